"""A session's checkpoints: when one is due (:class:`CheckpointPolicy`), the state copy on the
caller's thread, the encode and write on the background writer's (:class:`CheckpointWriter`:
one thread, at most one pending checkpoint per session, a failed write never fails a turn) or
inline, and the manifests a resume reads back.

:class:`Checkpointer` is what a :class:`runtime.session.Session` needs of them; the chunk store
(:class:`ChunkCheckpointer`) is the one implementation. A session holds one, injected by its
pool, and never reaches into the store behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from runtime.chunks import ChunkStore, Manifest, PendingCheckpoint
from runtime.errors import ArgumentError, ClosedError

if TYPE_CHECKING:
    from llamaffi import Context
    from runtime.session.window import Window

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a resident session is checkpointed (always also on suspend and close).

    Attributes:
        every_tokens: after this many new tokens since the last checkpoint (0: never by count).
        every_seconds: after this many seconds since the last checkpoint, at the end of the next
            turn (0: never by time).
        idle_seconds: a session with unsaved tokens that has been idle this long is
            checkpointed by the runtime's idle sweeper (0: off). This is what makes the usual
            crash (a process killed while its sessions wait for their next message) resume
            from a snapshot with nothing to replay.
        background: hand the write to the writer thread (``False``: write inline, as tests of
            the synchronous path do).

    The defaults (256 tokens, 60 s, 2 s idle) keep checkpoints off the hot path of a busy
    session, while a session that pauses is saved within seconds: a crash replays at most
    the turns of the last couple of seconds, or 256 tokens.
    """

    every_tokens: int = 256
    every_seconds: float = 60.0
    idle_seconds: float = 2.0
    background: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.every_tokens, bool) or not isinstance(self.every_tokens, int):
            raise ArgumentError(f"every_tokens must be an int, got {self.every_tokens!r}")
        if self.every_tokens < 0 or not self.every_seconds >= 0 or not self.idle_seconds >= 0:
            raise ArgumentError("every_tokens, every_seconds and idle_seconds must be >= 0")

    @classmethod
    def every_turn(cls) -> CheckpointPolicy:
        """Checkpoint after every turn (the most replay-free, and the most I/O)."""
        return cls(every_tokens=1, every_seconds=0.0, idle_seconds=0.0)

    def due(self, new_tokens: int, since_s: float) -> bool:
        """Whether a checkpoint is due after ``new_tokens`` tokens and ``since_s`` seconds."""
        if new_tokens <= 0:
            return False
        if self.every_tokens and new_tokens >= self.every_tokens:
            return True
        return bool(self.every_seconds and since_s >= self.every_seconds)


Job = Callable[[], Any]


