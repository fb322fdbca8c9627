"""Rebuilding a session's KV sequence: the newest checkpoint that checks out against the
journal, then the journal's later entries. Its cost follows what it replays."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from runtime import snapshot as snapshot_mod
from runtime.chunks import ChunkError, Manifest
from runtime.errors import ContextFullError, SessionError
from runtime.session.base import (
    SNAPSHOT_ID_PREFIX,
    WINDOW_ROLE,
    ResumeReport,
    _journal_seq_of,
    _SessionCore,
)
from runtime.session.window import _Window, window_after, window_from_manifest

logger = logging.getLogger(__name__)


class _ResumeMixin(_SessionCore):
    """:meth:`resume` and the window a session opens with (part of ``Session``)."""

    def _chunk_manifests(self) -> list[Manifest]:
        if self._chunks is None:
            return []
        if self._manifests is None:
            self._manifests = self._chunks.manifests(self.session_id)
        return self._manifests

    def _initial_window(self) -> _Window:
        """The window now: the newest checkpoint's window plus the entries after it, so that
        opening a session costs what was said since its last checkpoint, not its age. With no
        checkpoint that records its window (or none that checks out), the whole journal."""
        for man in self._chunk_manifests():
            base = window_from_manifest(self.journal, man)
            if base is not None:
                for entry in self.journal.iter_from(man.journal_seq + 1):
                    base.apply(entry)
                return base
        if self.journal.compacted:
            # retention removed old entries: the window is only known from a checkpoint
            raise SessionError(
                f"session {self.session_id!r}: journal retention removed old entries and no "
                "checkpoint's window checks out against the rest"
            )
        window = _Window()
        for entry in self.journal:
            window.apply(entry)
        return window

    def resume(
        self, *, seq_id: int | None = None, allow_build_mismatch: bool = False
    ) -> ResumeReport:
        """Rebuild the KV sequence from the newest valid snapshot plus the journal.

        ``seq_id`` binds the session to that sequence first (a pool hands out a free one when
        it resumes a session); by default the session keeps its own.
        """
        if seq_id is not None:
            if not 0 <= seq_id < self.ctx.n_seq_max:
                raise SessionError(f"seq_id must be in [0, {self.ctx.n_seq_max}), got {seq_id}")
            self.seq_id = seq_id
        start = time.perf_counter()
        truth = self._window.tokens
        if len(truth) > self.ctx.n_ctx:
            raise ContextFullError(
                f"session {self.session_id!r} holds {len(truth)} tokens, more than "
                f"n_ctx={self.ctx.n_ctx}: open it with a larger context"
            )
        self.ctx.memory.seq_rm(self.seq_id)
        skipped: list[str] = []
        after, restored, path, base = self._restore_best(skipped, allow_build_mismatch)
        self._manifests = None  # read again at the next resume: the store moves on
        replayed = self._replay(after, base)
        if path is None and after >= 0:  # re-prefilled from a window record: not a checkpoint
            replayed += len(base.tokens)
        self._resident = True
        self._since_snapshot = 1 if replayed else 0
        self._new_tokens = replayed
        self._last_checkpoint = time.monotonic()
        source: Literal["snapshot", "journal", "empty"]
        source = "snapshot" if path else ("journal" if truth else "empty")
        report = ResumeReport(
            source=source,
            n_tokens=len(truth),
            restored_tokens=restored,
            replayed_tokens=replayed,
            seconds=time.perf_counter() - start,
            snapshot=path,
            skipped=skipped,
        )
        logger.info(
            "session %s resumed from %s: %d restored + %d replayed tokens in %.3f s",
            self.session_id,
            source,
            restored,
            replayed,
            report.seconds,
        )
        return report

    def _replay(self, after: int, base: _Window) -> int:
        """Repeat the journal's entries after entry ``after`` on the KV, one entry per call;
        ``base`` is the window after entry ``after`` (it is not changed).

        This repeats exactly what :meth:`append` (and window shifts) first did, so user turns
        come back bit for bit; a reply, first decoded token by token, comes back equal up to
        float rounding (batched vs incremental evaluation).
        """
        window = base.copy()
        replayed = 0
        for entry in self.journal.iter_from(after + 1):
            window.apply(entry)
            if entry.role == WINDOW_ROLE:
                a, b = (int(x) for x in entry.meta["drop"])
                self._apply_drop(a, b)
            elif entry.tokens:
                self._decode(entry.tokens, pos=len(window.tokens) - len(entry.tokens))
                replayed += len(entry.tokens)
        return replayed

    def _entry_of(self, tokens: list[int], claimed: int | None) -> int | None:
        """The journal entry after which the window held exactly ``tokens``, or None.

        ``claimed`` is the entry the snapshot says it follows (from its id); it is checked,
        never trusted. Without one (a snapshot made elsewhere), the last matching entry is
        taken: with repeated identical turns around a shift that guess can be wrong.
        """
        window = _Window()
        found = -1 if not tokens and claimed in (None, -1) else None
        for entry in self.journal:
            window.apply(entry)
            if claimed is not None and entry.seq != claimed:
                continue
            if len(window.tokens) == len(tokens) and window.tokens == tokens:
                found = entry.seq
        return found

    def _restore_best(
        self, skipped: list[str], allow_build_mismatch: bool
    ) -> tuple[int, int, Path | None, _Window]:
        """Restore the newest usable checkpoint; return (its journal entry, tokens, file, the
        window after that entry)."""
        if self._chunks is not None:
            found = self._restore_chunks(skipped, allow_build_mismatch)
            if found is not None:
                return found
        if self.journal.compacted:
            # a whole-sequence snapshot is checked by walking the journal from its start,
            # which retention has cut: the checkpointed window is the way back
            return self._reprefill_window(skipped)
        # Each failed candidate is quarantined, so latest_valid moves on to an older one;
        # the number of files bounds the attempts.
        for _attempt in range(len(self.store.generations(self.session_id))):
            stored = self.store.latest_valid(self.session_id)
            if stored is None:
                break
            snap = stored.snapshot
            tokens = list(snap.tokens)
            try:
                owner = snap.header.session_id
                if owner and owner != self.session_id:
                    raise snapshot_mod.SnapshotError(f"it belongs to session {owner!r}")
                claimed = snap.header.journal_seq  # format v2; v1 files say it in their id
                if claimed is None:
                    claimed = _journal_seq_of(snap.header.snapshot_id)
                after = self._entry_of(tokens, claimed)
                if after is None:
                    raise snapshot_mod.SnapshotError(
                        "its tokens are not a prefix of the journal (at any entry)"
                    )
                base = window_after(self.journal, after)
                self._room_for_replay(after, base)
                snapshot_mod.restore(
                    self.ctx, snap, self.seq_id, allow_build_mismatch=allow_build_mismatch
                )
            except (snapshot_mod.IncompatibleSnapshot, snapshot_mod.RestoreError) as exc:
                # Another model or cache layout, or llama.cpp could not take it now (e.g. the
                # cache is short of cells): the file may be fine, so it stays; the journal
                # rebuilds the sequence instead.
                skipped.append(f"{stored.path.name}: {exc}")
                break
            except snapshot_mod.SnapshotError as exc:
                skipped.append(f"{stored.path.name}: {exc}")
                if self.store.readonly:
                    break
                self.store.quarantine(stored.path, str(exc))
                continue
            self._last_snapshot_id = snap.header.snapshot_id
            return after, len(tokens), stored.path, base
        if self.journal.compacted:
            return self._reprefill_window(skipped)
        # resume() emptied the sequence, and a failed restore clears it again
        empty = _Window()
        self._room_for_replay(-1, empty)
        return -1, 0, None, empty

    def _reprefill_window(self, skipped: list[str]) -> tuple[int, int, Path | None, _Window]:
        """No checkpoint restores, and journal retention removed the entries a full replay
        would need: decode the newest checkpointed window's tokens afresh (its record checks
        out against the journal even when its KV chunks are gone), then replay what followed.

        The KV differs from the lost one only in what the shifted-out turns contributed; it is
        a fresh prefill, so its lineage is empty (chunk keys then equal any fresh prefill's).
        """
        for man in self._chunk_manifests():
            base = window_from_manifest(self.journal, man)
            if base is None:
                continue
            base.lineage = ()
            self._room_for_replay(man.journal_seq, base)
            if base.tokens:
                self._decode(base.tokens, pos=0)
            window = base.copy()
            for entry in self.journal.iter_from(man.journal_seq + 1):
                window.apply(entry)
            self._window = window
            skipped.append(
                "old journal entries were removed by retention: re-prefilled the "
                f"{len(base.tokens)}-token window of manifest {man.generation}"
            )
            logger.warning("session %s: %s", self.session_id, skipped[-1])
            return man.journal_seq, 0, None, base
        raise SessionError(
            f"session {self.session_id!r} cannot be rebuilt: journal retention removed old "
            "entries and no checkpoint of its window is readable (its long-term memories "
            "remain)"
        )

    def _restore_chunks(
        self, skipped: list[str], allow_build_mismatch: bool
    ) -> tuple[int, int, Path | None, _Window] | None:
        """Restore the newest chunked manifest that matches the journal and restores."""
        assert self._chunks is not None
        for man in self._chunk_manifests():
            name = f"manifest {man.generation}"
            tokens = list(man.tokens)
            base = window_from_manifest(self.journal, man)
            if base is not None:
                after: int | None = man.journal_seq
            else:  # a manifest that does not record its window: check it the slow way
                after = self._entry_of(tokens, man.journal_seq)
                base = window_after(self.journal, after) if after is not None else None
            if after is None or base is None or man.lineage != base.lineage:
                skipped.append(
                    f"{name}: its tokens are not the window after journal entry {man.journal_seq}"
                )
                continue
            self._room_for_replay(after, base)
            try:
                self._chunks.restore(
                    self.ctx,
                    man,
                    self.seq_id,
                    scratch_seq=self._scratch,
                    allow_build_mismatch=allow_build_mismatch,
                )
            except ChunkError as exc:  # missing or damaged chunk (quarantined): an older one
                skipped.append(f"{name}: {exc}")
                continue
            except (snapshot_mod.IncompatibleSnapshot, snapshot_mod.RestoreError) as exc:
                skipped.append(f"{name}: {exc}")
                return None
            self._last_snapshot_id = f"{SNAPSHOT_ID_PREFIX}{man.journal_seq}"
            return after, len(tokens), self._chunks.manifest_dir / self.session_id, base
        return None

    def _room_for_replay(self, after: int, base: _Window) -> None:
        """Ask the pool for the most cells the replay after entry ``after`` will hold
        (``base`` is the window after entry ``after``).

        Before a journalled window shift the sequence was longer than it ends up, so the peak,
        not the final window, must fit while the shift is repeated.
        """
        if self._make_room is None:
            return
        window = base.copy()
        peak = len(window.tokens)
        for entry in self.journal.iter_from(after + 1):
            window.apply(entry)
            peak = max(peak, len(window.tokens))
        self._make_room(self, peak)
