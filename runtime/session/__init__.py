"""Sessions: a conversation's short-term memory (journal + KV sequence + checkpoints) and
the pool that shares one context among them.

One module per part: :mod:`~runtime.session.window` (the KV sequence, the tokens it holds and
the record a checkpoint keeps of them),
:mod:`~runtime.session.checkpointer` (checkpoints: the interface and the chunk store's),
:mod:`~runtime.session.resume` (rebuilding the KV), :mod:`~runtime.session.session` (the
session, composed of those parts), :mod:`~runtime.session.pool` (residency).
"""

from runtime.errors import ContextFullError, SessionError
from runtime.session.checkpointer import Checkpointer, ChunkCheckpointer
from runtime.session.pool import SessionPool
from runtime.session.resume import Rebuild, ResumeReport
from runtime.session.session import Session
from runtime.session.window import (
    IMPORTED,
    MODEL_TAG,
    WINDOW_ROLE,
    SequenceKV,
    Span,
    Window,
    model_tag,
    window_after,
    window_from_manifest,
)

__all__ = [
    "IMPORTED",
    "MODEL_TAG",
    "WINDOW_ROLE",
    "Checkpointer",
    "ChunkCheckpointer",
    "ContextFullError",
    "Rebuild",
    "ResumeReport",
    "SequenceKV",
    "Session",
    "SessionError",
    "SessionPool",
    "Span",
    "Window",
    "model_tag",
    "window_after",
    "window_from_manifest",
]