def _cancel(job: Job) -> None:
    """Tell a job that will never run (replaced, discarded) to release what it holds."""
    cancel = getattr(job, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:  # releasing a pin must not fail the caller
            logger.exception("cancelling a checkpoint job failed")


@dataclass
class WriterStats:
    """What the writer did since it started."""

    written: int = 0
    failed: int = 0
    replaced: int = 0
    last_write_s: float = 0.0
    last_error: str = ""
    total_write_s: float = 0.0
    pending: int = 0
    last_finished: float = field(default=0.0)


class CheckpointWriter:
    """One background thread that runs checkpoint jobs, newest per session only.

    A job is a callable that encodes and writes one checkpoint (it must not touch a llama.cpp
    context); it may have a ``cancel()`` method, called when it is replaced or discarded
    without running. :meth:`submit` never blocks on I/O.
    """

    def __init__(self, *, name: str = "runtime-checkpoint-writer") -> None:
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, Job] = OrderedDict()
        self._running: str | None = None
        self._closed = False
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: str, job: Job) -> None:
        """Queue ``job`` for ``key`` (a session id), replacing a pending one of the same key."""
        with self._cond:
            if self._closed:
                raise ClosedError("the checkpoint writer is closed")
            old = self._pending.pop(key, None)
            if old is not None:
                self.stats.replaced += 1
                _cancel(old)
            self._pending[key] = job
            self.stats.pending = len(self._pending)
            self._cond.notify_all()

    def discard(self, key: str) -> bool:
        """Drop ``key``'s pending job (if it has not started); True if one was dropped."""
        with self._cond:
            job = self._pending.pop(key, None)
            self.stats.pending = len(self._pending)
        if job is not None:
            _cancel(job)
        return job is not None

    def busy(self, key: str) -> bool:
        """Whether ``key`` has a job pending or running."""
        with self._cond:
            return key in self._pending or self._running == key

    def flush(self, key: str | None = None, timeout: float | None = None) -> bool:
        """Wait until ``key``'s job (or every job) is written; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if key is None:
                    idle = not self._pending and self._running is None
                else:
                    idle = key not in self._pending and self._running != key
                if idle:
                    return True
                if not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:  # closed and drained
                    return
                key, job = self._pending.popitem(last=False)
                self._running = key
                self.stats.pending = len(self._pending)
            start = time.perf_counter()
            try:
                job()
            except Exception as exc:
                # A checkpoint is a cache of the journal: its loss costs replay time, not data.
                with self._cond:
                    self.stats.failed += 1
                    self.stats.last_error = f"{key}: {exc}"
                logger.warning("checkpoint of session %s failed: %s", key, exc)
            else:
                elapsed = time.perf_counter() - start
                with self._cond:
                    self.stats.written += 1
                    self.stats.last_write_s = elapsed
                    self.stats.total_write_s += elapsed
            finally:
                with self._cond:
                    self._running = None
                    self.stats.last_finished = time.time()
                    self._cond.notify_all()

    def close(self, *, flush: bool = True, timeout: float | None = 60.0) -> None:
        """Stop the thread; with ``flush`` (default) the pending jobs are written first."""
        with self._cond:
            if self._closed:
                return
            if not flush:
                for job in self._pending.values():
                    _cancel(job)
                self._pending.clear()
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("checkpoint writer still busy after %.0f s; leaving it", timeout or 0)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed


class Checkpointer(Protocol):
    """Checkpoints of one session's KV sequence.

    A checkpoint is only a cache of the journal: losing one costs replay time, never data, so
    :meth:`take` never fails a turn. Manifests come back newest first; :meth:`restore` leaves
    the target sequence empty when it fails.
    """

    session_id: str
    #: checkpoints that could not be written (the turns themselves were safe in the journal)
    failures: int

    @property
    def unsaved_turns(self) -> int:
        """Turns added since the last checkpoint."""
        ...

    @property
    def unsaved_tokens(self) -> int:
        """Tokens added since the last checkpoint (what a crash now would replay)."""
        ...

    def count(self, n_tokens: int) -> None:
        """One more turn of ``n_tokens`` tokens is in the KV and not checkpointed yet."""

    def due(self) -> bool:
        """Whether the policy wants a checkpoint now."""
        ...

    def reset(self, unsaved_tokens: int = 0) -> None:
        """Start counting afresh (after a checkpoint, or a resume that replayed tokens)."""

    def take(self, ctx: Context, seq_id: int, window: Window, journal_seq: int) -> None:
        """Checkpoint now, never failing: the copy here, the write on the writer."""

    def take_now(self, ctx: Context, seq_id: int, window: Window, journal_seq: int) -> object:
        """Checkpoint now and wait until it is durable; return what was written."""
        ...

    def manifests(self) -> list[Manifest]:
        """The readable checkpoints, newest first (read once, until :meth:`forget`)."""
        ...

    def require_reachable(self) -> None:
        """Raise :class:`runtime.errors.PersistError` when a checkpoint exists that the store
        cannot reach now (a resume with nothing else to rebuild from must say "retry")."""

    def forget(self) -> None:
        """Read the manifests again next time (the store moved on)."""

    def restore(
        self, ctx: Context, manifest: Manifest, seq_id: int, *, allow_build_mismatch: bool
    ) -> None:
        """Rebuild ``seq_id`` from ``manifest`` (ChunkError, IncompatibleSnapshotError or
        RestoreError with the sequence left empty)."""

    def describe(self, generation: int) -> str:
        """Where checkpoint ``generation`` lives (a path or URL, for reports)."""
        ...

    def journal_needs(self, journal_len: int) -> tuple[int, set[int]] | None:
        """What a resume can still need of a journal of ``journal_len`` entries:
        ``(from_seq, window entries)``, or None when it may need all of it."""
        ...

    def flush(self) -> None:
        """Wait until every queued checkpoint of the session is written."""

    def delete(self) -> None:
        """Drop queued checkpoints and delete the stored ones."""


class ChunkCheckpointer:
    """One session's checkpoints in a :class:`runtime.chunks.ChunkStore`.

    Args:
        store: the chunk store (shared by every session of a pool).
        session_id: the session.
        scratch_seq: the empty sequence the store copies ranges through.
        writer: the background writer that encodes and writes checkpoints (only the state
            copy stays on the calling thread); ``None`` writes inline.
        policy: when a checkpoint is due; default every turn.
    """

    def __init__(
        self,
        store: ChunkStore,
        session_id: str,
        *,
        scratch_seq: int,
        writer: CheckpointWriter | None = None,
        policy: CheckpointPolicy | None = None,
    ) -> None:
        if scratch_seq < 0:
            raise ArgumentError("chunked checkpoints need a scratch sequence of the context")
        self.store = store
        self.session_id = session_id
        self.scratch_seq = scratch_seq
        self.writer = writer
        self.policy = policy if policy is not None else CheckpointPolicy.every_turn()
        self.failures = 0
        self._turns = 0
        self._tokens = 0
        self._last = time.monotonic()
        self._manifests: list[Manifest] | None = None

    # -- when ----------------------------------------------------------------------------------

    @property
    def unsaved_turns(self) -> int:
        """Turns added since the last checkpoint."""
        return self._turns

    @property
    def unsaved_tokens(self) -> int:
        """Tokens added since the last checkpoint (what a crash now would replay)."""
        return self._tokens

    def count(self, n_tokens: int) -> None:
        """One more turn of ``n_tokens`` tokens is in the KV and not checkpointed yet."""
        self._turns += 1
        self._tokens += n_tokens

    def due(self) -> bool:
        """Whether the policy wants a checkpoint now."""
        return self.policy.due(self._tokens, time.monotonic() - self._last)

    def reset(self, unsaved_tokens: int = 0) -> None:
        """Start counting afresh; ``unsaved_tokens`` were added (replayed) since the last
        checkpoint and count as one turn."""
        self._turns = 1 if unsaved_tokens else 0
        self._tokens = unsaved_tokens
        self._last = time.monotonic()

    # -- writing -------------------------------------------------------------------------------

    def _plan(self, ctx: Context, seq_id: int, window: Window, journal_seq: int) -> _ChunkJob:
        """Copy the chunks the store does not hold yet out of the context (caller thread);
        return the job that writes them (any thread: it never touches the context)."""
        pending = self.store.plan_capture(
            ctx,
            seq_id,
            window.tokens,
            scratch_seq=self.scratch_seq,
            session_id=self.session_id,
            journal_seq=journal_seq,
            lineage=window.lineage,
            meta={"window": window.record()},
        )
        return _ChunkJob(self.store, pending)

    def take(self, ctx: Context, seq_id: int, window: Window, journal_seq: int) -> None:
        """Checkpoint now, but never fail a turn that is already safe in the journal.

        With a background writer only the state copy happens here; the rest is queued.
        """
        try:
            if self.writer is not None and not self.writer.closed:
                self.writer.submit(self.session_id, self._plan(ctx, seq_id, window, journal_seq))
                self.reset()
            else:
                self.take_now(ctx, seq_id, window, journal_seq)
        except Exception as exc:
            # The checkpoint is only a cache of the journal: a failure (e.g. ENOSPC) costs a
            # slower resume, not data. It is retried after the next turn.
            self.failures += 1
            logger.warning("session %s: checkpoint failed (%s); will retry", self.session_id, exc)

    def take_now(self, ctx: Context, seq_id: int, window: Window, journal_seq: int) -> object:
        """Checkpoint now and wait for it; returns the manifest.

        With a background writer, anything queued for the session is dropped and a write in
        progress waited for first, so that this one is the newest.
        """
        job = self._plan(ctx, seq_id, window, journal_seq)
        if self.writer is not None and not self.writer.closed:
            self.writer.discard(self.session_id)
            self.writer.flush(self.session_id)
        written = job()
        self.reset()
        return written

    def flush(self) -> None:
        """Wait until every queued checkpoint of the session is written."""
        if self.writer is not None:
            self.writer.flush(self.session_id)

    def delete(self) -> None:
        """Drop queued checkpoints, then delete the stored ones and their chunks."""
        if self.writer is not None:
            self.writer.discard(self.session_id)
            self.writer.flush(self.session_id)
        self.store.delete_session(self.session_id)
        self._manifests = None

    # -- reading -------------------------------------------------------------------------------

    def manifests(self) -> list[Manifest]:
        """The readable manifests, newest first, read once for the window and the next
        resume."""
        if self._manifests is None:
            self._manifests = self.store.manifests(self.session_id)
        return self._manifests

    def require_reachable(self) -> None:
        """See :meth:`Checkpointer.require_reachable`."""
        self.store.manifests(self.session_id, strict=True)

    def forget(self) -> None:
        """Read the manifests again next time (the store moved on)."""
        self._manifests = None

    def restore(
        self, ctx: Context, manifest: Manifest, seq_id: int, *, allow_build_mismatch: bool
    ) -> None:
        """Rebuild ``seq_id`` from ``manifest`` through the scratch sequence."""
        self.store.restore(
            ctx,
            manifest,
            seq_id,
            scratch_seq=self.scratch_seq,
            allow_build_mismatch=allow_build_mismatch,
        )

    def describe(self, generation: int) -> str:
        """The manifest's path (or URL) in the chunk store."""
        return self.store.blobs.describe_manifest(self.session_id, generation)

    def journal_needs(self, journal_len: int) -> tuple[int, set[int]] | None:
        """What a resume can still need of a journal of ``journal_len`` entries: every entry
        from ``from_seq`` on, and the entries of each kept checkpoint's window (``(from_seq,
        window entries)``). None when any kept checkpoint does not record its window, or when
        there is none: then a resume may need a full replay, and nothing may be compacted."""
        manifests = self.store.manifests(self.session_id)
        if not manifests:
            return None
        from_seq = journal_len
        window: set[int] = set()
        for man in manifests:
            record = man.meta.get("window")
            spans = record.get("spans") if isinstance(record, dict) else None
            if not isinstance(spans, list):
                return None
            window.update(int(span[2]) for span in spans)
            from_seq = min(from_seq, man.journal_seq + 1)
        return from_seq, window


class _ChunkJob:
    """A planned chunked checkpoint: run it to commit, cancel it to release its pins."""

    def __init__(self, store: ChunkStore, pending: PendingCheckpoint) -> None:
        self.store = store
        self.pending = pending

    def __call__(self) -> Manifest:
        return self.store.commit(self.pending)

    def cancel(self) -> None:
        self.store.discard(self.pending)
