"""Checkpoints off the hot path: when to take one (:class:`CheckpointPolicy`) and the
background thread that writes them (:class:`CheckpointWriter`).

A turn only copies its sequence's KV state out of llama.cpp (``llama_state_seq_get_data``,
one memcpy-speed copy on the calling thread, which owns the context). Compression, digests,
the write and the fsync happen on one writer thread that never touches the context.

Memory stays bounded: the writer holds at most one pending checkpoint per session. A newer one
replaces an older one that has not started yet (the older is simply dropped: the journal is
the truth, so a lost checkpoint only means the next resume replays a few more turns). A turn
never waits for a write, and a write that fails never fails a turn; it is logged and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import ArgumentError, ClosedError

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
