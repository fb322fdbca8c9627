"""What a failure of SQLite, or of a store's final writes, means to a caller.

A raw :class:`sqlite3.Error` becomes the runtime error that says what to do about it (a full
disk, a damaged file, an I/O error): :func:`sqlite_error`, applied to every public method of
the store by :func:`sqlite_errors`. :func:`final_error` does the same for what the writes on
close (access times, the index save) may raise.
"""

from __future__ import annotations

import errno
import functools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from runtime.errors import DamagedStoreError, DiskFullError, MemoryStoreError, PersistError

# SQLite primary result codes (sqlite3.h) that this module tells apart
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


_P = ParamSpec("_P")
_R = TypeVar("_R")


class _OnFile(Protocol):
    #: the SQLite file (named in every error about it)
    db_path: Path


_S = TypeVar("_S", bound=_OnFile)


def sqlite_errors(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Raise :func:`sqlite_error`'s error instead of a ``sqlite3.Error``."""

    @functools.wraps(method)
    def wrapper(self: _S, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise sqlite_error(exc, self.db_path) from exc

    return wrapper  # type: ignore[return-value]  # functools' _Wrapped is not a Callable here


def sqlite_error(exc: sqlite3.Error, path: Path) -> MemoryStoreError | PersistError:
    """The runtime error for a raw SQLite error on the store at ``path`` (the db file): a
    full disk is a :class:`DiskFullError` and an I/O error a :class:`PersistError` (both
    retryable, as for any other write of the runtime), damage a :class:`DamagedStoreError`."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else int(code) & 0xFF
    text = str(exc)
    if primary == _SQLITE_FULL or "disk is full" in text:
        return DiskFullError(
            errno.ENOSPC,
            f"disk full: SQLite could not write ({text}); the change was rolled back, retry "
            "once space is freed",
            str(path),
        )
    if (
        primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
        or "malformed" in text
        or ("not a database" in text)
    ):
        return DamagedStoreError(
            f"{path} is damaged or not a memory store ({text}): move it aside (with its -wal "
            "and -shm files) to start an empty store, or restore it from a backup; the index "
            "is rebuilt from it on open"
        )
    if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN) or "disk I/O" in text:
        return PersistError(errno.EIO, f"SQLite I/O error: {text}", str(path))
    return MemoryStoreError(f"{path}: SQLite error: {text}")


def final_error(
    writes: Callable[[], None], path: Path, directory: Path
) -> MemoryStoreError | PersistError | None:
    """Run a closing store's final ``writes``; returns what they raised as a runtime error
    (None if they succeeded) for the SQLite file ``path`` of the store in ``directory``. Any
    other exception propagates."""
    try:
        writes()
    except sqlite3.Error as exc:
        error = sqlite_error(exc, path)
        error.__cause__ = exc
        return error
    except (MemoryStoreError, PersistError) as exc:
        return exc
    except (OSError, RuntimeError) as exc:
        error = PersistError(
            getattr(exc, "errno", None) or errno.EIO,
            f"could not save the index on close: {exc}",
            str(directory),
        )
        error.__cause__ = exc
        return error
    return None
