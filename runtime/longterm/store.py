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
from runtime.longterm.db import DB_NAME, KINDS, MemoryItem, sqlite_error
from runtime.longterm.hnsw import HnswIndex, IndexParams
from runtime.longterm.index import StoreIndex
from runtime.longterm.ranking import Hit, ScoringWeights, rank

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
    ) -> str:
        """Store one memory; returns its id (a UUID) once the SQLite commit is done."""
        return self.add_many(
            [text], kind=kind, session=session, importance=importance, meta=meta, now=now
        )[0]

    @_sqlite_errors
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

        ``importance`` may be one value for all or one per text.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ArgumentTypeError("texts must be a sequence of str")
        items = [sql.check_text(t) for t in texts]
        if isinstance(importance, Sequence):
            if len(importance) != len(items):
                raise ArgumentError(f"{len(importance)} importances for {len(items)} texts")
            importances = [float(i) for i in importance]
        else:
            importances = [importance] * len(items)
        metas = [sql.check_fields(kind, session, imp, meta) for imp in importances]
        self._writable()
        if not items:
            return []
        stamp = sql.to_epoch(now)
        vectors = embed_all(self.embedder, items)
        ids = [str(uuid.uuid4()) for _ in items]
        # one lock across the commit and the index add: a delete between the two would mark
        # a label that is not in the index yet, and the add would then make it live again
        with self._lock:
            with self._tx() as db:
                seqs = sql.insert_items(
                    db,
                    ids,
                    items,
                    kind=kind,
                    session=session,
                    stamp=stamp,
                    importances=importances,
                    metas=metas,
                    vectors=vectors,
                )
            # committed: the ids are durable; the index follows (replay covers a crash here)
            self._keeper().added(vectors, seqs)
            self._maybe_save()
        return ids

    @_sqlite_errors
    def delete(self, item_id: str) -> bool:
        """Delete a memory; returns False if there was none with that id."""
        with self._lock:
            with self._tx() as db:
                row = db.execute("SELECT seq FROM items WHERE id = ?", (item_id,)).fetchone()
                if row is None:
                    return False
                db.execute("DELETE FROM items WHERE seq = ?", (row[0],))
                cur = db.execute("INSERT INTO tombstones (seq) VALUES (?)", (row[0],))
            self._keeper().deleted(int(row[0]), cur.lastrowid)
            self._maybe_save()
            return True

    def delete_session(self, session: str) -> int:
        """Delete every memory of ``session``; returns how many went."""
        with self._lock:
            rows = self._conn().execute("SELECT id FROM items WHERE session = ?", (session,))
            ids = [str(r[0]) for r in rows.fetchall()]
        return sum(self.delete(item_id) for item_id in ids)

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
    ) -> list[Hit]:
        """The ``k`` best memories for ``query`` by :class:`ScoringWeights`, best first.

        ``session`` and ``kinds`` restrict the candidates; ``global_only`` keeps only the
        memories stored without a session. ``touch`` updates the returned
        items' last-access time to ``now`` (skipped on a read-only store); later searches and
        :meth:`get` see it at once, SQLite gets it in the next batch
        (see :class:`~runtime.longterm.db.AccessTimes`).
        """
        text = sql.check_text(query)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ArgumentError(f"k must be a positive int, got {k!r}")
        kind_list = None if kinds is None else sorted(set(kinds))
        if kind_list is not None and not set(kind_list) <= set(KINDS):
            raise ArgumentError(f"kinds must be drawn from {KINDS}, got {kind_list}")
        stamp = sql.to_epoch(now)
        vector = self.embedder.embed([text])[0]
        with self._lock:
            pool = max(4 * k, 40)
            candidates = self._keeper().candidates(
                self._conn(),
                vector,
                pool,
                session=session,
                kinds=kind_list,
                global_only=global_only,
            )
            hits = self._score(candidates, stamp)[:k]
            if touch and hits and not self.read_only:
                self._touch([h.id for h in hits], stamp)
        return hits

    def _score(self, candidates: Mapping[int, float], now: float) -> list[Hit]:
        if not candidates:
            return []
        # a label SQLite no longer has (a stale index) simply drops out
        items = sql.items_by_seq(self._conn(), list(candidates))
        return rank((self._touches.latest(item) for item in items), candidates, self.weights, now)

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
