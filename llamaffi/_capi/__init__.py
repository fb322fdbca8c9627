"""The raw layer: ``llama.h`` mirrored one module per section, names identical to C.

Nothing here checks arguments or owns memory; that is the job of :mod:`llamaffi.model`,
:mod:`llamaffi.context` and friends. Import the section modules directly::

    from llamaffi._capi import state
    state.llama_state_seq_get_size(ctx_ptr, 0)
"""

from llamaffi._capi import (
    _types,
    backend,
    batch,
    chat,
    context,
    memory,
    model,
    sampler,
    state,
    vocab,
)

__all__ = [
    "_types",
    "backend",
    "batch",
    "chat",
    "context",
    "memory",
    "model",
    "sampler",
    "state",
    "vocab",
]
