"""The turn journal: durability, torn tails, mid-file corruption, kill -9 mid-append."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime.journal import Journal, JournalCorrupt, JournalError


def fill(path: Path, n: int = 5) -> list[list[int]]:
    toks = [[i, i + 1, i + 2] for i in range(n)]
    with Journal(path) as j:
        for i, t in enumerate(toks):
            j.append("user" if i % 2 == 0 else "assistant", f"turn {i} ünï 🙂", t, {"i": i})
    return toks


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s" / "journal.log"
    toks = fill(path)
    with Journal(path) as j:
        assert len(j) == 5
        assert [e.seq for e in j] == list(range(5))
        assert j[1].role == "assistant" and j[1].text == "turn 1 ünï 🙂"
        assert j[3].meta == {"i": 3}
        assert j.tokens() == [t for ts in toks for t in ts]
        j.append("user", "more", [9])
    with Journal(path) as j:
        assert len(j) == 6 and j[5].tokens == (9,)
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("cut", [1, 5, 12, 13, 20])
def test_torn_tail_is_dropped_and_appends_continue(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "journal.log"
    fill(path, 3)
    size = path.stat().st_size
    with Journal(path) as j:
        j.append("user", "the torn one", [1, 2, 3])
    full = path.stat().st_size
    assert full - size > 20
    os.truncate(path, size + cut)  # crash part-way through the 4th record
    with Journal(path, readonly=True) as j:  # a read-only open never cuts anything
        assert len(j) == 3
    assert path.stat().st_size == size + cut
    with Journal(path) as j:
        assert len(j) == 3
        j.append("user", "after recovery", [4])
    assert (tmp_path / f"journal.log.torn-{size}").stat().st_size == cut  # bytes kept aside
    assert path.stat().st_size > size
    with Journal(path) as j:
        assert [e.text for e in j][-1] == "after recovery" and len(j) == 4


def test_zero_filled_tail_is_a_torn_write(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    fill(path, 2)
    with path.open("ab") as f:
        f.write(b"\0" * 300)
    with Journal(path) as j:
        assert len(j) == 2


def test_damage_in_the_middle_names_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    fill(path, 4)
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01  # inside the first payload
    path.write_bytes(data)
    with pytest.raises(JournalCorrupt) as info:
        Journal(path)
    assert info.value.offset == 0


def test_damaged_header_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    fill(path, 4)
    data = bytearray(path.read_bytes())
    data[2] ^= 0xFF  # the first record's length field
    path.write_bytes(data)
    with pytest.raises(JournalCorrupt, match="header checksum"):
        Journal(path)


def test_every_single_byte_flip_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    fill(path, 2)
    clean = path.read_bytes()
    for i in range(len(clean)):
        data = bytearray(clean)
        data[i] ^= 0x5A
        path.write_bytes(data)
        try:
            with Journal(path) as j:
                # a flip in the last record may read as a torn tail: never as different data
                assert [e.text for e in j] in (
                    ["turn 0 ünï 🙂", "turn 1 ünï 🙂"],
                    ["turn 0 ünï 🙂"],
                )
        except JournalCorrupt:
            pass


def test_failed_append_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.log"
    fill(path, 2)
    size = path.stat().st_size
    j = Journal(path)
    real_fsync = os.fsync

    def enospc(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError):
        j.append("user", "lost", [1])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(j) == 2
    j.close()
    assert path.stat().st_size == size
    with pytest.raises(JournalError):
        j.append("user", "closed", [1])


WRITER = textwrap.dedent(
    """
    import sys
    from runtime.journal import Journal
    j = Journal(sys.argv[1])
    i = len(j)
    while True:
        j.append("user", "x" * (i % 500), list(range(i % 50)))
        print(i, flush=True)
        i += 1
    """
)


def test_kill_minus_9_never_loses_an_acknowledged_entry(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    rng = random.Random(7)
    acknowledged = -1
    root = Path(__file__).resolve().parents[2]
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        assert proc.stdout is not None
        time.sleep(rng.uniform(0.15, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        lines = out.split()
        if lines:
            acknowledged = max(acknowledged, int(lines[-1]))
        with Journal(path) as j:
            assert len(j) >= acknowledged + 1
            assert [e.seq for e in j] == list(range(len(j)))
    assert acknowledged > 20


def test_interrupted_append_leaves_no_record_and_no_seq_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt (or a signal handler's exception) inside write/fsync."""
    path = tmp_path / "journal.log"
    j = Journal(path)
    j.append("user", "first", [1])
    real_fsync = os.fsync

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        j.append("user", "never acknowledged", [2])
    monkeypatch.setattr(os, "fsync", real_fsync)
    entry = j.append("user", "acknowledged", [3])
    assert entry.seq == 1
    j.close()
    with Journal(path) as again:
        assert [e.text for e in again] == ["first", "acknowledged"]
