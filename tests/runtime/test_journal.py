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

from runtime.journal import Journal, JournalCompactedError, JournalCorruptError, JournalError


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
    with pytest.raises(JournalCorruptError) as info:
        Journal(path)
    assert info.value.offset == 0


def test_damaged_header_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    fill(path, 4)
    data = bytearray(path.read_bytes())
    data[2] ^= 0xFF  # the first record's length field
    path.write_bytes(data)
    with pytest.raises(JournalCorruptError, match="header checksum"):
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
        except JournalCorruptError:
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


# -- segments -----------------------------------------------------------------------------------


def _segmented(path: Path, n: int, per: int = 4) -> Journal:
    j = Journal(path, segment_entries=per)
    for i in range(n):
        j.append("user", f"t{i}", [i, i + 1], {"i": i})
    return j


def test_segments_rotate_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    with _segmented(path, 10) as j:
        assert j.n_segments == 2 and len(j) == 10
        assert [e.seq for e in j] == list(range(10))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "s.log",
        "s.log.000000000000.idx",
        "s.log.000000000000.seg",
        "s.log.000000000004.idx",
        "s.log.000000000004.seg",
    ]
    with Journal(path, segment_entries=4) as j:
        assert len(j) == 10 and j.n_tokens == 20
        assert j[5].text == "t5" and j[-1].seq == 9 and j[0].meta == {"i": 0}
        assert [e.seq for e in j.iter_from(3)] == list(range(3, 10))
        assert j.tokens() == [t for i in range(10) for t in (i, i + 1)]
        j.append("user", "more", [1])
        assert j.n_tokens == 21
    with Journal(path, readonly=True) as j:
        assert len(j) == 11 and j[10].text == "more"


def test_open_reads_only_the_active_segment(tmp_path: Path) -> None:
    """A damaged sealed segment is not read at open (opens cost what the last segment
    holds); reading an entry there still finds the damage, naming the file and offset."""
    path = tmp_path / "s.log"
    _segmented(path, 10).close()
    seg = tmp_path / "s.log.000000000000.seg"
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF  # the last record's payload
    seg.write_bytes(bytes(data))
    with Journal(path, segment_entries=4) as j:
        assert len(j) == 10 and j[9].text == "t9" and j[2].text == "t2"
        with pytest.raises(JournalCorruptError, match=r"s\.log\.000000000000\.seg"):
            j[3]


def test_missing_or_damaged_index_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    _segmented(path, 9).close()
    idx0 = tmp_path / "s.log.000000000000.idx"
    idx4 = tmp_path / "s.log.000000000004.idx"
    good = idx4.read_bytes()
    idx0.unlink()
    idx4.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with Journal(path, segment_entries=4) as j:
        assert [e.text for e in j] == [f"t{i}" for i in range(9)]
        assert j.n_tokens == 18
    assert idx0.exists() and idx4.read_bytes() == good  # rewritten, identical


@pytest.mark.parametrize("stage", ["index", "rename"])
def test_crash_during_rotation_reopens_to_the_same_entries(tmp_path: Path, stage: str) -> None:
    path = tmp_path / "s.log"
    with _segmented(path, 3) as j:
        j.rotate()
    seg = tmp_path / "s.log.000000000000.seg"
    if stage == "index":  # index published, active not yet renamed
        os.rename(seg, path)
    else:  # renamed, the new active file not yet created
        path.unlink()
    with Journal(path, segment_entries=4) as j:
        assert [e.text for e in j] == ["t0", "t1", "t2"]
        j.append("user", "t3", [3])
        assert len(j) == 4
    with Journal(path, segment_entries=4) as j:
        assert [e.text for e in j] == ["t0", "t1", "t2", "t3"]


