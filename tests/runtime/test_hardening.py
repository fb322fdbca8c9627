"""Issue 12: a full disk, forged files, symlinks, file modes and the journal lock.

Each test here failed on the code before the fix it guards. A real full disk is a small
tmpfs (root only; skipped with the reason where mounting is impossible); an injected ENOSPC
(monkeypatched ``os.write``) covers the same paths everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import sqlite3
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import runtime.cli.memory_cmd as cli_memory
from runtime.chunks import ChunkStore
from runtime.cli import main
from runtime.errors import LockedError, MemoryRuntimeError
from runtime.journal import Journal
from runtime.longterm import MemoryStore
from runtime.longterm.db import DB_NAME
from runtime.longterm.manifest import MANIFEST_NAME, Manifest
from tests.runtime.chunk_helpers import commit_fake_checkpoint
from tests.runtime.memory_helpers import HashEmbedder


def open_store(directory: Path, **kwargs: Any) -> MemoryStore:
    return MemoryStore(directory, HashEmbedder(), **kwargs)  # type: ignore[arg-type]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``tmp_path/disk`` (skipped where mounting is impossible)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, and mounting needs root")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(directory: Path, leave: int = 0) -> Path:
    """Fill the file system under ``directory`` to ``leave`` bytes free; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\xff" * 4096)
    finally:
        os.close(fd)
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - (leave - free)))
    return filler


# -- disk full: the journal -------------------------------------------------------------------


def test_journal_append_on_a_real_full_disk_stays_usable(small_disk: Path) -> None:
    path = small_disk / "journals" / "s.log"
    j = Journal(path)
    j.append("user", "before", [1])
    filler = fill_disk(small_disk)
    with pytest.raises(OSError, match="disk full") as info:
        for i in range(200):  # ~3 KB records: smaller than a write buffer
            j.append("user", "x" * 3000, [i])
    assert isinstance(info.value, MemoryRuntimeError) and str(path) in str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert not j.closed
    good = len(j)
    with Journal(path, readonly=True) as reader:  # no partial record was left behind
        assert len(reader) == good
    filler.unlink()  # space is back: the very same object works again, no manual step
    entry = j.append("user", "after", [2])
    assert entry.seq == good
    j.close()
    with Journal(path) as again:
        assert len(again) == good + 1 and again[-1].text == "after"


def test_journal_append_enospc_injected_rolls_back_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.log"
    j = Journal(path)
    j.append("user", "one", [1])
    size = path.stat().st_size
    real_write = os.write
    calls = {"n": 0}

    def half_then_enospc(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])  # a short write, then full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError, match="disk full") as info:
        j.append("user", "x" * 5000, [2])
    monkeypatch.setattr(os, "write", real_write)
    assert str(path) in str(info.value) and isinstance(info.value, MemoryRuntimeError)
    assert not j.closed and len(j) == 1
    assert path.stat().st_size == size  # the half record was cut off
    assert j.append("user", "two", [3]).seq == 1
    j.close()
    with Journal(path) as again:
        assert [e.text for e in again] == ["one", "two"]


# -- disk full: the lock file -----------------------------------------------------------------


