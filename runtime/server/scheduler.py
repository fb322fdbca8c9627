"""A bounded, fair queue in front of the runtime: up to ``slots`` jobs at once, one per key,
waiters served round-robin by tenant, then by key.

The runtime batches the replies of the sessions generating together (continuous batching),
so the server runs as many turns at once as the runtime has sequences (``max_resident``),
but never two of one session: its turns are ordered. Each waiting request holds a ticket
under its tenant and key (the session id); when a job ends, the next ticket comes from the
tenant that has waited longest since it was last served, and within it from the key that
has, so one busy session cannot starve the others, and a tenant with many sessions (or one
that rotates session ids) cannot starve another tenant. Past ``max_waiting`` tickets, or
past ``tenant_share`` tickets of one tenant, :meth:`acquire` refuses at once (the server
answers 503 with ``Retry-After``).

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

    def __init__(self, max_waiting: int, slots: int = 1, tenant_share: int | None = None) -> None:
        if max_waiting < 0:
            raise ArgumentError("max_waiting must be >= 0")
        if slots < 1:
            raise ArgumentError("slots must be >= 1")
        if tenant_share is not None and tenant_share < 1:
            raise ArgumentError("tenant_share must be >= 1")
        self.max_waiting = max_waiting
        self.slots = slots
        self.tenant_share = max_waiting if tenant_share is None else tenant_share
        # tenant -> key -> tickets; both levels in the order they are next served
        self._waiting: OrderedDict[str | None, OrderedDict[str, deque[asyncio.Future[None]]]]
        self._waiting = OrderedDict()
        self._per_tenant: dict[str | None, int] = {}
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

    def _queued(self, key: str) -> bool:
        return any(key in keys for keys in self._waiting.values())

    async def acquire(self, key: str, tenant: str | None = None) -> None:
        """Wait for the turn of ``key`` (of ``tenant``); raises :class:`QueueFullError` when
        the queue, or the tenant's share of it, is full. Keys are unique across tenants
        (the server's session ids carry their tenant)."""
        # a free slot goes to a new key at once: whoever waits, waits for its own key's turn
        # (release hands a freed slot to the waiting keys first)
        free = len(self._running) < self.slots
        if free and key not in self._running and not self._queued(key):
            self._running.add(key)
            return
        if self._n_waiting >= self.max_waiting:
            raise QueueFullError(f"{self._n_waiting} requests are waiting")
        mine = self._per_tenant.get(tenant, 0)
        if mine >= self.tenant_share:
            raise QueueFullError(f"{mine} requests of this tenant are waiting, its share")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, OrderedDict()).setdefault(key, deque()).append(fut)
        self._per_tenant[tenant] = mine + 1
        self._n_waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(key)  # granted just as we were cancelled: pass the turn on
            else:
                self._remove(tenant, key, fut)
            raise

    def _taken(self, tenant: str | None) -> None:
        """One ticket of ``tenant`` left the queue."""
        self._n_waiting -= 1
        left = self._per_tenant[tenant] - 1
        if left:
            self._per_tenant[tenant] = left
        else:
            del self._per_tenant[tenant]

    def _remove(self, tenant: str | None, key: str, fut: asyncio.Future[None]) -> None:
        keys = self._waiting.get(tenant)
        queue = keys.get(key) if keys is not None else None
        if keys is not None and queue is not None and fut in queue:
            queue.remove(fut)
            self._taken(tenant)
            if not queue:
                del keys[key]
            if not keys:
                del self._waiting[tenant]

    def release(self, key: str) -> None:
        """End the job of ``key`` and hand its slot to the next keys in line."""
        self._running.discard(key)
        self.served += 1
        while len(self._running) < self.slots and self._grant():
            pass

    def _grant(self) -> bool:
        """Give a free slot to the next waiting ticket: the first tenant in line with a key
        not running now, its first such key; both then go to the back of their lines.
        Whether one was given."""
        for tenant, keys in list(self._waiting.items()):
            for key, queue in list(keys.items()):
                if key in self._running:
                    continue  # that session's turn is running: its next one waits for it
                granted = False
                while queue and not granted:
                    fut = queue.popleft()
                    self._taken(tenant)
                    if not fut.done():
                        fut.set_result(None)
                        self._running.add(key)
                        granted = True
                if queue:
                    keys.move_to_end(key)  # the tenant's other keys go first
                else:
                    del keys[key]
                if not keys:
                    del self._waiting[tenant]
                elif granted:
                    self._waiting.move_to_end(tenant)  # the other tenants go first
                if granted:
                    return True
        return False

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

    async def run(self, key: str, fn: Callable[[], T], tenant: str | None = None) -> T:
        """:meth:`acquire`, then :meth:`start` and wait for the result."""
        await self.acquire(key, tenant)
        task = self.start(key, fn)
        return await asyncio.shield(task)
