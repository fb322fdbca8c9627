"""One thread runs every ``llama_decode`` of the process.

ggml's CPU backend runs each graph on an OpenMP team, and libgomp keeps a team per thread
that starts a parallel region. When several threads decode (a server's worker threads taking
turns, the thread a turn happens to run on), each leaves a team behind, and a decode from a
thread other than the one that decoded first ran about 40% slower on 2 cores: 17-20 ms per
SmolLM2 token against 12-14 ms, interleaved in one process; once two threads had decoded,
every decode stayed slow. So the safe layer hands each decode to one long-lived thread and
waits for it, and no other thread enters OpenMP: a 32-token turn run from a worker thread
went from 493-550 ms of generation to 368-399 ms (``Runtime.chat`` on SmolLM2, one session).

The caller waits for the call to end, so :class:`~llamaffi.context.Context` keeps its
rules: one call at a time per context, and a Ctrl-C during a decode takes effect once the
decode has returned (as it would in the caller's thread: the C call is never cut, and the
context is never left mid-call). The thread starts with the first decode and stops at
interpreter exit, before llama.cpp's own exit hooks free anything.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["run"]

_T = TypeVar("_T")


class _Call:
    """One call handed to the compute thread, and its outcome."""

    __slots__ = ("args", "done", "error", "fn", "result", "state", "state_lock")

    def __init__(self, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None
        # "new", then "running" (the compute thread took it) or "dropped" (its caller was
        # interrupted first: it never runs); a caller interrupted once it runs waits for it
        self.state = "new"
        self.state_lock = threading.Lock()

    def take(self) -> bool:
        """The compute thread: claim the call; False if its caller dropped it."""
        with self.state_lock:
            if self.state == "dropped":
                return False
            self.state = "running"
            return True

    def drop(self) -> bool:
        """The interrupted caller: drop the call unless it runs already; whether dropped."""
        with self.state_lock:
            if self.state == "new":
                self.state = "dropped"
            return self.state == "dropped"


class _ComputeThread:
    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closing = threading.Lock()  # a call is queued before the stop, or not at all
        self.closed = False
        self._thread = threading.Thread(target=self._serve, name="llama-compute", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            if not call.take():
                continue
            try:
                call.result = call.fn(*call.args)
            except BaseException as exc:  # handed to the caller, raised there
                call.error = exc
            finally:
                call.done.set()

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, call: _Call) -> object:
        interrupted: BaseException | None = None
        while True:
            try:
                if interrupted is None:
                    with self._closing:
                        if self.closed:  # stopped at exit: the caller's own thread runs it
                            return call.fn(*call.args)
                        self._calls.put(call)
                call.done.wait()
                break
            except KeyboardInterrupt as exc:
                if interrupted is None and call.drop():
                    raise  # before the C call started: it never will
                interrupted = exc  # the C call runs on: wait for it, then raise
        if interrupted is not None:
            raise interrupted
        if call.error is not None:
            raise call.error
        return call.result

    def stop(self) -> None:
        """Let the queued calls finish, then end the thread (at exit)."""
        with self._closing:
            self.closed = True
            self._calls.put(None)
        self._thread.join(timeout=30)


_lock = threading.Lock()
_compute: _ComputeThread | None = None
_stopped = False


def run(fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args)`` on the compute thread; its result, or its exception raised here.

    From the compute thread itself, or once the thread has stopped at exit, ``fn`` runs in
    the calling thread."""
    global _compute
    compute = _compute
    if compute is None:
        with _lock:
            if _compute is None and not _stopped:
                try:
                    _compute = _ComputeThread()
                except RuntimeError:  # no new thread (inside an exit hook): run it here
                    return fn(*args)
                atexit.register(_stop)  # after llamaffi's own hooks: so it runs before them
            compute = _compute
    if compute is None or compute.is_current():
        return fn(*args)
    return compute.run(_Call(fn, args))  # type: ignore[return-value]


def _stop() -> None:
    global _stopped
    with _lock:
        _stopped = True
        compute = _compute
    if compute is not None:
        compute.stop()


def _forget_in_child() -> None:
    """After fork the compute thread is the parent's only: the child starts its own."""
    global _compute, _stopped, _lock
    _compute, _stopped, _lock = None, False, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
