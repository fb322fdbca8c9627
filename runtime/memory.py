"""Former home of the long-term memory store; it now lives in :mod:`runtime.longterm`.

Every name this module defined is re-exported here, so ``from runtime.memory import ...``
keeps working. ``ClosedError`` is :class:`runtime.errors.MemoryClosedError` under its old
name. The tunables (``EXACT_FILTER_LIMIT``, ``TOUCH_FLUSH_EVERY``) are copies: change them in
:mod:`runtime.longterm.index` and :mod:`runtime.longterm.db`, where they are read.
"""

from __future__ import annotations

from runtime.embed.embedder import TextEmbedder
from runtime.errors import (
    DamagedStoreError,
    MemoryClosedError,
    MemoryStoreError,
    MemoryStoreFullError,
    MemoryStoreIOError,
    ReadOnlyError,
    StoreMismatchError,
)
from runtime.longterm.db import (
    DB_NAME,
    KINDS,
    MAX_TEXT_CHARS,
    SCHEMA_VERSION,
    TOUCH_FLUSH_EVERY,
    FloatArray,
    MemoryItem,
    sqlite_error,
)
from runtime.longterm.index import EXACT_FILTER_LIMIT
from runtime.longterm.ranking import Hit, ScoringWeights
from runtime.longterm.store import MemoryStore

#: The old name of :class:`runtime.errors.MemoryClosedError` (``llamaffi.ClosedError`` is
#: another class: a closed model or context).
ClosedError = MemoryClosedError

__all__ = [
    "DB_NAME",
    "EXACT_FILTER_LIMIT",
    "KINDS",
    "MAX_TEXT_CHARS",
    "SCHEMA_VERSION",
    "TOUCH_FLUSH_EVERY",
    "ClosedError",
    "DamagedStoreError",
    "FloatArray",
    "Hit",
    "MemoryClosedError",
    "MemoryItem",
    "MemoryStore",
    "MemoryStoreError",
    "MemoryStoreFullError",
    "MemoryStoreIOError",
    "ReadOnlyError",
    "ScoringWeights",
    "StoreMismatchError",
    "TextEmbedder",
    "sqlite_error",
]
