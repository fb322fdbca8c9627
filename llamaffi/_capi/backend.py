"""Raw: backend init/free, library capabilities, logging, system info (llama.h + ggml)."""

from __future__ import annotations

from ctypes import c_bool, c_char_p, c_int, c_int64, c_size_t, c_void_p

from llamaffi._capi._types import (
    ggml_backend_dev_t,
    ggml_backend_reg_t,
    ggml_log_callback,
    llama_context_params,
    llama_model_params,
    llama_sampler_chain_params,
)
from llamaffi._lib import c_function, libggml, libggml_base


# LLAMA_API const char * llama_version(void);
@c_function("llama_version", [], c_char_p)
def llama_version() -> bytes:
    """The library's version string."""


# LLAMA_API struct llama_model_params llama_model_default_params(void);
@c_function("llama_model_default_params", [], llama_model_params)
def llama_model_default_params() -> llama_model_params:
    """Default model parameters."""


# LLAMA_API struct llama_context_params llama_context_default_params(void);
@c_function("llama_context_default_params", [], llama_context_params)
def llama_context_default_params() -> llama_context_params:
    """Default context parameters."""


# LLAMA_API struct llama_sampler_chain_params llama_sampler_chain_default_params(void);
@c_function("llama_sampler_chain_default_params", [], llama_sampler_chain_params)
def llama_sampler_chain_default_params() -> llama_sampler_chain_params:
    """Default sampler chain parameters."""


# LLAMA_API void llama_backend_init(void);
@c_function("llama_backend_init", [], None)
def llama_backend_init() -> None:
    """Initialise the llama + ggml backend; call once per process."""


# LLAMA_API void llama_backend_free(void);
@c_function("llama_backend_free", [], None)
def llama_backend_free() -> None:
    """Release backend resources at process end."""


# LLAMA_API int64_t llama_time_us(void);
@c_function("llama_time_us", [], c_int64)
def llama_time_us() -> int:
    """Microseconds since an arbitrary epoch (llama.cpp's clock)."""


# LLAMA_API size_t llama_max_devices(void);
@c_function("llama_max_devices", [], c_size_t)
def llama_max_devices() -> int:
    """The maximum number of devices."""


# LLAMA_API size_t llama_max_parallel_sequences(void);
@c_function("llama_max_parallel_sequences", [], c_size_t)
def llama_max_parallel_sequences() -> int:
    """The maximum ``n_seq_max`` a context accepts."""


# LLAMA_API bool llama_supports_mmap(void);
@c_function("llama_supports_mmap", [], c_bool)
def llama_supports_mmap() -> bool:
    """Whether mmap loading is available."""


# LLAMA_API bool llama_supports_mlock(void);
@c_function("llama_supports_mlock", [], c_bool)
def llama_supports_mlock() -> bool:
    """Whether mlock is available."""


# LLAMA_API bool llama_supports_gpu_offload(void);
@c_function("llama_supports_gpu_offload", [], c_bool)
def llama_supports_gpu_offload() -> bool:
    """Whether a GPU backend is compiled in."""


# LLAMA_API bool llama_supports_rpc(void);
@c_function("llama_supports_rpc", [], c_bool)
def llama_supports_rpc() -> bool:
    """Whether the RPC backend is compiled in."""


# LLAMA_API const char * llama_print_system_info(void);
@c_function("llama_print_system_info", [], c_char_p)
def llama_print_system_info() -> bytes:
    """CPU features and backend flags as one line."""


# LLAMA_API void llama_log_set(ggml_log_callback log_callback, void * user_data);
@c_function("llama_log_set", [ggml_log_callback, c_void_p], None)
def llama_log_set(log_callback: object, user_data: int | None) -> None:
    """Route llama.cpp's and ggml's log lines to ``log_callback`` (NULL: stderr)."""


# GGML_API size_t ggml_backend_reg_count(void);            (ggml-backend.h)
@c_function("ggml_backend_reg_count", [], c_size_t, lib=libggml)
def ggml_backend_reg_count() -> int:
    """Number of registered backends."""


# GGML_API ggml_backend_reg_t ggml_backend_reg_get(size_t index);
@c_function("ggml_backend_reg_get", [c_size_t], ggml_backend_reg_t, lib=libggml)
def ggml_backend_reg_get(index: int) -> int | None:
    """The ``index``-th backend registry."""


# GGML_API const char * ggml_backend_reg_name(ggml_backend_reg_t reg);
@c_function("ggml_backend_reg_name", [ggml_backend_reg_t], c_char_p, lib=libggml_base)
def ggml_backend_reg_name(reg: int) -> bytes:
    """A backend's name, e.g. ``CPU`` or ``CUDA``."""


# GGML_API size_t ggml_backend_dev_count(void);
@c_function("ggml_backend_dev_count", [], c_size_t, lib=libggml)
def ggml_backend_dev_count() -> int:
    """Number of devices across all backends."""


# GGML_API ggml_backend_dev_t ggml_backend_dev_get(size_t index);
@c_function("ggml_backend_dev_get", [c_size_t], ggml_backend_dev_t, lib=libggml)
def ggml_backend_dev_get(index: int) -> int | None:
    """The ``index``-th device."""


# GGML_API const char * ggml_backend_dev_name(ggml_backend_dev_t device);
@c_function("ggml_backend_dev_name", [ggml_backend_dev_t], c_char_p, lib=libggml_base)
def ggml_backend_dev_name(device: int) -> bytes:
    """A device's short name."""


# GGML_API const char * ggml_backend_dev_description(ggml_backend_dev_t device);
@c_function("ggml_backend_dev_description", [ggml_backend_dev_t], c_char_p, lib=libggml_base)
def ggml_backend_dev_description(device: int) -> bytes:
    """A device's description."""


# GGML_API const char * ggml_type_name(enum ggml_type type);   (ggml.h)
@c_function("ggml_type_name", [c_int], c_char_p, lib=libggml_base)
def ggml_type_name(type_: int) -> bytes:
    """The name of a ggml tensor type, e.g. ``f16``."""
