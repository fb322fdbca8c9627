"""Crash-safe file primitives shared by every persisted type in the runtime.

One place for the publish-atomically dance (temp file in the same directory, fsync, rename,
fsync the directory), for opening files without following symlinks, for file modes, and for
the single-writer lock, so that the snapshot store, the journal and the long-term index all
get the same guarantees. :func:`sha256_file`, :func:`sha256_fd` and :func:`cache_root` are
defined once in :mod:`llamaffi._util` (llamaffi needs them too, and never imports the
runtime) and re-exported here for the runtime's modules.

Every file the runtime creates is mode 0600 and every directory 0700, whatever the umask
(modes are set with ``fchmod``/``chmod`` after creation, not only requested). Nothing inside
the data directory is opened for writing through a symlink: :func:`open_nofollow` refuses one
with :class:`runtime.errors.UnsafePathError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from llamaffi._util import cache_root as cache_root
from llamaffi._util import sha256_fd as sha256_fd
from llamaffi._util import sha256_file as sha256_file
from runtime.errors import DiskFullError, LockedError, PersistError, UnsafePathError

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o700
#: errnos that mean "no space": a full disk, or a full quota.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_warned_exposed: set[str] = set()
_warned_lock = threading.Lock()


def persist_error(
    exc: OSError,
    path: str | os.PathLike[str],
    what: str,
    *,
    error: type[PersistError] = PersistError,
    full: type[PersistError] = DiskFullError,
) -> PersistError:
    """The runtime error for a failed write of ``path``: ``full`` (:class:`DiskFullError`)
    for ENOSPC/EDQUOT, else ``error`` (:class:`PersistError`); a part passes its own
    subclasses (the journal does).

    ``what`` says what was not written, e.g. ``"could not append a journal record"``; the
    message always names the path, and says "disk full" when that is the cause.
    """
    code = exc.errno or errno.EIO
    if code in FULL_ERRNOS:
        return full(
            code,
            f"disk full: {what}; nothing partial was kept, retry once space is freed",
            str(path),
        )
    return error(code, f"{what}: {exc.strerror or exc}", str(path))


def open_nofollow(
    path: str | os.PathLike[str],
    flags: int,
    mode: int = FILE_MODE,
    *,
    dir_fd: int | None = None,
) -> int:
    """``os.open`` that refuses a symlink at ``path`` and anything but a regular file.

    A symlink (dangling or not) raises :class:`UnsafePathError` naming the path, so a planted
    link can never make us truncate, overwrite or create a file elsewhere. When the file is
    opened for writing its mode is forced to ``mode`` (default 0600) whatever the umask and
    whatever it was before. ``dir_fd`` makes ``path`` relative to an open directory.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(
                errno.ELOOP,
                "is a symlink; the runtime never writes through one (remove it)",
                str(path),
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(
                errno.EINVAL, "is not a regular file; move it out of the data directory", str(path)
            )
        if flags & (os.O_WRONLY | os.O_RDWR) and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (mode 0700) and its parents if needed, and return it.

    Directories created here get exactly 0700 (the umask cannot widen or narrow it); existing
    ones are left as they are (see :func:`private_dir` for the runtime's own directories).
    """
    p = Path(path)
    missing: list[Path] = []
    cur = p
    while not cur.exists() and not cur.is_symlink() and cur != cur.parent:
        missing.append(cur)
        cur = cur.parent
    p.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for created in missing:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(created, DIR_MODE, follow_symlinks=False)
    return p


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create (or adopt) one of the runtime's own directories: never a symlink, always 0700.

    For directories whose layout the runtime owns (a session's snapshot directory, a
    quarantine directory): a symlink there raises :class:`UnsafePathError` instead of being
    followed, and an existing directory's mode is narrowed to 0700.
    """
    p = Path(path)
    if p.is_symlink():
        raise UnsafePathError(
            errno.ELOOP, "is a symlink; the runtime never writes through one (remove it)", str(p)
        )
    ensure_dir(p)
    st = os.lstat(p)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(errno.ENOTDIR, "is not a directory", str(p))
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(p, DIR_MODE, follow_symlinks=False)
    return p


def remove_tree(path: str | os.PathLike[str]) -> int:
    """Remove directory ``path`` and everything in it, following no symlink; return how many
    non-directory entries went.

    A symlink at ``path`` itself is removed (the link, never its target). Inside, the walk
    goes by directory file descriptors with ``O_NOFOLLOW``, so a link there (or a directory
    swapped for one meanwhile) is unlinked, never entered. The parent is fsynced.
    """
    p = Path(path)
    if p.is_symlink():
        logger.warning("%s is a symlink: removing the link only, not its target", p)
        p.unlink()
        fsync_dir(p.parent)
        return 0
    if not p.is_dir():
        return 0
    parent_fd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        removed = _remove_tree_at(parent_fd, p.name)
        os.fsync(parent_fd)
    finally:
        os.close(parent_fd)
    return removed


def _remove_tree_at(parent_fd: int, name: str) -> int:
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    removed = 0
    try:
        with os.scandir(fd) as it:
            entries = list(it)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                removed += _remove_tree_at(fd, entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
                removed += 1
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)
    return removed


def own_subdirs(path: str | os.PathLike[str]) -> list[Path]:
    """The real directories directly under ``path``, sorted: symlinks are not ours and are
    never listed (nor followed)."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return []
    return sorted(c for c in p.iterdir() if not c.is_symlink() and c.is_dir())


def warn_if_exposed(path: str | os.PathLike[str]) -> bool:
    """Log one warning per process and directory if ``path`` is open to group or others.

    The runtime's files are 0600 anyway; the warning is for the user's own data root (made
    with a plain ``mkdir``, 0755), whose listing and any foreign files stay visible. Returns
    whether the directory is exposed.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return False
    if not mode & 0o077:
        return False
    key = os.path.realpath(path)
    with _warned_lock:
        if key in _warned_exposed:
            return True
        _warned_exposed.add(key)
    logger.warning(
        "data directory %s is mode %04o (open to group/others); its files are created 0600, "
        "but consider chmod 700 %s",
        path,
        mode,
        path,
    )
    return True


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block exits cleanly.

    The data goes to a temp file (mode 0600) in the same directory; on success it is flushed,
    fsynced, renamed over ``path`` and the directory is fsynced. On any exception the temp file
    is removed and ``path`` is left exactly as it was, so the previous version stays readable.
    The temp name is random and created with ``O_EXCL``, which never follows a symlink; the
    rename replaces a symlink at ``path`` itself, never its target.
    """
    target = Path(path)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}.{secrets.token_hex(4)}")
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
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


#: Files fsynced at once by :func:`atomic_write_all` (concurrent fsyncs share journal commits).
SYNC_WORKERS = 4


def atomic_write_all(
    jobs: Sequence[tuple[str | os.PathLike[str], Callable[[BinaryIO], int]]],
) -> list[int]:
    """Write every ``(path, write)`` as :func:`atomic_writer` does, all durable on return;
    return what each ``write(f)`` returned.

    The files are written one after another on this thread while the earlier ones are
    fsynced on worker threads; once every file is durable they are renamed, and each
    distinct directory is fsynced once, concurrently (the filesystem commits concurrent
    fsyncs together). One fsync per file and one per directory, as before, but they overlap
    the writing and each other instead of queueing behind it; at most ``2 * SYNC_WORKERS``
    files are in flight. On any exception no path is replaced (every temp file is removed),
    except those already renamed, which are complete and fsynced (their directory entries
    may not be durable yet).
    """
    if len(jobs) <= 1:
        out = []
        for path, write in jobs:
            with atomic_writer(path) as f:
                out.append(write(f))
        return out
    sizes: list[int] = []
    temps: list[tuple[Path, Path]] = []
    renamed = 0
    with concurrent.futures.ThreadPoolExecutor(SYNC_WORKERS, "fsync") as pool:
        synced: list[concurrent.futures.Future[None]] = []
        try:
            for k, (path, write) in enumerate(jobs):
                if k >= 2 * SYNC_WORKERS:  # bound the open files and dirty pages in flight
                    synced[k - 2 * SYNC_WORKERS].result()
                target = Path(path)
                tmp = target.with_name(f"{TMP_PREFIX}{target.name}.{secrets.token_hex(4)}")
                f = os.fdopen(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")
                temps.append((tmp, target))
                try:
                    sizes.append(write(f))
                    f.flush()
                except BaseException:
                    f.close()
                    raise
                synced.append(pool.submit(_sync_and_close, f))
            for done in synced:
                done.result()
            for tmp, target in temps:
                os.replace(tmp, target)
                renamed += 1
        except BaseException:
            concurrent.futures.wait(synced)
            for tmp, _ in temps[renamed:]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise
        dirs = list(dict.fromkeys(target.parent for _, target in temps))
        for done in [pool.submit(fsync_dir, d) for d in dirs]:
            done.result()
    return sizes


def _sync_and_close(f: BinaryIO) -> None:
    try:
        os.fsync(f.fileno())
    finally:
        f.close()


def remove_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Delete temp files left by a writer that died mid-write; return how many were removed.

    Only call this while holding the directory's :class:`DirLock`, so that no live writer's
    temp file is removed.
    """
    removed = 0
    for child in Path(directory).glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            child.unlink()  # unlink never follows a symlink: only the link goes
            removed += 1
    return removed


def flock_holder(fd: int) -> int | None:
    """The pid holding an ``flock`` on the file open at ``fd`` (from ``/proc/locks``), if known."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == ident:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def lock_exclusive(
    fd: int, what: str | os.PathLike[str], holder: Callable[[], str] | None = None
) -> None:
    """``flock(LOCK_EX | LOCK_NB)`` on ``fd``; raise :class:`LockedError` if someone holds it.

    ``what`` names the locked thing in the message; ``holder`` returns the pid that holds it
    (by default it is looked up in ``/proc/locks``).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        who = holder() if holder is not None else str(flock_holder(fd) or "")
        raise LockedError(
            f"{what} is already open for writing by another process"
            f"{f' (pid {who})' if who else ''}; close it first or use another "
            "directory"
        ) from None


class DirLock:
    """An exclusive, process-level lock on a directory (``flock`` on ``<dir>/.lock``).

    The kernel drops the lock when the process dies, so a crash never leaves a stale lock
    behind. A second process (or a second lock object in this one) gets :class:`LockedError`.
    The lock file is opened without following symlinks and holds the owner's pid; if writing
    the pid fails (a full disk) the lock is dropped again and the error says so.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = ".lock") -> None:
        self.path = ensure_dir(directory) / name
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        """Take the lock without waiting; raise :class:`LockedError` if someone holds it."""
        if self._fd is not None:
            return self
        fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            lock_exclusive(fd, self.path.parent, self._read_holder)
            self._write_pid(fd)
        except BaseException:
            os.close(fd)  # also drops the flock: a retry in this process must not see it held
            raise
        self._fd = fd
        return self

    def _write_pid(self, fd: int) -> None:
        data = f"{os.getpid()}\n".encode()
        try:
            os.ftruncate(fd, 0)
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            raise persist_error(exc, self.path, "could not write the lock file") from exc

    def _read_holder(self) -> str:
        try:
            fd = open_nofollow(self.path, os.O_RDONLY)
        except OSError:
            return ""
        try:
            return os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        finally:
            os.close(fd)

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
