"""A session's KV sequence in the shared context: the few llama.cpp calls a session makes on
its cells, and whether they hold the session's window now."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from runtime.errors import SessionError

if TYPE_CHECKING:
    from llamaffi import Context


class SequenceKV:
    """Sequence ``seq_id`` of ``ctx`` as one session holds it.

    ``resident`` says whether the cells hold the session's window; any call that leaves them
    behind the journal clears them and drops ``resident``, so that the next use resumes.
    ``shift_pending`` says a window shift waits for the next decode: llama.cpp rotates the
    shifted keys only then, so a state copied before holds unrotated K and would restore wrong.
    """

    def __init__(self, ctx: Context, seq_id: int) -> None:
        self.ctx = ctx
        self.seq_id = seq_id
        self.resident = False
        self.shift_pending = False

    def decode(self, tokens: Sequence[int], pos: int | None = None) -> None:
        """Decode ``tokens`` into the sequence (at ``pos``, default: after its last cell)."""
        self.ctx.decode(tokens, seq_id=self.seq_id, pos=pos)
        self.shift_pending = False

    def drop(self, a: int, b: int) -> None:
        """Remove positions [a, b) and shift the rest down (llama.cpp's context shift)."""
        memory = self.ctx.memory
        if not memory.seq_rm(self.seq_id, a, b):
            self.clear()
            raise SessionError(f"llama.cpp could not remove positions [{a}, {b})")
        memory.seq_add(self.seq_id, b, -1, -(b - a))
        self.shift_pending = True

    def cut(self, keep: int) -> bool:
        """Remove every position from ``keep`` on; False if llama.cpp could not."""
        return bool(self.ctx.memory.seq_rm(self.seq_id, keep, -1))

    def next_pos(self) -> int:
        """The position after the sequence's last cell."""
        return int(self.ctx.memory.pos_max(self.seq_id)) + 1

    def clear(self) -> None:
        """Free the sequence's cells; the session is no longer resident."""
        self.ctx.memory.seq_rm(self.seq_id)
        self.resident = False
