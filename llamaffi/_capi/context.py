"""Raw: context init/free, sizes, threads, abort callback, perf (llama.h)."""

from __future__ import annotations

from ctypes import c_int32, c_uint32, c_void_p

from llamaffi._capi._types import (
    ggml_abort_callback,
    llama_context_p,
    llama_context_params,
    llama_memory_t,
    llama_model_p,
    llama_perf_context_data,
)
from llamaffi._lib import c_function


# LLAMA_API struct llama_context * llama_init_from_model(struct llama_model * model,
#                                                        struct llama_context_params params);
@c_function("llama_init_from_model", [llama_model_p, llama_context_params], llama_context_p)
def llama_init_from_model(model: int, params: llama_context_params) -> int | None:
    """Create a context; NULL on failure."""


# LLAMA_API void llama_free(struct llama_context * ctx);
@c_function("llama_free", [llama_context_p], None)
def llama_free(ctx: int) -> None:
    """Free a context and its KV cache."""


# LLAMA_API uint32_t llama_n_ctx(const struct llama_context * ctx);
@c_function("llama_n_ctx", [llama_context_p], c_uint32)
def llama_n_ctx(ctx: int) -> int:
    """Actual context size (may differ from the requested one)."""


# LLAMA_API uint32_t llama_n_ctx_seq(const struct llama_context * ctx);
@c_function("llama_n_ctx_seq", [llama_context_p], c_uint32)
def llama_n_ctx_seq(ctx: int) -> int:
    """Context size available to one sequence."""


# LLAMA_API uint32_t llama_n_batch(const struct llama_context * ctx);
@c_function("llama_n_batch", [llama_context_p], c_uint32)
def llama_n_batch(ctx: int) -> int:
    """Logical maximum batch size for one ``llama_decode``."""


# LLAMA_API uint32_t llama_n_ubatch(const struct llama_context * ctx);
@c_function("llama_n_ubatch", [llama_context_p], c_uint32)
def llama_n_ubatch(ctx: int) -> int:
    """Physical maximum batch size."""


# LLAMA_API uint32_t llama_n_seq_max(const struct llama_context * ctx);
@c_function("llama_n_seq_max", [llama_context_p], c_uint32)
def llama_n_seq_max(ctx: int) -> int:
    """Number of sequences the context holds."""


# LLAMA_API const struct llama_model * llama_get_model(const struct llama_context * ctx);
@c_function("llama_get_model", [llama_context_p], llama_model_p)
def llama_get_model(ctx: int) -> int | None:
    """The model a context was made from."""


# LLAMA_API llama_memory_t llama_get_memory(const struct llama_context * ctx);
@c_function("llama_get_memory", [llama_context_p], llama_memory_t)
def llama_get_memory(ctx: int) -> int | None:
    """The context's memory (KV cache); NULL for memory-less contexts."""


# LLAMA_API void llama_set_n_threads(struct llama_context * ctx, int32_t n_threads,
#                                    int32_t n_threads_batch);
@c_function("llama_set_n_threads", [llama_context_p, c_int32, c_int32], None)
def llama_set_n_threads(ctx: int, n_threads: int, n_threads_batch: int) -> None:
    """Set generation and batch thread counts."""


# LLAMA_API int32_t llama_n_threads(struct llama_context * ctx);
@c_function("llama_n_threads", [llama_context_p], c_int32)
def llama_n_threads(ctx: int) -> int:
    """Threads used for single-token generation."""


# LLAMA_API void llama_set_abort_callback(struct llama_context * ctx,
#     ggml_abort_callback abort_callback, void * abort_callback_data);
@c_function("llama_set_abort_callback", [llama_context_p, ggml_abort_callback, c_void_p], None)
def llama_set_abort_callback(ctx: int, abort_callback: object, data: int | None) -> None:
    """Install a callback polled during decode; returning true aborts it."""


# LLAMA_API void llama_synchronize(struct llama_context * ctx);
@c_function("llama_synchronize", [llama_context_p], None)
def llama_synchronize(ctx: int) -> None:
    """Wait for all pending computation to finish."""


# LLAMA_API struct llama_perf_context_data llama_perf_context(const struct llama_context * ctx);
@c_function("llama_perf_context", [llama_context_p], llama_perf_context_data)
def llama_perf_context(ctx: int) -> llama_perf_context_data:
    """Timings of the context."""


# LLAMA_API void llama_perf_context_reset(struct llama_context * ctx);
@c_function("llama_perf_context_reset", [llama_context_p], None)
def llama_perf_context_reset(ctx: int) -> None:
    """Reset the context's timings."""
