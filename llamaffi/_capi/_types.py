"""Typedefs, enums, callbacks and structs of ``llama.h`` (and the bits of ``ggml.h`` it uses).

Each struct is laid out field for field in header order; ``tests/llamaffi/raw/test_abi.py``
compares ``sizeof`` and every field offset with what the C compiler says.
Opaque handles (``llama_model *``, ``llama_context *``, ...) are ``c_void_p``: they come back
as ``int`` or ``None``, which the safe layer checks before use.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_int64,
    c_size_t,
    c_uint32,
    c_void_p,
)

# typedef int32_t llama_pos; typedef int32_t llama_token; typedef int32_t llama_seq_id;
llama_pos = c_int32
llama_token = c_int32
llama_seq_id = c_int32
llama_token_p = POINTER(llama_token)
# typedef uint32_t llama_state_seq_flags;
llama_state_seq_flags = c_uint32

# opaque handles
llama_model_p = c_void_p
llama_context_p = c_void_p
llama_vocab_p = c_void_p
llama_sampler_p = c_void_p
llama_memory_t = c_void_p  # typedef struct llama_memory_i * llama_memory_t;
ggml_backend_dev_t = c_void_p
ggml_backend_reg_t = c_void_p

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_TOKEN_NULL = -1

# #define LLAMA_STATE_SEQ_FLAGS_* (llama.h)
LLAMA_STATE_SEQ_FLAGS_NONE = 0
LLAMA_STATE_SEQ_FLAGS_SWA_ONLY = 1
LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY = 1
LLAMA_STATE_SEQ_FLAGS_ON_DEVICE = 2


class llama_vocab_type(enum.IntEnum):
    NONE = 0
    SPM = 1
    BPE = 2
    WPM = 3
    UGM = 4
    RWKV = 5
    PLAMO2 = 6
    TEST = 7


class llama_rope_scaling_type(enum.IntEnum):
    UNSPECIFIED = -1
    NONE = 0
    LINEAR = 1
    YARN = 2
    LONGROPE = 3


class llama_pooling_type(enum.IntEnum):
    UNSPECIFIED = -1
    NONE = 0
    MEAN = 1
    CLS = 2
    LAST = 3
    RANK = 4


class llama_attention_type(enum.IntEnum):
    UNSPECIFIED = -1
    CAUSAL = 0
    NON_CAUSAL = 1


class llama_flash_attn_type(enum.IntEnum):
    AUTO = -1
    DISABLED = 0
    ENABLED = 1


class llama_split_mode(enum.IntEnum):
    NONE = 0
    LAYER = 1
    ROW = 2
    TENSOR = 3


class llama_load_mode(enum.IntEnum):
    AUTO = -1
    NONE = 0
    MMAP = 1
    MLOCK = 2
    MMAP_MLOCK = 3
    DIRECT_IO = 4


class llama_lazy_mode(enum.IntEnum):
    OFF = 0
    AUTO = 1
    ON = 2


class llama_context_type(enum.IntEnum):
    DEFAULT = 0
    MTP = 1


class ggml_log_level(enum.IntEnum):
    NONE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CONT = 5


class ggml_type(enum.IntEnum):
    """The KV cache types we accept (a subset of ``enum ggml_type``; values from ggml.h)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    BF16 = 30


# typedef bool (*llama_progress_callback)(float progress, void * user_data);
llama_progress_callback = CFUNCTYPE(c_bool, c_float, c_void_p)
# typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
ggml_log_callback = CFUNCTYPE(None, c_int, c_char_p, c_void_p)
# typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * ud);
ggml_backend_sched_eval_callback = CFUNCTYPE(c_bool, c_void_p, c_bool, c_void_p)
# typedef bool (*ggml_abort_callback)(void * data);
ggml_abort_callback = CFUNCTYPE(c_bool, c_void_p)


class llama_token_data(Structure):
    _fields_ = [("id", llama_token), ("logit", c_float), ("p", c_float)]


class llama_token_data_array(Structure):
    _fields_ = [
        ("data", POINTER(llama_token_data)),
        ("size", c_size_t),
        ("selected", c_int64),
        ("sorted", c_bool),
    ]


class llama_batch(Structure):
    _fields_ = [
        ("n_tokens", c_int32),
        ("token", POINTER(llama_token)),
        ("embd", POINTER(c_float)),
        ("pos", POINTER(llama_pos)),
        ("n_seq_id", POINTER(c_int32)),
        ("seq_id", POINTER(POINTER(llama_seq_id))),
        ("logits", POINTER(c_int8)),
    ]


