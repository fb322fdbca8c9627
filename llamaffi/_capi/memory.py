"""Raw: the memory (KV cache) API (llama.h, "Memory")."""

from __future__ import annotations

from ctypes import c_bool, c_int

from llamaffi._capi._types import llama_memory_t, llama_pos, llama_seq_id
from llamaffi._lib import c_function


# LLAMA_API void llama_memory_clear(llama_memory_t mem, bool data);
@c_function("llama_memory_clear", [llama_memory_t, c_bool], None)
def llama_memory_clear(mem: int, data: bool) -> None:
    """Clear all sequences (and zero the buffers if ``data``)."""


# LLAMA_API bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0,
#                                    llama_pos p1);
@c_function("llama_memory_seq_rm", [llama_memory_t, llama_seq_id, llama_pos, llama_pos], c_bool)
def llama_memory_seq_rm(mem: int, seq_id: int, p0: int, p1: int) -> bool:
    """Remove positions [p0, p1) of ``seq_id``; false if a partial removal is impossible."""


# LLAMA_API void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src,
#                                    llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1);
@c_function(
    "llama_memory_seq_cp", [llama_memory_t, llama_seq_id, llama_seq_id, llama_pos, llama_pos], None
)
def llama_memory_seq_cp(mem: int, seq_id_src: int, seq_id_dst: int, p0: int, p1: int) -> None:
    """Copy positions [p0, p1) of ``seq_id_src`` into ``seq_id_dst``."""


# LLAMA_API void llama_memory_seq_keep(llama_memory_t mem, llama_seq_id seq_id);
@c_function("llama_memory_seq_keep", [llama_memory_t, llama_seq_id], None)
def llama_memory_seq_keep(mem: int, seq_id: int) -> None:
    """Remove every sequence but ``seq_id``."""


# LLAMA_API void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0,
#                                     llama_pos p1, llama_pos delta);
@c_function(
    "llama_memory_seq_add", [llama_memory_t, llama_seq_id, llama_pos, llama_pos, llama_pos], None
)
def llama_memory_seq_add(mem: int, seq_id: int, p0: int, p1: int, delta: int) -> None:
    """Shift positions [p0, p1) of ``seq_id`` by ``delta``."""


# LLAMA_API void llama_memory_seq_div(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0,
#                                     llama_pos p1, int d);
@c_function(
    "llama_memory_seq_div", [llama_memory_t, llama_seq_id, llama_pos, llama_pos, c_int], None
)
def llama_memory_seq_div(mem: int, seq_id: int, p0: int, p1: int, d: int) -> None:
    """Integer-divide positions [p0, p1) of ``seq_id`` by ``d`` (> 1)."""


# LLAMA_API llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id);
@c_function("llama_memory_seq_pos_min", [llama_memory_t, llama_seq_id], llama_pos)
def llama_memory_seq_pos_min(mem: int, seq_id: int) -> int:
    """Smallest position of ``seq_id``; -1 if empty."""


# LLAMA_API llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);
@c_function("llama_memory_seq_pos_max", [llama_memory_t, llama_seq_id], llama_pos)
def llama_memory_seq_pos_max(mem: int, seq_id: int) -> int:
    """Largest position of ``seq_id``; -1 if empty."""


# LLAMA_API bool llama_memory_can_shift(llama_memory_t mem);
@c_function("llama_memory_can_shift", [llama_memory_t], c_bool)
def llama_memory_can_shift(mem: int) -> bool:
    """Whether ``seq_add``/``seq_div`` are supported."""
