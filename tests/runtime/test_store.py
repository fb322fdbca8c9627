"""SnapshotStore: atomic writes, retention, quarantine, locking, modes, crashes, ENOSPC."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import select
import signal
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime import snapshot as S
from runtime.errors import InvalidNameError, LockedError
from runtime.store import SnapshotStore, StoreError, StoreWriteError, validate_session_id
from tests.runtime import store_writer

REPO = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("store_writer.py")
N = 64 << 10


def snap(k: int, session: str = "s1", n: int = N) -> S.Snapshot:
    return store_writer.make(k, n, session)


def intact(stored_snapshot: S.Snapshot, n: int = N) -> bool:
    k = stored_snapshot.tokens[0]
    return bool(np.array_equal(S.decode(stored_snapshot), store_writer.payload(k, n)))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SnapshotStore]:
    with SnapshotStore(tmp_path / "store", keep=3) as s:
        yield s


def test_save_and_latest_valid(store: SnapshotStore) -> None:
    for k in range(2):
        store.save("s1", snap(k))
    latest = store.latest_valid("s1")
    assert latest is not None
    assert latest.generation == 2 and latest.snapshot.tokens == (1,)
    assert intact(latest.snapshot)
    assert store.latest_valid("never-written") is None
    assert store.sessions() == ["s1"]


def test_modes(store: SnapshotStore) -> None:
    path = store.save("s1", snap(0))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((store.root / ".lock").stat().st_mode) == 0o600


def test_retention(tmp_path: Path) -> None:
    with SnapshotStore(tmp_path, keep=2) as store:
        for k in range(5):
            store.save("s1", snap(k))
        assert [g for g, _ in store.generations("s1")] == [5, 4]
        with pytest.raises(ValueError):
            SnapshotStore(tmp_path / "other", keep=0)


@pytest.mark.parametrize(
    "bad", ["", "..", "../x", "a/b", "/abs", ".hidden", "x" * 129, "a b", "quarantine", "a\0b"]
)
def test_session_ids_validated(store: SnapshotStore, bad: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid session id"):
        store.save(bad, snap(0))
    with pytest.raises(InvalidNameError):
        store.latest_valid(bad)


def test_good_session_ids() -> None:
    for good in ("a", "chat-1", "user_42.session", "X" * 128):
        assert validate_session_id(good) == good


def test_session_mismatch_refused(store: SnapshotStore) -> None:
    with pytest.raises(StoreError, match="belongs to session"):
        store.save("s2", snap(0, session="s1"))


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip-header":
        data[100] ^= 0x10
    elif how == "flip-payload":
        data[-10] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip-header", "flip-payload", "truncate", "empty"])
def test_latest_valid_quarantines_and_falls_back(
    store: SnapshotStore, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    store.save("s1", snap(0))
    newest = store.save("s1", snap(1))
    _damage(newest, how)
    with caplog.at_level(logging.WARNING, logger="runtime.store"):
        latest = store.latest_valid("s1")
    assert latest is not None and latest.snapshot.tokens == (0,) and intact(latest.snapshot)
    assert not newest.exists()
    quarantined = sorted((newest.parent / "quarantine").iterdir())
    assert len(quarantined) == 2  # the file and its .reason
    assert "damaged snapshot" in caplog.text
    reason = next(p for p in quarantined if p.name.endswith(".reason")).read_text()
    # The payload flip hits the last byte: the high-byte plane, chunk 1 of a one-segment file.
    expected = {"header_checksum", "chunk[1].checksum", "file_size", "magic"}
    assert reason.split(":")[0] in expected


def test_all_damaged_gives_none(store: SnapshotStore) -> None:
    _damage(store.save("s1", snap(0)), "truncate")
    assert store.latest_valid("s1") is None


def test_readonly_store(store: SnapshotStore) -> None:
    store.save("s1", snap(0))
    newest = store.save("s1", snap(1))
    _damage(newest, "flip-payload")
    reader = SnapshotStore(store.root, readonly=True)
    latest = reader.latest_valid("s1")
    assert latest is not None and latest.generation == 1
    assert newest.exists()  # a reader never moves files
    with pytest.raises(StoreError, match="read-only"):
        reader.save("s1", snap(2))


def test_lock_in_process(store: SnapshotStore) -> None:
    with pytest.raises(LockedError, match="already open for writing"):
        SnapshotStore(store.root)
    store.close()
    with SnapshotStore(store.root):
        pass
    with pytest.raises(StoreError, match="closed"):
        store.save("s1", snap(0))


def test_lock_second_process(store: SnapshotStore) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from runtime.errors import LockedError
        from runtime.store import SnapshotStore
        try:
            SnapshotStore({str(store.root)!r})
        except LockedError as exc:
            print(exc)
            sys.exit(3)
        sys.exit(0)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    assert f"pid {os.getpid()}" in proc.stdout


def test_stale_temps_removed_on_open(tmp_path: Path) -> None:
    with SnapshotStore(tmp_path) as store:
        store.save("s1", snap(0))
    leftover = tmp_path / "s1" / ".tmp-000000000002.kvsnap.dead"
    leftover.write_bytes(b"partial")
    with SnapshotStore(tmp_path) as store:
        assert not leftover.exists()
        assert store.temp_files("s1") == []
        assert store.latest_valid("s1") is not None


# -- crashes ----------------------------------------------------------------------------------


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        proc.wait()
        pytest.fail("writer subprocess did not get ready in time")
    line = proc.stdout.readline()
    assert line.strip() == "ready", line


@pytest.mark.slow
def test_kill_9_crash_loop(tmp_path: Path) -> None:
    """50 writers killed with SIGKILL at random moments; the store always recovers."""
    root = tmp_path / "store"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    n = 1 << 20
    for i in range(50):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(root), "s1", str(n), "30"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_ready(proc, timeout=60)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=rng.uniform(0.0, 0.25))
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, f"iteration {i}: writer exited by itself"
        with SnapshotStore(root, keep=3) as store:
            assert store.temp_files("s1") == [], f"iteration {i}: temp files left"
            latest = store.latest_valid("s1")
            assert latest is not None, f"iteration {i}: no valid snapshot"
            assert intact(latest.snapshot, n), f"iteration {i}: snapshot not intact"
            assert len(store.generations("s1")) <= 3 + 1
            assert not (root / "s1" / "quarantine").exists(), "a published file was damaged"


# -- ENOSPC -----------------------------------------------------------------------------------


def _check_enospc_leaves_previous(store: SnapshotStore, before: Path) -> None:
    expected = before.read_bytes()
    with pytest.raises(StoreWriteError) as info:
        store.save("s1", snap(1, n=4 << 20))
    assert info.value.errno == errno.ENOSPC
    assert isinstance(info.value, OSError)
    assert store.temp_files("s1") == []
    assert [p for _, p in store.generations("s1")] == [before]
    assert before.read_bytes() == expected
    latest = store.latest_valid("s1")
    assert latest is not None and latest.path == before and intact(latest.snapshot)


def test_enospc_injected(store: SnapshotStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Always runs: the write call itself fails half-way with ENOSPC."""
    before = store.save("s1", snap(0))

    def failing_write_to(self: S.Snapshot, f: object) -> int:
        f.write(self.header.pack())  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(S.Snapshot, "write_to", failing_write_to)
    _check_enospc_leaves_previous(store, before)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_enospc_real_filesystem(tiny_tmpfs: Path) -> None:
    """A 1 MiB tmpfs: the previous snapshot fits, the next (4 MiB raw) does not."""
    with SnapshotStore(tiny_tmpfs / "store", keep=3) as store:
        before = store.save("s1", snap(0))
        _check_enospc_leaves_previous(store, before)


def test_newer_version_skipped_not_quarantined(store: SnapshotStore) -> None:
    store.save("s1", snap(0))
    newest = store.save("s1", snap(1))
    data = bytearray(newest.read_bytes())
    data[8:10] = (S.FORMAT_VERSION + 1).to_bytes(2, "little")  # a version from the future
    newest.write_bytes(bytes(data))
    latest = store.latest_valid("s1")
    assert latest is not None and latest.generation == 1
    assert newest.exists()
