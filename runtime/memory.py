"""Long-term memory: items in SQLite (the source of truth) plus a derived hnswlib index.

A write is acknowledged only after its SQLite commit (WAL, ``synchronous=FULL``); the index
is updated after the commit and saved every :attr:`MemoryStore.save_every` changes and on
close. On open the saved index is validated and loaded, and every item newer than the
highest sequence number it contains (and every delete newer than its last tombstone) is
replayed from SQLite. A missing, corrupt or foreign index is rebuilt from SQLite with a
warning; it never stops the store from opening.

Search ranks a candidate pool from the index by

    score = w_relevance · cosine + w_recency · 0.5^(age / half_life) + w_importance · importance

where ``age`` is the time since the item was last accessed (see :class:`ScoringWeights` and
docs/long-term-memory.md for the defaults and why). Access times set by searches are held in
memory and written in batches (:data:`TOUCH_FLUSH_EVERY`, on save and on close); see
:meth:`MemoryStore._flush_touches` for why that is safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from runtime.errors import (
    DamagedStoreError,
    MemoryClosedError,
    MemoryStoreError,
    MemoryStoreFullError,
    MemoryStoreIOError,
    ReadOnlyError,
    StoreMismatchError,
)
from runtime.fsutil import (
    DirLock,
    ensure_dir,
    open_nofollow,
    persist_error,
    remove_stale_temps,
    warn_if_exposed,
)
from runtime.index import (
    HnswIndex,
    IndexFileError,
    IndexParams,
    remove_unreferenced_blobs,
)

log = logging.getLogger(__name__)

DB_NAME = "memory.sqlite3"
SCHEMA_VERSION = 1
KINDS: tuple[str, ...] = ("turn", "fact", "summary")
#: Texts longer than this (in characters) are refused: memories are notes, not documents.
MAX_TEXT_CHARS = 100_000
#: Filtered searches whose allowed set is at most this size scan it exactly in numpy.
EXACT_FILTER_LIMIT = 4096
_ROWS_PER_CHUNK = 10_000
#: Access-time updates from searches are kept in memory and written after this many
#: searches (and on save and close): a search no longer costs a synchronous write.
TOUCH_FLUSH_EVERY = 64

FloatArray = npt.NDArray[np.float32]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT    NOT NULL UNIQUE,
    text       TEXT    NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('turn', 'fact', 'summary')),
    session    TEXT,
    created    REAL    NOT NULL,
    accessed   REAL    NOT NULL,
    importance REAL    NOT NULL CHECK (importance >= 0.0 AND importance <= 1.0),
    meta       TEXT    NOT NULL,
    embedding  BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS items_session ON items (session);
CREATE TABLE IF NOT EXISTS tombstones (
    op  INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL
);
"""


class TextEmbedder(Protocol):
    """What the store needs from an embedder (:class:`runtime.embed.Embedder` is one)."""

    @property
    def model_id(self) -> str:
        """Recorded in the store; reopening with another model is refused."""

    @property
    def dim(self) -> int:
        """Width of the vectors."""

    def embed(self, texts: list[str]) -> FloatArray:
        """float32 ``(n, dim)`` unit vectors."""


ClosedError = MemoryClosedError  # the old name; llamaffi.ClosedError is another class


# SQLite primary result codes (sqlite3.h) that this module tells apart
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26

_P = ParamSpec("_P")
_R = TypeVar("_R")


