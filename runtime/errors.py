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
