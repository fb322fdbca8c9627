"""Sealed journal segments: the name scheme, the checksummed index of record offsets, and
reading a segment (rebuilding a missing or damaged index by scanning it).

Index layout (little-endian): ``magic "KVJIDX\\0\\1" | u64 first seq | u64 count | u64 segment
size | u64 tokens | count x u64 record offset | SHA-256 of everything before``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.errors import JournalCompactedError, JournalCorruptError, JournalError
from runtime.fsutil import atomic_write_bytes, fsync_dir, lock_exclusive, open_nofollow
from runtime.journal.record import (
    MAX_RECORD,
    RECORD_HEAD,
    RECORD_TAIL,
    Entry,
    parse_entry,
    record_at,
    scan_records,
)
from runtime.journal.retention import DroppedRanges

logger = logging.getLogger(__name__)

#: Rotate the active file once it holds this many records ...
DEFAULT_SEGMENT_ENTRIES = 4096
#: ... or this many bytes.
DEFAULT_SEGMENT_BYTES = 32 << 20

_IDX_MAGIC = b"KVJIDX\x00\x01"
#: magic, first seq, record count, segment file size, total tokens
_IDX_HEAD = struct.Struct("<8sQQQQ")
#: parsed entries of sealed segments kept in memory (most recently used)
SEALED_CACHE = 1024


def segment_name(name: str, first: int, kind: str) -> str:
    return f"{name}.{first:012d}.{kind}"


@dataclass
class Segment:
    """A sealed (immutable) segment: ``first`` .. ``first + count - 1``, records at ``offsets``."""

    first: int
    path: Path
    index: Path
    count: int = -1
    n_tokens: int = -1
    offsets: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def loaded(self) -> bool:
        return self.count >= 0

    @property
    def end(self) -> int:
        return self.first + self.count


def pack_index(seg: Segment, size: int) -> bytes:
    body = _IDX_HEAD.pack(_IDX_MAGIC, seg.first, seg.count, size, seg.n_tokens)
    body += np.asarray(seg.offsets, dtype="<u8").tobytes()
    return body + hashlib.sha256(body).digest()


def unpack_index(data: bytes, seg: Segment, size: int) -> bool:
    """Fill ``seg`` from its index bytes if they are intact and describe this segment file."""
    if len(data) < _IDX_HEAD.size + 32 or hashlib.sha256(data[:-32]).digest() != data[-32:]:
        return False
    magic, first, count, seg_size, n_tokens = _IDX_HEAD.unpack_from(data)
    if magic != _IDX_MAGIC or first != seg.first or seg_size != size:
        return False
    if len(data) != _IDX_HEAD.size + 8 * count + 32 or count == 0:
        return False
    offsets = np.frombuffer(data, dtype="<u8", count=count, offset=_IDX_HEAD.size)
    if offsets[0] != 0 or int(offsets[-1]) >= size or not bool(np.all(np.diff(offsets) > 0)):
        return False
    seg.count, seg.n_tokens, seg.offsets = count, n_tokens, offsets.astype(np.int64)
    return True


def list_segments(path: Path) -> list[Segment]:
    """The sealed segments of the journal whose active file is ``path``, oldest first."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d{12})\.seg")
    found: list[Segment] = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path.parent):
            m = pattern.fullmatch(name)
            if m:
                first = int(m.group(1))
                found.append(
                    Segment(
                        first,
                        path.with_name(name),
                        path.with_name(segment_name(path.name, first, "idx")),
                    )
                )
    found.sort(key=lambda s: s.first)
    return found