def sqlite_error(exc: sqlite3.Error, path: Path) -> MemoryStoreError:
    """The runtime error for a raw SQLite error on the store at ``path`` (the db file)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else int(code) & 0xFF
    text = str(exc)
    if primary == _SQLITE_FULL or "disk is full" in text:
        return MemoryStoreFullError(
            errno.ENOSPC,
            f"disk full: SQLite could not write ({text}); the change was rolled back, retry "
            "once space is freed",
            str(path),
        )
    if (
        primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
        or "malformed" in text
        or ("not a database" in text)
    ):
        return DamagedStoreError(
            f"{path} is damaged or not a memory store ({text}): move it aside (with its -wal "
            "and -shm files) to start an empty store, or restore it from a backup; the index "
            "is rebuilt from it on open"
        )
    if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN) or "disk I/O" in text:
        return MemoryStoreIOError(errno.EIO, f"SQLite I/O error: {text}", str(path))
    return MemoryStoreError(f"{path}: SQLite error: {text}")


def _sqlite_errors(
    method: Callable[Concatenate[MemoryStore, _P], _R],
) -> Callable[Concatenate[MemoryStore, _P], _R]:
    """Raise :func:`sqlite_error`'s runtime error instead of a raw ``sqlite3.Error``."""

    @functools.wraps(method)
    def wrapper(self: MemoryStore, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise sqlite_error(exc, self.db_path) from exc

    return wrapper  # type: ignore[return-value]  # functools' _Wrapped is not a Callable here


@dataclass(frozen=True)
class ScoringWeights:
    """Weights of the three retrieval signals (all in [0, 1] before weighting).

    * ``relevance`` multiplies the cosine similarity to the query;
    * ``recency`` multiplies ``0.5 ** (age / half_life_s)``, age since last access;
    * ``importance`` multiplies the item's importance (0..1, set when added).

    Defaults (1.0, 0.2, 0.2, 7 days): relevance dominates, because the candidate pool comes
    from the vector index anyway and a fresh but off-topic memory is worse than an old
    on-topic one. Recency and importance break near-ties: with MiniLM, paraphrases score about
    0.7–0.9 and unrelated text 0.0–0.2, so 0.2 can reorder close candidates but cannot promote
    an unrelated item above a related one. Generative Agents (Park et al. 2023) weights its
    three signals equally after min-max normalising each over the candidates; we do not
    normalise, so that one stale item cannot stretch every other recency to 0 or 1.
    """

    relevance: float = 1.0
    recency: float = 0.2
    importance: float = 0.2
    half_life_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        for name in ("relevance", "recency", "importance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"weight {name} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.half_life_s) and self.half_life_s > 0):
            raise ValueError(f"half_life_s must be positive, got {self.half_life_s}")

    def recency_of(self, accessed: float, now: float) -> float:
        """``0.5 ** (age / half_life)``; an access in the future counts as now."""
        return float(0.5 ** (max(0.0, now - accessed) / self.half_life_s))

    def score(self, similarity: float, recency: float, importance: float) -> float:
        """The weighted sum that ranks hits."""
        return self.relevance * similarity + self.recency * recency + self.importance * importance


@dataclass(frozen=True)
class MemoryItem:
    """One stored memory."""

    id: str
    text: str
    kind: str
    session: str | None
    created: float
    accessed: float
    importance: float
    meta: dict[str, Any]
    seq: int


@dataclass(frozen=True)
class Hit:
    """A search result: the item's fields plus how it scored."""

    id: str
    text: str
    score: float
    similarity: float
    recency: float
    kind: str
    session: str | None
    created: float
    accessed: float
    importance: float
    meta: dict[str, Any] = field(default_factory=dict)


