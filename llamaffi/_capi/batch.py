"""Raw: batches, decode/encode and output access (llama.h, "Decoding")."""

from __future__ import annotations

from ctypes import POINTER, c_float, c_int32

from llamaffi._capi._types import llama_batch, llama_context_p, llama_seq_id, llama_token_p
from llamaffi._lib import c_function


# LLAMA_API struct llama_batch llama_batch_get_one(llama_token * tokens, int32_t n_tokens);
@c_function("llama_batch_get_one", [llama_token_p, c_int32], llama_batch)
def llama_batch_get_one(tokens: object, n_tokens: int) -> llama_batch:
    """A view batch over ``tokens`` for sequence 0 (positions tracked by llama.cpp)."""


# LLAMA_API struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
@c_function("llama_batch_init", [c_int32, c_int32, c_int32], llama_batch)
def llama_batch_init(n_tokens: int, embd: int, n_seq_max: int) -> llama_batch:
    """Allocate a batch of ``n_tokens`` (free with ``llama_batch_free``)."""


# LLAMA_API void llama_batch_free(struct llama_batch batch);
@c_function("llama_batch_free", [llama_batch], None)
def llama_batch_free(batch: llama_batch) -> None:
    """Free a batch made by ``llama_batch_init``."""


# LLAMA_API int32_t llama_encode(struct llama_context * ctx, struct llama_batch batch);
@c_function("llama_encode", [llama_context_p, llama_batch], c_int32)
def llama_encode(ctx: int, batch: llama_batch) -> int:
    """Run the encoder; 0 on success, < 0 on error."""


# LLAMA_API int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
@c_function("llama_decode", [llama_context_p, llama_batch], c_int32)
def llama_decode(ctx: int, batch: llama_batch) -> int:
    """Decode a batch: 0 ok, 1 no KV slot, 2 aborted, -1 invalid batch, < -1 fatal."""


# LLAMA_API float * llama_get_logits(struct llama_context * ctx);
@c_function("llama_get_logits", [llama_context_p], POINTER(c_float))
def llama_get_logits(ctx: int) -> object:
    """All output logits of the last decode, row-major ``[n_outputs, n_vocab]``."""


# LLAMA_API float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
@c_function("llama_get_logits_ith", [llama_context_p, c_int32], POINTER(c_float))
def llama_get_logits_ith(ctx: int, i: int) -> object:
    """Logits of output ``i`` (negative: from the end); NULL if invalid."""


# LLAMA_API float * llama_get_embeddings_ith(struct llama_context * ctx, int32_t i);
@c_function("llama_get_embeddings_ith", [llama_context_p, c_int32], POINTER(c_float))
def llama_get_embeddings_ith(ctx: int, i: int) -> object:
    """Embeddings of output ``i``; NULL if invalid."""


# LLAMA_API float * llama_get_embeddings_seq(struct llama_context * ctx, llama_seq_id seq_id);
@c_function("llama_get_embeddings_seq", [llama_context_p, llama_seq_id], POINTER(c_float))
def llama_get_embeddings_seq(ctx: int, seq_id: int) -> object:
    """Pooled embeddings of a sequence; NULL if pooling is off."""