def test_drop_segments_before_keeps_numbering(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    with _segmented(path, 10) as j:
        freed = j.drop_segments_before(6)  # segment 4..7 holds 6: it stays
        assert freed > 0 and j.first_seq == 4 and len(j) == 10
        with pytest.raises(JournalCompactedError):
            j[1]
        assert [e.seq for e in j] == list(range(4, 10))
    assert not (tmp_path / "s.log.000000000000.seg").exists()
    with Journal(path, segment_entries=4) as j:
        assert j.first_seq == 4 and len(j) == 10 and j[4].text == "t4"
        j.append("user", "t10", [10])
        assert j[10].seq == 10


def test_drop_never_loses_the_numbering(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    with _segmented(path, 8) as j:  # two full segments, an empty active file
        j.drop_segments_before(100)
        assert j.n_segments == 1 and len(j) == 8
    with Journal(path, segment_entries=4) as j:
        assert len(j) == 8
        assert j.append("user", "next", [1]).seq == 8


def test_remove_files_takes_every_segment(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    _segmented(path, 9).close()
    (tmp_path / "s.log.torn-5").write_bytes(b"x")
    (tmp_path / "other.log").write_bytes(b"")
    assert Journal.remove_files(path) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.log"]


def test_drop_keeps_segments_holding_pinned_entries(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    with _segmented(path, 14) as j:  # segments 0..3, 4..7, 8..11; active 12, 13
        assert not j.compacted
        j.drop_segments_before(12, keep={1})
        assert j.compacted and j.n_segments == 1 and j.first_seq == 0
        assert [e.seq for e in j] == [0, 1, 2, 3, 12, 13]  # iteration skips the gap
        with pytest.raises(JournalCompactedError):
            j[5]
    with Journal(path, segment_entries=4) as j:
        assert j.compacted and len(j) == 14 and j[1].text == "t1" and j[12].text == "t12"


def test_a_lost_segment_is_damage_not_compaction(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    _segmented(path, 14).close()
    (tmp_path / "s.log.000000000004.seg").unlink()  # not by retention: no .dropped record
    with Journal(path, segment_entries=4) as j:
        assert not j.compacted and j[2].text == "t2"
        with pytest.raises(JournalCorruptError, match="segment holding entry 5 is missing"):
            j[5]
    (tmp_path / "s.log.000000000008.seg").unlink()  # the one before the active file
    with pytest.raises(JournalCorruptError, match="expected"):
        Journal(path, segment_entries=4)


def test_a_lost_segment_fails_iteration_and_open(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    _segmented(path, 14).close()
    (tmp_path / "s.log.000000000004.seg").unlink()  # a middle segment, not by retention
    with (
        Journal(path, segment_entries=4) as j,
        pytest.raises(JournalCorruptError, match=r"entries 4\.\.7 are missing"),
    ):
        list(j)  # never a silent gap
    _segmented(tmp_path / "t.log", 10).close()
    (tmp_path / "t.log.000000000000.seg").unlink()  # the first one
    with pytest.raises(JournalCorruptError, match=r"entries 0\.\.3 are missing"):
        Journal(tmp_path / "t.log", segment_entries=4)


def test_a_segment_removed_under_a_reader_is_a_journal_error(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    _segmented(path, 10).close()
    with Journal(path, readonly=True) as j:
        (tmp_path / "s.log.000000000000.seg").unlink()
        with pytest.raises(JournalError):
            j[1]


def test_a_failed_rotation_keeps_the_journal_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runtime.journal.segment as jmod  # where a rotation opens the new active file

    real = jmod.open_nofollow

    def no_more_files(p: object, flags: int, *a: object, **k: object) -> int:
        if flags & os.O_EXCL:
            raise OSError(24, "Too many open files")
        return real(p, flags, *a, **k)  # type: ignore[arg-type]

    path = tmp_path / "s.log"
    j = Journal(path, segment_entries=4)
    monkeypatch.setattr(jmod, "open_nofollow", no_more_files)
    for i in range(6):  # the 4th append tries to rotate and fails
        j.append("user", f"t{i}", [i])
    assert not j.closed and j.n_segments == 0 and path.exists()
    assert not list(tmp_path.glob("*.seg")) and not list(tmp_path.glob("*.idx"))
    monkeypatch.setattr(jmod, "open_nofollow", real)
    j.rotate()
    j.append("user", "t6", [6])
    j.close()
    with Journal(path, segment_entries=4) as again:
        assert [e.text for e in again] == [f"t{i}" for i in range(7)]
