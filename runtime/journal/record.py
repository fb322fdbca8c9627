"""Journal records: the entry, its CRC-framed record on disk, the scan that checks frames,
and torn-tail rescue (the journal's errors are in :mod:`runtime.errors`).

Record layout (TFRecord-style, little-endian)::

    u64 payload length | u32 crc32(length bytes) | payload | u32 crc32(payload)

The payload is UTF-8 JSON (one :class:`Entry`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from runtime.errors import (
    DamagedFileError,
    JournalCorruptError,
    JournalError,
    PersistError,
    UnsafePathError,
)
from runtime.fsutil import fsync_dir, open_nofollow, persist_error

logger = logging.getLogger(__name__)

RECORD_HEAD = struct.Struct("<QI")
RECORD_TAIL = struct.Struct("<I")
#: A record larger than this is refused on write and treated as damage on read.
MAX_RECORD = 64 << 20


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

    @classmethod
    def new(
        cls,
        seq: int,
        role: str,
        text: str,
        tokens: Any,
        meta: dict[str, Any] | None,
        created: float | None,
    ) -> tuple[Entry, bytes]:
        """An entry to append (``created``: now when ``None``) and its payload;
        :class:`JournalError` when the payload exceeds :data:`MAX_RECORD`."""
        entry = cls(
            seq=seq,
            role=role,
            text=text,
            tokens=tuple(int(t) for t in tokens),
            created=time.time() if created is None else float(created),
            meta=dict(meta or {}),
        )
        payload = entry.to_payload()
        if len(payload) > MAX_RECORD:
            raise JournalError(f"entry of {len(payload)} bytes exceeds {MAX_RECORD}")
        return entry, payload

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
            raise DamagedFileError(f"unknown journal entry version {doc.get('v')!r}")
        return cls(
            seq=int(doc["seq"]),
            role=str(doc["role"]),
            text=str(doc["text"]),
            tokens=tuple(int(t) for t in doc["tokens"]),
            created=float(doc["created"]),
            meta=dict(doc.get("meta") or {}),
        )


def encode_record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    head = length + RECORD_TAIL.pack(zlib.crc32(length))
    return head + payload + RECORD_TAIL.pack(zlib.crc32(payload))


def scan_records(f: BinaryIO, path: Path, size: int) -> tuple[list[int], int]:
    """Check every record's frame and both checksums (no JSON is parsed); return the records'
    offsets and the offset where good data ends."""
    offsets: list[int] = []
    offset = 0
    while offset < size:
        head = f.read(RECORD_HEAD.size)
        if len(head) < RECORD_HEAD.size:
            break  # torn inside the header
        length, head_crc = RECORD_HEAD.unpack(head)
        if zlib.crc32(head[:8]) != head_crc:
            if _rest_is_zero(f, offset, size):
                break  # an unwritten tail after a crash
            raise JournalCorruptError(path, offset, "record header checksum mismatch")
        if length > MAX_RECORD:
            raise JournalCorruptError(path, offset, f"record length {length} exceeds {MAX_RECORD}")
        end = offset + RECORD_HEAD.size + length + RECORD_TAIL.size
        if end > size:
            break  # torn inside the payload
        payload = f.read(length)
        tail = f.read(RECORD_TAIL.size)
        (crc,) = RECORD_TAIL.unpack(tail)
        if zlib.crc32(payload) != crc:
            if end == size and _looks_unwritten(payload + tail):
                break  # the last record, torn: its end never reached the disk
            raise JournalCorruptError(path, offset, "payload checksum mismatch")
        offsets.append(offset)
        offset = end
    return offsets, offset


def record_at(data: bytes | memoryview, path: Path, offset: int, base: int = 0) -> bytes:
    """The payload of the record at file offset ``offset`` (``data`` starts at ``base``),
    checked again: a segment may have been damaged since it was indexed."""
    at = offset - base
    if at < 0 or at + RECORD_HEAD.size > len(data):
        raise JournalCorruptError(path, offset, "record is past the end of the file")
    length, head_crc = RECORD_HEAD.unpack_from(data, at)
    if zlib.crc32(data[at : at + 8]) != head_crc or length > MAX_RECORD:
        raise JournalCorruptError(path, offset, "record header checksum mismatch")
    start = at + RECORD_HEAD.size
    if start + length + RECORD_TAIL.size > len(data):
        raise JournalCorruptError(path, offset, "record is past the end of the file")
    payload = bytes(data[start : start + length])
    (crc,) = RECORD_TAIL.unpack_from(data, start + length)
    if zlib.crc32(payload) != crc:
        raise JournalCorruptError(path, offset, "payload checksum mismatch")
    return payload


def parse_entry(payload: bytes, path: Path, offset: int, seq: int) -> Entry:
    try:
        entry = Entry.from_payload(payload)
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalCorruptError(path, offset, f"unreadable entry: {exc}") from exc
    if entry.seq != seq:
        raise JournalCorruptError(path, offset, f"entry seq {entry.seq}, expected {seq}")
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


def write_error(exc: OSError, path: Path, what: str) -> PersistError:
    """:class:`DiskFullError` for a full disk, else :class:`PersistError`."""
    return persist_error(exc, path, what)


def cut_torn_tail(path: Path, fd: int, good: int, size: int) -> None:
    """Move a torn last record aside (never destroy bytes), then truncate."""
    rescued = os.pread(fd, size - good, good)
    try:
        aside = write_rescue(path, good, rescued)
        logger.warning(
            "%s: a crash left a torn last record (%d bytes at offset %d); it was never "
            "acknowledged, so it is dropped (bytes kept in %s)",
            path,
            size - good,
            good,
            aside.name,
        )
        os.ftruncate(fd, good)
        os.fsync(fd)
        fsync_dir(path.parent)
    except UnsafePathError:
        raise
    except OSError as exc:
        raise write_error(exc, path, "could not set a torn last record aside") from exc


def write_rescue(path: Path, good: int, data: bytes) -> Path:
    """Write ``data`` to a new ``<journal>.torn-<offset>[.<n>]`` file (0600, O_EXCL).

    ``O_EXCL`` never follows a symlink and never replaces an earlier rescue file: a second
    torn tail at the same offset, or a planted link, just moves on to the next name.
    """
    for attempt in range(1000):
        suffix = f".torn-{good}" + (f".{attempt}" if attempt else "")
        aside = path.with_name(path.name + suffix)
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
    raise JournalError(f"{path}: too many torn-tail rescue files at offset {good}")
