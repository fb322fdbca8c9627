"""Sessions: a conversation's short-term memory (journal + KV sequence + checkpoints) and
the pool that shares one context among them.

One module per part: :mod:`~runtime.session.window` (the tokens in the KV sequence and the
record a checkpoint keeps of them), :mod:`~runtime.session.resume` (rebuilding the KV),
:mod:`~runtime.session.capture` (checkpoints), :mod:`~runtime.session.session` (turns),
:mod:`~runtime.session.pool` (residency), :mod:`~runtime.session.ingest` (long-term sync).
"""

from runtime.errors import ContextFullError, SessionError
from runtime.session.base import (
    JOURNAL_DIR,
    SNAPSHOT_ID_PREFIX,
    WINDOW_ROLE,
    ResumeReport,
    _journal_seq_of,
)
from runtime.session.ingest import sync_longterm
from runtime.session.pool import SessionPool
from runtime.session.session import Session
from runtime.session.window import window_after, window_from_manifest

__all__ = [
    "JOURNAL_DIR",
    "SNAPSHOT_ID_PREFIX",
    "WINDOW_ROLE",
    "ContextFullError",
    "ResumeReport",
    "Session",
    "SessionError",
    "SessionPool",
    "_journal_seq_of",
    "sync_longterm",
    "window_after",
    "window_from_manifest",
]
