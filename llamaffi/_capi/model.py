"""Raw: model load/free and metadata (llama.h, "model" section)."""

from __future__ import annotations

from ctypes import c_bool, c_char_p, c_int32, c_size_t, c_uint64

from llamaffi._capi._types import llama_model_p, llama_model_params, llama_vocab_p
from llamaffi._lib import c_function


# LLAMA_API struct llama_model * llama_model_load_from_file(const char * path_model,
#                                                          struct llama_model_params params);
@c_function("llama_model_load_from_file", [c_char_p, llama_model_params], llama_model_p)
def llama_model_load_from_file(path_model: bytes, params: llama_model_params) -> int | None:
    """Load a GGUF model; NULL on failure."""


# LLAMA_API void llama_model_free(struct llama_model * model);
@c_function("llama_model_free", [llama_model_p], None)
def llama_model_free(model: int) -> None:
    """Free a model. Every context made from it must be freed first."""


# LLAMA_API const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
@c_function("llama_model_get_vocab", [llama_model_p], llama_vocab_p)
def llama_model_get_vocab(model: int) -> int | None:
    """The model's vocabulary (owned by the model)."""


# LLAMA_API int32_t llama_model_n_ctx_train(const struct llama_model * model);
@c_function("llama_model_n_ctx_train", [llama_model_p], c_int32)
def llama_model_n_ctx_train(model: int) -> int:
    """Context length the model was trained with."""


# LLAMA_API int32_t llama_model_n_embd(const struct llama_model * model);
@c_function("llama_model_n_embd", [llama_model_p], c_int32)
def llama_model_n_embd(model: int) -> int:
    """Embedding width."""


# LLAMA_API int32_t llama_model_n_layer(const struct llama_model * model);
@c_function("llama_model_n_layer", [llama_model_p], c_int32)
def llama_model_n_layer(model: int) -> int:
    """Number of layers."""


# LLAMA_API int32_t llama_model_n_head(const struct llama_model * model);
@c_function("llama_model_n_head", [llama_model_p], c_int32)
def llama_model_n_head(model: int) -> int:
    """Number of attention heads."""


# LLAMA_API int32_t llama_model_n_head_kv(const struct llama_model * model);
@c_function("llama_model_n_head_kv", [llama_model_p], c_int32)
def llama_model_n_head_kv(model: int) -> int:
    """Number of KV heads (GQA)."""


# LLAMA_API int32_t llama_model_n_swa(const struct llama_model * model);
@c_function("llama_model_n_swa", [llama_model_p], c_int32)
def llama_model_n_swa(model: int) -> int:
    """Sliding-window size (0: none)."""


# LLAMA_API int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key,
#                                            char * buf, size_t buf_size);
@c_function("llama_model_meta_val_str", [llama_model_p, c_char_p, c_char_p, c_size_t], c_int32)
def llama_model_meta_val_str(model: int, key: bytes, buf: object, buf_size: int) -> int:
    """Metadata value as a string; the length, or -1 if the key is missing."""


# LLAMA_API int32_t llama_model_meta_count(const struct llama_model * model);
@c_function("llama_model_meta_count", [llama_model_p], c_int32)
def llama_model_meta_count(model: int) -> int:
    """Number of metadata pairs."""


# LLAMA_API int32_t llama_model_meta_key_by_index(const struct llama_model * model, int32_t i,
#                                                 char * buf, size_t buf_size);
@c_function("llama_model_meta_key_by_index", [llama_model_p, c_int32, c_char_p, c_size_t], c_int32)
def llama_model_meta_key_by_index(model: int, i: int, buf: object, buf_size: int) -> int:
    """The ``i``-th metadata key; its length or -1."""


# LLAMA_API int32_t llama_model_meta_val_str_by_index(const struct llama_model * model, int32_t i,
#                                                     char * buf, size_t buf_size);
@c_function(
    "llama_model_meta_val_str_by_index", [llama_model_p, c_int32, c_char_p, c_size_t], c_int32
)
def llama_model_meta_val_str_by_index(model: int, i: int, buf: object, buf_size: int) -> int:
    """The ``i``-th metadata value as a string; its length or -1."""


# LLAMA_API int32_t llama_model_desc(const struct llama_model * model, char * buf, size_t buf_size);
@c_function("llama_model_desc", [llama_model_p, c_char_p, c_size_t], c_int32)
def llama_model_desc(model: int, buf: object, buf_size: int) -> int:
    """A short description, e.g. ``llama 1B F16``."""


# LLAMA_API uint64_t llama_model_size(const struct llama_model * model);
@c_function("llama_model_size", [llama_model_p], c_uint64)
def llama_model_size(model: int) -> int:
    """Total bytes of the model's tensors."""


# LLAMA_API const char * llama_model_chat_template(const struct llama_model * model,
#                                                  const char * name);
@c_function("llama_model_chat_template", [llama_model_p, c_char_p], c_char_p)
def llama_model_chat_template(model: int, name: bytes | None) -> bytes | None:
    """The named (or default, for NULL) chat template; NULL if absent."""


# LLAMA_API uint64_t llama_model_n_params(const struct llama_model * model);
@c_function("llama_model_n_params", [llama_model_p], c_uint64)
def llama_model_n_params(model: int) -> int:
    """Total number of parameters."""


# LLAMA_API bool llama_model_has_encoder(const struct llama_model * model);
@c_function("llama_model_has_encoder", [llama_model_p], c_bool)
def llama_model_has_encoder(model: int) -> bool:
    """Whether ``llama_encode`` is needed."""


# LLAMA_API bool llama_model_is_recurrent(const struct llama_model * model);
@c_function("llama_model_is_recurrent", [llama_model_p], c_bool)
def llama_model_is_recurrent(model: int) -> bool:
    """Whether the model is recurrent (Mamba, RWKV, ...)."""
