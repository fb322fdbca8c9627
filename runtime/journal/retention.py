"""What journal retention removed: the seq ranges of dropped segments, kept beside the journal
(``<name>.dropped``, JSON) so that a gap they do not explain (a segment file lost) is damage,
never compaction."""

from __future__ import annotations

import json
import os
from pathlib import Path

from runtime.errors import JournalCompactedError, JournalCorruptError, JournalError
from runtime.fsutil import atomic_write_bytes, open_nofollow


class DroppedRanges:
    """The sorted, merged ``[lo, hi)`` seq ranges retention removed from one journal."""

    def __init__(self, journal_path: Path) -> None:
        self.path = journal_path.with_name(journal_path.name + ".dropped")
        self.ranges: list[tuple[int, int]] = []

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def load(self) -> None:
        """Read the record (none: nothing was dropped)."""
        try:
            fd = open_nofollow(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self.ranges = []
            return
        try:
            data = os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)
        try:
            ranges = [(int(a), int(b)) for a, b in json.loads(data)["dropped"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalCorruptError(self.path, 0, f"unreadable: {exc}") from None
        self.ranges = sorted(ranges)

    def missing(self, seq: int) -> JournalError:
        """The error for entry ``seq`` that no file holds: compacted, or lost."""
        journal = self.path.with_name(self.path.name.removesuffix(".dropped"))
        if self.covers(seq, seq + 1):
            return JournalCompactedError(f"{journal}: entry {seq} was removed by journal retention")
        return JournalCorruptError(journal, 0, f"the segment holding entry {seq} is missing")

    def check_gap(self, a: int, b: int) -> None:
        """Entries ``[a, b)`` are in no file: fine if retention dropped them, damage if not."""
        if not self.covers(a, b):
            journal = self.path.with_name(self.path.name.removesuffix(".dropped"))
            raise JournalCorruptError(
                journal, 0, f"entries {a}..{b - 1} are missing (a segment file was lost)"
            )

    def covers(self, a: int, b: int) -> bool:
        """Whether retention dropped every seq in ``[a, b)``."""
        for lo, hi in self.ranges:
            if lo <= a < hi:
                a = hi
            if a >= b:
                return True
        return a >= b

    def add(self, ranges: list[tuple[int, int]]) -> None:
        """Record more dropped ranges, durably (before the files go: a crash after this
        leaves files that are simply still there)."""
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(self.ranges + ranges):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        body = json.dumps({"dropped": [list(r) for r in merged]}).encode()
        atomic_write_bytes(self.path, body)
        self.ranges = merged
