"""The KV cache view of a context (``llama_memory_*``): :class:`Memory`, ``Context.memory``."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from llamaffi._capi import memory
from llamaffi.errors import ArgumentError, ArgumentTypeError, ClosedError, ContextError

if TYPE_CHECKING:
    from llamaffi.context import Context


class Memory:
    """The KV cache of a :class:`Context` (``llama_memory_*``).

    Positions follow llama.cpp: ``p0 < 0`` means from 0, ``p1 < 0`` means to the end.
    """

    def __init__(self, ctx: Context) -> None:
        self._ctx = weakref.proxy(ctx)

    def _mem(self) -> int:
        try:
            self._ctx._handle()
            mem: int = self._ctx._mem
            return mem
        except ReferenceError:
            raise ClosedError("context is gone") from None

    def _seq(self, seq_id: int, allow_any: bool = False) -> None:
        if allow_any and seq_id == -1:
            return
        self._ctx._check_seq(seq_id)

    @staticmethod
    def _range(p0: int, p1: int) -> None:
        if not (isinstance(p0, int) and isinstance(p1, int)):
            raise ArgumentTypeError("positions must be ints")
        if p0 >= 0 and p1 >= 0 and p1 < p0:
            raise ArgumentError(f"empty or reversed position range [{p0}, {p1})")

    def clear(self, data: bool = True) -> None:
        """Remove every sequence (and zero the buffers when ``data``)."""
        memory.llama_memory_clear(self._mem(), data)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of ``seq_id`` (``-1``: any sequence).

        Returns False when a partial removal is not possible (whole removals always work).
        """
        mem = self._mem()
        self._seq(seq_id, allow_any=True)
        self._range(p0, p1)
        return bool(memory.llama_memory_seq_rm(mem, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Copy positions [p0, p1) of ``src`` into ``dst`` (cells are shared, not duplicated)."""
        mem = self._mem()
        self._seq(src)
        self._seq(dst)
        self._range(p0, p1)
        memory.llama_memory_seq_cp(mem, src, dst, p0, p1)

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence except ``seq_id``."""
        mem = self._mem()
        self._seq(seq_id)
        memory.llama_memory_seq_keep(mem, seq_id)

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions [p0, p1) of ``seq_id`` by ``delta`` (needs :meth:`can_shift`)."""
        mem = self._mem()
        self._seq(seq_id)
        self._range(p0, p1)
        if not memory.llama_memory_can_shift(mem):
            raise ContextError(
                "this memory cannot shift positions", function="llama_memory_seq_add"
            )
        memory.llama_memory_seq_add(mem, seq_id, p0, p1, delta)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Integer-divide positions [p0, p1) of ``seq_id`` by ``d > 1``."""
        mem = self._mem()
        self._seq(seq_id)
        self._range(p0, p1)
        if d <= 1:
            raise ArgumentError(f"d must be > 1, got {d}")
        if not memory.llama_memory_can_shift(mem):
            raise ContextError(
                "this memory cannot shift positions", function="llama_memory_seq_div"
            )
        memory.llama_memory_seq_div(mem, seq_id, p0, p1, d)

    def pos_min(self, seq_id: int) -> int:
        """Smallest position of ``seq_id``; -1 when empty."""
        mem = self._mem()
        self._seq(seq_id)
        return int(memory.llama_memory_seq_pos_min(mem, seq_id))

    def pos_max(self, seq_id: int) -> int:
        """Largest position of ``seq_id``; -1 when empty."""
        mem = self._mem()
        self._seq(seq_id)
        return int(memory.llama_memory_seq_pos_max(mem, seq_id))

    def can_shift(self) -> bool:
        """Whether :meth:`seq_add` and :meth:`seq_div` are supported."""
        return bool(memory.llama_memory_can_shift(self._mem()))
