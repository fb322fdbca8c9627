"""Raw: samplers and sampler chains (llama.h, "Sampling API")."""

from __future__ import annotations

from ctypes import c_char_p, c_float, c_int32, c_size_t, c_uint32

from llamaffi._capi._types import (
    llama_context_p,
    llama_sampler_chain_params,
    llama_sampler_p,
    llama_token,
)
from llamaffi._lib import c_function


# LLAMA_API struct llama_sampler * llama_sampler_chain_init(struct llama_sampler_chain_params p);
@c_function("llama_sampler_chain_init", [llama_sampler_chain_params], llama_sampler_p)
def llama_sampler_chain_init(params: llama_sampler_chain_params) -> int | None:
    """An empty sampler chain."""


# LLAMA_API void llama_sampler_chain_add(struct llama_sampler * chain, struct llama_sampler * s);
@c_function("llama_sampler_chain_add", [llama_sampler_p, llama_sampler_p], None)
def llama_sampler_chain_add(chain: int, smpl: int) -> None:
    """Append ``smpl`` to ``chain``; the chain takes ownership."""


# LLAMA_API int32_t llama_sampler_chain_n(const struct llama_sampler * chain);
@c_function("llama_sampler_chain_n", [llama_sampler_p], c_int32)
def llama_sampler_chain_n(chain: int) -> int:
    """Number of samplers in the chain."""


# LLAMA_API const char * llama_sampler_name(const struct llama_sampler * smpl);
@c_function("llama_sampler_name", [llama_sampler_p], c_char_p)
def llama_sampler_name(smpl: int) -> bytes:
    """The sampler's name."""


# LLAMA_API void llama_sampler_accept(struct llama_sampler * smpl, llama_token token);
@c_function("llama_sampler_accept", [llama_sampler_p, llama_token], None)
def llama_sampler_accept(smpl: int, token: int) -> None:
    """Tell the sampler ``token`` was chosen (for penalties)."""


# LLAMA_API void llama_sampler_reset(struct llama_sampler * smpl);
@c_function("llama_sampler_reset", [llama_sampler_p], None)
def llama_sampler_reset(smpl: int) -> None:
    """Forget accepted tokens."""


# LLAMA_API void llama_sampler_free(struct llama_sampler * smpl);
@c_function("llama_sampler_free", [llama_sampler_p], None)
def llama_sampler_free(smpl: int) -> None:
    """Free a sampler (never one that was added to a chain)."""


# LLAMA_API llama_token llama_sampler_sample(struct llama_sampler * smpl,
#                                            struct llama_context * ctx, int32_t idx);
@c_function("llama_sampler_sample", [llama_sampler_p, llama_context_p, c_int32], llama_token)
def llama_sampler_sample(smpl: int, ctx: int, idx: int) -> int:
    """Sample from output ``idx`` of the last decode, and accept the token."""


# LLAMA_API struct llama_sampler * llama_sampler_init_greedy(void);
@c_function("llama_sampler_init_greedy", [], llama_sampler_p)
def llama_sampler_init_greedy() -> int | None:
    """Argmax."""


# LLAMA_API struct llama_sampler * llama_sampler_init_dist(uint32_t seed);
@c_function("llama_sampler_init_dist", [c_uint32], llama_sampler_p)
def llama_sampler_init_dist(seed: int) -> int | None:
    """Sample from the distribution with a seeded RNG."""


# LLAMA_API struct llama_sampler * llama_sampler_init_top_k(int32_t k);
@c_function("llama_sampler_init_top_k", [c_int32], llama_sampler_p)
def llama_sampler_init_top_k(k: int) -> int | None:
    """Keep the ``k`` most likely tokens."""


# LLAMA_API struct llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep);
@c_function("llama_sampler_init_top_p", [c_float, c_size_t], llama_sampler_p)
def llama_sampler_init_top_p(p: float, min_keep: int) -> int | None:
    """Nucleus sampling."""


# LLAMA_API struct llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep);
@c_function("llama_sampler_init_min_p", [c_float, c_size_t], llama_sampler_p)
def llama_sampler_init_min_p(p: float, min_keep: int) -> int | None:
    """Min-p sampling."""


# LLAMA_API struct llama_sampler * llama_sampler_init_temp(float t);
@c_function("llama_sampler_init_temp", [c_float], llama_sampler_p)
def llama_sampler_init_temp(t: float) -> int | None:
    """Divide logits by ``t``."""


# LLAMA_API struct llama_sampler * llama_sampler_init_penalties(int32_t n_vocab,
#     int32_t penalty_last_n, float penalty_repeat, float penalty_freq, float penalty_present);
@c_function(
    "llama_sampler_init_penalties", [c_int32, c_int32, c_float, c_float, c_float], llama_sampler_p
)
def llama_sampler_init_penalties(
    n_vocab: int,
    penalty_last_n: int,
    penalty_repeat: float,
    penalty_freq: float,
    penalty_present: float,
) -> int | None:
    """Repetition, frequency and presence penalties over the last ``penalty_last_n`` tokens."""


# LLAMA_API uint32_t llama_sampler_get_seed(const struct llama_sampler * smpl);
@c_function("llama_sampler_get_seed", [llama_sampler_p], c_uint32)
def llama_sampler_get_seed(smpl: int) -> int:
    """The seed a (chain of) sampler(s) uses."""
