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
"""

from __future__ import annotations

import contextlib
import errno
import io
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

from runtime.errors import DiskFullError, MemoryRuntimeError, PersistError, UnsafePathError
from runtime.fsutil import (
    FULL_ERRNOS,
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


class Journal:
    """An append-only, fsynced journal of turns for one session (one file).

    A writer holds an exclusive ``flock`` on the file while it is open: a second writer (in
    this process or another) gets :class:`runtime.errors.LockedError` naming the holder's pid.
    ``readonly=True`` takes no lock and never writes, so it works while a writer is open (it
    sees the entries appended before it opened).

    Appends go straight to the file descriptor (no user-space buffer), so a failed append
    (ENOSPC, EIO, an exception escaping write/fsync) is undone with one ``ftruncate`` back to
    the end of the last good record: the journal stays open and usable, and the error is a
    :class:`JournalWriteError` (:class:`JournalFullError`, a
    :class:`runtime.errors.DiskFullError`, for a full disk) naming the file.

    The journal file and its torn-tail rescue files are never opened through a symlink
    (:class:`runtime.errors.UnsafePathError`) and are created mode 0600.

    Args:
        path: the journal file; created (mode 0600) if missing.
        fsync: fsync after every append. Turn it off only for tests and benchmarks.
        readonly: open for reading only (no lock, no torn-tail cut).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = True, readonly: bool = False
    ) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._lock = threading.Lock()
        self.readonly = readonly
        self._fd: int | None = None
        self._end = 0
        if readonly:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        else:
            ensure_dir(self.path.parent)
            warn_if_exposed(self.path.parent)
            created = not os.path.lexists(self.path)
            self._fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            if not readonly:
                lock_exclusive(self._fd, self.path)
                if created:
                    fsync_dir(self.path.parent)
            size = os.fstat(self._fd).st_size
            with io.FileIO(self._fd, "r", closefd=False) as raw:
                reader = io.BufferedReader(raw, 1 << 16)
                self._entries, good = _scan(reader, self.path, size)
            self._n_tokens = sum(len(e.tokens) for e in self._entries)
            if good < size and not readonly:
                self._cut_torn_tail(self._fd, good, size)
            self._end = good
        except BaseException:
            self.close()
            raise

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
        """Append one turn; it is durable (written and fsynced) when this returns.

        On failure nothing of the record is kept, the journal stays open, and the next append
        reuses the same seq; an ``OSError`` comes out as :class:`JournalWriteError` (or
        :class:`JournalFullError` for a full disk) naming the file.
        """
        if self._fd is None:
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
            self._write_record(self._fd, _encode(payload), entry.seq)
            self._entries.append(entry)
            self._n_tokens += len(entry.tokens)
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

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None

    def close(self) -> None:
        """Close the file (which drops the writer's lock); safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