def load_segment(seg: Segment, *, writable: bool) -> None:
    """Read a sealed segment's index (or rebuild it by scanning the segment)."""
    if seg.loaded:
        return
    try:
        fd = open_nofollow(seg.path, os.O_RDONLY)
    except FileNotFoundError:
        raise SegmentMoved from None
    try:
        size = os.fstat(fd).st_size
        try:
            ifd = open_nofollow(seg.index, os.O_RDONLY)
            try:
                data = os.pread(ifd, 16 << 20, 0)
            finally:
                os.close(ifd)
        except FileNotFoundError:
            data = b""
        if unpack_index(data, seg, size):
            return
        logger.warning("%s: index missing or damaged; rebuilding it", seg.path.name)
        with io.FileIO(fd, "r", closefd=False) as raw:
            offsets, good = scan_records(io.BufferedReader(raw, 1 << 16), seg.path, size)
        if good != size or not offsets:
            raise JournalCorruptError(seg.path, good, "a sealed segment ends in a torn record")
        whole = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    n_tokens = 0
    for i, off in enumerate(offsets):
        entry = parse_entry(record_at(whole, seg.path, off), seg.path, off, seg.first + i)
        n_tokens += len(entry.tokens)
    seg.count, seg.n_tokens = len(offsets), n_tokens
    seg.offsets = np.asarray(offsets, dtype=np.int64)
    if writable:
        try:
            atomic_write_bytes(seg.index, pack_index(seg, size))
        except OSError as exc:
            logger.warning("%s: could not rewrite the index: %s", seg.index.name, exc)


def read_sealed(seg: Segment, seq: int) -> Entry:
    """Entry ``seq`` of a loaded sealed segment, read with two ``pread`` calls."""
    off = int(seg.offsets[seq - seg.first])
    fd = open_nofollow(seg.path, os.O_RDONLY)
    try:
        head = os.pread(fd, RECORD_HEAD.size, off)
        length = RECORD_HEAD.unpack(head)[0] if len(head) == RECORD_HEAD.size else 0
        data = os.pread(fd, RECORD_HEAD.size + min(length, MAX_RECORD) + RECORD_TAIL.size, off)
    finally:
        os.close(fd)
    return parse_entry(record_at(data, seg.path, off, off), seg.path, off, seq)


def iter_segment(seg: Segment, start: int, *, writable: bool) -> Iterator[Entry]:
    """Entries ``start`` .. the segment's end, reading the segment file once."""
    load_segment(seg, writable=writable)
    fd = open_nofollow(seg.path, os.O_RDONLY)
    try:
        whole = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    for seq in range(max(start, seg.first), seg.end):
        off = int(seg.offsets[seq - seg.first])
        yield parse_entry(record_at(whole, seg.path, off), seg.path, off, seq)


#: The files of journal ``<name>.log``: the active file, its sealed segments and indexes,
#: its retention record and its torn-tail rescue files (group 1: the journal's name).
_JOURNAL_FILE = re.compile(r"(.+?\.log)(\.\d{12}\.(seg|idx)|\.torn-\d+(\.\d+)?|\.dropped)?")


def journal_files(path: str | os.PathLike[str]) -> list[Path]:
    """Every file of the journal whose active file is ``path``: the active file, its sealed
    segments and indexes, its retention record and its torn-tail rescue files."""
    p = Path(path)
    return journal_files_of(p.parent, [p.name]).get(p.name, [])


def journal_files_of(
    directory: str | os.PathLike[str], names: Sequence[str]
) -> dict[str, list[Path]]:
    """:func:`journal_files` of each active file name in ``names`` (``<id>.log``), from one
    listing of ``directory``: a page of sessions costs one ``listdir``, not one each."""
    wanted = set(names)
    out: dict[str, list[Path]] = {}
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return out
    for entry in entries:
        m = _JOURNAL_FILE.fullmatch(entry)
        if m and m.group(1) in wanted:
            out.setdefault(m.group(1), []).append(Path(directory) / entry)
    return {name: sorted(files) for name, files in out.items()}


def journal_sessions(directory: str | os.PathLike[str]) -> list[str]:
    """The names of the journals in ``directory`` (``<name>.log``, or only its sealed
    segments after a crash mid-rotation), sorted."""
    names: set[str] = set()
    pattern = re.compile(r"(.+)\.log(\.\d{12}\.seg)?")
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory):
            m = pattern.fullmatch(entry)
            if m:
                names.add(m.group(1))
    return sorted(names)