def _to_epoch(now: float | datetime | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return now.timestamp()
    if isinstance(now, (int, float)) and math.isfinite(now):
        return float(now)
    raise TypeError(f"now must be a float timestamp or a datetime, got {now!r}")


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("text must not be empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"text is {len(text)} characters; at most {MAX_TEXT_CHARS}")
    return text


def _check_fields(
    kind: str, session: str | None, importance: float, meta: Mapping[str, Any] | None
) -> str:
    """Validate the shared fields of an add; returns the metadata as JSON."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if session is not None and not isinstance(session, str):
        raise TypeError(f"session must be str or None, not {type(session).__name__}")
    if isinstance(importance, bool) or not isinstance(importance, (int, float)):
        raise TypeError(f"importance must be a number, not {type(importance).__name__}")
    if not (0.0 <= float(importance) <= 1.0):
        raise ValueError(f"importance must be in [0, 1], got {importance}")
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, not {type(meta).__name__}")
    try:
        return json.dumps(dict(meta or {}), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta is not JSON-serialisable: {exc}") from None


class MemoryStore:
    """Long-term memory in one directory: ``memory.sqlite3`` + the hnswlib index files.

    Open with :meth:`open`; one process at a time may open a directory for writing (a second
    gets :class:`runtime.errors.LockedError`). Thread-safe: every public method holds one lock.
    """

    def __init__(self) -> None:
        raise TypeError("use MemoryStore.open(directory, embedder)")

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        embedder: TextEmbedder,
        *,
        weights: ScoringWeights | None = None,
        M: int = 32,
        ef_construction: int = 200,
        ef_search: int = 512,
        save_every: int = 5000,
        read_only: bool = False,
    ) -> MemoryStore:
        """Open (creating if needed) the store in ``directory``.

        ``read_only=True`` takes no lock, never writes (no index save, no access-time
        updates) and works while another process holds the store open for writing.
        """
        self = object.__new__(cls)
        self._init(directory, embedder, weights or ScoringWeights(), save_every, read_only)
        try:
            self._open_db()
            params = IndexParams(
                dim=self._dim, M=M, ef_construction=ef_construction, ef_search=ef_search
            )
            self._open_index(params)
        except sqlite3.Error as exc:
            self._release()
            raise sqlite_error(exc, self.db_path) from exc
        except BaseException:
            self._release()
            raise
        return self

    def _init(
        self,
        directory: str | os.PathLike[str],
        embedder: TextEmbedder,
        weights: ScoringWeights,
        save_every: int,
        read_only: bool,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be positive, got {save_every}")
        self.directory = Path(directory)
        #: the SQLite file (named in every error about it)
        self.db_path = self.directory / DB_NAME
        self.embedder = embedder
        self.weights = weights
        self.save_every = save_every
        self.read_only = read_only
        self._lock = threading.RLock()
        self._dirlock: DirLock | None = None
        self._db: sqlite3.Connection | None = None
        self._index: HnswIndex | None = None
        self._store_id = b""
        self._dim = 0
        self._max_seq = 0
        self._max_tomb = 0
        self._dirty = 0
        # id -> latest access time not yet written to SQLite (see _flush_touches)
        self._touches: dict[str, float] = {}
        self._touch_searches = 0
        self._save_retry_at = 0  # after a failed periodic save: retry at this many changes
        self.recovered = ""  # why the index was rebuilt on open ("" if it was not)

    # -- opening --------------------------------------------------------------------------------

    def _open_db(self) -> None:
        if self.read_only:
            path = self.directory / DB_NAME
            if not path.is_file():
                raise MemoryStoreError(f"{self.directory} holds no memory store")
            self._db = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
        else:
            ensure_dir(self.directory)
            warn_if_exposed(self.directory)
            self._dirlock = DirLock(self.directory).acquire()
            removed = remove_stale_temps(self.directory)
            if removed:
                log.info("removed %d temp files left by a crashed writer", removed)
            self._prepare_db_files()
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged add survives power loss too, not only a process crash
            self._db.execute("PRAGMA synchronous=FULL")
            self._create_schema()
        self._db.execute("PRAGMA busy_timeout=5000")
        self._check_meta()

    def _prepare_db_files(self) -> None:
        """Create ``memory.sqlite3`` 0600 ourselves and refuse symlinks before SQLite opens it.

        SQLite would follow a planted link and create the file with the umask's mode (0644:
        readable by every local user). It creates ``-wal``/``-shm`` with the database file's
        mode, so a 0600 database gives 0600 companions; existing ones are narrowed here too.
        We hold the directory lock, so nothing of ours races with this.
        """
        for suffix in ("", "-wal", "-shm", "-journal"):
            path = self.directory / f"{DB_NAME}{suffix}"
            if suffix and not os.path.lexists(path):
                continue
            try:
                fd = open_nofollow(path, os.O_RDWR | (os.O_CREAT if not suffix else 0))
            except FileNotFoundError:
                continue
            os.close(fd)

    def _create_schema(self) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            defaults = {
                "schema_version": str(SCHEMA_VERSION),
                "store_id": uuid.uuid4().hex,
                "model_id": self.embedder.model_id,
                "dim": str(self.embedder.dim),
            }
            for key, value in defaults.items():
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _check_meta(self) -> None:
        try:
            meta = dict(self._conn().execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError as exc:  # "no such table": some other SQLite file
            raise DamagedStoreError(
                f"{self.db_path} is not a memory store ({exc}): move it aside to start an empty "
                "store there, or open the right directory"
            ) from exc
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise MemoryStoreError(f"unsupported schema version {meta.get('schema_version')}")
        try:
            self._store_id = uuid.UUID(hex=meta["store_id"]).bytes
            self._dim = int(meta["dim"])
            if "model_id" not in meta:
                raise KeyError("model_id")
        except (KeyError, ValueError) as exc:
            raise DamagedStoreError(
                f"{self.db_path} has a damaged meta table ({exc!r}): move it aside to start an "
                "empty store, or restore it from a backup"
            ) from exc
        if meta["model_id"] != self.embedder.model_id or self._dim != self.embedder.dim:
            raise StoreMismatchError(
                f"{self.directory} was written with {meta['model_id']} (dim {self._dim}); "
                f"this embedder is {self.embedder.model_id} (dim {self.embedder.dim})"
            )

    def _ever_inserted(self) -> int:
        """The highest item seq SQLite ever handed out: an upper bound on the index's slots."""
        db = self._conn()
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
        top = db.execute("SELECT MAX(seq) FROM items").fetchone()
        return max(int(row[0] or 0) if row else 0, int(top[0] or 0))

    def _open_index(self, params: IndexParams) -> None:
        try:
            # hnswlib PR #677: bound what the saved index claims by what SQLite holds, before
            # hnswlib's loader allocates for it
            index, manifest = HnswIndex.load(
                self.directory, params, store_id=self._store_id, max_slots=self._ever_inserted()
            )
        except IndexFileError as exc:
            self.recovered = str(exc)
            level = logging.INFO if str(exc) == "no index manifest" else logging.WARNING
            log.log(level, "rebuilding the index of %s from SQLite: %s", self.directory, exc)
            self._rebuild(params)
            return
        self._index = index
        self._max_seq, self._max_tomb = manifest.max_seq, manifest.max_tomb
        replayed = self._replay()
        count = self._count()
        if len(index) != count:
            self.recovered = f"index has {len(index)} items after replay, SQLite has {count}"
            log.warning("rebuilding the index of %s: %s", self.directory, self.recovered)
            self._rebuild(params)
            return
        if replayed:
            log.info("replayed %d changes into the index of %s", replayed, self.directory)
        if not self.read_only:
            remove_unreferenced_blobs(self.directory, keep=manifest.blob_name)
            self._maybe_save()

    def _replay(self) -> int:
        """Apply items and deletes newer than the saved index; returns how many."""
        db, index = self._conn(), self._idx()
        done = 0
        for seqs, vectors in self._iter_embeddings("WHERE seq > ?", (self._max_seq,)):
            index.add(vectors, seqs)
            self._max_seq = max(self._max_seq, int(seqs[-1]))
            done += len(seqs)
        for op, seq in db.execute(
            "SELECT op, seq FROM tombstones WHERE op > ? ORDER BY op", (self._max_tomb,)
        ):
            index.mark_deleted(seq)
            self._max_tomb = op
            done += 1
        self._dirty += done
        return done

    def _rebuild(self, params: IndexParams) -> None:
        count = self._count()
        index = HnswIndex(params, capacity=max(1024, int(count * 1.25)))
        self._max_seq = 0
        for seqs, vectors in self._iter_embeddings("", ()):
            index.add(vectors, seqs)
            self._max_seq = max(self._max_seq, int(seqs[-1]))
        row = self._conn().execute("SELECT MAX(op) FROM tombstones").fetchone()
        self._max_tomb = int(row[0] or 0)
        self._index = index
        self._dirty = 0
        if not self.read_only:
            self._save()

    def _iter_embeddings(
        self, where: str, args: tuple[Any, ...]
    ) -> Iterator[tuple[list[int], FloatArray]]:
        """(seqs, vectors) in seq order, in bounded chunks."""
        last = -1
        while True:
            clause = f"{where} AND seq > ?" if where else "WHERE seq > ?"
            rows = (
                self._conn()
                .execute(
                    f"SELECT seq, embedding FROM items {clause} ORDER BY seq LIMIT ?",
                    (*args, last, _ROWS_PER_CHUNK),
                )
                .fetchall()
            )
            if not rows:
                return
            seqs = [int(r[0]) for r in rows]
            yield seqs, self._decode_vectors([r[1] for r in rows])
            last = seqs[-1]

    def _decode_vectors(self, blobs: Sequence[bytes]) -> FloatArray:
        width = self._dim * 4
        for blob in blobs:
            if len(blob) != width:
                raise MemoryStoreError(f"stored embedding is {len(blob)} bytes, expected {width}")
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self._dim)

    # -- helpers --------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise MemoryClosedError("the memory store is closed")
        return self._db

    def _idx(self) -> HnswIndex:
        if self._index is None:
            raise MemoryClosedError("the memory store is closed")
        return self._index

    def _writable(self) -> sqlite3.Connection:
        db = self._conn()
        if self.read_only:
            raise ReadOnlyError(f"{self.directory} is open read-only")
        return db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._writable()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            # also after a failed COMMIT (disk full): leave no transaction open behind us
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def _save(self) -> None:
        self._flush_touches()
        try:
            self._idx().save(
                self.directory,
                store_id=self._store_id,
                max_seq=self._max_seq,
                max_tomb=self._max_tomb,
            )
        except OSError as exc:
            raise persist_error(
                exc, self.directory, "could not save the index (SQLite still has every item)"
            ) from exc
        # tombstones up to max_tomb are now in the saved index; keep the table bounded
        with self._tx() as db:
            db.execute("DELETE FROM tombstones WHERE op <= ?", (self._max_tomb,))
        self._dirty = 0

    def _maybe_save(self) -> None:
        """Save the index every ``save_every`` changes; a failure there never fails a write.

        The change is committed to SQLite already (and is replayed into the index on the next
        open), so a periodic save that fails (a full disk) is logged and retried
        ``save_every`` changes later instead of being raised from an acknowledged add.
        """
        if self._dirty < max(self.save_every, self._save_retry_at):
            return
        try:
            self._save()
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            self._save_retry_at = self._dirty + self.save_every
            log.warning(
                "could not save the index of %s (%s); committed items are safe in SQLite and "
                "are replayed on the next open; retrying after %d more changes",
                self.directory,
                exc,
                self.save_every,
            )
        else:
            self._save_retry_at = 0

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
            raise TypeError("texts must be a sequence of str")
        items = [_check_text(t) for t in texts]
        if isinstance(importance, Sequence):
            if len(importance) != len(items):
                raise ValueError(f"{len(importance)} importances for {len(items)} texts")
            importances = [float(i) for i in importance]
        else:
            importances = [importance] * len(items)
        metas = [_check_fields(kind, session, imp, meta) for imp in importances]
        self._writable()
        if not items:
            return []
        stamp = _to_epoch(now)
        vectors = self._embed_all(items)
        ids = [str(uuid.uuid4()) for _ in items]
        # one lock across the commit and the index add: a delete between the two would mark
        # a label that is not in the index yet, and the add would then make it live again
        with self._lock:
            seqs = self._insert(ids, items, kind, session, stamp, importances, metas, vectors)
            # committed: the ids are durable; the index follows (replay covers a crash here)
            self._idx().add(vectors, seqs)
            self._max_seq = max(self._max_seq, max(seqs))
            self._dirty += len(seqs)
            self._maybe_save()
        return ids

    def _insert(
        self,
        ids: list[str],
        items: list[str],
        kind: str,
        session: str | None,
        stamp: float,
        importances: Sequence[float],
        metas: list[str],
        vectors: FloatArray,
    ) -> list[int]:
        """INSERT the rows in one transaction; returns their seqs. Hold the lock."""
        seqs: list[int] = []
        with self._tx() as db:
            for i, text in enumerate(items):
                cur = db.execute(
                    "INSERT INTO items (id, text, kind, session, created, accessed, importance,"
                    " meta, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        ids[i],
                        text,
                        kind,
                        session,
                        stamp,
                        stamp,
                        float(importances[i]),
                        metas[i],
                        vectors[i].astype("<f4").tobytes(),
                    ),
                )
                seqs.append(int(cur.lastrowid or 0))
        return seqs

    def _embed_all(self, items: list[str]) -> FloatArray:
        """Embed in chunks; warn once if the embedder truncated any text."""
        parts: list[FloatArray] = []
        truncated = 0
        for i in range(0, len(items), 1024):
            parts.append(self.embedder.embed(items[i : i + 1024]))
            stats = getattr(self.embedder, "last_stats", None)
            truncated += int(getattr(stats, "truncated", 0))
        if truncated:
            limit = getattr(self.embedder, "max_length", "max_length")
            log.warning(
                "%d of %d texts are longer than the embedder's %s tokens and were truncated: "
                "search cannot find what comes after that (split long texts before adding)",
                truncated,
                len(items),
                limit,
            )
        return np.concatenate(parts)

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
            self._idx().mark_deleted(int(row[0]))
            self._max_tomb = int(cur.lastrowid or self._max_tomb)
            self._dirty += 1
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
            self._touch(list(ids), _to_epoch(now))

    # -- reads ----------------------------------------------------------------------------------

    _COLUMNS = "seq, id, text, kind, session, created, accessed, importance, meta"

    @staticmethod
    def _item(row: Sequence[Any]) -> MemoryItem:
        seq, item_id, text, kind, session, created, accessed, importance, meta = row
        return MemoryItem(
            item_id, text, kind, session, created, accessed, importance, json.loads(meta), seq
        )

    @_sqlite_errors
    def get(self, item_id: str) -> MemoryItem | None:
        """The memory with this id, or None."""
        with self._lock:
            row = (
                self._conn()
                .execute(f"SELECT {self._COLUMNS} FROM items WHERE id = ?", (item_id,))
                .fetchone()
            )
        return None if row is None else self._accessed(self._item(row))

    @_sqlite_errors
    def find(self, *, session: str | None, meta_key: str, value: str | int | float) -> list[str]:
        """Ids of the session's memories whose ``meta[meta_key]`` equals ``value`` (exact).

        For bookkeeping lookups such as "was journal entry 42 already ingested?".
        """
        if not meta_key.replace("_", "").isalnum():
            raise ValueError(f"meta_key must be alphanumeric/underscore, got {meta_key!r}")
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
        :meth:`get` see it at once, SQLite gets it in the next batch (see :meth:`_flush_touches`).
        """
        text = _check_text(query)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        kind_list = None if kinds is None else sorted(set(kinds))
        if kind_list is not None and not set(kind_list) <= set(KINDS):
            raise ValueError(f"kinds must be drawn from {KINDS}, got {kind_list}")
        stamp = _to_epoch(now)
        vector = self.embedder.embed([text])[0]
        with self._lock:
            pool = max(4 * k, 40)
            candidates = self._candidates(vector, pool, session, kind_list, global_only)
            hits = self._score(candidates, stamp)[:k]
            if touch and hits and not self.read_only:
                self._touch([h.id for h in hits], stamp)
        return hits

    def _touch(self, ids: Iterable[str], stamp: float) -> None:
        """Record an access in memory; written by :meth:`_flush_touches`. Hold the lock."""
        for item_id in ids:
            self._touches[item_id] = max(stamp, self._touches.get(item_id, stamp))
        self._touch_searches += 1
        if self._touch_searches >= TOUCH_FLUSH_EVERY:
            self._flush_touches()

    def _flush_touches(self) -> None:
        """Write the pending access times in one transaction. Hold the lock.

        ``synchronous=NORMAL`` for this transaction only: in WAL mode that never corrupts the
        database, it only lets a power loss undo this last commit, and access times are
        ranking hints, not user data. The next FULL commit (an add or delete) syncs the WAL,
        and with it this update. A crash before the flush loses at most
        :data:`TOUCH_FLUSH_EVERY` searches' worth of access times, never an item.
        """
        if not self._touches or self.read_only:
            self._touches.clear()
            self._touch_searches = 0
            return
        db = self._conn()
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._tx() as tx:
                tx.executemany(
                    "UPDATE items SET accessed = MAX(accessed, ?) WHERE id = ?",
                    [(stamp, item_id) for item_id, stamp in self._touches.items()],
                )
        finally:
            db.execute("PRAGMA synchronous=FULL")
        self._touches.clear()
        self._touch_searches = 0

    def _accessed(self, item: MemoryItem) -> MemoryItem:
        """``item`` with its last access including any pending (unflushed) one."""
        pending = self._touches.get(item.id)
        if pending is None or pending <= item.accessed:
            return item
        return dataclasses.replace(item, accessed=pending)

    def _candidates(
        self,
        vector: FloatArray,
        pool: int,
        session: str | None,
        kinds: list[str] | None,
        global_only: bool = False,
    ) -> dict[int, float]:
        """seq -> cosine for up to ``pool`` candidates that pass the filters."""
        if session is None and kinds is None and not global_only:
            labels, sims = self._idx().query(vector, pool)
            return dict(zip(labels, sims, strict=True))
        clauses, args = [], []
        if global_only:
            clauses.append("session IS NULL")
        elif session is not None:
            clauses.append("session = ?")
            args.append(session)
        if kinds is not None:
            clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
            args.extend(kinds)
        where = " AND ".join(clauses)
        db = self._conn()
        allowed = [r[0] for r in db.execute(f"SELECT seq FROM items WHERE {where}", args)]
        if len(allowed) <= EXACT_FILTER_LIMIT:
            # small sets: exact scan beats the graph walk and never misses
            result: dict[int, float] = {}
            for seqs, vectors in self._iter_embeddings(f"WHERE {where}", tuple(args)):
                exact = vectors @ vector
                result.update(zip(seqs, (float(s) for s in exact), strict=True))
            best = sorted(result.items(), key=lambda kv: -kv[1])[:pool]
            return dict(best)
        allowed_set = frozenset(allowed)
        labels, sims = self._idx().query(vector, pool, filter=allowed_set.__contains__)
        return dict(zip(labels, sims, strict=True))

    def _score(self, candidates: Mapping[int, float], now: float) -> list[Hit]:
        if not candidates:
            return []
        seqs = list(candidates)
        rows: list[Any] = []
        for i in range(0, len(seqs), 500):  # stay under SQLite's bound-parameter limit
            part = seqs[i : i + 500]
            marks = ", ".join("?" * len(part))
            sql = f"SELECT {self._COLUMNS} FROM items WHERE seq IN ({marks})"
            rows += self._conn().execute(sql, part).fetchall()
        hits = []
        for row in rows:  # a label SQLite no longer has (a stale index) simply drops out
            item = self._accessed(self._item(row))
            sim = candidates[item.seq]
            rec = self.weights.recency_of(item.accessed, now)
            hits.append(
                Hit(
                    id=item.id,
                    text=item.text,
                    score=self.weights.score(sim, rec, item.importance),
                    similarity=sim,
                    recency=rec,
                    kind=item.kind,
                    session=item.session,
                    created=item.created,
                    accessed=item.accessed,
                    importance=item.importance,
                    meta=item.meta,
                )
            )
        hits.sort(key=lambda h: (-h.score, -h.similarity, h.id))
        return hits

    # -- maintenance ----------------------------------------------------------------------------

    @_sqlite_errors
    def stats(self) -> dict[str, Any]:
        """Counts and settings, for the CLI and for monitoring."""
        with self._lock:
            db, index = self._conn(), self._idx()
            by_kind = dict(db.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall())
            sessions = db.execute("SELECT COUNT(DISTINCT session) FROM items").fetchone()[0]
            db_bytes = sum(
                p.stat().st_size for p in self.directory.glob(f"{DB_NAME}*") if p.is_file()
            )
            index_bytes = sum(p.stat().st_size for p in self.directory.glob("index-*.hnsw"))
            return {
                "directory": str(self.directory),
                "items": self._count(),
                "by_kind": by_kind,
                "sessions": int(sessions),
                "model_id": self.embedder.model_id,
                "dim": self._dim,
                "index_live": len(index),
                "index_slots": index.slots,
                "index_capacity": index.max_elements,
                "index_M": index.params.M,
                "index_ef_search": index.params.ef_search,
                "unsaved_changes": self._dirty,
                "pending_access_times": len(self._touches),
                "max_seq": self._max_seq,
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
            self._rebuild(self._idx().params)
            return len(self._idx())

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
                    and self._dirty
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
            return self._count()
