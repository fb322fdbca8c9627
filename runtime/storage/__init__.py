"""Storage behind interfaces: what the journal and the checkpoints need of a backend, and what
each call guarantees when it returns.

Four interfaces, each with a local implementation (the data directory, the default); the
first three also have server-backed ones:

* :class:`JournalBackend`: a session's turns, in order. :class:`runtime.journal.Journal`
  (segment files under ``journals/``) is the local one; :class:`runtime.storage.postgres.PgJournal`
  (one PostgreSQL table) the server-backed one.
* :class:`JournalStore`: every session's journal, what the runtime opens, lists and deletes
  them through. :class:`LocalJournals` (the ``journals/`` directory) and
  :class:`runtime.storage.postgres.PgJournals` (the table, with a lease per session).
* :class:`BlobStore`: immutable, content-addressed chunks and the per-session manifests that
  name them. :class:`LocalBlobStore` (files under ``kv/``) is the local one;
  :class:`runtime.storage.s3.S3BlobStore` (an S3-compatible bucket) the server-backed one.
* :class:`MemoryBackend`: the long-term memory's items, their vectors and search, what
  :class:`runtime.app.recall.Recall` and the distiller use.
  :class:`runtime.longterm.MemoryStore` (SQLite + FTS5 + an hnswlib index under ``longterm/``)
  is the local one. With ``db=``, each node's store is a replica of a
  :class:`MemoryLog` (:class:`runtime.storage.pgmemory.PgMemoryLog`, a PostgreSQL table with
  pgvector embeddings) that every node writes through and reads from
  (:mod:`runtime.longterm.replica`).

The server-backed modules import their clients (psycopg, boto3; the ``cluster`` extra) only
when they are imported themselves, so the local runtime needs neither.

The contract tests in ``tests/runtime/test_storage_contract.py`` run against every
journal and blob store; the memory store's guarantees are tested in
``tests/runtime/test_memory.py`` and ``test_longterm_truth.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from runtime.storage.local import MANIFEST_SUFFIX, LocalBlobStore, LocalJournals

if TYPE_CHECKING:
    from datetime import datetime

    from runtime.journal import Entry
    from runtime.longterm import Hit, MemoryItem
    from runtime.longterm.items import NewItem

__all__ = [
    "MANIFEST_SUFFIX",
    "BlobStore",
    "JournalBackend",
    "JournalStore",
    "LocalBlobStore",
    "LocalJournals",
    "MemoryBackend",
    "MemoryChange",
    "MemoryLog",
]


class JournalBackend(Protocol):
    """A session's turns, in order: the truth both memories are rebuilt from.

    Durability: when :meth:`append` returns, the entry is durable (written and, unless the
    journal was opened without fsync for tests, fsynced) and will be read back by every later
    reader, after any crash. A failed append keeps nothing of the entry, and the next append
    reuses its seq.

    Order: entries are numbered ``0, 1, 2, ...`` in append order, without gaps; a reader sees
    a prefix of that order. :meth:`rotate` seals the entries so far (an immutable segment);
    :meth:`drop_segments_before` removes sealed entries only, never the newest, and a later
    read of a dropped entry raises :class:`runtime.errors.JournalCompactedError` (never a
    silent skip); damage in the middle raises :class:`runtime.errors.JournalCorruptError`.
    """

    def __len__(self) -> int:
        """Entries appended so far (dropped ones included in the numbering)."""
        ...

    def __getitem__(self, seq: int) -> Entry:
        """Entry ``seq`` (negative: from the end)."""
        ...

    def __iter__(self) -> Iterator[Entry]:
        """Every stored entry, in order."""
        ...

    @property
    def closed(self) -> bool:
        """Whether the journal was closed (or closed itself after a failure it cannot undo)."""
        ...

    @property
    def compacted(self) -> bool:
        """Whether retention dropped any entry."""
        ...

    @property
    def first_seq(self) -> int:
        """The oldest entry still stored (0 unless retention dropped the first segments)."""
        ...

    @property
    def n_segments(self) -> int:
        """Sealed segments kept."""
        ...

    def append(
        self,
        role: str,
        text: str,
        tokens: Sequence[int],
        meta: dict[str, Any] | None = None,
        *,
        created: float | None = None,
    ) -> Entry:
        """Append one entry; durable when this returns."""
        ...

    def iter_from(self, seq: int) -> Iterator[Entry]:
        """The entries from ``seq`` on, in order (a range read: costs what it returns)."""
        ...

    def rotate(self) -> None:
        """Seal the entries so far into an immutable segment (only sealed entries can be
        dropped)."""

    def drop_segments_before(self, seq: int, keep: Collection[int] = ()) -> int:
        """Drop sealed entries older than ``seq`` (those in ``keep`` stay readable); return
        the bytes freed."""
        ...

    def close(self) -> None:
        """Release the backend; later calls raise."""

    def __enter__(self) -> JournalBackend:
        """The journal itself; :meth:`close` on exit."""
        ...

    def __exit__(self, *exc: object) -> None:
        """:meth:`close`."""


class JournalStore(Protocol):
    """Every session's journal: where the runtime opens, lists and deletes them.

    A session exists once its journal holds an entry (an open for writing creates nothing
    until the first append). :meth:`open` of a writable journal may refuse a session that
    another process serves (:class:`runtime.errors.SessionLeasedError`: a server-backed
    store's lease); its appends are then refused too once that process loses it (fencing).
    :meth:`delete` removes every entry, durable on return.
    """

    def open(self, session_id: str, *, readonly: bool = False) -> JournalBackend:
        """The session's journal (``readonly``: never writes, takes no lease)."""
        ...

    def exists(self, session_id: str) -> bool:
        """Whether the session has a journal."""
        ...

    def sessions(self) -> list[str]:
        """Every session with a journal, sorted."""
        ...

    def usage(self, session_ids: Sequence[str]) -> dict[str, tuple[int, float]]:
        """``(bytes, time of the last write)`` of each of these sessions that has a journal
        (one listing or query for them all)."""
        ...

    def delete(self, session_id: str) -> None:
        """Delete the session's whole journal (its writer must be closed)."""

    def total_bytes(self) -> int:
        """Bytes every journal takes."""
        ...

    def describe(self) -> str:
        """Where the journals are, for messages."""
        ...

    def close(self) -> None:
        """Release the store; safe to call twice."""


class BlobStore(Protocol):
    """Chunks (immutable blobs named by their content key) and each session's manifests.

    Durability and order:

    * :meth:`put_all` returns only once its blobs are durable; a blob is never changed
      after that (a key names its content), so a second put of the same key is a no-op.
    * :meth:`switch_manifest` publishes a session's new manifest atomically: a reader sees
      the old manifests or the new one, never part of it, and it is durable when the call
      returns. **A manifest is durable only after every chunk it names**: the caller puts
      every chunk first (durable on return), then switches.
    * Deletes (:meth:`delete`, :meth:`delete_manifest`, :meth:`delete_session`) are issued
      only after the manifest switch that stops referencing what they delete, so a crash at
      any point leaves every chunk a live manifest names in place (at worst, orphans that the
      next garbage collection removes).
    * Damaged data is never deleted by a reader: it is moved aside with a reason
      (:meth:`quarantine`, :meth:`quarantine_manifest`).
    """

    readonly: bool
    #: Chunks worth reading ahead of a restore's caller, besides the decoders: 0 for a local
    #: disk (reads are memory maps), more for a store with a round trip per read.
    fetch_ahead: int

    def put_all(self, blobs: Sequence[tuple[str, Callable[[BinaryIO], int]]]) -> list[int]:
        """Store each blob ``(key, write)`` that is not there yet (``write(f)`` writes its
        bytes), all durable on return. Returns the stored sizes (the existing one where the
        key was already there, and ``write`` is not called). Each ``write`` is called at most
        once, one at a time, in order, on the caller's thread (the local store fsyncs one
        file while the next is written). On an error the blobs stored before it stay."""
        ...

    def get(self, key: str) -> memoryview:
        """The bytes of blob ``key`` (``FileNotFoundError`` when absent). Valid while the
        view lives; the local store maps the file instead of copying it."""
        ...

    def has(self, key: str) -> bool:
        """Whether blob ``key`` is stored."""
        ...

    def list_keys(self) -> Iterator[str]:
        """Every stored blob key (any order)."""
        ...

    def delete(self, key: str) -> None:
        """Delete blob ``key`` (no error when it is absent); durable after
        :meth:`sync_deletes`."""

    def sync_deletes(self, keys: Collection[str]) -> None:
        """Make the deletes of ``keys`` durable."""

    def quarantine(self, key: str, reason: str) -> None:
        """Move damaged blob ``key`` aside with ``reason``."""

    def describe(self, key: str) -> str:
        """A name for blob ``key`` in messages (the local store: its path)."""
        ...

    def describe_manifest(self, session_id: str, generation: int) -> str:
        """A name for a manifest in messages (the local store: its path)."""
        ...

    def sessions(self) -> list[str]:
        """The sessions with manifests, sorted."""
        ...

    def generations(self, session_id: str) -> list[int]:
        """The session's manifest generations, newest first."""
        ...

    def get_manifest(self, session_id: str, generation: int, max_size: int) -> bytes:
        """The bytes of one manifest (``FileNotFoundError`` when absent; ``ValueError``
        before reading when it is larger than ``max_size``)."""
        ...

    def switch_manifest(self, session_id: str, generation: int, data: bytes) -> None:
        """Publish manifest ``generation`` of the session atomically and durably."""

    def delete_manifest(self, session_id: str, generation: int) -> None:
        """Delete one manifest (no error when it is absent)."""

    def quarantine_manifest(self, session_id: str, generation: int, reason: str) -> None:
        """Move a damaged manifest aside with ``reason``."""

    def delete_session(self, session_id: str) -> None:
        """Delete every manifest of the session (its chunks are collected afterwards)."""

    def close(self) -> None:
        """Release the store (its lock); safe to call twice."""


class MemoryBackend(Protocol):
    """Long-term memory: distilled items (turns, facts, summaries), their vectors, search.

    Durability and order:

    * :meth:`put` and :meth:`add` return ids only once the items are committed: an
      acknowledged memory survives any crash. The vector index is derived and may lag; it is
      rebuilt from the committed items on open, so a search after a crash finds every item.
    * :meth:`put` with ``mark=(key, value)`` writes the watermark in the same transaction
      as the items, so a crash leaves both or neither (ingest from the journal resumes after
      :meth:`watermark` and never adds an item twice: an item whose id is stored is skipped).
    * Distinct facts are never merged: two items merge only when they say the same thing
      (same numbers, names, negations and speaker). A newer fact about the same subject and
      attribute supersedes the older one, which is kept and reachable through
      :meth:`lineage`, never deleted.
    * Deletes (:meth:`delete`, :meth:`delete_session`) are committed on return; a search
      after them never returns what they deleted.
    """

    def put(
        self,
        items: Sequence[NewItem],
        *,
        now: float | datetime | None = None,
        merge: bool = True,
        mark: tuple[str, int] | None = None,
    ) -> list[str]:
        """Store items in one transaction (merging repeats unless ``merge=False``); their ids."""
        ...

    def add(
        self,
        text: str,
        *,
        kind: str = "fact",
        session: str | None = None,
        importance: float = 0.5,
        meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Store one explicit note, never merged; its id."""
        ...

    def get(self, item_id: str) -> MemoryItem | None:
        """The item with this id, or ``None``."""
        ...

    def search(
        self,
        query: str,
        k: int = 10,
        *,
        session: str | None = None,
        now: float | datetime | None = None,
        touch: bool = True,
        with_global: bool = False,
        current_only: bool = False,
        tenant: str | None = None,
    ) -> list[Hit]:
        """The ``k`` best items for ``query`` in the scope (``session``, plus its global
        items ``with_global``: its tenant's root's, or those stored without a session;
        without a session, ``tenant``'s items only; ``current_only``: nothing superseded),
        best first. A search never returns an item outside its scope."""
        ...

    def touch(self, ids: Iterable[str], now: float | datetime | None = None) -> None:
        """Mark items as used now (recency); may be written lazily."""

    def lineage(self, item_id: str) -> list[MemoryItem]:
        """Every fact about the item's subject and attribute, current first."""
        ...

    def delete(self, item_id: str) -> bool:
        """Delete one item; False when there was none."""
        ...

    def delete_session(self, session: str) -> int:
        """Delete every item of a session; how many."""
        ...

    def watermark(self, key: str) -> int:
        """The value last written with ``mark=(key, ...)`` (-1 when none)."""
        ...

    def forget_marks(self, session: str) -> None:
        """Drop the session's watermarks (its journal is gone)."""

    def archive_turns(self, session: str, max_items: int) -> int:
        """Delete the session's least useful turn items past ``max_items``; how many."""
        ...

    def stats(self) -> dict[str, Any]:
        """Item counts and index figures."""
        ...

    def close(self) -> None:
        """Write what is pending and release the backend; safe to call twice."""


@dataclass(frozen=True)
class MemoryChange:
    """One change to a shared long-term memory: an item's latest image, an item's deletion,
    or a watermark's value.

    ``id`` is the item's id, or ``"mark:<key>"`` for a watermark (``kind`` ``"mark"``);
    ``item`` is the item's stored fields (``None``: deleted, or a watermark cleared; a
    watermark's is ``{"value": n}``); ``embedding`` its vector as little-endian float32 bytes
    (``None`` for a deletion or a watermark). ``scrub``: the deletion is part of a session's
    erasure, after which a replica leaves no trace of the text on its disk either.
    """

    id: str
    session: str | None
    kind: str | None
    item: Mapping[str, Any] | None
    embedding: bytes | None = None
    scrub: bool = False


class MemoryLog(Protocol):
    """The shared truth of a long-term memory that several nodes replicate: the latest image
    of every item (and watermark), each stamped with a revision.

    Durability and order:

    * :meth:`publish` returns once its changes have committed, all or none, and returns
      their revisions. It is refused (:class:`runtime.errors.PersistError`, retry after a
      pull) when another writer changed one of its rows after revision ``base``, the
      writer's last pull, so a change is never made to a stale image (a deleted item
      resurrected by a merge into it, say); and for a session whose lease this node held
      and lost. Revisions grow in commit order with no later gap: a reader that has
      seen revision ``r`` has seen every change committed before it.
    * :meth:`changes` returns the changes after a revision, in revision order; an item
      changed twice appears once, with its latest image. Deletions stay as tombstones (the
      id and the session, never the text), so a replica that was away applies them too.
    """

    def open(self, model_id: str, dim: int) -> str:
        """Create the shared tables if needed; the store's id. A store written with another
        embedding model or width raises :class:`runtime.errors.StoreMismatchError`."""
        ...

    def publish(self, changes: Sequence[MemoryChange], *, base: int) -> list[int]:
        """Commit ``changes`` in one transaction unless one of their rows changed after
        revision ``base``; their revisions, in order."""
        ...

    def changes(self, after: int, limit: int) -> list[tuple[int, MemoryChange]]:
        """Up to ``limit`` changes with a revision above ``after``, in revision order."""
        ...

    def touch(self, times: Mapping[str, float]) -> None:
        """Record items' last access times (each only moves forward); a ranking hint, never
        refused for a stale image."""

    def touches(self, after: int, limit: int) -> list[tuple[int, str, float]]:
        """Up to ``limit`` (access revision, id, time) recorded after ``after``, in order."""
        ...

    def top(self) -> tuple[int, int]:
        """The newest revision and access revision stored (0 when none): a replica ahead of
        them is of a database restored from a backup, and is rebuilt."""
        ...

    def describe(self) -> str:
        """Where the log lives (for messages; no secrets)."""
        ...
