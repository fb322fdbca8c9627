"""runtime.fsutil: the O_NOFOLLOW open, modes whatever the umask, the lock, error mapping."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import DiskFullError, LockedError, PersistError, UnsafePathError
from runtime.fsutil import (
    DirLock,
    atomic_write_all,
    atomic_write_bytes,
    ensure_dir,
    lock_exclusive,
    open_nofollow,
    persist_error,
    private_dir,
    warn_if_exposed,
)

REPO = Path(__file__).resolve().parents[2]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_open_nofollow_refuses_links_and_non_files(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("link", "dangling"):
        with pytest.raises(UnsafePathError, match="symlink") as info:
            open_nofollow(tmp_path / name, os.O_RDWR | os.O_CREAT)
        assert info.value.filename == str(tmp_path / name)
    assert target.read_text() == "keep" and not (tmp_path / "nowhere").exists()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        open_nofollow(tmp_path / "fifo", os.O_RDWR)


def test_open_nofollow_relative_to_a_directory_fd(tmp_path: Path) -> None:
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(open_nofollow("f", os.O_WRONLY | os.O_CREAT, dir_fd=dfd))
        os.symlink("f", "g", dir_fd=dfd)
        with pytest.raises(UnsafePathError):
            open_nofollow("g", os.O_WRONLY, dir_fd=dfd)
    finally:
        os.close(dfd)
    assert (tmp_path / "f").is_file()


@pytest.mark.usefixtures("open_umask")
def test_created_files_and_dirs_get_exact_modes_whatever_the_umask(tmp_path: Path) -> None:
    os.close(open_nofollow(tmp_path / "new", os.O_WRONLY | os.O_CREAT))
    assert mode_of(tmp_path / "new") == 0o600
    (tmp_path / "old").write_text("x")
    os.chmod(tmp_path / "old", 0o666)
    os.close(open_nofollow(tmp_path / "old", os.O_WRONLY))
    assert mode_of(tmp_path / "old") == 0o600  # narrowed when opened for writing
    atomic_write_bytes(tmp_path / "atomic", b"data")
    assert mode_of(tmp_path / "atomic") == 0o600
    ensure_dir(tmp_path / "a" / "b" / "c")
    assert [mode_of(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3


def test_private_dir_narrows_modes_and_refuses_links(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    assert mode_of(private_dir(loose)) == 0o700
    (tmp_path / "link").symlink_to(loose, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symlink"):
        private_dir(tmp_path / "link")


def test_persist_error_says_disk_full_and_names_the_path(tmp_path: Path) -> None:
    err = persist_error(OSError(errno.ENOSPC, "No space left"), tmp_path / "f", "could not write f")
    assert isinstance(err, DiskFullError) and err.errno == errno.ENOSPC
    assert "disk full" in str(err) and str(tmp_path / "f") in str(err)
    other = persist_error(OSError(errno.EIO, "I/O error"), tmp_path / "f", "could not write f")
    assert type(other) is PersistError and "I/O error" in str(other)


def test_dirlock_retry_after_a_failed_pid_write_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def enospc(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", enospc)
    with pytest.raises(DiskFullError, match="disk full"):
        DirLock(tmp_path).acquire()
    monkeypatch.undo()
    lock = DirLock(tmp_path).acquire()  # today: a false LockedError with no pid
    assert lock.held and (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()


def test_lock_exclusive_names_the_holder_from_proc_locks(tmp_path: Path) -> None:
    path = tmp_path / "held"
    path.write_bytes(b"")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(30)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(LockedError, match=f"pid {child.pid}"):
                lock_exclusive(fd, path)
        finally:
            os.close(fd)
    finally:
        child.kill()
        child.wait()
    fd = os.open(path, os.O_RDONLY)
    try:
        lock_exclusive(fd, path)
    finally:
        os.close(fd)


def test_warn_if_exposed_warns_once_per_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o750)
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o700)
    with caplog.at_level(logging.WARNING, logger="runtime.fsutil"):
        assert warn_if_exposed(open_dir) and warn_if_exposed(open_dir)
        assert not warn_if_exposed(closed)
    assert len([r for r in caplog.records if str(open_dir) in r.getMessage()]) == 1


def _writes(data: bytes) -> Any:
    def write(f: Any) -> int:
        f.write(data)
        return len(data)

    return write


@pytest.mark.parametrize("n", [1, 9])
def test_atomic_write_all_writes_every_file_or_none(tmp_path: Path, n: int) -> None:
    """Every file complete with its mode on success; after a failure in the last write,
    no file and no temp file (the earlier ones are never renamed before all are durable)."""
    dirs = [ensure_dir(tmp_path / f"d{i % 3}") for i in range(n)]
    paths = [d / f"f{i}" for i, d in enumerate(dirs)]
    sizes = atomic_write_all([(p, _writes(b"x" * i)) for i, p in enumerate(paths)])
    assert sizes == list(range(n))
    assert [p.read_bytes() for p in paths] == [b"x" * i for i in range(n)]
    assert all(mode_of(p) == 0o600 for p in paths)

    def broken(f: Any) -> int:
        f.write(b"partial")
        raise OSError(errno.EIO, "the disk went away")

    others = [d / f"g{i}" for i, d in enumerate(dirs)]
    jobs = [(p, _writes(b"new")) for p in others[:-1]] + [(others[-1], broken)]
    with pytest.raises(OSError, match="went away"):
        atomic_write_all(jobs)
    assert not any(p.exists() for p in others)
    assert sorted(q.name for d in set(dirs) for q in d.iterdir()) == sorted(p.name for p in paths)
