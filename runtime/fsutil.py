"""Crash-safe file primitives shared by every persisted type in the runtime.

One place for the publish-atomically dance (temp file in the same directory, fsync, rename,
fsync the directory) and for the single-writer lock, so that the snapshot store, the journal
and the long-term index all get the same guarantees.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from runtime.errors import LockedError

TMP_PREFIX = ".tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o700


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (mode 0700) and its parents if needed, and return it."""
    p = Path(path)
    p.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block exits cleanly.

    The data goes to a temp file (mode 0600) in the same directory; on success it is flushed,
    fsynced, renamed over ``path`` and the directory is fsynced. On any exception the temp file
    is removed and ``path`` is left exactly as it was, so the previous version stays readable.
    """
    target = Path(path)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def remove_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Delete temp files left by a writer that died mid-write; return how many were removed.

    Only call this while holding the directory's :class:`DirLock`, so that no live writer's
    temp file is removed.
    """
    removed = 0
    for child in Path(directory).glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            child.unlink()
            removed += 1
    return removed


class DirLock:
    """An exclusive, process-level lock on a directory (``flock`` on ``<dir>/.lock``).

    The kernel drops the lock when the process dies, so a crash never leaves a stale lock
    behind. A second process (or a second lock object in this one) gets :class:`LockedError`.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = ".lock") -> None:
        self.path = ensure_dir(directory) / name
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        """Take the lock without waiting; raise :class:`LockedError` if someone holds it."""
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self._read_holder()
                raise LockedError(
                    f"{self.path.parent} is already open for writing by another process"
                    f"{f' (pid {holder})' if holder else ''}; close it first or use another "
                    "directory"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _read_holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        """Drop the lock; safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
