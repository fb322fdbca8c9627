"""Long-term memory: :class:`MemoryStore`, items in SQLite plus a derived hnswlib index.

The store is the facade over its parts (listed in :mod:`runtime.longterm`) and holds their
lock. A write is acknowledged only after its SQLite commit; the index follows it.

Access times set by searches are written in batches (:data:`~runtime.longterm.db.TOUCH_FLUSH_EVERY`,
on save and close; :meth:`runtime.longterm.db.AccessTimes.flush` says why that is safe).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.embed.embedder import TextEmbedder, embed_all
from runtime.errors import ArgumentError, ClosedError, MemoryStoreError, PersistError, ReadOnlyError
from runtime.fsutil import DirLock
from runtime.longterm import db as sql
from runtime.longterm import forget, links, retrieval, schema
from runtime.longterm.db import DB_NAME
from runtime.longterm.failures import final_error, sqlite_error, sqlite_errors
from runtime.longterm.hnsw import IndexParams
from runtime.longterm.index import StoreIndex
from runtime.longterm.items import (
    MemoryItem,
    NewItem,
    check_item,
    embedded_text,
    note,
    notes,
    to_epoch,
)
from runtime.longterm.ranking import FusionWeights, Hit, ScoringWeights
from runtime.longterm.replica import Replica

if TYPE_CHECKING:
    from runtime.storage import MemoryLog


class MemoryStore:
    """Long-term memory in one directory: ``memory.sqlite3`` + the hnswlib index files.

    One process at a time may open a directory for writing (a second gets
    :class:`runtime.errors.LockedError`). Thread-safe: every public method holds one lock.
    Bad arguments raise :class:`runtime.errors.ArgumentError` (a ``ValueError``) or
    :class:`runtime.errors.ArgumentTypeError` (a ``TypeError``); use after :meth:`close`,
    :class:`runtime.errors.ClosedError`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        embedder: TextEmbedder,
        *,
        weights: ScoringWeights | None = None,
        fusion: FusionWeights | None = None,
        dedup_similarity: float = links.DEDUP_SIMILARITY,
        M: int = 32,
        ef_construction: int = 200,
        ef_search: int = 512,
        save_every: int = 5000,
        read_only: bool = False,
        shared: MemoryLog | None = None,
    ) -> None:
        """Open (creating if needed) the store in ``directory``.

        ``read_only=True`` takes no lock, never writes (no index save, no access-time
        updates) and works while another process holds the store open for writing.

        ``shared``: the store is a replica of this log, written through and read from by
        every node (:mod:`runtime.longterm.replica`); a write is acknowledged once it commits.
        """
        if save_every < 1:
            raise ArgumentError(f"save_every must be positive, got {save_every}")
        self.directory = Path(directory)
        #: the SQLite file (named in every error about it)
        self.db_path = self.directory / DB_NAME
        self.embedder = embedder
        self.weights = weights or ScoringWeights()
        self.fusion = fusion or FusionWeights()
        if not (0.0 < dedup_similarity <= 1.0):
            raise ArgumentError(f"dedup_similarity must be in (0, 1], got {dedup_similarity}")
        self.dedup_similarity = dedup_similarity
        self.save_every = save_every
        self.read_only = read_only
        self._lock = threading.RLock()
        self._dirlock: DirLock | None = None
        self._db: sqlite3.Connection | None = None
        self._index: StoreIndex | None = None
        self._replica: Replica | None = None
        self._touches = sql.AccessTimes(self._conn, read_only=read_only)  # not yet in SQLite
        self.recovered = ""  # why the index was rebuilt on open ("" if it was not)
        try:
            self._db, self._dirlock, meta = schema.open_db(
                self.directory, read_only=read_only, model_id=embedder.model_id, dim=embedder.dim
            )
            self._store_id, self._dim = meta.store_id, meta.dim
            self._retriever = retrieval.Retriever(self._dim)
            if shared is not None and not read_only:
                self._replica = Replica(self._db, shared, model_id=embedder.model_id, dim=self._dim)
                self._touches.on_flush = self._replica.share_access
            elif not read_only:
                Replica.refuse_local_writes(self._db, self.directory)
            self._index = StoreIndex(
                self._conn(),
                self.directory,
                IndexParams(
                    dim=self._dim, M=M, ef_construction=ef_construction, ef_search=ef_search
                ),
                store_id=self._store_id,
                save_every=save_every,
                read_only=read_only,
                on_save=self._touches.flush,
            )
            self.recovered = self._index.recovered
            self._fresh(strict=True)
        except sqlite3.Error as exc:
            self._release()
            raise sqlite_error(exc, self.db_path) from exc
        except BaseException:
            self._release()
            raise

    # -- helpers --------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ClosedError("the memory store is closed")
        return self._db

    def _keeper(self) -> StoreIndex:
        if self._index is None:
            raise ClosedError("the memory store is closed")
        return self._index

    def _writable(self) -> sqlite3.Connection:
        db = self._conn()
        if self.read_only:
            raise ReadOnlyError(f"{self.directory} is open read-only")
        return db

    def _tx(self, *, scrub: bool = False) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction; on a replica, after what other nodes wrote is applied, one
        that publishes its changes before it commits (``scrub``: a session's erasure)."""
        if self._replica is None:
            return sql.transaction(self._writable())
        self._fresh(strict=True)
        return self._replica.writing(self._writable(), scrub=scrub)

    def _fresh(self, *, strict: bool = False) -> None:
        """On a replica: apply what the shared log has that this store lacks (the caller
        holds the lock; :meth:`Replica.refresh`)."""
        if self._replica is not None:
            self._replica.refresh(self._conn(), self._keeper(), self._retriever, strict=strict)

    # -- writes ---------------------------------------------------------------------------------

    def add(
        self,
        text: str,
        *,
        kind: str = "fact",
        session: str | None = None,
        importance: float = 0.5,
        meta: Mapping[str, Any] | None = None,
        now: float | datetime | None = None,
        said_at: float | datetime | None = None,
        speaker: str | None = None,
        sources: Sequence[int] = (),
    ) -> str:
        """Store one memory; returns its id once the SQLite commit is done. Nothing is merged:
        this is an explicit note (see :meth:`put` for items that may repeat)."""
        item = note(text, kind, session, importance, meta, said_at, speaker, sources)
        return self.put([item], now=now, merge=False)[0]

    def add_many(
        self,
        texts: Sequence[str],
        *,
        kind: str = "fact",
        session: str | None = None,
        importance: float | Sequence[float] = 0.5,
        meta: Mapping[str, Any] | None = None,
        now: float | datetime | None = None,
    ) -> list[str]:
        """Store several memories in one transaction; returns their ids in order.

        ``importance`` may be one value for all or one per text. Nothing is merged: these are
        explicit notes (see :meth:`put` for items that may repeat).
        """
        items = notes(texts, kind=kind, session=session, importance=importance, meta=meta)
        return self.put(items, now=now, merge=False)

    @sqlite_errors
    def put(
        self,
        items: Sequence[NewItem],
        *,
        now: float | datetime | None = None,
        merge: bool = True,
        mark: tuple[str, int] | None = None,
    ) -> list[str]:
        """Store items in one transaction; returns their ids in order, once committed.

        ``merge``: a turn or fact that says the same thing as a stored item of its session
        and kind (or one earlier in ``items``) joins it, sources and text kept: the same
        normalised text, or a cosine of at least ``dedup_similarity`` with the same numbers,
        names, negations and speaker, so facts that differ in one number never merge (mem0
        #1674). An item whose ``id`` is stored is skipped (a re-add after a crash is a no-op).
        A fact with a ``subject`` and ``attribute`` supersedes its session's older fact about
        them (kept, linked by ``superseded_by``, ranked below). ``mark`` (key, value) is a
        watermark written in the same transaction. Rules: docs/long-term-memory.md.
        """
        checked = [check_item(item) for item in items]
        self._writable()
        if not checked:
            if mark is not None:
                with self._lock, self._tx() as db:
                    links.write_mark(db, *mark)
            return []
        stamp = to_epoch(now)
        vectors = embed_all(self.embedder, [embedded_text(item) for item in checked])
        # one lock across the commit and the index add: a delete between the two would mark
        # a label that is not in the index yet, and the add would then make it live again
        with self._lock:
            merge_with = (self._keeper().hnsw, self.dedup_similarity) if merge else None
            with self._tx() as db:
                ids, added = links.store_items(
                    db, checked, vectors, stamp=stamp, merge_with=merge_with, mark=mark
                )
            # committed: the ids are durable; the index follows (replay covers a crash here)
            if added:
                self._keeper().added(vectors[[p for p, _ in added]], [q for _, q in added])
                self._keeper().maybe_save(self._conn())
            if any(item.speaker for item in checked):
                self._retriever.speakers.forget()
        return ids

    @sqlite_errors
    def delete(self, item_id: str) -> bool:
        """Delete a memory; returns False if there was none with that id."""
        with self._lock:
            with self._tx() as db:
                done = forget.delete_id(db, item_id)
            if not done:
                return False
            self._forget(done)
            self._keeper().maybe_save(self._conn())
            return True

    @sqlite_errors
    def delete_session(self, session: str) -> int:
        """Delete every memory of ``session`` and its watermarks, leaving no trace on disk;
        how many went. Then (if any did) the FTS index is merged (FTS5 keeps deleted terms),
        the vector index rebuilt (hnswlib keeps a deleted vector's data), the database
        vacuumed and the WAL truncated, with ``secure_delete`` on."""
        with self._lock:
            with self._tx(scrub=True) as db:
                done = forget.delete_session(db, session)
            if done:  # else nothing to scrub (an unknown session, or one of no memories)
                self._forget(done)
                forget.scrub(self._writable(), lambda: self._keeper().rebuild(self._conn()))
            return len(done)

    def _forget(self, done: forget.Deleted) -> None:
        """Tell the index what a committed delete removed."""
        for seq, op in done:
            self._keeper().deleted(seq, op)

    @sqlite_errors
    def forget_marks(self, session: str) -> None:
        """Forget the distiller's watermarks of ``session`` (its journal was deleted and its
        memories kept: a new journal under that id is distilled from its start)."""
        with self._lock, self._tx() as db:
            links.clear_marks(db, session)

    @sqlite_errors
    def watermark(self, key: str) -> int:
        """The value last written with ``put(..., mark=(key, value))``; -1 if none."""
        with self._lock:
            self._fresh()
            return links.read_mark(self._conn(), key)

    @sqlite_errors
    def current_fact(self, session: str | None, subject: str, attribute: str) -> MemoryItem | None:
        """The newest fact of ``session`` about ``subject``/``attribute`` that nothing has
        superseded, or None."""
        with self._lock:
            self._fresh()
            return links.current_fact(self._conn(), session, subject, attribute)

    @sqlite_errors
    def lineage(self, item_id: str) -> list[MemoryItem]:
        """The history of what an item says: the facts about the same subject and attribute
        as it (or, for a turn, as the facts distilled from it), newest first, the current
        one first and those it superseded after it. Empty for an item that states no
        single-valued attribute."""
        with self._lock:
            self._fresh()
            session, keys = links.lineage_keys(self._conn(), item_id)
        out: list[MemoryItem] = []
        for subj, attr in keys:
            out += self.history(session, subj, attr)
        return out

    @sqlite_errors
    def history(self, session: str | None, subject: str, attribute: str) -> list[MemoryItem]:
        """Every fact of ``session`` about ``subject``/``attribute``, newest first (the
        current one, then those it superseded)."""
        with self._lock:
            self._fresh()
            return links.history(self._conn(), session, subject, attribute)

    @sqlite_errors
    def archive_turns(self, session: str, max_items: int) -> int:
        """Bound a session to ``max_items``: delete its lowest-value raw turns (least
        important, then superseded, then oldest) until it fits. Facts and summaries are never
        archived, and the raw text stays in the journal. Returns how many went."""
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ArgumentError(f"max_items must be a positive int, got {max_items!r}")
        with self._lock:
            with self._tx() as db:
                done = forget.archive_turns(db, session, max_items)
            if done is None:
                return 0
            self._forget(done)
            self._keeper().maybe_save(self._conn())
            return len(done)

    @sqlite_errors
    def count(self, session: str | None = None, kind: str | None = None) -> int:
        """How many items (of a session, of a kind) the store holds."""
        with self._lock:
            self._fresh()
            return sql.count(self._conn(), session, kind)

    def touch(self, ids: Iterable[str], now: float | datetime | None = None) -> None:
        """Record that the memories ``ids`` were used now (their recency restarts)."""
        if self.read_only:
            return
        with self._lock:
            self._touches.record(list(ids), to_epoch(now))

    # -- reads ----------------------------------------------------------------------------------

    @sqlite_errors
    def get(self, item_id: str) -> MemoryItem | None:
        """The memory with this id, or None."""
        with self._lock:
            self._fresh()
            item = sql.item_by_id(self._conn(), item_id)
            if item is None:
                return None
            return dataclasses.replace(item, accessed=self._touches.latest(item.id, item.accessed))

    @sqlite_errors
    def find(self, *, session: str | None, meta_key: str, value: str | int | float) -> list[str]:
        """Ids of the session's memories whose ``meta[meta_key]`` equals ``value`` (exact).

        For bookkeeping lookups such as "was journal entry 42 already ingested?".
        """
        if not meta_key.replace("_", "").isalnum():
            raise ArgumentError(f"meta_key must be alphanumeric/underscore, got {meta_key!r}")
        with self._lock:
            self._fresh()
            return sql.find_by_meta(self._conn(), session, meta_key, value)

    @sqlite_errors
    def search(
        self,
        query: str,
        k: int = 10,
        *,
        session: str | None = None,
        kinds: Iterable[str] | None = None,
        now: float | datetime | None = None,
        touch: bool = True,
        global_only: bool = False,
        with_global: bool = False,
        current_only: bool = False,
        tenant: str | None = None,
    ) -> list[Hit]:
        """The ``k`` best memories for ``query``, best first: dense (MiniLM cosine) and
        lexical (FTS5 BM25) ranks fused (:class:`FusionWeights`), blended with recency and
        importance (:class:`ScoringWeights`); a speaker or period the query names boosts
        what matches; a superseded item ranks below its successor (``current_only``: left
        out). The scope (:func:`runtime.longterm.db.scope_clause`) is ``session`` (with its
        global memories ``with_global``), ``global_only``, ``tenant`` and ``kinds``.
        ``touch`` marks the hits used at ``now``. Ranking: docs/long-term-memory.md.
        """
        q = retrieval.Query.parse(
            query,
            k,
            session=session,
            kinds=kinds,
            now=now,
            global_only=global_only,
            with_global=with_global,
            current_only=current_only,
            embedder=self.embedder,
            tenant=tenant,
        )
        with self._lock:
            self._fresh()
            hits = self._retriever.search(
                self._conn(), self._keeper(), q, self.weights, self.fusion, self._touches.latest
            )
            if touch and hits and not self.read_only:
                self._touches.record([h.id for h in hits], q.stamp)
        return hits

    # -- maintenance ----------------------------------------------------------------------------

    @sqlite_errors
    def stats(self) -> dict[str, Any]:
        """Counts and settings, for the CLI and for monitoring."""
        with self._lock:
            self._fresh()
            db, keeper = self._conn(), self._keeper()
            by_kind, sessions = sql.tally(db)
            return {
                "directory": str(self.directory),
                "items": sql.count(db),
                "by_kind": by_kind,
                "sessions": sessions,
                "model_id": self.embedder.model_id,
                "dim": self._dim,
                **keeper.figures(),
                "pending_access_times": len(self._touches),
                "max_seq": keeper.max_seq,
                "db_bytes": schema.db_bytes(self.directory),
                "index_bytes": sum(p.stat().st_size for p in self.directory.glob("index-*.hnsw")),
                "read_only": self.read_only,
                "recovered": self.recovered,
                "weights": dataclasses.asdict(self.weights),
            }

    @sqlite_errors
    def rebuild(self) -> int:
        """Rebuild the index from SQLite (and save it); returns the item count."""
        with self._lock:
            keeper = self._keeper()
            keeper.rebuild(self._conn())
            return len(keeper)

    @sqlite_errors
    def save_index(self) -> None:
        """Save the index now (normally done every ``save_every`` changes and on close)."""
        with self._lock:
            self._writable()
            self._keeper().save(self._conn())

    def close(self) -> None:
        """Save the index if it changed, close SQLite and release the lock; idempotent.

        Everything (the connection, the lock, the index) is released even when the final
        writes fail (a full disk); then one error says what was not saved. Nothing
        acknowledged is lost by that: SQLite has every committed item.
        """
        with self._lock:
            try:
                error = final_error(self._final_writes, self.db_path, self.directory)
            finally:
                released = self._release()
            error = released if error is None else error
            if error is not None:
                raise error

    def _final_writes(self) -> None:
        """Write the pending access times and the index, if open for writing and changed."""
        if self._db is None or self.read_only:
            return
        self._touches.flush()
        if self._index is not None and self._index.dirty:
            self._keeper().save(self._conn())

    def _release(self) -> MemoryStoreError | PersistError | None:
        """Drop the index, close SQLite and release the lock; never raises (returns the error)."""
        self._index = None
        if hasattr(self, "_retriever"):  # made once the database is open
            self._retriever.close()
        db, self._db = self._db, None
        lock, self._dirlock = self._dirlock, None
        return schema.close_db(db, lock, self.db_path)

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.count()
