"""Long-term memory: :class:`MemoryStore`, items in SQLite plus a derived hnswlib index.

The store is the facade over three parts: :mod:`runtime.longterm.db` (the SQLite file, the
source of truth), :mod:`runtime.longterm.index` (the derived index's open, replay, rebuild
and save) and :mod:`runtime.longterm.ranking` (how hits are scored). A write is acknowledged
only after its SQLite commit; the index follows it.

Access times set by searches are held in memory and written in batches
(:data:`~runtime.longterm.db.TOUCH_FLUSH_EVERY`, on save and on close); see
:meth:`runtime.longterm.db.AccessTimes.flush` for why that is safe.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from runtime.embed.embedder import TextEmbedder, embed_all
from runtime.errors import (
    ArgumentError,
    ArgumentTypeError,
    ClosedError,
    MemoryStoreError,
    MemoryStoreIOError,
    ReadOnlyError,
    StoreMismatchError,
)
from runtime.fsutil import DirLock, ensure_dir, remove_stale_temps, warn_if_exposed
from runtime.longterm import db as sql
from runtime.longterm.db import DB_NAME, KINDS, MemoryItem, NewItem, sqlite_error
from runtime.longterm.hnsw import HnswIndex, IndexParams
from runtime.longterm.index import StoreIndex
from runtime.longterm.lexical import (
    match_expression,
    normalise,
    query_terms,
    signature,
    time_range,
    words,
)
from runtime.longterm.ranking import Candidates, FusionWeights, Hit, ScoringWeights, rank

#: Two items may be merged only at this cosine or above, and only when they name the same
#: numbers, names and negations (:func:`runtime.longterm.lexical.signature`).
DEDUP_SIMILARITY = 0.95

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _sqlite_errors(
    method: Callable[Concatenate[MemoryStore, _P], _R],
) -> Callable[Concatenate[MemoryStore, _P], _R]:
    """Raise :func:`~runtime.longterm.db.sqlite_error`'s error instead of a ``sqlite3.Error``."""

    @functools.wraps(method)
    def wrapper(self: MemoryStore, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise sqlite_error(exc, self.db_path) from exc

    return wrapper  # type: ignore[return-value]  # functools' _Wrapped is not a Callable here


def _embedded_text(item: NewItem) -> str:
    """What is embedded for an item: its text, after its speaker's name when it has one (a
    question that names the speaker then finds what they said)."""
    return f"{item.speaker}: {item.text}" if item.speaker else item.text


class MemoryStore:
    """Long-term memory in one directory: ``memory.sqlite3`` + the hnswlib index files.

    ``MemoryStore(directory, embedder)`` opens (creating if needed) the store; one process at
    a time may open a directory for writing (a second gets
    :class:`runtime.errors.LockedError`). Thread-safe: every public method holds one lock.
    Bad arguments raise :class:`runtime.errors.ArgumentError` (a ``ValueError``) or
    :class:`runtime.errors.ArgumentTypeError` (a ``TypeError``); use after :meth:`close`
    raises :class:`runtime.errors.ClosedError`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        embedder: TextEmbedder,
        *,
        weights: ScoringWeights | None = None,
        fusion: FusionWeights | None = None,
        dedup_similarity: float = DEDUP_SIMILARITY,
        M: int = 32,
        ef_construction: int = 200,
        ef_search: int = 512,
        save_every: int = 5000,
        read_only: bool = False,
    ) -> None:
        """Open (creating if needed) the store in ``directory``.

        ``read_only=True`` takes no lock, never writes (no index save, no access-time
        updates) and works while another process holds the store open for writing.
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
        self._speakers: frozenset[str] | None = None  # lower-cased speakers (cached)
        self.save_every = save_every
        self.read_only = read_only
        self._lock = threading.RLock()
        self._dirlock: DirLock | None = None
        self._db: sqlite3.Connection | None = None
        self._index: StoreIndex | None = None
        self._store_id = b""
        self._dim = 0
        self._touches = sql.AccessTimes()  # access times not yet written to SQLite
        self.recovered = ""  # why the index was rebuilt on open ("" if it was not)
        try:
            self._open_db()
            params = IndexParams(
                dim=self._dim, M=M, ef_construction=ef_construction, ef_search=ef_search
            )
            self._index = StoreIndex(
                self._conn(),
                self.directory,
                params,
                store_id=self._store_id,
                save_every=save_every,
                read_only=read_only,
                on_save=self._flush_touches,
            )
            self.recovered = self._index.recovered
        except sqlite3.Error as exc:
            self._release()
            raise sqlite_error(exc, self.db_path) from exc
        except BaseException:
            self._release()
            raise

    @classmethod
    def open(cls, *args: Any, **kwargs: Any) -> MemoryStore:
        """The same as ``MemoryStore(directory, embedder, ...)`` (kept for existing callers)."""
        return cls(*args, **kwargs)

    def _open_db(self) -> None:
        if self.read_only:
            self._db = sql.connect_read_only(self.directory)
        else:
            ensure_dir(self.directory)
            warn_if_exposed(self.directory)
            self._dirlock = DirLock(self.directory).acquire()
            removed = remove_stale_temps(self.directory)
            if removed:
                logger.info("removed %d temp files left by a crashed writer", removed)
            self._db = sql.connect(self.directory)
            sql.create_schema(self._db, model_id=self.embedder.model_id, dim=self.embedder.dim)
        self._db.execute("PRAGMA busy_timeout=5000")
        meta = sql.read_meta(self._db, self.db_path)
        self._store_id, self._dim = meta.store_id, meta.dim
        if meta.model_id != self.embedder.model_id or self._dim != self.embedder.dim:
            raise StoreMismatchError(
                f"{self.directory} was written with {meta.model_id} (dim {self._dim}); "
                f"this embedder is {self.embedder.model_id} (dim {self.embedder.dim})"
            )

    # -- helpers --------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ClosedError("the memory store is closed")
        return self._db

    def _keeper(self) -> StoreIndex:
        if self._index is None:
            raise ClosedError("the memory store is closed")
        return self._index

    def _idx(self) -> HnswIndex:
        return self._keeper().hnsw

    @property
    def _dirty(self) -> int:
        """Changes not in the saved index yet (a crash test sets it to 0: close then skips
        the save, as a killed process would)."""
        return self._keeper().dirty

    @_dirty.setter
    def _dirty(self, value: int) -> None:
        self._keeper().dirty = value

    def _writable(self) -> sqlite3.Connection:
        db = self._conn()
        if self.read_only:
            raise ReadOnlyError(f"{self.directory} is open read-only")
        return db

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sql.transaction(self._writable())

    def _save(self) -> None:
        self._keeper().save(self._conn())

    def _maybe_save(self) -> None:
        self._keeper().maybe_save(self._conn())

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
        item = NewItem(
            text,
            kind=kind,
            session=session,
            said_at=None if said_at is None else sql.to_epoch(said_at),
            speaker=speaker,
            sources=tuple(sources),
            importance=importance,
            meta=meta or {},
        )
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
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ArgumentTypeError("texts must be a sequence of str")
        if isinstance(importance, Sequence):
            if len(importance) != len(texts):
                raise ArgumentError(f"{len(importance)} importances for {len(texts)} texts")
            importances = [float(i) for i in importance]
        else:
            importances = [importance] * len(texts)
        items = [
            NewItem(t, kind=kind, session=session, importance=imp, meta=meta or {})
            for t, imp in zip(texts, importances, strict=True)
        ]
        return self.put(items, now=now, merge=False)

    @_sqlite_errors
    def put(
        self,
        items: Sequence[NewItem],
        *,
        now: float | datetime | None = None,
        merge: bool = True,
        mark: tuple[str, int] | None = None,
    ) -> list[str]:
        """Store items in one transaction; returns their ids in order, once committed.

        With ``merge`` (the default), a turn or fact that says the same thing as an item of
        its session and kind already stored, or earlier in ``items``, is merged into it
        instead of stored again: its sources join the item's and its text, if it differs, is
        kept in the item's ``meta["merged"]``. "The same thing" is the same normalised text,
        or a cosine of at least ``dedup_similarity`` with the same numbers, names and
        negations, said by the same speaker: two facts that differ in one number are never
        merged (mem0 #1674). An
        item whose ``id`` is stored already is skipped (its id is returned): re-adding after
        a crash is a no-op.

        A fact with a ``subject`` and ``attribute`` supersedes the current fact of its
        session about the same subject and attribute said before it (and that fact's source
        turns): they are kept, linked by ``superseded_by`` and ranked below. ``mark``
        (key, value) is a watermark written in the same transaction (:meth:`watermark`), so
        a crash leaves both or neither.
        """
        checked = [self._check(item) for item in items]
        self._writable()
        if not checked:
            if mark is not None:
                with self._lock, self._tx() as db:
                    sql.write_mark(db, *mark)
            return []
        stamp = sql.to_epoch(now)
        vectors = embed_all(self.embedder, [_embedded_text(item) for item in checked])
        # one lock across the commit and the index add: a delete between the two would mark
        # a label that is not in the index yet, and the add would then make it live again
        with self._lock:
            ids: list[str] = []
            added: list[tuple[int, int]] = []  # (position in checked, seq) of new rows
            with self._tx() as db:
                for i, item in enumerate(checked):
                    # one row at a time: a repeat later in the batch finds this one
                    into = self._merge_target(db, item, vectors[i]) if merge else None
                    if into is not None:
                        ids.append(into)
                        continue
                    ids.append(item.id or str(uuid.uuid4()))
                    meta = sql.check_fields(item.kind, item.session, item.importance, item.meta)
                    (seq,) = sql.insert_items(
                        db, ids[-1:], [item], stamp=stamp, metas=[meta], vectors=vectors[i : i + 1]
                    )
                    if seq:
                        added.append((i, seq))
                        if item.attribute is not None:
                            sql.supersede_older(db, seq)
                if mark is not None:
                    sql.write_mark(db, *mark)
            # committed: the ids are durable; the index follows (replay covers a crash here)
            if added:
                self._keeper().added(vectors[[p for p, _ in added]], [q for _, q in added])
                self._maybe_save()
            if any(item.speaker for item in checked):
                self._speakers = None
        return ids

    def _check(self, item: NewItem) -> NewItem:
        if not isinstance(item, NewItem):
            raise ArgumentTypeError(f"items must be NewItem, not {type(item).__name__}")
        sql.check_text(item.text)
        sql.check_fields(item.kind, item.session, item.importance, item.meta)
        if item.speaker is not None and not isinstance(item.speaker, str):
            raise ArgumentTypeError("speaker must be str or None")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in item.sources):
            raise ArgumentError(f"sources must be journal seqs (ints >= 0), got {item.sources}")
        if item.said_at is not None:
            sql.to_epoch(item.said_at)
        return item

    def _merge_target(self, db: sqlite3.Connection, item: NewItem, vector: Any) -> str | None:
        """The id of the stored item ``item`` merges into (its sources added), or None."""
        if item.id is not None:
            row = db.execute("SELECT seq FROM items WHERE id = ?", (item.id,)).fetchone()
            if row is not None:
                return item.id
        if item.kind not in ("turn", "fact"):
            return None
        target = sql.same_text(db, item.session, item.kind, normalise(item.text), item.speaker)
        if target is None:
            target = self._near_duplicate(db, item, vector)
        if target is None:
            return None
        sql.add_sources(db, target, item.sources, item.text)
        row = db.execute("SELECT id FROM items WHERE seq = ?", (target,)).fetchone()
        return str(row[0])

    def _near_duplicate(self, db: sqlite3.Connection, item: NewItem, vector: Any) -> int | None:
        """A stored item of the same session and kind at ``dedup_similarity`` or above that
        names the same numbers, names and negations."""
        labels, sims = self._idx().query(vector, 8)
        close = [
            int(q) for q, sim in zip(labels, sims, strict=True) if sim >= self.dedup_similarity
        ]
        if not close:
            return None
        mine = signature(item.text)
        for other in sql.items_by_seq(db, close):
            if (
                other.session == item.session
                and other.kind == item.kind
                and other.speaker == item.speaker
                and other.superseded_by is None
                and signature(other.text) == mine
            ):
                return other.seq
        return None

    @_sqlite_errors
    def delete(self, item_id: str) -> bool:
        """Delete a memory; returns False if there was none with that id."""
        with self._lock:
            with self._tx() as db:
                row = db.execute("SELECT seq FROM items WHERE id = ?", (item_id,)).fetchone()
                if row is None:
                    return False
                op = sql.delete_item(db, int(row[0]))
            self._keeper().deleted(int(row[0]), op)
            self._maybe_save()
            return True

    @_sqlite_errors
    def delete_session(self, session: str) -> int:
        """Delete every memory of ``session``, leaving no trace of its text on disk; returns
        how many went.

        The rows go in one transaction; then the lexical index is merged (FTS5 keeps a
        deleted document's terms in old segments until a merge), the WAL is checkpointed
        and truncated, and ``secure_delete`` (set on every connection) has zeroed the freed
        pages. The index is saved, so no vector of the session stays in a saved graph.
        """
        with self._lock:
            with self._tx() as db:
                rows = db.execute("SELECT seq FROM items WHERE session = ?", (session,))
                done = [(seq, sql.delete_item(db, seq)) for (seq,) in rows.fetchall()]
            for seq, op in done:
                self._keeper().deleted(seq, op)
            self._scrub()
            return len(done)

    def _scrub(self) -> None:
        """Merge the lexical index, save the vector index and truncate the WAL."""
        db = self._conn()
        with self._tx() as tx:
            tx.execute("INSERT INTO items_fts (items_fts) VALUES ('optimize')")
        self._save()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @_sqlite_errors
    def watermark(self, key: str) -> int:
        """The value last written with ``put(..., mark=(key, value))``; -1 if none."""
        with self._lock:
            return sql.read_mark(self._conn(), key)

    @_sqlite_errors
    def current_fact(self, session: str | None, subject: str, attribute: str) -> MemoryItem | None:
        """The newest fact of ``session`` about ``subject``/``attribute`` that nothing has
        superseded, or None."""
        with self._lock:
            row = (
                self._conn()
                .execute(
                    f"SELECT {sql.COLUMNS} FROM items WHERE session IS ? AND kind = 'fact'"
                    " AND subject = ? AND attribute = ? AND superseded_by IS NULL"
                    " ORDER BY said_at DESC, seq DESC LIMIT 1",
                    (session, subject, attribute),
                )
                .fetchone()
            )
        return None if row is None else MemoryItem.from_row(row)

    @_sqlite_errors
    def lineage(self, item_id: str) -> list[MemoryItem]:
        """The history of what an item says: the facts about the same subject and attribute
        as it (or, for a turn, as the facts distilled from it), newest first, the current
        one first and those it superseded after it. Empty for an item that states no
        single-valued attribute."""
        with self._lock:
            db = self._conn()
            row = db.execute(
                "SELECT session, kind, subject, attribute, sources FROM items WHERE id = ?",
                (item_id,),
            ).fetchone()
            if row is None:
                return []
            session, kind, subject, attribute, sources = row
            keys = {(subject, attribute)} if attribute is not None else set()
            if kind == "turn":
                for source in json.loads(sources):
                    keys.update(
                        db.execute(
                            "SELECT subject, attribute FROM items WHERE session IS ? AND"
                            " kind = 'fact' AND attribute IS NOT NULL AND EXISTS (SELECT 1 FROM"
                            " json_each(items.sources) WHERE json_each.value = ?)",
                            (session, source),
                        ).fetchall()
                    )
        out: list[MemoryItem] = []
        for subj, attr in sorted(keys):
            out += self.history(session, subj, attr)
        return out

    @_sqlite_errors
    def history(self, session: str | None, subject: str, attribute: str) -> list[MemoryItem]:
        """Every fact of ``session`` about ``subject``/``attribute``, newest first (the
        current one, then those it superseded)."""
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    f"SELECT {sql.COLUMNS} FROM items WHERE session IS ? AND kind = 'fact'"
                    " AND subject = ? AND attribute = ? ORDER BY said_at DESC, seq DESC",
                    (session, subject, attribute),
                )
                .fetchall()
            )
        return [MemoryItem.from_row(r) for r in rows]

    @_sqlite_errors
    def archive_turns(self, session: str, max_items: int) -> int:
        """Bound a session to ``max_items``: delete its lowest-value raw turns (least
        important, then superseded, then oldest) until it fits. Facts and summaries are never
        archived, and the raw text stays in the journal. Returns how many went."""
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ArgumentError(f"max_items must be a positive int, got {max_items!r}")
        with self._lock:
            with self._tx() as db:
                total = db.execute(
                    "SELECT COUNT(*) FROM items WHERE session = ?", (session,)
                ).fetchone()[0]
                excess = int(total) - max_items
                if excess <= 0:
                    return 0
                rows = db.execute(
                    "SELECT seq FROM items WHERE session = ? AND kind = 'turn'"
                    " ORDER BY importance, superseded_by IS NULL, said_at, seq LIMIT ?",
                    (session, excess),
                ).fetchall()
                done = [(seq, sql.delete_item(db, seq)) for (seq,) in rows]
            for seq, op in done:
                self._keeper().deleted(seq, op)
            self._maybe_save()
            return len(done)

    @_sqlite_errors
    def count(self, session: str | None = None, kind: str | None = None) -> int:
        """How many items (of a session, of a kind) the store holds."""
        clauses, args = [], []
        if session is not None:
            clauses.append("session = ?")
            args.append(session)
        if kind is not None:
            clauses.append("kind = ?")
            args.append(kind)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            row = self._conn().execute(f"SELECT COUNT(*) FROM items{where}", args).fetchone()
        return int(row[0])

    def touch(self, ids: Iterable[str], now: float | datetime | None = None) -> None:
        """Record that the memories ``ids`` were used now (their recency restarts)."""
        if self.read_only:
            return
        with self._lock:
            self._touch(list(ids), sql.to_epoch(now))

    def _touch(self, ids: Iterable[str], stamp: float) -> None:
        """Record an access in memory; hold the lock. Written every
        :data:`~runtime.longterm.db.TOUCH_FLUSH_EVERY` searches, on save and on close."""
        if self._touches.record(ids, stamp):
            self._flush_touches()

    def _flush_touches(self) -> None:
        """Write the pending access times (see :meth:`runtime.longterm.db.AccessTimes.flush`)."""
        if self.read_only or not self._touches:
            self._touches.clear()
            return
        self._touches.flush(self._conn())

    # -- reads ----------------------------------------------------------------------------------

    @_sqlite_errors
    def get(self, item_id: str) -> MemoryItem | None:
        """The memory with this id, or None."""
        with self._lock:
            row = (
                self._conn()
                .execute(f"SELECT {sql.COLUMNS} FROM items WHERE id = ?", (item_id,))
                .fetchone()
            )
        return None if row is None else self._touches.latest(MemoryItem.from_row(row))

    @_sqlite_errors
    def find(self, *, session: str | None, meta_key: str, value: str | int | float) -> list[str]:
        """Ids of the session's memories whose ``meta[meta_key]`` equals ``value`` (exact).

        For bookkeeping lookups such as "was journal entry 42 already ingested?".
        """
        if not meta_key.replace("_", "").isalnum():
            raise ArgumentError(f"meta_key must be alphanumeric/underscore, got {meta_key!r}")
        path = f"$.{meta_key}"
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT id FROM items WHERE session IS ? AND json_extract(meta, ?) = ?",
                    (session, path, value),
                )
                .fetchall()
            )
        return [str(r[0]) for r in rows]

    @_sqlite_errors
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
    ) -> list[Hit]:
        """The ``k`` best memories for ``query``, best first.

        Two retrievers run inside the scope: dense (MiniLM cosine over the vector index) and
        lexical (SQLite FTS5 BM25 over each item's text and context); their ranks are fused
        (:class:`FusionWeights`), then blended with recency and importance
        (:class:`ScoringWeights`). A speaker the query names, and a period it names ("in
        May", "last week", relative to ``now``), boost the items that match; a superseded
        item ranks below the fact that replaced it (``current_only`` leaves it out).

        ``session`` restricts the candidates to that session (``with_global``: plus the
        memories stored without a session); ``global_only`` keeps only the latter; ``kinds``
        restricts the kinds. ``touch`` updates the returned items' last-access time to
        ``now`` (skipped on a read-only store).
        """
        text = sql.check_text(query)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ArgumentError(f"k must be a positive int, got {k!r}")
        kind_list = None if kinds is None else sorted(set(kinds))
        if kind_list is not None and not set(kind_list) <= set(KINDS):
            raise ArgumentError(f"kinds must be drawn from {KINDS}, got {kind_list}")
        stamp = sql.to_epoch(now)
        vector = self.embedder.embed([text])[0]
        terms = query_terms(text)
        with self._lock:
            db = self._conn()
            pool = max(4 * k, 50)
            where, args = sql.scope_clause(
                session, kind_list, global_only=global_only, with_global=with_global
            )
            if current_only:
                where = " AND ".join(c for c in (where, "superseded_by IS NULL") if c)
            dense = self._keeper().candidates(db, vector, pool, where=where, args=args)
            lexical: dict[int, float] = {}
            if terms and self.fusion.lexical > 0:
                lexical = dict(
                    sql.lexical_candidates(db, match_expression(terms), pool, where, args)
                )
            missing = [seq for seq in lexical if seq not in dense]
            dense = {**dense, **sql.cosines(db, self._dim, missing, vector)}
            found = Candidates(
                dense=dense,
                lexical=lexical,
                speakers=self._named_speakers(db, terms),
                period=time_range(text, stamp) if self.fusion.in_period != 1.0 else None,
                use_dense=self.fusion.dense > 0,
                use_lexical=self.fusion.lexical > 0,
            )
            hits = self._score(found, stamp)[:k]
            if touch and hits and not self.read_only:
                self._touch([h.id for h in hits], stamp)
        return hits

    def _named_speakers(self, db: sqlite3.Connection, terms: list[str]) -> frozenset[str]:
        """The stored speakers (lower-cased) whose name is one of the query's words."""
        if self._speakers is None:
            rows = db.execute("SELECT DISTINCT speaker FROM items WHERE speaker IS NOT NULL")
            self._speakers = frozenset(" ".join(words(str(r[0]))) for r in rows)
        return frozenset(name for name in self._speakers if name in terms)

    def _score(self, found: Candidates, now: float) -> list[Hit]:
        seqs = set(found.dense) | set(found.lexical)
        if not seqs:
            return []
        # a label SQLite no longer has (a stale index) simply drops out
        items = sql.items_by_seq(self._conn(), sorted(seqs))
        return rank(
            (self._touches.latest(item) for item in items), found, self.weights, self.fusion, now
        )

    # -- maintenance ----------------------------------------------------------------------------

    @_sqlite_errors
    def stats(self) -> dict[str, Any]:
        """Counts and settings, for the CLI and for monitoring."""
        with self._lock:
            db, keeper = self._conn(), self._keeper()
            index = keeper.hnsw
            by_kind = dict(db.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall())
            sessions = db.execute("SELECT COUNT(DISTINCT session) FROM items").fetchone()[0]
            db_bytes = sum(
                p.stat().st_size for p in self.directory.glob(f"{DB_NAME}*") if p.is_file()
            )
            index_bytes = sum(p.stat().st_size for p in self.directory.glob("index-*.hnsw"))
            return {
                "directory": str(self.directory),
                "items": sql.count(db),
                "by_kind": by_kind,
                "sessions": int(sessions),
                "model_id": self.embedder.model_id,
                "dim": self._dim,
                "index_live": len(index),
                "index_slots": index.slots,
                "index_capacity": index.max_elements,
                "index_M": index.params.M,
                "index_ef_search": index.params.ef_search,
                "unsaved_changes": keeper.dirty,
                "pending_access_times": len(self._touches),
                "max_seq": keeper.max_seq,
                "db_bytes": db_bytes,
                "index_bytes": index_bytes,
                "read_only": self.read_only,
                "recovered": self.recovered,
                "weights": {
                    "relevance": self.weights.relevance,
                    "recency": self.weights.recency,
                    "importance": self.weights.importance,
                    "half_life_s": self.weights.half_life_s,
                },
            }

    @_sqlite_errors
    def rebuild(self) -> int:
        """Rebuild the index from SQLite (and save it); returns the item count."""
        with self._lock:
            keeper = self._keeper()
            keeper.rebuild(self._conn())
            return len(keeper)

    @_sqlite_errors
    def save_index(self) -> None:
        """Save the index now (normally done every ``save_every`` changes and on close)."""
        with self._lock:
            self._writable()
            self._save()

    def close(self) -> None:
        """Save the index if it changed, close SQLite and release the lock; idempotent.

        Everything (the connection, the lock, the index) is released even when the final
        writes fail (a full disk); then one :class:`MemoryStoreError` says what was not saved.
        Nothing acknowledged is lost by that: SQLite has every committed item.
        """
        with self._lock:
            error: MemoryStoreError | None = None
            try:
                if self._db is not None and not self.read_only:
                    self._flush_touches()
                if (
                    self._index is not None
                    and self._db is not None
                    and not self.read_only
                    and self._index.dirty
                ):
                    self._save()
            except sqlite3.Error as exc:
                error = sqlite_error(exc, self.db_path)
                error.__cause__ = exc
            except MemoryStoreError as exc:
                error = exc
            except (OSError, RuntimeError) as exc:
                error = MemoryStoreIOError(
                    getattr(exc, "errno", None) or errno.EIO,
                    f"could not save the index on close: {exc}",
                    str(self.directory),
                )
                error.__cause__ = exc
            finally:
                released = self._release()
            if error is None:
                error = released
            if error is not None:
                raise error

    def _release(self) -> MemoryStoreError | None:
        """Drop the index, close SQLite and release the lock; never raises (returns the error)."""
        error: MemoryStoreError | None = None
        self._index = None
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.close()
            except sqlite3.Error as exc:
                error = sqlite_error(exc, self.db_path)
        if self._dirlock is not None:
            lock, self._dirlock = self._dirlock, None
            lock.release()
        return error

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_sqlite_errors
    def __len__(self) -> int:
        with self._lock:
            return sql.count(self._conn())
