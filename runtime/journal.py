"""The durable turn journal: an append-only log that both memories can be rebuilt from.

Every turn is appended (and fsynced) before anyone is told it was saved. A KV snapshot is
only a cache of the journal's tokens: if it is lost or damaged, replaying the journal's tokens
rebuilds the same KV cache.

Record layout (TFRecord-style, little-endian)::

    u64 payload length | u32 crc32(length bytes) | payload | u32 crc32(payload)

The payload is UTF-8 JSON (one :class:`Entry`). On open, the file is scanned: a clean EOF is
normal; a torn last record (a crash mid-append: the file ends inside it, or its unwritten tail
reads as zeros) was never acknowledged, so it is cut off with a warning, its bytes moved to
``<journal>.torn-<offset>`` first. Any other damage (a bad checksum on a complete record,
even the last one) is :class:`JournalCorrupt` naming the byte offset: dropping an
acknowledged turn is never acceptable. ``readonly=True`` opens without ever writing.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from runtime.errors import MemoryRuntimeError
from runtime.fsutil import FILE_MODE, ensure_dir, fsync_dir

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


def _scan(f: BinaryIO, path: Path, size: int) -> tuple[list[Entry], int]:
    """Read every intact record; return them and the offset where good data ends."""
    entries: list[Entry] = []
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
        try:
            entry = Entry.from_payload(payload)
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalCorrupt(path, offset, f"unreadable entry: {exc}") from exc
        if entry.seq != len(entries):
            raise JournalCorrupt(path, offset, f"entry seq {entry.seq}, expected {len(entries)}")
        entries.append(entry)
        offset = end
    return entries, offset


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


class Journal:
    """An append-only, fsynced journal of turns for one session (one file).

    Not safe for two writers: the caller holds the directory lock (the session does).

    Args:
        path: the journal file; created (mode 0600) if missing.
        fsync: fsync after every append. Turn it off only for tests and benchmarks.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = True, readonly: bool = False
    ) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._lock = threading.Lock()
        self.readonly = readonly
        if readonly:
            fd = os.open(self.path, os.O_RDONLY)
        else:
            ensure_dir(self.path.parent)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            if created:
                fsync_dir(self.path.parent)
        self._f: BinaryIO | None = os.fdopen(fd, "rb" if readonly else "r+b")
        try:
            size = os.fstat(fd).st_size
            self._entries, good = _scan(self._f, self.path, size)
            self._n_tokens = sum(len(e.tokens) for e in self._entries)
            if good < size and not readonly:
                self._cut_torn_tail(self._f, good, size)
            self._f.seek(good)
        except BaseException:
            self.close()
            raise

    def _cut_torn_tail(self, f: BinaryIO, good: int, size: int) -> None:
        """Move a torn last record aside (never destroy bytes), then truncate."""
        f.seek(good)
        rescued = f.read(size - good)
        aside = self.path.with_name(f"{self.path.name}.torn-{good}")
        with open(aside, "wb") as out:
            out.write(rescued)
            out.flush()
            os.fsync(out.fileno())
        logger.warning(
            "%s: a crash left a torn last record (%d bytes at offset %d); it was never "
            "acknowledged, so it is dropped (bytes kept in %s)",
            self.path,
            size - good,
            good,
            aside.name,
        )
        f.truncate(good)
        os.fsync(f.fileno())
        fsync_dir(self.path.parent)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries))

    def __getitem__(self, index: int) -> Entry:
        return self._entries[index]

    @property
    def entries(self) -> list[Entry]:
        """Every intact entry, oldest first (a copy)."""
        return list(self._entries)

    @property
    def n_tokens(self) -> int:
        """Total tokens of all entries (kept up to date; O(1))."""
        return self._n_tokens

    def tokens(self) -> list[int]:
        """All tokens of all entries, in order: the session's KV sequence."""
        return [t for e in self._entries for t in e.tokens]

    def append(
        self,
        role: str,
        text: str,
        tokens: Sequence[int],
        meta: dict[str, Any] | None = None,
    ) -> Entry:
        """Append one turn; it is durable (written and fsynced) when this returns."""
        if self._f is None:
            raise JournalError(f"{self.path} is closed")
        if self.readonly:
            raise JournalError(f"{self.path} was opened read-only")
        with self._lock:
            entry = Entry(
                seq=len(self._entries),
                role=role,
                text=text,
                tokens=tuple(int(t) for t in tokens),
                created=time.time(),
                meta=dict(meta or {}),
            )
            payload = entry.to_payload()
            if len(payload) > MAX_RECORD:
                raise JournalError(f"entry of {len(payload)} bytes exceeds {MAX_RECORD}")
            start = self._f.tell()
            try:
                self._f.write(_encode(payload))
                self._f.flush()
                if self._fsync:
                    os.fsync(self._f.fileno())
            except BaseException:
                # Leave no record behind an append that did not complete: ENOSPC, but also
                # KeyboardInterrupt or a signal handler's exception escaping write/fsync.
                # Otherwise the next append would reuse this seq and corrupt the journal.
                try:
                    self._f.seek(start)
                    self._f.truncate(start)
                except BaseException:
                    f, self._f = self._f, None  # unusable now; reopening rescans the file
                    f.close()
                raise
            self._entries.append(entry)
            self._n_tokens += len(entry.tokens)
            return entry

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._f is None

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._f is not None:
            f, self._f = self._f, None
            f.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
