"""The memory runtime: short-term (KV checkpoints) and long-term (embedded items) memory.

An application uses one object, :class:`runtime.Runtime` (:mod:`runtime.app`). One
module or package per concept below it: :mod:`runtime.journal` (the fsynced turn journal,
the truth), :mod:`runtime.session` (journal-first sessions, their checkpoints' policy and background
writer, and the pool), :mod:`runtime.chunks` (chunked,
content-addressed KV checkpoints), :mod:`runtime.snapshot` (the KV file format),
:mod:`runtime.storage` (the journal and blob store interfaces and the local blob store),
:mod:`runtime.layout` (the data directory's names), :mod:`runtime.template` (chat
templates), :mod:`runtime.models` (model names), :mod:`runtime.embed` (ONNX MiniLM embedder),
:mod:`runtime.longterm` (long-term memory: SQLite, hnswlib index, ranking),
:mod:`runtime.server` (the OpenAI-compatible server), :mod:`runtime.fsutil` (atomic files
and locks), :mod:`runtime.errors` (every runtime exception), :mod:`runtime.cli`.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.app import Reply, Runtime, RuntimeConfig, Sampling

__all__ = ["Reply", "Runtime", "RuntimeConfig", "Sampling"]


def __getattr__(name: str) -> Any:
    # Lazy: `import runtime` must not load libllama (the memory CLI never needs it).
    if name in __all__:
        from runtime import app as _app

        return getattr(_app, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
