"""The journal itself: one session's active file plus its sealed segments (see the package
docstring)."""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ArgumentError, JournalCorruptError, JournalError
from runtime.fsutil import ensure_dir, fsync_dir, lock_exclusive, open_nofollow, warn_if_exposed
from runtime.journal.record import (
    MAX_RECORD,
    RECORD_HEAD,
    RECORD_TAIL,
    Entry,
    cut_torn_tail,
    encode_record,
    parse_entry,
    record_at,
    scan_records,
    write_error,
)
from runtime.journal.retention import DroppedRanges
from runtime.journal.segment import (
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SEGMENT_ENTRIES,
    SEALED_CACHE,
    Segment,
    SegmentMoved,
    delete_segments,
    first_seq_of_active,
    iter_segment,
    list_segments,
    load_sealed,
    read_sealed,
    remove_journal_files,
    seal_active,
    segment_name,
)

logger = logging.getLogger(__name__)


class Journal:
    """An append-only, fsynced journal of turns for one session (an active file + segments).

    A writer holds an exclusive ``flock`` on the active file while it is open: a second writer
    (in this process or another) gets :class:`runtime.errors.LockedError` naming the holder's
    pid. ``readonly=True`` takes no lock and never writes, so it works while a writer is open
    (it sees the entries appended before it opened).

    Appends go straight to the file descriptor (no user-space buffer), so a failed append
    (ENOSPC, EIO, an exception escaping write/fsync) is undone with one ``ftruncate`` back to
    the end of the last good record: the journal stays open and usable, and the error is a
    :class:`runtime.errors.PersistError` (:class:`runtime.errors.DiskFullError` for a full
    disk) naming the file.

    Opening costs what the active segment holds: sealed segments (see the package docstring)
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
            raise ArgumentError("segment_entries and segment_bytes must be positive")
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
        self._segments: list[Segment] = []
        self._dropped = DroppedRanges(self.path)
        self._opening = False
        self._n_tokens: int | None = None
        self._rotate_after = 0  # append count before a failed rotation is retried
        self._opening = True
        try:
            for _attempt in range(5):
                try:
                    self._open()
                    return
                except SegmentMoved:
                    continue  # a writer rotated while this reader listed the files: look again
            raise JournalError(f"{self.path}: the journal kept changing while it was opened")
        finally:
            self._opening = False

    # -- open ------------------------------------------------------------------------------------

    def _open(self) -> None:
        self._segments = list_segments(self.path)
        self._dropped.load()
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
                lock_exclusive(self._writable_fd(), self.path)
                if created:
                    fsync_dir(self.path.parent)
                # the writer's view of the segments is only stable once it holds the lock
                self._segments = list_segments(self.path)
            size = os.fstat(self._fd).st_size if self._fd is not None else 0
            if self._fd is not None:
                with io.FileIO(self._fd, "r", closefd=False) as raw:
                    reader = io.BufferedReader(raw, 1 << 16)
                    self._offsets, good = scan_records(reader, self.path, size)
            else:
                self._offsets, good = [], 0
            self._first = self._first_seq_of_active()
            stored = self._segments[0].first if self._segments else self._first
            if stored > 0 and not self._dropped.covers(0, stored):
                # entries before the first file are gone, and no retention record says so
                raise JournalCorruptError(
                    self._segments[0].path if self._segments else self.path,
                    0,
                    f"entries 0..{stored - 1} are missing (a segment file was lost)",
                )
            if good < size and not self.readonly:
                cut_torn_tail(self.path, self._writable_fd(), good, size)
            self._end = good
        except BaseException:
            self.close()
            raise

    def _first_seq_of_active(self) -> int:
        """The seq the active file starts at (:func:`first_seq_of_active`)."""
        if self._segments:
            self._load(self._segments[-1])
        first = self._pread_record(self._offsets[0]) if self._offsets else None
        return first_seq_of_active(
            self.path, self._segments, first, self._dropped, readonly=self.readonly
        )

    # -- sealed segments ---------------------------------------------------------------------

    def _segment_of(self, seq: int) -> Segment:
        lo, hi = 0, len(self._segments) - 1
        while lo < hi:  # the last segment whose first seq is <= seq
            mid = (lo + hi + 1) // 2
            if self._segments[mid].first <= seq:
                lo = mid
            else:
                hi = mid - 1
        seg = self._segments[lo] if self._segments else None
        if seg is not None:
            self._load(seg)
        if seg is None or not seg.first <= seq < seg.end:
            raise self._dropped.missing(seq)
        return seg

    def _load(self, seg: Segment) -> None:
        load_sealed(seg, self._dropped, writable=not self.readonly, opening=self._opening)

    def _sealed_entry(self, seq: int) -> Entry:
        cached = self._sealed_cache.get(seq)
        if cached is not None:
            self._sealed_cache.move_to_end(seq)
            return cached
        entry = read_sealed(self._segment_of(seq), seq)
        self._sealed_cache[seq] = entry
        if len(self._sealed_cache) > SEALED_CACHE:
            self._sealed_cache.popitem(last=False)
        return entry

    # -- reading -------------------------------------------------------------------------------

    def _writable_fd(self) -> int:
        """The active file's descriptor, open for writing (JournalError if it is not)."""
        if self._fd is None or self.readonly:
            raise JournalError(f"{self.path} is not open for writing")
        return self._fd

    def _pread_record(self, offset: int) -> bytes:
        if self._fd is None:
            raise JournalError(f"{self.path} is closed")
        head = os.pread(self._fd, RECORD_HEAD.size, offset)
        length = RECORD_HEAD.unpack(head)[0] if len(head) == RECORD_HEAD.size else 0
        size = RECORD_HEAD.size + min(length, MAX_RECORD) + RECORD_TAIL.size
        data = os.pread(self._fd, size, offset)
        return record_at(data, self.path, offset, offset)

    def _active_entry(self, seq: int) -> Entry:
        entry = self._active.get(seq)
        if entry is None:
            if self._fd is None:
                raise JournalError(f"{self.path} is closed")
            off = self._offsets[seq - self._first]
            entry = parse_entry(self._pread_record(off), self.path, off, seq)
            self._active[seq] = entry
        return entry

    def __len__(self) -> int:
        """The next entry's seq (entries dropped by retention still count)."""
        return self._first + len(self._offsets)

    @property
    def first_seq(self) -> int:
        """The oldest entry still stored (0 unless retention dropped the first segments)."""
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
                raise self._dropped.missing(seq)
            return self._sealed_entry(seq)

    def iter_from(self, seq: int) -> Iterator[Entry]:
        """Entries ``seq``, ``seq + 1``, ... up to the end as of this call, in order.

        Sealed segments are read whole, once each; :class:`JournalCompactedError` if ``seq`` is
        older than :attr:`first_seq`.
        """
        end = len(self)
        seq = max(seq, 0)
        if seq < self.first_seq:
            raise self._dropped.missing(seq)
        segments = list(self._segments)
        for i, seg in enumerate(segments):
            # one that the next starts at or before ``seq`` is skipped without reading its
            # index
            following = segments[i + 1].first if i + 1 < len(segments) else self._first
            if following <= seq:
                continue
            if seg.first >= end:
                return
            if seg.first > seq:
                self._dropped.check_gap(seq, seg.first)  # retention may leave gaps; loss may not
            yield from iter_segment(seg, seq, writable=not self.readonly)
            seq = seg.end
        if self._first > seq:
            self._dropped.check_gap(seq, self._first)
        for s in range(max(seq, self._first), end):
            with self._lock:
                entry = self._active_entry(s)
            yield entry

    def __iter__(self) -> Iterator[Entry]:
        return self.iter_from(self.first_seq)

    @property
    def n_tokens(self) -> int:
        """Total tokens of all stored entries (computed once, then kept up to date)."""
        with self._lock:
            if self._n_tokens is None:
                total = 0
                for seg in self._segments:
                    self._load(seg)
                    total += seg.n_tokens
                for s in range(self._first, len(self)):
                    total += len(self._active_entry(s).tokens)
                self._n_tokens = total
            return self._n_tokens

    def tokens(self) -> list[int]:
        """All tokens of all stored entries, in order."""
        return [t for e in self for t in e.tokens]

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
        *,
        created: float | None = None,
    ) -> Entry:
        """Append one turn; it is durable (written and fsynced) when this returns.

        ``created`` is the turn's UNIX time (default: now; an imported history keeps its own).

        On failure nothing of the record is kept, the journal stays open, and the next append
        reuses the same seq; an ``OSError`` comes out as :class:`PersistError` (or
        :class:`DiskFullError` for a full disk) naming the file. A full active file is
        sealed into a segment afterwards; a failed rotation only logs (the entry is safe) and
        is retried later.
        """
        if self._fd is None:
            raise JournalError(f"{self.path} is closed")
        if self.readonly:
            raise JournalError(f"{self.path} was opened read-only")
        with self._lock:
            entry, payload = Entry.new(len(self), role, text, tokens, meta, created)
            start = self._end
            self._write_record(self._fd, encode_record(payload), entry.seq)
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
                raise write_error(exc, self.path, f"could not append entry {seq}") from exc
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
            seg = Segment(
                first,
                self.path.with_name(segment_name(name, first, "seg")),
                self.path.with_name(segment_name(name, first, "idx")),
                count,
                n_tokens,
                np.asarray(self._offsets, dtype=np.int64),
            )
            fd = seal_active(self.path, self._fd, seg, self._end, on_closed=self._lost_fd)
            self._fd = fd
            self._segments.append(seg)
            self._first = first + count
            self._offsets = []
            self._active = {}
            self._end = 0
            self._rotate_after = 0

    def _lost_fd(self) -> None:
        # a failed rotation closed the active file: the journal is closed
        self._fd = None

    def drop_segments_before(self, seq: int, keep: Collection[int] = ()) -> int:
        """Delete sealed segments whose every entry is older than ``seq`` and that hold none
        of the entries in ``keep``; return the bytes freed.

        ``keep`` lets a segment in the middle of the history stay (a session's first turn,
        pinned in its window, lives in segment 0 forever). The newest sealed segment always
        stays while the active file is empty, so that the journal still knows where its
        numbering resumes. Dropped entries raise :class:`JournalCompactedError`; iteration skips
        them; every other seq keeps its number.
        """
        freed = 0
        with self._lock:
            if self.readonly or self._fd is None:
                raise JournalError(f"{self.path} is not open for writing")
            keep_last = not self._offsets
            kept: list[Segment] = []
            gone: list[Segment] = []
            for i, seg in enumerate(self._segments):
                self._load(seg)
                newest = i == len(self._segments) - 1
                needed = any(seg.first <= k < seg.end for k in keep)
                if seg.end > seq or needed or (keep_last and newest):
                    kept.append(seg)
                else:
                    gone.append(seg)
            if not gone:
                return 0
            # the record first: a crash after it leaves files that are simply still there
            self._dropped.add([(seg.first, seg.end) for seg in gone])
            freed = delete_segments(self.path.parent, gone)
            self._n_tokens = None
            for seg in gone:
                for s in [s for s in self._sealed_cache if seg.first <= s < seg.end]:
                    del self._sealed_cache[s]
            self._segments = kept
        return freed

    @property
    def compacted(self) -> bool:
        """Whether retention removed any entry."""
        return bool(self._dropped)

    @staticmethod
    def remove_files(path: str | os.PathLike[str]) -> int:
        """Delete a journal's files (:func:`journal_files`); return how many. The caller must
        hold (or have closed) the writer."""
        return remove_journal_files(path)

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
