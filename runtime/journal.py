"""The durable turn journal: an append-only log that both memories can be rebuilt from.

Every turn is appended (and fsynced) before anyone is told it was saved. A KV snapshot is
only a cache of the journal's tokens: if it is lost or damaged, replaying the journal's tokens
rebuilds the same KV cache.

Record layout (TFRecord-style, little-endian)::

    u64 payload length | u32 crc32(length bytes) | payload | u32 crc32(payload)

The payload is UTF-8 JSON (one :class:`Entry`). On open, the file is scanned: a clean EOF is
normal; a torn last record (a crash mid-append: the file ends inside it, or its unwritten tail
reads as zeros) was never acknowledged, so it is cut off with a warning, its bytes moved to
``<journal>.torn-<offset>`` first (``.torn-<offset>.<n>`` if that name is taken: a rescue
file is never overwritten). Any other damage (a bad checksum on a complete record, even the
last one) is :class:`JournalCorrupt` naming the byte offset: dropping an acknowledged turn is
never acceptable. ``readonly=True`` opens without ever writing (and without the writer's
lock).

**Segments.** A session that runs for weeks must not pay for its age on every open, so the
journal rotates: once the active file (``<name>``) holds ``segment_entries`` records or
``segment_bytes`` bytes, it is sealed as ``<name>.<first seq, 12 digits>.seg`` beside an index
``<name>.<first seq>.idx`` (magic, first seq, count, segment size, token count, the record
offsets, SHA-256), and a new active file starts. Opening scans only the active file's record
frames (CRC, no JSON); sealed segments are located by name and read through their index only
when an entry there is asked for, so an open costs what the last segment holds, not what the
session ever said. Entries are parsed on first access. A missing or damaged index is rebuilt
by scanning its segment (which is then fully checked). Rotation is crash-safe in any order:
the index is published first, then the active file is renamed, then a new one is created;
every intermediate state reopens to the same entries.

:meth:`Journal.drop_segments_before` deletes sealed segments wholly before a seq (the
runtime's opt-in retention policy); later seqs keep their numbers, and reading a dropped entry
raises :class:`JournalCompacted`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from runtime.errors import DiskFullError, MemoryRuntimeError, PersistError, UnsafePathError
from runtime.fsutil import (
    FULL_ERRNOS,
    atomic_write_bytes,
    ensure_dir,
    fsync_dir,
    lock_exclusive,
    open_nofollow,
    warn_if_exposed,
)

logger = logging.getLogger(__name__)

_HEAD = struct.Struct("<QI")
_TAIL = struct.Struct("<I")
#: A record larger than this is refused on write and treated as damage on read.
MAX_RECORD = 64 << 20


class JournalError(MemoryRuntimeError):
    """The journal cannot be used."""


class JournalCorrupt(JournalError, ValueError):
    """Damage in the middle of the journal (not a torn tail); ``offset`` is where it starts."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt record at byte {offset}: {reason}")
        self.path = path
        self.offset = offset


