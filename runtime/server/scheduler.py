"""A bounded, fair queue in front of the runtime: one job at a time, round-robin by key.

The runtime serialises every context call on one lock; a plain lock would serve whichever
thread the OS wakes first, and an unbounded one would let a burst queue without limit. Here
each waiting request holds a ticket under its key (the session id); when the running job
ends, the next ticket comes from the key that has waited longest since it was last served,
so one busy session cannot starve the others. Past ``max_waiting`` tickets, :meth:`acquire`
refuses at once (the server answers 503 with ``Retry-After``).

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
    """One holder at a time; waiters served round-robin between keys, FIFO within a key."""

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ArgumentError("max_waiting must be >= 0")
        self.max_waiting = max_waiting
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._n_waiting = 0
        self._busy = False
        self.served = 0

    @property
    def waiting(self) -> int:
        """Tickets waiting (not counting the running job)."""
        return self._n_waiting

    @property
    def busy(self) -> bool:
        """Whether a job holds the queue."""
        return self._busy

    async def acquire(self, key: str) -> None:
        """Wait for the turn of ``key``; raises :class:`QueueFullError` when the queue is full."""
        if not self._busy and self._n_waiting == 0:
            self._busy = True
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
                self.release()  # granted just as we were cancelled: pass the turn on
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

    def release(self) -> None:
        """End the running job's turn and hand it to the next key in line."""
        self.served += 1
        while self._waiting:
            key, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            self._n_waiting -= 1
            if queue:
                self._waiting.move_to_end(key)  # the other keys go first
            else:
                del self._waiting[key]
            if not fut.done():
                fut.set_result(None)
                return
        self._busy = False

    def start(self, fn: Callable[[], T]) -> asyncio.Task[T]:
        """Run ``fn`` in a worker thread as the holder's job; the turn passes on when it ends.

        Call after :meth:`acquire`. The task is independent of the request that started it:
        a client that goes away cancels the job through its own flag, not by cancelling this
        task, so the context is never left mid-call and the turn is always released.
        """

        async def job() -> T:
            try:
                return await run_in_threadpool(fn)
            finally:
                self.release()

        return asyncio.get_running_loop().create_task(job())

    async def run(self, key: str, fn: Callable[[], T]) -> T:
        """:meth:`acquire`, then :meth:`start` and wait for the result."""
        await self.acquire(key)
        task = self.start(fn)
        return await asyncio.shield(task)
