"""Checkpoints of a session: the state copy on the caller's thread, the encode and write on
the background writer's (or inline)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from runtime import snapshot as snapshot_mod
from runtime.chunks import ChunkStore, PendingCheckpoint

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


from runtime.errors import SessionError
from runtime.session.base import (
    SNAPSHOT_ID_PREFIX,
    _SessionCore,
)

logger = logging.getLogger(__name__)


class _CaptureMixin(_SessionCore):
    """Checkpointing (part of ``Session``)."""

    def checkpoint_if_idle(self, idle_seconds: float) -> bool:
        """Checkpoint (never failing) if tokens are unsaved and the session has been idle for
        ``idle_seconds``; True if one was taken."""
        if not self._resident or self.journal.closed or not self._since_snapshot:
            return False
        if time.monotonic() - self.last_active < idle_seconds:
            return False
        self._try_checkpoint()
        return True

    @property
    def shift_pending(self) -> bool:
        """Whether a window shift waits for the next decode (no checkpoint until then)."""
        return self._shift_pending

    @property
    def pending_tokens(self) -> int:
        """Tokens added since the last checkpoint (what a crash now would replay)."""
        return self._new_tokens

    def _try_checkpoint(self) -> None:
        """Snapshot now, but never fail a turn that is already safe in the journal.

        With a background writer only the state copy happens here; the rest is queued.
        """
        if self._shift_pending:
            logger.debug("session %s: shift not applied yet; checkpoint deferred", self.session_id)
            return
        try:
            if self._writer is not None and not self._writer.closed:
                self._writer.submit(self.session_id, self._capture_job())
                self._since_snapshot = 0
                self._new_tokens = 0
                self._last_checkpoint = time.monotonic()
            else:
                self.checkpoint()
        except Exception as exc:
            # The snapshot is only a cache of the journal: a failure (e.g. ENOSPC) costs a
            # slower resume, not data. It is retried after the next turn.
            self.snapshot_failures += 1
            logger.warning("session %s: snapshot failed (%s); will retry", self.session_id, exc)

    def _capture_job(self) -> Callable[[], object]:
        """Copy the sequence's state out now (caller thread); return the job that encodes and
        writes it (any thread: it never touches the context)."""
        self._require_resident()
        if self._shift_pending:
            raise SessionError(
                f"session {self.session_id!r}: a window shift is not applied until the next "
                "decode; checkpoint after it"
            )
        ctx, seq_id = self.ctx, self.seq_id
        last = self.journal[-1].seq if len(self.journal) else -1
        if self._chunks is not None:
            pending = self._chunks.plan_capture(
                ctx,
                seq_id,
                self._window.tokens,
                scratch_seq=self._scratch,
                session_id=self.session_id,
                journal_seq=last,
                lineage=self._window.lineage,
                meta={"window": self._window.record()},
            )
            self._last_snapshot_id = f"{SNAPSHOT_ID_PREFIX}{last}"
            return _ChunkJob(self._chunks, pending)
        identity = snapshot_mod.CacheIdentity.from_context(ctx)
        pos_min, pos_max = snapshot_mod.seq_positions(ctx, seq_id)
        raw: npt.NDArray[np.uint8] = ctx.seq_state_get(seq_id)
        tokens = tuple(self._window.tokens)
        snapshot_id = f"{SNAPSHOT_ID_PREFIX}{last}-{secrets.token_hex(6)}"
        parent_id, n_ctx = self._last_snapshot_id, ctx.n_ctx
        session_id, store = self.session_id, self.store
        self._last_snapshot_id = snapshot_id

        def job() -> Path:
            snap = snapshot_mod.encode(
                raw,
                identity=identity,
                tokens=tokens,
                seq_id=seq_id,
                pos_min=pos_min,
                pos_max=pos_max,
                n_ctx=n_ctx,
                session_id=session_id,
                parent_id=parent_id,
                snapshot_id=snapshot_id,
                journal_seq=last,
            )
            return store.save(session_id, snap)

        return job

    def checkpoint(self) -> object:
        """Capture the KV sequence into the store now and wait for it; returns the file.

        With a background writer the write still happens there (one writer per store), and
        this waits for it.
        """
        self._require_resident()
        if self._shift_pending:
            raise SessionError(
                f"session {self.session_id!r}: a window shift is not applied until the next "
                "decode; checkpoint after it"
            )
        if self._writer is not None and not self._writer.closed:
            # one writer per store: the write still happens there, after anything queued
            job = self._capture_job()
            self._writer.discard(self.session_id)
            self._writer.flush(self.session_id)
            path = job()
        else:
            path = self._capture_job()()
        self._since_snapshot = 0
        self._new_tokens = 0
        self._last_checkpoint = time.monotonic()
        return path

    def journal_needs(self) -> tuple[int, set[int]] | None:
        """What a resume can still need of the journal: every entry from ``from_seq`` on, and
        the entries of each kept checkpoint's window (``(from_seq, window entries)``). None
        when any kept checkpoint does not record its window, or when there is no chunked
        checkpoint: then a resume may need a full replay, and nothing may be compacted."""
        if self._chunks is None:
            return None
        manifests = self._chunks.manifests(self.session_id)
        if not manifests:
            return None
        from_seq = len(self.journal)
        window: set[int] = set()
        for man in manifests:
            record = man.meta.get("window")
            spans = record.get("spans") if isinstance(record, dict) else None
            if not isinstance(spans, list):
                return None
            window.update(int(span[2]) for span in spans)
            from_seq = min(from_seq, man.journal_seq + 1)
        return from_seq, window

    def compact_journal(self, keep_from: int) -> int:
        """Delete the journal's sealed segments that a resume no longer needs
        (:meth:`journal_needs`) and that hold only entries older than ``keep_from`` (long-term
        memory's ingestion mark + 1); return the bytes freed. This is the opt-in retention
        policy: the history it removes lives on only in long-term memory."""
        if self.journal.closed or self.journal.n_segments == 0:
            return 0
        needs = self.journal_needs()
        if needs is None:
            return 0
        from_seq, window = needs
        return self.journal.drop_segments_before(min(keep_from, from_seq), keep=window)


class _ChunkJob:
    """A planned chunked checkpoint: run it to commit, cancel it to release its pins."""

    def __init__(self, store: ChunkStore, pending: PendingCheckpoint) -> None:
        self.store = store
        self.pending = pending

    def __call__(self) -> object:
        return self.store.commit(self.pending)

    def cancel(self) -> None:
        self.store.discard(self.pending)
