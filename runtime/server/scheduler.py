"""A bounded, fair queue in front of the runtime: up to ``slots`` jobs at once, one per key,
waiters served round-robin by key.

The runtime batches the replies of the sessions generating together (continuous batching),
so the server runs as many turns at once as the runtime has sequences (``max_resident``),
but never two of one session: its turns are ordered. Each waiting request holds a ticket
under its key (the session id); when a job ends, the next tickets come from the keys that
have waited longest since they were last served, so one busy session cannot starve the
others. Past ``max_waiting`` tickets, :meth:`acquire` refuses at once (the server answers
503 with ``Retry-After``).

Everything here runs on the event loop; the jobs themselves run in worker threads.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

from runtime.errors import ArgumentError, MemoryRuntimeError

T = TypeVar("T")


class QueueFullError(MemoryRuntimeError):
    """More requests are waiting than the queue admits."""


class FairQueue:
    """Up to ``slots`` holders at a time, at most one per key; waiters served round-robin
    between keys, FIFO within a key."""

    def __init__(self, max_waiting: int, slots: int = 1) -> None:
        if max_waiting < 0:
            raise ArgumentError("max_waiting must be >= 0")
        if slots < 1:
            raise ArgumentError("slots must be >= 1")
        self.max_waiting = max_waiting
        self.slots = slots
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._n_waiting = 0
        self._running: set[str] = set()
        self.served = 0

    @property
    def waiting(self) -> int:
        """Tickets waiting (not counting the running jobs)."""
        return self._n_waiting

    @property
    def running(self) -> int:
        """Jobs holding the queue now."""
        return len(self._running)

    @property
    def busy(self) -> bool:
        """Whether a job holds the queue."""
        return bool(self._running)

    async def acquire(self, key: str) -> None:
        """Wait for the turn of ``key``; raises :class:`QueueFullError` when the queue is full."""
        # a free slot goes to a new key at once: whoever waits, waits for its own key's turn
        # (release hands a freed slot to the waiting keys first)
        free = len(self._running) < self.slots
        if free and key not in self._running and key not in self._waiting:
            self._running.add(key)
            return
        if self._n_waiting >= self.max_waiting:
            raise QueueFullError(f"{self._n_waiting} requests are waiting")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(fut)
        self._n_waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(key)  # granted just as we were cancelled: pass the turn on
            else:
                self._remove(key, fut)
            raise

    def _remove(self, key: str, fut: asyncio.Future[None]) -> None:
        queue = self._waiting.get(key)
        if queue is not None and fut in queue:
            queue.remove(fut)
            self._n_waiting -= 1
            if not queue:
                del self._waiting[key]

    def release(self, key: str) -> None:
        """End the job of ``key`` and hand its slot to the next keys in line."""
        self._running.discard(key)
        self.served += 1
        for waiting in list(self._waiting):
            if len(self._running) >= self.slots:
                return
            if waiting in self._running:
                continue  # that session's turn is running: its next one waits for it
            queue = self._waiting[waiting]
            while queue:
                fut = queue.popleft()
                self._n_waiting -= 1
                if not fut.done():
                    fut.set_result(None)
                    self._running.add(waiting)
                    break
            if queue:
                self._waiting.move_to_end(waiting)  # the other keys go first
            else:
                del self._waiting[waiting]

    def start(self, key: str, fn: Callable[[], T]) -> asyncio.Task[T]:
        """Run ``fn`` in a worker thread as the job of ``key``; its slot passes on when it
        ends.

        Call after :meth:`acquire`. The task is independent of the request that started it:
        a client that goes away cancels the job through its own flag, not by cancelling this
        task, so the context is never left mid-call and the slot is always released.
        """

        async def job() -> T:
            try:
                return await run_in_threadpool(fn)
            finally:
                self.release(key)

        return asyncio.get_running_loop().create_task(job())

    async def run(self, key: str, fn: Callable[[], T]) -> T:
        """:meth:`acquire`, then :meth:`start` and wait for the result."""
        await self.acquire(key)
        task = self.start(key, fn)
        return await asyncio.shield(task)