class _llama_model_kv_override_value(Union):
    _fields_ = [
        ("val_i64", c_int64),
        ("val_f64", c_double),
        ("val_bool", c_bool),
        ("val_str", c_char * 128),
    ]


class llama_model_kv_override(Structure):
    _anonymous_ = ("value",)
    _fields_ = [
        ("tag", c_int),
        ("key", c_char * 128),
        ("value", _llama_model_kv_override_value),
    ]


class llama_model_params(Structure):
    _fields_ = [
        ("devices", c_void_p),
        ("tensor_buft_overrides", c_void_p),
        ("n_gpu_layers", c_int32),
        ("split_mode", c_int),
        ("load_mode", c_int),
        ("lazy_mode", c_int),
        ("main_gpu", c_int32),
        ("tensor_split", POINTER(c_float)),
        ("progress_callback", llama_progress_callback),
        ("progress_callback_user_data", c_void_p),
        ("kv_overrides", POINTER(llama_model_kv_override)),
        ("vocab_only", c_bool),
        ("check_tensors", c_bool),
        ("use_extra_bufts", c_bool),
        ("no_host", c_bool),
        ("no_alloc", c_bool),
        ("load_mtp", c_bool),
    ]


class llama_sampler_seq_config(Structure):
    _fields_ = [("seq_id", llama_seq_id), ("sampler", llama_sampler_p)]


class llama_context_params(Structure):
    _fields_ = [
        ("n_ctx", c_uint32),
        ("n_batch", c_uint32),
        ("n_ubatch", c_uint32),
        ("n_seq_max", c_uint32),
        ("n_rs_seq", c_uint32),
        ("n_outputs_max", c_uint32),
        ("n_outputs_max_per_seq", c_uint32),
        ("n_threads", c_int32),
        ("n_threads_batch", c_int32),
        ("ctx_type", c_int),
        ("rope_scaling_type", c_int),
        ("pooling_type", c_int),
        ("attention_type", c_int),
        ("flash_attn_type", c_int),
        ("rope_freq_base", c_float),
        ("rope_freq_scale", c_float),
        ("yarn_ext_factor", c_float),
        ("yarn_attn_factor", c_float),
        ("yarn_beta_fast", c_float),
        ("yarn_beta_slow", c_float),
        ("yarn_orig_ctx", c_uint32),
        ("defrag_thold", c_float),
        ("cb_eval", ggml_backend_sched_eval_callback),
        ("cb_eval_user_data", c_void_p),
        ("type_k", c_int),
        ("type_v", c_int),
        ("abort_callback", ggml_abort_callback),
        ("abort_callback_data", c_void_p),
        ("embeddings", c_bool),
        ("offload_kqv", c_bool),
        ("no_perf", c_bool),
        ("op_offload", c_bool),
        ("swa_full", c_bool),
        ("kv_unified", c_bool),
        ("samplers", POINTER(llama_sampler_seq_config)),
        ("n_samplers", c_size_t),
        ("ctx_other", llama_context_p),
    ]


class llama_logit_bias(Structure):
    _fields_ = [("token", llama_token), ("bias", c_float)]


class llama_sampler_chain_params(Structure):
    _fields_ = [("no_perf", c_bool)]


class llama_chat_message(Structure):
    _fields_ = [("role", c_char_p), ("content", c_char_p)]


class llama_perf_context_data(Structure):
    _fields_ = [
        ("t_start_ms", c_double),
        ("t_load_ms", c_double),
        ("t_p_eval_ms", c_double),
        ("t_eval_ms", c_double),
        ("n_p_eval", c_int32),
        ("n_eval", c_int32),
        ("n_reused", c_int32),
    ]


class llama_perf_sampler_data(Structure):
    _fields_ = [("t_sample_ms", c_double), ("n_sample", c_int32)]


#: The structs the ABI drift test checks, by C name.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "llama_token_data": llama_token_data,
    "llama_token_data_array": llama_token_data_array,
    "llama_batch": llama_batch,
    "llama_model_kv_override": llama_model_kv_override,
    "llama_model_params": llama_model_params,
    "llama_sampler_seq_config": llama_sampler_seq_config,
    "llama_context_params": llama_context_params,
    "llama_logit_bias": llama_logit_bias,
    "llama_sampler_chain_params": llama_sampler_chain_params,
    "llama_chat_message": llama_chat_message,
    "llama_perf_context_data": llama_perf_context_data,
    "llama_perf_sampler_data": llama_perf_sampler_data,
}
