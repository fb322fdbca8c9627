"""Raw: whole-context and per-sequence state (llama.h, "State / sessions").

``llama_state_seq_save_file``/``load_file`` are the reference our snapshot format is measured
against: they carry a magic and a version but no checksum and no model identity.
"""

from __future__ import annotations

from ctypes import POINTER, c_bool, c_char_p, c_size_t, c_uint8

from llamaffi._capi._types import (
    llama_context_p,
    llama_seq_id,
    llama_state_seq_flags,
    llama_token_p,
)
from llamaffi._lib import c_function

u8_p = POINTER(c_uint8)
size_p = POINTER(c_size_t)


# LLAMA_API size_t llama_state_get_size(struct llama_context * ctx);
@c_function("llama_state_get_size", [llama_context_p], c_size_t)
def llama_state_get_size(ctx: int) -> int:
    """Bytes needed to save the whole state (logits, embeddings, memory)."""


# LLAMA_API size_t llama_state_get_data(struct llama_context * ctx, uint8_t * dst, size_t size);
@c_function("llama_state_get_data", [llama_context_p, u8_p, c_size_t], c_size_t)
def llama_state_get_data(ctx: int, dst: object, size: int) -> int:
    """Copy the whole state into ``dst``; bytes written."""


# LLAMA_API size_t llama_state_set_data(struct llama_context * ctx, const uint8_t * src,
#                                       size_t size);
@c_function("llama_state_set_data", [llama_context_p, u8_p, c_size_t], c_size_t)
def llama_state_set_data(ctx: int, src: object, size: int) -> int:
    """Load the whole state from ``src``; bytes read (0 on failure)."""


# LLAMA_API bool llama_state_load_file(struct llama_context * ctx, const char * path_session,
#     llama_token * tokens_out, size_t n_token_capacity, size_t * n_token_count_out);
@c_function(
    "llama_state_load_file", [llama_context_p, c_char_p, llama_token_p, c_size_t, size_p], c_bool
)
def llama_state_load_file(
    ctx: int, path_session: bytes, tokens_out: object, n_token_capacity: int, n_out: object
) -> bool:
    """Load a whole-context session file."""


# LLAMA_API bool llama_state_save_file(struct llama_context * ctx, const char * path_session,
#     const llama_token * tokens, size_t n_token_count);
@c_function("llama_state_save_file", [llama_context_p, c_char_p, llama_token_p, c_size_t], c_bool)
def llama_state_save_file(
    ctx: int, path_session: bytes, tokens: object, n_token_count: int
) -> bool:
    """Save the whole context state and ``tokens`` to a file."""


# LLAMA_API size_t llama_state_seq_get_size(struct llama_context * ctx, llama_seq_id seq_id);
@c_function("llama_state_seq_get_size", [llama_context_p, llama_seq_id], c_size_t)
def llama_state_seq_get_size(ctx: int, seq_id: int) -> int:
    """Exact bytes needed for the state of one sequence."""


# LLAMA_API size_t llama_state_seq_get_data(struct llama_context * ctx, uint8_t * dst,
#     size_t size, llama_seq_id seq_id);
@c_function("llama_state_seq_get_data", [llama_context_p, u8_p, c_size_t, llama_seq_id], c_size_t)
def llama_state_seq_get_data(ctx: int, dst: object, size: int, seq_id: int) -> int:
    """Copy one sequence's state into ``dst``; bytes written."""


# LLAMA_API size_t llama_state_seq_set_data(struct llama_context * ctx, const uint8_t * src,
#     size_t size, llama_seq_id dest_seq_id);
@c_function("llama_state_seq_set_data", [llama_context_p, u8_p, c_size_t, llama_seq_id], c_size_t)
def llama_state_seq_set_data(ctx: int, src: object, size: int, dest_seq_id: int) -> int:
    """Load a sequence's state into ``dest_seq_id``; bytes read, 0 on failure."""


# LLAMA_API size_t llama_state_seq_save_file(struct llama_context * ctx, const char * filepath,
#     llama_seq_id seq_id, const llama_token * tokens, size_t n_token_count);
@c_function(
    "llama_state_seq_save_file",
    [llama_context_p, c_char_p, llama_seq_id, llama_token_p, c_size_t],
    c_size_t,
)
def llama_state_seq_save_file(
    ctx: int, filepath: bytes, seq_id: int, tokens: object, n_token_count: int
) -> int:
    """Save one sequence and ``tokens`` to a file; bytes written, 0 on failure."""


# LLAMA_API size_t llama_state_seq_load_file(struct llama_context * ctx, const char * filepath,
#     llama_seq_id dest_seq_id, llama_token * tokens_out, size_t n_token_capacity,
#     size_t * n_token_count_out);
@c_function(
    "llama_state_seq_load_file",
    [llama_context_p, c_char_p, llama_seq_id, llama_token_p, c_size_t, size_p],
    c_size_t,
)
def llama_state_seq_load_file(
    ctx: int,
    filepath: bytes,
    dest_seq_id: int,
    tokens_out: object,
    n_token_capacity: int,
    n_token_count_out: object,
) -> int:
    """Load a sequence file into ``dest_seq_id``; bytes read, 0 on failure."""


# LLAMA_API size_t llama_state_seq_get_size_ext(struct llama_context * ctx, llama_seq_id seq_id,
#     llama_state_seq_flags flags);
@c_function(
    "llama_state_seq_get_size_ext", [llama_context_p, llama_seq_id, llama_state_seq_flags], c_size_t
)
def llama_state_seq_get_size_ext(ctx: int, seq_id: int, flags: int) -> int:
    """As ``llama_state_seq_get_size`` with ``LLAMA_STATE_SEQ_FLAGS_*``."""


# LLAMA_API size_t llama_state_seq_get_data_ext(struct llama_context * ctx, uint8_t * dst,
#     size_t size, llama_seq_id seq_id, llama_state_seq_flags flags);
@c_function(
    "llama_state_seq_get_data_ext",
    [llama_context_p, u8_p, c_size_t, llama_seq_id, llama_state_seq_flags],
    c_size_t,
)
def llama_state_seq_get_data_ext(ctx: int, dst: object, size: int, seq_id: int, flags: int) -> int:
    """As ``llama_state_seq_get_data`` with flags."""


# LLAMA_API size_t llama_state_seq_set_data_ext(struct llama_context * ctx, const uint8_t * src,
#     size_t size, llama_seq_id dest_seq_id, llama_state_seq_flags flags);
@c_function(
    "llama_state_seq_set_data_ext",
    [llama_context_p, u8_p, c_size_t, llama_seq_id, llama_state_seq_flags],
    c_size_t,
)
def llama_state_seq_set_data_ext(
    ctx: int, src: object, size: int, dest_seq_id: int, flags: int
) -> int:
    """As ``llama_state_seq_set_data`` with flags."""
