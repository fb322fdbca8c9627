"""Background upkeep: :class:`Retention` (the opt-in journal compaction) and
:class:`Housekeeper`, the thread that checkpoints idle sessions, suspends long-idle ones,
applies retention and publishes the stats file.

The thread takes the runtime's lock like any call, so it never runs inside a turn; it only
copies state (the checkpoint write goes to the background writer). Its owner starts it and
joins it in :meth:`Housekeeper.close`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from runtime.app.batching import RuntimeLock
from runtime.app.recall import Recall
from runtime.errors import MemoryRuntimeError
from runtime.longterm.distill import AskBudget
from runtime.session import Session, SessionPool

__all__ = ["Housekeeper", "Retention"]

logger = logging.getLogger(__name__)


class Retention:
    """``journal_retention="window"``: delete sealed journal segments that no kept checkpoint
    needs and long-term memory has durably ingested (``"all"``: never)."""

    def __init__(self, mode: str, recall: Recall) -> None:
        self.mode = mode
        self._recall = recall
        self._compacted_at: dict[str, int] = {}  # sid -> sealed segments at the last try
        #: journal bytes deleted since open
        self.bytes_compacted = 0

    def compact(self, session: Session, *, force: bool = False) -> int:
        """Apply retention to a resident session whose journal sealed a segment since the last
        try (``force``: try again anyway); returns the bytes freed. Bounded by what long-term
        memory has durably ingested (the watermark on disk, not the one in memory: the next
        process starts from that)."""
        if self.mode != "window" or session.journal.closed:
            return 0
        sid = session.session_id
        if force:
            self._compacted_at.pop(sid, None)
        sealed = session.journal.n_segments
        if sealed < 2 or self._compacted_at.get(sid) == sealed:
            return 0
        self._compacted_at[sid] = sealed
        mark = self._recall.durable_mark(sid)
        keep_from = len(session.journal) if mark is None else mark + 1
        try:
            freed = session.compact_journal(keep_from)
        except (OSError, MemoryRuntimeError) as exc:
            logger.warning("session %s: journal compaction failed: %s", sid, exc)
            return 0
        if freed:
            self.bytes_compacted += freed
            logger.info("session %s: journal retention freed %d bytes", sid, freed)
        return freed

    def forget(self, session_id: str) -> None:
        """A session was deleted."""
        self._compacted_at.pop(session_id, None)


class Housekeeper:
    """The housekeeping thread.

    Args:
        lock: the runtime's lock (every tick runs under it).
        pool: the resident sessions.
        retention: journal retention.
        publish: writes the stats file (rate-limited by the callee).
        consolidate: the long-term memory's background work on one session (facts,
            summaries, the bound), given the tick's budget of questions to the model
            (shared by every session of the tick); a failure is logged and retried on the
            next tick.
        idle_checkpoint_s: checkpoint a session with unsaved tokens idle this long (0: off).
        idle_suspend_s: suspend a session idle this long (0: off).
        busy: whether a session is in a turn (generating between two steps): it is left
            alone until the turn ends.
        expire: deletes the sessions idle past their time to live (see
            :meth:`runtime.app.sessions.Sessions.expire`), called every ``expire_every_s``.
    """

    def __init__(
        self,
        lock: RuntimeLock,
        pool: SessionPool,
        retention: Retention,
        publish: Callable[[], None],
        *,
        consolidate: Callable[[Session, AskBudget], object],
        idle_checkpoint_s: float,
        idle_suspend_s: float,
        busy: Callable[[str], bool] = lambda _sid: False,
        expire: Callable[[], object] | None = None,
        expire_every_s: float = 60.0,
    ) -> None:
        self._lock = lock
        self._expire = expire
        self._expire_every = expire_every_s
        self._next_expiry = 0.0
        self._busy = busy
        self._pool = pool
        self._retention = retention
        self._publish = publish
        self._consolidate = consolidate
        self._idle = idle_checkpoint_s
        self._idle_suspend = idle_suspend_s
        period = min(1.0, self._idle / 2) if self._idle > 0 else 1.0
        if idle_suspend_s:
            period = min(period, max(0.05, idle_suspend_s / 2))
        if expire is not None:
            period = min(period, max(0.05, expire_every_s))
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runtime-housekeeping", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (it checks under the lock, so no tick starts after this
        returns while the caller holds the lock)."""
        self._stop.set()

    def close(self) -> None:
        """Stop the thread and wait for it. Call without holding the lock: a tick waiting for
        it must be able to see the stop and leave."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self.tick()
                except Exception:  # the thread must live on: the next tick tries again
                    logger.exception("housekeeping failed")

    def tick(self) -> None:
        """One round (the caller holds the lock)."""
        now = time.monotonic()
        budget = AskBudget()  # the lock is held: one tick asks the model a bounded number
        for session in self._pool.resident():
            if self._busy(session.session_id):
                continue
            try:
                self._consolidate(session, budget)
            except Exception as exc:  # durable in the journal: the next tick catches up
                logger.warning(
                    "session %s: memory consolidation failed: %s", session.session_id, exc
                )
            if self._idle_suspend and now - session.last_active >= self._idle_suspend:
                logger.info("session %s idle: suspending it", session.session_id)
                self._pool.suspend(session.session_id)
            else:
                if self._idle > 0:
                    session.checkpoint_if_idle(self._idle)
                self._retention.compact(session)
        if self._expire is not None and now >= self._next_expiry:
            self._next_expiry = now + self._expire_every
            try:
                self._expire()
            except Exception as exc:  # retried at the next sweep
                logger.warning("session expiry failed: %s", exc)
        self._publish()