@dataclass(frozen=True)
class Entry:
    """One journalled turn.

    Attributes:
        seq: 0-based position of the entry in the journal.
        role: who spoke (``user``, ``assistant``, ``system``).
        text: the text of the turn.
        tokens: the exact token ids this turn appended to the session's KV sequence.
        created: UNIX time of the append.
        meta: free-form JSON-serialisable data.
    """

    seq: int
    role: str
    text: str
    tokens: tuple[int, ...]
    created: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> bytes:
        """The record payload (JSON, UTF-8)."""
        doc = {
            "v": 1,
            "seq": self.seq,
            "role": self.role,
            "text": self.text,
            "tokens": list(self.tokens),
            "created": self.created,
            "meta": self.meta,
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_payload(cls, payload: bytes) -> Entry:
        """Parse a payload written by :meth:`to_payload`."""
        doc = json.loads(payload)
        if doc.get("v") != 1:
            raise ValueError(f"unknown journal entry version {doc.get('v')!r}")
        return cls(
            seq=int(doc["seq"]),
            role=str(doc["role"]),
            text=str(doc["text"]),
            tokens=tuple(int(t) for t in doc["tokens"]),
            created=float(doc["created"]),
            meta=dict(doc.get("meta") or {}),
        )


def _encode(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + _TAIL.pack(zlib.crc32(length)) + payload + _TAIL.pack(zlib.crc32(payload))


def _scan(f: BinaryIO, path: Path, size: int) -> tuple[list[int], int]:
    """Check every record's frame and both checksums (no JSON is parsed); return the records'
    offsets and the offset where good data ends."""
    offsets: list[int] = []
    offset = 0
    while offset < size:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            break  # torn inside the header
        length, head_crc = _HEAD.unpack(head)
        if zlib.crc32(head[:8]) != head_crc:
            if _rest_is_zero(f, offset, size):
                break  # an unwritten tail after a crash
            raise JournalCorrupt(path, offset, "record header checksum mismatch")
        if length > MAX_RECORD:
            raise JournalCorrupt(path, offset, f"record length {length} exceeds {MAX_RECORD}")
        end = offset + _HEAD.size + length + _TAIL.size
        if end > size:
            break  # torn inside the payload
        payload = f.read(length)
        tail = f.read(_TAIL.size)
        (crc,) = _TAIL.unpack(tail)
        if zlib.crc32(payload) != crc:
            if end == size and _looks_unwritten(payload + tail):
                break  # the last record, torn: its end never reached the disk
            raise JournalCorrupt(path, offset, "payload checksum mismatch")
        offsets.append(offset)
        offset = end
    return offsets, offset


def _record_at(data: bytes | memoryview, path: Path, offset: int, base: int = 0) -> bytes:
    """The payload of the record at file offset ``offset`` (``data`` starts at ``base``),
    checked again: a segment may have been damaged since it was indexed."""
    at = offset - base
    if at < 0 or at + _HEAD.size > len(data):
        raise JournalCorrupt(path, offset, "record is past the end of the file")
    length, head_crc = _HEAD.unpack_from(data, at)
    if zlib.crc32(data[at : at + 8]) != head_crc or length > MAX_RECORD:
        raise JournalCorrupt(path, offset, "record header checksum mismatch")
    start = at + _HEAD.size
    if start + length + _TAIL.size > len(data):
        raise JournalCorrupt(path, offset, "record is past the end of the file")
    payload = bytes(data[start : start + length])
    (crc,) = _TAIL.unpack_from(data, start + length)
    if zlib.crc32(payload) != crc:
        raise JournalCorrupt(path, offset, "payload checksum mismatch")
    return payload


def _parse(payload: bytes, path: Path, offset: int, seq: int) -> Entry:
    try:
        entry = Entry.from_payload(payload)
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalCorrupt(path, offset, f"unreadable entry: {exc}") from exc
    if entry.seq != seq:
        raise JournalCorrupt(path, offset, f"entry seq {entry.seq}, expected {seq}")
    return entry


def _looks_unwritten(record_end: bytes) -> bool:
    """A record whose length reached the disk but whose last bytes did not reads as zeros
    there (a file extended before its data blocks were written). A bit flip does not."""
    return record_end.endswith(b"\0" * min(8, len(record_end)))


def _rest_is_zero(f: BinaryIO, offset: int, size: int) -> bool:
    f.seek(offset)
    while chunk := f.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return False
    f.seek(size)
    return True


class JournalWriteError(JournalError, PersistError):
    """An append failed (an I/O error); nothing of it was kept and the journal stays usable."""


class JournalFullError(JournalWriteError, DiskFullError):
    """An append failed because the disk is full; the next append works once space is freed."""


def _write_error(exc: OSError, path: Path, what: str) -> JournalWriteError:
    code = exc.errno or errno.EIO
    if code in FULL_ERRNOS:
        return JournalFullError(
            code,
            f"disk full: {what}; nothing of it was kept, retry once space is freed",
            str(path),
        )
    return JournalWriteError(code, f"{what}: {exc.strerror or exc}", str(path))


class JournalCompacted(JournalError, LookupError):
    """The entry was in a segment that a retention policy deleted."""


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


class Journal:
    """An append-only, fsynced journal of turns for one session (an active file + segments).

    A writer holds an exclusive ``flock`` on the active file while it is open: a second writer
    (in this process or another) gets :class:`runtime.errors.LockedError` naming the holder's
    pid. ``readonly=True`` takes no lock and never writes, so it works while a writer is open
    (it sees the entries appended before it opened).

    Appends go straight to the file descriptor (no user-space buffer), so a failed append
    (ENOSPC, EIO, an exception escaping write/fsync) is undone with one ``ftruncate`` back to
    the end of the last good record: the journal stays open and usable, and the error is a
    :class:`JournalWriteError` (:class:`JournalFullError`, a
    :class:`runtime.errors.DiskFullError`, for a full disk) naming the file.

    Opening costs what the active segment holds: sealed segments (see the module docstring)
    are read only when one of their entries is, and entries are parsed on first access.

    The journal's files are never opened through a symlink
    (:class:`runtime.errors.UnsafePathError`) and are created mode 0600.

    Args:
        path: the active journal file; created (mode 0600) if missing.
        fsync: fsync after every append. Turn it off only for tests and benchmarks.
        readonly: open for reading only (no lock, no torn-tail cut, no rotation).
        segment_entries: seal the active file once it holds this many records.
        segment_bytes: ... or once it is this large.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = True,
        readonly: bool = False,
        segment_entries: int = DEFAULT_SEGMENT_ENTRIES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if segment_entries < 1 or segment_bytes < 1:
            raise JournalError("segment_entries and segment_bytes must be positive")
        self.path = Path(path)
        self._fsync = fsync
        self._lock = threading.RLock()
        self.readonly = readonly
        self._segment_entries = segment_entries
        self._segment_bytes = segment_bytes
        self._fd: int | None = None
        self._end = 0
        self._first = 0  # seq of the active file's first record
        self._offsets: list[int] = []  # the active file's records
        self._active: dict[int, Entry] = {}  # parsed active entries, by seq
        self._sealed_cache: OrderedDict[int, Entry] = OrderedDict()
        self._segments: list[_Segment] = []
        self._n_tokens: int | None = None
        self._rotate_after = 0  # append count before a failed rotation is retried
        for _attempt in range(5):
            try:
                self._open()
                return
            except _Moved:
                continue  # a writer rotated while this reader listed the files: look again
        raise JournalError(f"{self.path}: the journal kept changing while it was opened")

    # -- open ------------------------------------------------------------------------------------

    def _open(self) -> None:
        self._segments = self._list_segments()
        if self.readonly:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not self._segments:
                    raise
                self._fd = None
        else:
            ensure_dir(self.path.parent)
            warn_if_exposed(self.path.parent)
            created = not os.path.lexists(self.path)
            self._fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            if not self.readonly:
                assert self._fd is not None
                lock_exclusive(self._fd, self.path)
                if created:
                    fsync_dir(self.path.parent)
                # the writer's view of the segments is only stable once it holds the lock
                self._segments = self._list_segments()
            size = os.fstat(self._fd).st_size if self._fd is not None else 0
            if self._fd is not None:
                with io.FileIO(self._fd, "r", closefd=False) as raw:
                    reader = io.BufferedReader(raw, 1 << 16)
                    self._offsets, good = _scan(reader, self.path, size)
            else:
                self._offsets, good = [], 0
            self._first = self._first_seq_of_active()
            if good < size and not self.readonly:
                assert self._fd is not None
                self._cut_torn_tail(self._fd, good, size)
            self._end = good
        except BaseException:
            self.close()
            raise

    def _list_segments(self) -> list[_Segment]:
        pattern = re.compile(re.escape(self.path.name) + r"\.(\d{12})\.seg")
        found: list[_Segment] = []
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.path.parent):
                m = pattern.fullmatch(name)
                if m:
                    first = int(m.group(1))
                    found.append(
                        _Segment(
                            first,
                            self.path.with_name(name),
                            self.path.with_name(_seg_name(self.path.name, first, "idx")),
                        )
                    )
        found.sort(key=lambda s: s.first)
        return found

    def _first_seq_of_active(self) -> int:
        """The seq the active file starts at: the sealed segments' end (checked against the
        first record's own seq)."""
        expected = 0
        if self._segments:
            last = self._segments[-1]
            self._load_segment(last)
            expected = last.end
        if self._offsets:
            payload = self._pread_record(self._offsets[0])
            try:
                seq = int(json.loads(payload)["seq"])
            except (ValueError, KeyError, TypeError) as exc:
                raise JournalCorrupt(self.path, 0, f"unreadable entry: {exc}") from exc
            if seq != expected:
                if self.readonly and self._segments and seq > expected:
                    raise _Moved
                if not self._segments and seq > 0:
                    # older segments were dropped by retention: the active file says where
                    # the journal resumes
                    return seq
                raise JournalCorrupt(
                    self.path, 0, f"entry seq {seq}, expected {expected} after the segments"
                )
        return expected

    # -- sealed segments ---------------------------------------------------------------------

    def _load_segment(self, seg: _Segment) -> None:
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
                raise JournalCorrupt(seg.path, good, "a sealed segment ends in a torn record")
            whole = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        n_tokens = 0
        for i, off in enumerate(offsets):
            entry = _parse(_record_at(whole, seg.path, off), seg.path, off, seg.first + i)
            n_tokens += len(entry.tokens)
        seg.count, seg.n_tokens = len(offsets), n_tokens
        seg.offsets = np.asarray(offsets, dtype=np.int64)
        if not self.readonly:
            try:
                atomic_write_bytes(seg.index, _pack_index(seg, size))
            except OSError as exc:
                logger.warning("%s: could not rewrite the index: %s", seg.index.name, exc)

    def _segment_of(self, seq: int) -> _Segment:
        lo, hi = 0, len(self._segments) - 1
        while lo < hi:  # the last segment whose first seq is <= seq
            mid = (lo + hi + 1) // 2
            if self._segments[mid].first <= seq:
                lo = mid
            else:
                hi = mid - 1
        seg = self._segments[lo]
        self._load_segment(seg)
        if not seg.first <= seq < seg.end:
            raise JournalCompacted(f"{self.path}: entry {seq} was removed by journal retention")
        return seg

    def _sealed_entry(self, seq: int) -> Entry:
        cached = self._sealed_cache.get(seq)
        if cached is not None:
            self._sealed_cache.move_to_end(seq)
            return cached
        seg = self._segment_of(seq)
        off = int(seg.offsets[seq - seg.first])
        fd = open_nofollow(seg.path, os.O_RDONLY)
        try:
            head = os.pread(fd, _HEAD.size, off)
            length = _HEAD.unpack(head)[0] if len(head) == _HEAD.size else 0
            data = os.pread(fd, _HEAD.size + min(length, MAX_RECORD) + _TAIL.size, off)
        finally:
            os.close(fd)
        entry = _parse(_record_at(data, seg.path, off, off), seg.path, off, seq)
        self._sealed_cache[seq] = entry
        if len(self._sealed_cache) > _SEALED_CACHE:
            self._sealed_cache.popitem(last=False)
        return entry

    def _iter_segment(self, seg: _Segment, start: int) -> Iterator[Entry]:
        self._load_segment(seg)
        fd = open_nofollow(seg.path, os.O_RDONLY)
        try:
            whole = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        for seq in range(max(start, seg.first), seg.end):
            off = int(seg.offsets[seq - seg.first])
            yield _parse(_record_at(whole, seg.path, off), seg.path, off, seq)

    # -- torn tails ----------------------------------------------------------------------------

    def _cut_torn_tail(self, fd: int, good: int, size: int) -> None:
        """Move a torn last record aside (never destroy bytes), then truncate."""
        rescued = os.pread(fd, size - good, good)
        try:
            aside = self._write_rescue(good, rescued)
            logger.warning(
                "%s: a crash left a torn last record (%d bytes at offset %d); it was never "
                "acknowledged, so it is dropped (bytes kept in %s)",
                self.path,
                size - good,
                good,
                aside.name,
            )
            os.ftruncate(fd, good)
            os.fsync(fd)
            fsync_dir(self.path.parent)
        except UnsafePathError:
            raise
        except OSError as exc:
            raise _write_error(exc, self.path, "could not set a torn last record aside") from exc

    def _write_rescue(self, good: int, data: bytes) -> Path:
        """Write ``data`` to a new ``<journal>.torn-<offset>[.<n>]`` file (0600, O_EXCL).

        ``O_EXCL`` never follows a symlink and never replaces an earlier rescue file: a second
        torn tail at the same offset, or a planted link, just moves on to the next name.
        """
        for attempt in range(1000):
            suffix = f".torn-{good}" + (f".{attempt}" if attempt else "")
            aside = self.path.with_name(self.path.name + suffix)
            try:
                out = open_nofollow(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view) :]
                os.fsync(out)
            except BaseException:
                os.close(out)
                with contextlib.suppress(OSError):
                    os.unlink(aside)
                raise
            os.close(out)
            return aside
        raise JournalError(f"{self.path}: too many torn-tail rescue files at offset {good}")

    # -- reading -------------------------------------------------------------------------------

    def _pread_record(self, offset: int) -> bytes:
        assert self._fd is not None
        head = os.pread(self._fd, _HEAD.size, offset)
        length = _HEAD.unpack(head)[0] if len(head) == _HEAD.size else 0
        data = os.pread(self._fd, _HEAD.size + min(length, MAX_RECORD) + _TAIL.size, offset)
        return _record_at(data, self.path, offset, offset)

    def _active_entry(self, seq: int) -> Entry:
        entry = self._active.get(seq)
        if entry is None:
            if self._fd is None:
                raise JournalError(f"{self.path} is closed")
            off = self._offsets[seq - self._first]
            entry = _parse(self._pread_record(off), self.path, off, seq)
            self._active[seq] = entry
        return entry

    def __len__(self) -> int:
        """The next entry's seq (entries dropped by retention still count)."""
        return self._first + len(self._offsets)

    @property
    def first_seq(self) -> int:
        """The oldest entry still stored (0 unless retention dropped segments)."""
        return self._segments[0].first if self._segments else self._first

    def __getitem__(self, index: int) -> Entry:
        with self._lock:
            n = len(self)
            seq = index + n if index < 0 else index
            if not 0 <= seq < n:
                raise IndexError(f"journal entry {index} out of range (0..{n - 1})")
            if seq >= self._first:
                return self._active_entry(seq)
            if seq < self.first_seq:
                raise JournalCompacted(f"{self.path}: entry {seq} was removed by journal retention")
            return self._sealed_entry(seq)

    def iter_from(self, seq: int) -> Iterator[Entry]:
        """Entries ``seq``, ``seq + 1``, ... up to the end as of this call, in order.

        Sealed segments are read whole, once each; :class:`JournalCompacted` if ``seq`` is
        older than :attr:`first_seq`.
        """
        end = len(self)
        seq = max(seq, 0)
        if seq < self.first_seq:
            raise JournalCompacted(f"{self.path}: entry {seq} was removed by journal retention")
        segments = list(self._segments)
        for i, seg in enumerate(segments):
            # segments are contiguous: one that the next starts at or before ``seq`` is
            # skipped without reading its index
            following = segments[i + 1].first if i + 1 < len(segments) else self._first
            if following <= seq:
                continue
            if seg.first >= end:
                return
            yield from self._iter_segment(seg, seq)
            seq = seg.end
        for s in range(max(seq, self._first), end):
            with self._lock:
                entry = self._active_entry(s)
            yield entry

    def __iter__(self) -> Iterator[Entry]:
        return self.iter_from(self.first_seq)

    @property
    def entries(self) -> list[Entry]:
        """Every stored entry, oldest first (a copy; reads every segment)."""
        return list(self)

    @property
    def n_tokens(self) -> int:
        """Total tokens of all stored entries (computed once, then kept up to date)."""
        with self._lock:
            if self._n_tokens is None:
                total = 0
                for seg in self._segments:
                    self._load_segment(seg)
                    total += seg.n_tokens
                for s in range(self._first, len(self)):
                    total += len(self._active_entry(s).tokens)
                self._n_tokens = total
            return self._n_tokens

    def tokens(self) -> list[int]:
        """All tokens of all stored entries, in order."""
        return [t for e in self for t in e.tokens]

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the active file, the sealed segments and their indexes."""
        total = self._end
        for seg in self._segments:
            for p in (seg.path, seg.index):
                with contextlib.suppress(OSError):
                    total += os.lstat(p).st_size
        return total

    @property
    def n_segments(self) -> int:
        """Sealed segments on disk."""
        return len(self._segments)

    # -- writing -------------------------------------------------------------------------------

    def append(
        self,
        role: str,
        text: str,
        tokens: Sequence[int],
        meta: dict[str, Any] | None = None,
    ) -> Entry:
        """Append one turn; it is durable (written and fsynced) when this returns.

        On failure nothing of the record is kept, the journal stays open, and the next append
        reuses the same seq; an ``OSError`` comes out as :class:`JournalWriteError` (or
        :class:`JournalFullError` for a full disk) naming the file. A full active file is
        sealed into a segment afterwards; a failed rotation only logs (the entry is safe) and
        is retried later.
        """
        if self._fd is None:
            raise JournalError(f"{self.path} is closed")
        if self.readonly:
            raise JournalError(f"{self.path} was opened read-only")
        with self._lock:
            entry = Entry(
                seq=len(self),
                role=role,
                text=text,
                tokens=tuple(int(t) for t in tokens),
                created=time.time(),
                meta=dict(meta or {}),
            )
            payload = entry.to_payload()
            if len(payload) > MAX_RECORD:
                raise JournalError(f"entry of {len(payload)} bytes exceeds {MAX_RECORD}")
            start = self._end
            self._write_record(self._fd, _encode(payload), entry.seq)
            self._offsets.append(start)
            self._active[entry.seq] = entry
            if self._n_tokens is not None:
                self._n_tokens += len(entry.tokens)
            self._maybe_rotate()
            return entry

    def _write_record(self, fd: int, record: bytes, seq: int) -> None:
        """Write and fsync one record at the end, or leave the file exactly as it was."""
        start = self._end
        try:
            os.lseek(fd, start, os.SEEK_SET)
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        except BaseException as exc:
            # Leave no record behind an append that did not complete: ENOSPC, but also
            # KeyboardInterrupt or a signal handler's exception escaping write/fsync.
            # Otherwise the next append would reuse this seq and corrupt the journal. The
            # fd is unbuffered, so the ftruncate cannot re-send bytes and fail again.
            try:
                os.ftruncate(fd, start)
            except BaseException:
                logger.exception("%s: could not cut a failed append; closing it", self.path)
                self.close()  # reopening rescans the file and sets a torn tail aside
                raise exc from None
            if isinstance(exc, OSError):
                raise _write_error(exc, self.path, f"could not append entry {seq}") from exc
            raise
        self._end = start + len(record)

    def _maybe_rotate(self) -> None:
        full = len(self._offsets) >= self._segment_entries or self._end >= self._segment_bytes
        if not full or len(self._offsets) < self._rotate_after:
            return
        try:
            self.rotate()
        except (OSError, JournalError) as exc:
            # the entry is durable in the active file; a full disk must not fail the turn
            self._rotate_after = len(self._offsets) + max(1, self._segment_entries // 8)
            logger.warning(
                "%s: could not seal a journal segment (retrying later): %s", self.path, exc
            )

    def rotate(self) -> None:
        """Seal the active file into a segment now and start a new one (no-op if empty).

        Order: the index is published (atomically), the active file is renamed to the
        segment name, a new active file is created and locked. A crash between any two steps
        reopens to the same entries (a stale index without its segment is ignored).
        """
        with self._lock:
            if self._fd is None or self.readonly:
                raise JournalError(f"{self.path} is not open for writing")
            if not self._offsets:
                return
            first = self._first
            count = len(self._offsets)
            n_tokens = sum(len(self._active_entry(s).tokens) for s in range(first, first + count))
            name = self.path.name
            seg = _Segment(
                first,
                self.path.with_name(_seg_name(name, first, "seg")),
                self.path.with_name(_seg_name(name, first, "idx")),
                count,
                n_tokens,
                np.asarray(self._offsets, dtype=np.int64),
            )
            if os.path.lexists(seg.path):
                raise JournalError(f"{seg.path} already exists")
            atomic_write_bytes(seg.index, _pack_index(seg, self._end))
            os.rename(self.path, seg.path)
            fsync_dir(self.path.parent)
            old = self._fd
            self._fd = None
            try:
                fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                os.close(old)
                raise JournalError(
                    f"{self.path} was created by someone else while it was sealed"
                ) from None
            except BaseException:
                os.close(old)
                raise
            try:
                lock_exclusive(fd, self.path)
                fsync_dir(self.path.parent)
            except BaseException:
                os.close(fd)
                os.close(old)
                raise
            os.close(old)
            self._fd = fd
            self._segments.append(seg)
            self._first = first + count
            self._offsets = []
            self._active = {}
            self._end = 0
            self._rotate_after = 0

    def drop_segments_before(self, seq: int) -> int:
        """Delete sealed segments whose every entry is older than ``seq``; return bytes freed.

        The newest sealed segment always stays while the active file is empty, so that the
        journal still knows where its numbering resumes. Dropped entries raise
        :class:`JournalCompacted`; nothing else changes.
        """
        freed = 0
        with self._lock:
            if self.readonly or self._fd is None:
                raise JournalError(f"{self.path} is not open for writing")
            keep_last = not self._offsets
            while self._segments:
                seg = self._segments[0]
                self._load_segment(seg)
                if seg.end > seq or (keep_last and len(self._segments) == 1):
                    break
                for p in (seg.path, seg.index):
                    with contextlib.suppress(FileNotFoundError):
                        freed += os.lstat(p).st_size
                        os.unlink(p)
                self._segments.pop(0)
                self._n_tokens = None
                for s in [s for s in self._sealed_cache if s < seg.end]:
                    del self._sealed_cache[s]
            if freed:
                fsync_dir(self.path.parent)
        return freed

    @staticmethod
    def remove_files(path: str | os.PathLike[str]) -> int:
        """Delete a journal's files (:func:`journal_files`); return how many. The caller must
        hold (or have closed) the writer."""
        removed = 0
        files = journal_files(path)
        for file in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(file)  # never follows a symlink
                removed += 1
        if removed:
            fsync_dir(Path(path).parent)
        return removed

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None and not (self.readonly and self._segments)

    def close(self) -> None:
        """Close the file (which drops the writer's lock); safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._segments = [] if self.readonly else self._segments
        self._active = {}
        self._sealed_cache.clear()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def journal_files(path: str | os.PathLike[str]) -> list[Path]:
    """Every file of the journal whose active file is ``path``: the active file, its sealed
    segments and indexes, and its torn-tail rescue files."""
    p = Path(path)
    pattern = re.compile(re.escape(p.name) + r"(\.\d{12}\.(seg|idx)|\.torn-\d+(\.\d+)?)?")
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
