"""Sealed journal segments: the name scheme, the checksummed index of record offsets, and
reading a segment (rebuilding a missing or damaged index by scanning it).

Index layout (little-endian): ``magic "KVJIDX\\0\\1" | u64 first seq | u64 count | u64 segment
size | u64 tokens | count x u64 record offset | SHA-256 of everything before``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.errors import JournalCorruptError
from runtime.fsutil import atomic_write_bytes, open_nofollow
from runtime.journal.record import (
    _HEAD,
    _TAIL,
    MAX_RECORD,
    Entry,
    _parse,
    _record_at,
    _scan,
)

logger = logging.getLogger(__name__)

#: Rotate the active file once it holds this many records ...
DEFAULT_SEGMENT_ENTRIES = 4096
#: ... or this many bytes.
DEFAULT_SEGMENT_BYTES = 32 << 20

_IDX_MAGIC = b"KVJIDX\x00\x01"
#: magic, first seq, record count, segment file size, total tokens
_IDX_HEAD = struct.Struct("<8sQQQQ")
#: parsed entries of sealed segments kept in memory (most recently used)
_SEALED_CACHE = 1024


def _seg_name(name: str, first: int, kind: str) -> str:
    return f"{name}.{first:012d}.{kind}"


@dataclass
class _Segment:
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


def _pack_index(seg: _Segment, size: int) -> bytes:
    body = _IDX_HEAD.pack(_IDX_MAGIC, seg.first, seg.count, size, seg.n_tokens)
    body += np.asarray(seg.offsets, dtype="<u8").tobytes()
    return body + hashlib.sha256(body).digest()


def _unpack_index(data: bytes, seg: _Segment, size: int) -> bool:
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


def list_segments(path: Path) -> list[_Segment]:
    """The sealed segments of the journal whose active file is ``path``, oldest first."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d{12})\.seg")
    found: list[_Segment] = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path.parent):
            m = pattern.fullmatch(name)
            if m:
                first = int(m.group(1))
                found.append(
                    _Segment(
                        first,
                        path.with_name(name),
                        path.with_name(_seg_name(path.name, first, "idx")),
                    )
                )
    found.sort(key=lambda s: s.first)
    return found


def load_segment(seg: _Segment, *, writable: bool) -> None:
    """Read a sealed segment's index (or rebuild it by scanning the segment)."""
    if seg.loaded:
        return
    try:
        fd = open_nofollow(seg.path, os.O_RDONLY)
    except FileNotFoundError:
        raise _Moved from None
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
        if _unpack_index(data, seg, size):
            return
        logger.warning("%s: index missing or damaged; rebuilding it", seg.path.name)
        with io.FileIO(fd, "r", closefd=False) as raw:
            offsets, good = _scan(io.BufferedReader(raw, 1 << 16), seg.path, size)
        if good != size or not offsets:
            raise JournalCorruptError(seg.path, good, "a sealed segment ends in a torn record")
        whole = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    n_tokens = 0
    for i, off in enumerate(offsets):
        entry = _parse(_record_at(whole, seg.path, off), seg.path, off, seg.first + i)
        n_tokens += len(entry.tokens)
    seg.count, seg.n_tokens = len(offsets), n_tokens
    seg.offsets = np.asarray(offsets, dtype=np.int64)
    if writable:
        try:
            atomic_write_bytes(seg.index, _pack_index(seg, size))
        except OSError as exc:
            logger.warning("%s: could not rewrite the index: %s", seg.index.name, exc)


def read_sealed(seg: _Segment, seq: int) -> Entry:
    """Entry ``seq`` of a loaded sealed segment, read with two ``pread`` calls."""
    off = int(seg.offsets[seq - seg.first])
    fd = open_nofollow(seg.path, os.O_RDONLY)
    try:
        head = os.pread(fd, _HEAD.size, off)
        length = _HEAD.unpack(head)[0] if len(head) == _HEAD.size else 0
        data = os.pread(fd, _HEAD.size + min(length, MAX_RECORD) + _TAIL.size, off)
    finally:
        os.close(fd)
    return _parse(_record_at(data, seg.path, off, off), seg.path, off, seq)


def iter_segment(seg: _Segment, start: int, *, writable: bool) -> Iterator[Entry]:
    """Entries ``start`` .. the segment's end, reading the segment file once."""
    load_segment(seg, writable=writable)
    fd = open_nofollow(seg.path, os.O_RDONLY)
    try:
        whole = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    for seq in range(max(start, seg.first), seg.end):
        off = int(seg.offsets[seq - seg.first])
        yield _parse(_record_at(whole, seg.path, off), seg.path, off, seq)


def journal_files(path: str | os.PathLike[str]) -> list[Path]:
    """Every file of the journal whose active file is ``path``: the active file, its sealed
    segments and indexes, its retention record and its torn-tail rescue files."""
    p = Path(path)
    pattern = re.compile(re.escape(p.name) + r"(\.\d{12}\.(seg|idx)|\.torn-\d+(\.\d+)?|\.dropped)?")
    try:
        names = os.listdir(p.parent)
    except FileNotFoundError:
        return []
    return sorted(p.parent / name for name in names if pattern.fullmatch(name))


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


class _Moved(Exception):
    """A reader saw the files mid-rotation."""