def test_store_lock_is_released_when_its_pid_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def enospc(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    monkeypatch.setattr(os, "pwrite", enospc)
    with pytest.raises(OSError) as info:
        ChunkStore(tmp_path / "kv")
    assert not isinstance(info.value, LockedError)
    monkeypatch.undo()
    with ChunkStore(tmp_path / "kv") as store:  # not a false LockedError
        assert store.sessions() == []


# -- disk full: the memory store --------------------------------------------------------------


class _FullDisk:
    """A connection proxy whose writes fail like SQLite's on a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.split()[0].upper() in {"BEGIN", "INSERT", "UPDATE", "DELETE", "COMMIT"}:
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_memory_add_and_close_on_a_full_disk_raise_a_runtime_error(tmp_path: Path) -> None:
    d = tmp_path / "mem"
    store = open_store(d)
    store.add("kept")
    assert store._db is not None
    store._db = _FullDisk(store._db)  # type: ignore[assignment]
    with pytest.raises(OSError, match="disk full") as info:
        store.add("lost")
    assert isinstance(info.value, MemoryRuntimeError) and DB_NAME in str(info.value)
    with pytest.raises(OSError, match="disk full"):
        store.close()  # pending index save fails: one clear error, everything released
    assert store._db is None and store._index is None
    with open_store(d) as again:  # the lock was released: no LockedError
        assert len(again) == 1 and again.search("kept", 1)[0].text == "kept"


def test_memory_store_on_a_real_full_disk(small_disk: Path) -> None:
    d = small_disk / "mem"
    store = open_store(d, save_every=10**9)
    acked = [store.add("warm up")]
    filler = fill_disk(small_disk, leave=48 << 10)
    with pytest.raises(OSError, match="disk full") as info:
        for i in range(5000):
            acked.append(store.add(f"memory {i} " + "y" * 400))
    assert isinstance(info.value, MemoryRuntimeError) and str(d) in str(info.value)
    with contextlib.suppress(OSError):
        store.close()  # may fail to save the index; must release everything anyway
    assert store._db is None
    filler.unlink()
    with open_store(d) as again:
        assert len(again) == len(acked)
        again.add("after")


# -- forged and damaged files -----------------------------------------------------------------


def forge_capacity(directory: Path, max_elements: int) -> None:
    """Rewrite the saved index to claim ``max_elements``, with every checksum valid."""
    manifest = Manifest.from_bytes((directory / MANIFEST_NAME).read_bytes())
    blob = directory / manifest.blob_name
    data = bytearray(blob.read_bytes())
    struct.pack_into("<Q", data, 8, max_elements)  # hnswlib header: max_elements_
    blob.write_bytes(data)
    forged = dataclasses.replace(
        manifest, max_elements=max_elements, blob_sha256=hashlib.sha256(data).digest()
    )
    (directory / MANIFEST_NAME).write_bytes(forged.to_bytes())


def test_forged_index_capacity_is_refused_before_hnswlib_allocates(tmp_path: Path) -> None:
    d = tmp_path / "mem"
    with open_store(d) as store:
        store.add_many([f"fact {i}" for i in range(20)])
    forge_capacity(d, 3_000_000)
    with open_store(d) as store:
        assert "capacity" in store.recovered
        assert store.stats()["index_capacity"] <= 4096
        assert len(store) == 20 and store.search("fact 3", 1)[0].text == "fact 3"
    saved = Manifest.from_bytes((d / MANIFEST_NAME).read_bytes())
    assert saved.max_elements <= 4096  # the oversized capacity does not persist


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_sqlite_file_is_a_typed_error_naming_it(tmp_path: Path, damage: str) -> None:
    d = tmp_path / "mem"
    with open_store(d) as store:
        store.add_many([f"fact {i} " + "z" * 200 for i in range(300)])
    db = d / DB_NAME
    if damage == "garbage":
        db.write_bytes(os.urandom(8192))
    else:
        os.truncate(db, db.stat().st_size // 2)
    with pytest.raises(MemoryRuntimeError) as info, open_store(d) as store:
        store.stats()
        store.search("fact 1", 5)
        store.add("more")
    assert str(db) in str(info.value) and "move it aside" in str(info.value)
    assert not isinstance(info.value, sqlite3.Error)


def test_cli_on_a_damaged_sqlite_file_prints_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_memory, "_embedder", lambda args: HashEmbedder())
    d = tmp_path / "mem"
    d.mkdir()
    (d / DB_NAME).write_bytes(b"this is not a database" * 100)
    for command in (["stats"], ["add", "x"], ["search", "x"]):
        assert main(["memory", command[0], "--dir", str(d), *command[1:]]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert str(d / DB_NAME) in err, err


# -- symlinks ---------------------------------------------------------------------------------


def test_lock_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = tmp_path / "kv"
    d.mkdir()
    (d / ".lock").symlink_to(victim)
    with pytest.raises(PermissionError, match="symlink"):
        ChunkStore(d)
    assert victim.read_text() == "precious"


def test_journal_symlinks_are_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    jdir = tmp_path / "data" / "journals"
    jdir.mkdir(parents=True)
    (jdir / "a.log").symlink_to(victim)
    with pytest.raises(PermissionError, match="symlink"):
        Journal(jdir / "a.log")
    assert victim.read_text() == "precious"
    outside = tmp_path / "outside.log"
    (jdir / "b.log").symlink_to(outside)  # dangling
    with pytest.raises(PermissionError, match="symlink"):
        Journal(jdir / "b.log")
    assert not outside.exists()


def torn_journal(path: Path) -> int:
    with Journal(path) as j:
        j.append("user", "kept", [1])
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x07" * 5)  # a torn header
    return good


def test_planted_torn_link_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = tmp_path / "journals"
    d.mkdir()
    path = d / "s.log"
    good = torn_journal(path)
    (d / f"s.log.torn-{good}").symlink_to(victim)
    with Journal(path) as j:
        assert len(j) == 1
    assert victim.read_text() == "precious"
    rescued = [p for p in d.glob("s.log.torn-*") if not p.is_symlink()]
    assert [p.read_bytes() for p in rescued] == [b"\x07" * 5]


def test_second_torn_tail_at_the_same_offset_keeps_the_first(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    good = torn_journal(path)
    Journal(path).close()
    with open(path, "ab") as f:
        f.write(b"\x09" * 7)
    Journal(path).close()
    rescued = sorted(p.read_bytes() for p in tmp_path.glob(f"s.log.torn-{good}*"))
    assert rescued == sorted([b"\x07" * 5, b"\x09" * 7])
    assert all(mode_of(p) == 0o600 for p in tmp_path.glob("s.log.torn-*"))


def test_delete_session_does_not_follow_a_symlinked_session_dir(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("a.txt", "000000000001.kvman"):
        (outside / name).write_text("precious")
    root = tmp_path / "kv"
    with ChunkStore(root) as store:
        link = root / "manifests" / "evil"
        link.parent.mkdir()
        link.symlink_to(outside, target_is_directory=True)
        with contextlib.suppress(OSError):
            store.delete_session("evil")
        assert sorted(p.name for p in outside.iterdir()) == ["000000000001.kvman", "a.txt"]
        assert not link.is_symlink()  # the link itself went
        link.symlink_to(outside, target_is_directory=True)
        assert store.sessions() == []  # a link is never listed as a session
        assert store.manifests("evil") == []  # nor read through
        with pytest.raises(PermissionError, match="symlink"):
            commit_fake_checkpoint(store, "evil")
        assert sorted(p.name for p in outside.iterdir()) == ["000000000001.kvman", "a.txt"]


def test_delete_session_does_not_follow_a_symlink_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.txt").write_text("precious")
    root = tmp_path / "kv"
    with ChunkStore(root) as store:
        commit_fake_checkpoint(store, "s1")
        (root / "manifests" / "s1" / "quarantine").symlink_to(outside, target_is_directory=True)
        store.delete_session("s1")
        assert not (root / "manifests" / "s1").exists()
    assert (outside / "a.txt").read_text() == "precious"


def test_memory_store_refuses_a_symlinked_database(tmp_path: Path) -> None:
    victim = tmp_path / "victim.db"
    d = tmp_path / "mem"
    d.mkdir()
    (d / DB_NAME).symlink_to(victim)
    with pytest.raises(PermissionError, match="symlink"):
        open_store(d)
    assert not victim.exists()


# -- file modes -------------------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_every_file_is_0600_and_every_dir_0700_whatever_the_umask(tmp_path: Path) -> None:
    data = tmp_path / "data"
    d = data / "mem"
    store = open_store(d)
    store.add_many([f"fact {i}" for i in range(5)])
    store.save_index()
    files = [d / DB_NAME, d / f"{DB_NAME}-wal", d / f"{DB_NAME}-shm", d / ".lock"]
    files += [d / MANIFEST_NAME, *d.glob("index-*.hnsw")]
    assert {p.name: mode_of(p) for p in files} == {p.name: 0o600 for p in files}
    store.close()
    assert mode_of(d) == 0o700 and mode_of(data) == 0o700
    with ChunkStore(data / "kv") as chunks:
        man = commit_fake_checkpoint(chunks, "s1")
        path = chunks.chunk_path(man.refs[0].key)
        manifest = data / "kv" / "manifests" / "s1" / f"{man.generation:012d}.kvman"
        assert mode_of(path) == 0o600 and mode_of(path.parent) == 0o700
        assert mode_of(manifest) == 0o600 and mode_of(manifest.parent) == 0o700
        assert mode_of(data / "kv" / ".lock") == 0o600
    jpath = data / "journals" / "s.log"
    torn_journal(jpath)
    Journal(jpath).close()
    assert mode_of(jpath) == 0o600 and mode_of(jpath.parent) == 0o700
    (torn,) = jpath.parent.glob("s.log.torn-*")
    assert mode_of(torn) == 0o600


def test_existing_loose_modes_are_narrowed(tmp_path: Path) -> None:
    d = tmp_path / "mem"
    with open_store(d) as store:
        store.add("x")
    for p in d.iterdir():
        p.chmod(0o644)
    with open_store(d) as store:
        store.add("y")
        assert mode_of(d / DB_NAME) == 0o600 and mode_of(d / f"{DB_NAME}-wal") == 0o600
    root = tmp_path / "kv"
    (root / "manifests" / "s1").mkdir(parents=True, mode=0o755)
    (root / "manifests" / "s1").chmod(0o755)
    with ChunkStore(root) as chunks:
        commit_fake_checkpoint(chunks, "s1")
    assert mode_of(root / "manifests" / "s1") == 0o700
    jpath = tmp_path / "j.log"
    jpath.write_bytes(b"")
    jpath.chmod(0o644)
    Journal(jpath).close()
    assert mode_of(jpath) == 0o600


def test_an_exposed_data_root_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "exposed"
    d.mkdir()
    d.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            open_store(d).close()
    warnings = [r for r in caplog.records if "0755" in r.getMessage()]
    assert len(warnings) == 1 and str(d) in warnings[0].getMessage()
    assert mode_of(d) == 0o755  # the user's own directory is left as it is


# -- the journal lock -------------------------------------------------------------------------


def test_two_journal_writers_on_one_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    first = Journal(path)
    first.append("user", "zero", [1])
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        Journal(path)
    with Journal(path, readonly=True) as reader:  # a reader needs no lock
        assert [e.text for e in reader] == ["zero"]
    first.append("user", "one", [2])
    first.close()
    with Journal(path) as second:
        assert [e.seq for e in second] == [0, 1]