class SegmentMoved(Exception):
    """A reader saw the files mid-rotation."""


def seal_active(
    path: Path, old: int, seg: Segment, end: int, *, on_closed: Callable[[], None]
) -> int:
    """Seal the active file ``path`` (open as ``old``, ``end`` bytes of good records) into
    ``seg`` and open a new, locked active file; return its descriptor (``old`` is closed).

    Order: the index is published (atomically), the active file is renamed to the segment
    name, a new active file is created and locked. A crash between any two steps reopens to
    the same entries (a stale index without its segment is ignored). On a failure that
    leaves the old file in place under its name, ``old`` stays open and the journal usable;
    on one that cannot, ``old`` is closed and ``on_closed()`` is called before the raise.
    """
    if os.path.lexists(seg.path):
        raise JournalError(f"{seg.path} already exists")
    atomic_write_bytes(seg.index, pack_index(seg, end))
    os.rename(path, seg.path)
    fsync_dir(path.parent)
    try:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        on_closed()
        os.close(old)
        raise JournalError(f"{path} was created by someone else while it was sealed") from None
    except BaseException:
        # EMFILE, ENOSPC, ...: put the file back under its name (still open and locked by
        # us), so the journal stays usable and the next rotation retries
        try:
            os.rename(seg.path, path)
            fsync_dir(path.parent)
        except BaseException:
            on_closed()
            os.close(old)
            raise
        with contextlib.suppress(OSError):
            os.unlink(seg.index)
        raise
    try:
        lock_exclusive(fd, path)
        fsync_dir(path.parent)
    except BaseException:
        on_closed()
        os.close(fd)
        os.close(old)
        raise
    os.close(old)
    return fd


def load_sealed(seg: Segment, dropped: DroppedRanges, *, writable: bool, opening: bool) -> None:
    """Load a sealed segment's index; a segment file that vanished is a reader's race while
    the journal opens (``opening``: :class:`SegmentMoved`, retried there), and afterwards retention
    or damage: never an internal exception for the caller."""
    try:
        load_segment(seg, writable=writable)
    except SegmentMoved:
        if opening:
            raise
        dropped.load()
        if dropped.covers(seg.first, seg.first + 1):
            raise JournalCompactedError(
                f"{seg.path}: removed by journal retention while it was open"
            ) from None
        raise JournalCorruptError(seg.path, 0, "the sealed segment file is missing") from None


def delete_segments(directory: Path, gone: list[Segment]) -> int:
    """Delete the files of ``gone`` (in ``directory``); return the bytes freed."""
    freed = 0
    for seg in gone:
        for p in (seg.path, seg.index):
            with contextlib.suppress(FileNotFoundError):
                freed += os.lstat(p).st_size
                os.unlink(p)
    if freed:
        fsync_dir(directory)
    return freed


def remove_journal_files(path: str | os.PathLike[str]) -> int:
    """Delete a journal's files (:func:`journal_files`); return how many. The caller must
    hold (or have closed) the writer."""
    removed = 0
    for file in journal_files(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)  # never follows a symlink
            removed += 1
    if removed:
        fsync_dir(Path(path).parent)
    return removed


def first_seq_of_active(
    path: Path,
    segments: list[Segment],
    first_record: bytes | None,
    dropped: DroppedRanges,
    *,
    readonly: bool,
) -> int:
    """The seq the active file ``path`` starts at: the (loaded) sealed segments' end, checked
    against the seq in its first record's payload (``None``: the file is empty)."""
    expected = segments[-1].end if segments else 0
    if first_record is None:
        return expected
    try:
        seq = int(json.loads(first_record)["seq"])
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalCorruptError(path, 0, f"unreadable entry: {exc}") from exc
    if seq != expected:
        if seq > expected and dropped.covers(expected, seq):
            return seq  # retention dropped the segments in between
        if readonly and segments and seq > expected:
            raise SegmentMoved
        raise JournalCorruptError(
            path, 0, f"entry seq {seq}, expected {expected} after the segments"
        )
    return expected
