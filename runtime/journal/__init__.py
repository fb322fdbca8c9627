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
last one) is :class:`JournalCorruptError` naming the byte offset: dropping an acknowledged turn is
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
raises :class:`JournalCompactedError`.
"""

from runtime.errors import (
    JournalCompactedError,
    JournalCorruptError,
    JournalError,
)
from runtime.journal.journal import Journal
from runtime.journal.record import (
    MAX_RECORD,
    Entry,
)
from runtime.journal.segment import (
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SEGMENT_ENTRIES,
    journal_files,
    journal_files_of,
    journal_sessions,
)

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "DEFAULT_SEGMENT_ENTRIES",
    "MAX_RECORD",
    "Entry",
    "Journal",
    "JournalCompactedError",
    "JournalCorruptError",
    "JournalError",
    "journal_files",
    "journal_files_of",
    "journal_sessions",
]
