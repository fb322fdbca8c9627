"""The long-term memory's source of truth: ``memory.sqlite3``, its schema and its transactions.

Items live in SQLite; the hnswlib index (:mod:`runtime.longterm.index`) is derived from it and
can always be rebuilt. A writer opens the file in WAL mode with ``synchronous=FULL``, so an
acknowledged add survives power loss, not only a process crash. Deletes leave a row in
``tombstones`` until the saved index has applied them.

Everything here takes the :class:`sqlite3.Connection` as an argument: the store owns the one
connection (and the directory lock), this module owns what is said through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import (
    ArgumentError,
    ArgumentTypeError,
    DamagedStoreError,
    MemoryStoreError,
    MemoryStoreFullError,
    MemoryStoreIOError,
)
from runtime.fsutil import open_nofollow
from runtime.longterm.lexical import normalise

DB_NAME = "memory.sqlite3"
SCHEMA_VERSION = 2
#: Versions this code opens; version 1 (no time, sources or lexical index) is upgraded in
#: place by the first writer that opens it.
READABLE_VERSIONS = (1, 2)
KINDS: tuple[str, ...] = ("turn", "fact", "summary")
#: Rows read per query when streaming embeddings (bounded memory on a large store).
ROWS_PER_CHUNK = 10_000
#: Texts longer than this (in characters) are refused: memories are notes, not documents.
MAX_TEXT_CHARS = 100_000
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

#: Schema version 2: when it was said and by whom, where it came from, which item replaced
#: it, the subject/attribute of a fact, and the lexical (FTS5 BM25) index of every item.
_SCHEMA_V2 = """
ALTER TABLE items ADD COLUMN said_at REAL;
ALTER TABLE items ADD COLUMN speaker TEXT;
ALTER TABLE items ADD COLUMN sources TEXT NOT NULL DEFAULT '[]';
ALTER TABLE items ADD COLUMN norm TEXT NOT NULL DEFAULT '';
ALTER TABLE items ADD COLUMN superseded_by TEXT;
ALTER TABLE items ADD COLUMN subject TEXT;
ALTER TABLE items ADD COLUMN attribute TEXT;
CREATE INDEX IF NOT EXISTS items_norm ON items (session, norm);
CREATE INDEX IF NOT EXISTS items_fact ON items (session, subject, attribute);
CREATE VIRTUAL TABLE IF NOT EXISTS items_fts USING fts5 (body, tokenize = 'porter unicode61');
"""

#: The columns of an item row, in :class:`MemoryItem`'s field order (seq first).
COLUMNS = (
    "seq, id, text, kind, session, created, accessed, importance, meta, said_at, speaker, "
    "sources, superseded_by, subject, attribute"
)

# SQLite primary result codes (sqlite3.h) that this module tells apart
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


@dataclass(frozen=True)
class MemoryItem:
    """One stored memory.

    ``said_at`` is when it was said (the event time: a journal entry's or an imported
    message's time), ``stored_at`` when the store took it. ``sources`` are the journal entry
    seqs of its session it came from (one for a turn, several for a fact that merged or a
    summary). ``superseded_by`` is the id of the newer fact that replaced it (it is kept and
    ranked below); ``subject``/``attribute`` name what a fact is about.
    """

    id: str
    text: str
    kind: str
    session: str | None
    stored_at: float
    accessed: float
    importance: float
    meta: dict[str, Any]
    seq: int
    said_at: float
    speaker: str | None = None
    sources: tuple[int, ...] = ()
    superseded_by: str | None = None
    subject: str | None = None
    attribute: str | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> MemoryItem:
        """Decode a row selected with :data:`COLUMNS`."""
        (seq, item_id, text, kind, session, stored, accessed, importance, meta, said_at,
         speaker, sources, superseded_by, subject, attribute) = row  # fmt: skip
        return cls(
            id=item_id,
            text=text,
            kind=kind,
            session=session,
            stored_at=stored,
            accessed=accessed,
            importance=importance,
            meta=json.loads(meta),
            seq=seq,
            said_at=stored if said_at is None else said_at,
            speaker=speaker,
            sources=tuple(int(s) for s in json.loads(sources or "[]")),
            superseded_by=superseded_by,
            subject=subject,
            attribute=attribute,
        )


@dataclass(frozen=True)
class NewItem:
    """An item to store (see :class:`MemoryItem` for the fields).

    ``context`` is text indexed for the lexical search only (a turn's preceding turns in the
    same sitting: a reply such as "Yes, twice!" is found by the question it answers); it is
    never shown. ``id`` may be given to make a re-add after a crash a no-op (the distiller's
    items are named by their sources); by default a random UUID.
    """

    text: str
    kind: str = "fact"
    session: str | None = None
    said_at: float | None = None
    speaker: str | None = None
    sources: tuple[int, ...] = ()
    context: str = ""
    importance: float = 0.5
    meta: Mapping[str, Any] = field(default_factory=dict)
    subject: str | None = None
    attribute: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class StoreMeta:
    """What the ``meta`` table says about the store."""

    store_id: bytes
    model_id: str
    dim: int


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


# -- what a row may hold ------------------------------------------------------------------------


def to_epoch(now: float | datetime | None) -> float:
    """``now`` as seconds since the epoch (``None``: the current time)."""
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return now.timestamp()
    if isinstance(now, (int, float)) and math.isfinite(now):
        return float(now)
    raise ArgumentTypeError(f"now must be a float timestamp or a datetime, got {now!r}")


def check_text(text: object) -> str:
    """``text`` if it may be stored (a non-blank str of at most :data:`MAX_TEXT_CHARS`)."""
    if not isinstance(text, str):
        raise ArgumentTypeError(f"text must be str, not {type(text).__name__}")
    if not text.strip():
        raise ArgumentError("text must not be empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ArgumentError(f"text is {len(text)} characters; at most {MAX_TEXT_CHARS}")
    return text


def check_fields(
    kind: str, session: str | None, importance: float, meta: Mapping[str, Any] | None
) -> str:
    """Validate the shared fields of an add; returns the metadata as JSON."""
    if kind not in KINDS:
        raise ArgumentError(f"kind must be one of {KINDS}, got {kind!r}")
    if session is not None and not isinstance(session, str):
        raise ArgumentTypeError(f"session must be str or None, not {type(session).__name__}")
    if isinstance(importance, bool) or not isinstance(importance, (int, float)):
        raise ArgumentTypeError(f"importance must be a number, not {type(importance).__name__}")
    if not (0.0 <= float(importance) <= 1.0):
        raise ArgumentError(f"importance must be in [0, 1], got {importance}")
    if meta is not None and not isinstance(meta, Mapping):
        raise ArgumentTypeError(f"meta must be a mapping, not {type(meta).__name__}")
    try:
        return json.dumps(dict(meta or {}), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"meta is not JSON-serialisable: {exc}") from None


# -- opening ----------------------------------------------------------------------------------


def connect_read_only(directory: Path) -> sqlite3.Connection:
    """Open the store's database without writing anything (no lock, no schema)."""
    path = directory / DB_NAME
    if not path.is_file():
        raise MemoryStoreError(f"{directory} holds no memory store")
    return sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
    )


def connect(directory: Path) -> sqlite3.Connection:
    """Open (creating) the database for writing; the caller holds the directory lock."""
    prepare_db_files(directory)
    db = sqlite3.connect(directory / DB_NAME, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged add survives power loss too, not only a process crash
        db.execute("PRAGMA synchronous=FULL")
        # a forgotten memory's text must not stay behind in a freed page
        db.execute("PRAGMA secure_delete=ON")
    except BaseException:
        db.close()
        raise
    return db


def prepare_db_files(directory: Path) -> None:
    """Create ``memory.sqlite3`` 0600 ourselves and refuse symlinks before SQLite opens it.

    SQLite would follow a planted link and create the file with the umask's mode (0644:
    readable by every local user). It creates ``-wal``/``-shm`` with the database file's
    mode, so a 0600 database gives 0600 companions; existing ones are narrowed here too.
    The caller holds the directory lock, so nothing of ours races with this.
    """
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = directory / f"{DB_NAME}{suffix}"
        if suffix and not os.path.lexists(path):
            continue
        try:
            fd = open_nofollow(path, os.O_RDWR | (os.O_CREAT if not suffix else 0))
        except FileNotFoundError:
            continue
        os.close(fd)


def create_schema(db: sqlite3.Connection, *, model_id: str, dim: int) -> None:
    """Create the tables if missing and record a new store's id, model and width."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        fresh = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if fresh is None or fresh[0] == "1":
            _upgrade_to_v2(db)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '2')")
        defaults = {
            "schema_version": str(SCHEMA_VERSION),
            "store_id": uuid.uuid4().hex,
            "model_id": model_id,
            "dim": str(dim),
        }
        for key, value in defaults.items():
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _upgrade_to_v2(db: sqlite3.Connection) -> None:
    """Add version 2's columns and lexical index to a new or version 1 store, inside the
    caller's transaction: a v1 item's event time is its stored time, its source the journal
    entry its metadata names."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(items)")}
    for statement in _SCHEMA_V2.split(";"):
        text = statement.strip()
        if not text or (text.startswith("ALTER") and text.split()[5] in columns):
            continue
        db.execute(text)
    rows = db.execute("SELECT seq, text, created, meta FROM items").fetchall()
    for seq, text, created, meta in rows:
        journal_seq = json.loads(meta).get("journal_seq")
        sources = [journal_seq] if isinstance(journal_seq, int) else []
        db.execute(
            "UPDATE items SET said_at = ?, sources = ?, norm = ? WHERE seq = ?",
            (created, json.dumps(sources), normalise(text), seq),
        )
        db.execute("INSERT INTO items_fts (rowid, body) VALUES (?, ?)", (seq, text))


def read_meta(db: sqlite3.Connection, path: Path) -> StoreMeta:
    """Check the schema version and decode the meta table of the database at ``path``."""
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError as exc:  # "no such table": some other SQLite file
        raise DamagedStoreError(
            f"{path} is not a memory store ({exc}): move it aside to start an empty "
            "store there, or open the right directory"
        ) from exc
    version = meta.get("schema_version")
    if version == "1":
        raise MemoryStoreError(
            f"{path} is a version 1 memory store: open it once for writing to upgrade it"
        )
    if version != str(SCHEMA_VERSION):
        raise MemoryStoreError(f"unsupported schema version {version}")
    try:
        return StoreMeta(
            store_id=uuid.UUID(hex=meta["store_id"]).bytes,
            model_id=str(meta["model_id"]),
            dim=int(meta["dim"]),
        )
    except (KeyError, ValueError) as exc:
        raise DamagedStoreError(
            f"{path} has a damaged meta table ({exc!r}): move it aside to start an "
            "empty store, or restore it from a backup"
        ) from exc


# -- transactions and queries -------------------------------------------------------------------


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error, a failed COMMIT included."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # also after a failed COMMIT (disk full): leave no transaction open behind us
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def count(db: sqlite3.Connection) -> int:
    """How many items the store holds."""
    return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])


def ever_inserted(db: sqlite3.Connection) -> int:
    """The highest item seq SQLite ever handed out: an upper bound on the index's slots."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
    top = db.execute("SELECT MAX(seq) FROM items").fetchone()
    return max(int(row[0] or 0) if row else 0, int(top[0] or 0))


def insert_items(
    db: sqlite3.Connection,
    ids: Sequence[str],
    items: Sequence[NewItem],
    *,
    stamp: float,
    metas: Sequence[str],
    vectors: FloatArray,
) -> list[int]:
    """INSERT one row per item (and its lexical index row) inside the caller's transaction;
    returns their seqs. An item whose id exists already is skipped (seq 0)."""
    seqs: list[int] = []
    for i, item in enumerate(items):
        cur = db.execute(
            "INSERT OR IGNORE INTO items (id, text, kind, session, created, accessed, importance,"
            " meta, embedding, said_at, speaker, sources, norm, subject, attribute)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ids[i],
                item.text,
                item.kind,
                item.session,
                stamp,
                stamp if item.said_at is None else item.said_at,  # recency runs from said_at
                float(item.importance),
                metas[i],
                vectors[i].astype("<f4").tobytes(),
                stamp if item.said_at is None else item.said_at,
                item.speaker,
                json.dumps(sorted(set(item.sources))),
                normalise(item.text),
                item.subject,
                item.attribute,
            ),
        )
        if cur.rowcount == 0:
            seqs.append(0)
            continue
        seq = int(cur.lastrowid or 0)
        said = f"{item.speaker}: {item.text}" if item.speaker else item.text
        body = f"{item.context} {said}" if item.context else said
        db.execute("INSERT INTO items_fts (rowid, body) VALUES (?, ?)", (seq, body))
        seqs.append(seq)
    return seqs


def delete_item(db: sqlite3.Connection, seq: int) -> int | None:
    """Delete one item and its lexical row inside the caller's transaction; returns the
    tombstone's number for the index."""
    db.execute("DELETE FROM items WHERE seq = ?", (seq,))
    db.execute("DELETE FROM items_fts WHERE rowid = ?", (seq,))
    return db.execute("INSERT INTO tombstones (seq) VALUES (?)", (seq,)).lastrowid


def scope_clause(
    session: str | None, kinds: Sequence[str] | None, *, global_only: bool, with_global: bool
) -> tuple[str, list[Any]]:
    """The WHERE conditions (joined by AND, "" for none) that scope a search."""
    clauses: list[str] = []
    args: list[Any] = []
    if global_only:
        clauses.append("session IS NULL")
    elif session is not None:
        clauses.append("(session = ? OR session IS NULL)" if with_global else "session = ?")
        args.append(session)
    if kinds is not None:
        clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
        args.extend(kinds)
    return " AND ".join(clauses), args


def lexical_candidates(
    db: sqlite3.Connection, expression: str, limit: int, where: str, args: Sequence[Any]
) -> list[tuple[int, float]]:
    """(seq, BM25 score: higher is better) of the best ``limit`` items matching the FTS5
    ``expression`` among those ``where`` allows, best first."""
    scope = f" AND {where}" if where else ""
    rows = db.execute(
        "SELECT f.rowid, -bm25(items_fts) FROM items_fts f JOIN items ON items.seq = f.rowid"
        f" WHERE items_fts MATCH ?{scope} ORDER BY bm25(items_fts) LIMIT ?",
        (expression, *args, limit),
    ).fetchall()
    return [(int(r[0]), float(r[1])) for r in rows]


def write_mark(db: sqlite3.Connection, key: str, value: int) -> None:
    """Set watermark ``key`` (in the meta table, inside the caller's transaction)."""
    db.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"mark:{key}", str(value))
    )


def read_mark(db: sqlite3.Connection, key: str) -> int:
    """Watermark ``key``, or -1."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (f"mark:{key}",)).fetchone()
    return -1 if row is None else int(row[0])


def supersede_older(db: sqlite3.Connection, seq: int) -> None:
    """Link the fact ``seq`` with the other current facts of its session about the same
    subject and attribute: the older ones (by said_at) are superseded by it, and it by a
    newer one (an import out of order). A superseded fact's source turns are marked too,
    unless another current fact still cites them."""
    item_id, session, subject, attribute, said_at = db.execute(
        "SELECT id, session, subject, attribute, said_at FROM items WHERE seq = ?", (seq,)
    ).fetchone()
    rows = db.execute(
        "SELECT seq, id, said_at FROM items WHERE session IS ? AND kind = 'fact' AND subject = ?"
        " AND attribute = ? AND superseded_by IS NULL AND seq != ?",
        (session, subject, attribute, seq),
    ).fetchall()
    newest = max(rows, key=lambda r: (r[2], r[0]), default=None)
    if newest is not None and (newest[2], newest[0]) > (said_at, seq):
        _mark_superseded(db, seq, str(newest[1]))
        return
    for other_seq, _other_id, _ in rows:
        _mark_superseded(db, int(other_seq), item_id)


def _mark_superseded(db: sqlite3.Connection, seq: int, by: str) -> None:
    db.execute("UPDATE items SET superseded_by = ? WHERE seq = ?", (by, seq))
    row = db.execute("SELECT session, sources FROM items WHERE seq = ?", (seq,)).fetchone()
    for source in json.loads(row[1]):
        cited = db.execute(
            "SELECT 1 FROM items WHERE session IS ? AND kind = 'fact' AND superseded_by IS NULL"
            " AND attribute IS NOT NULL AND EXISTS (SELECT 1 FROM json_each(items.sources)"
            " WHERE json_each.value = ?) LIMIT 1",
            (row[0], source),
        ).fetchone()
        if cited is None:
            db.execute(
                "UPDATE items SET superseded_by = ? WHERE session IS ? AND kind = 'turn'"
                " AND superseded_by IS NULL AND sources = ?",
                (by, row[0], json.dumps([source])),
            )


def same_text(
    db: sqlite3.Connection, session: str | None, kind: str, norm: str, speaker: str | None
) -> int | None:
    """The seq of an item of the session, kind and speaker whose normalised text is ``norm``
    (and that nothing superseded)."""
    row = db.execute(
        "SELECT seq FROM items WHERE session IS ? AND kind = ? AND norm = ? AND speaker IS ?"
        " AND superseded_by IS NULL LIMIT 1",
        (session, kind, norm, speaker),
    ).fetchone()
    return None if row is None else int(row[0])


def add_sources(db: sqlite3.Connection, seq: int, sources: Iterable[int], text: str) -> None:
    """Merge ``sources`` (and the merged text, if it differs) into item ``seq``."""
    row = db.execute("SELECT sources, meta, text FROM items WHERE seq = ?", (seq,)).fetchone()
    merged = sorted(set(json.loads(row[0])) | set(sources))
    meta = json.loads(row[1])
    if text != row[2] and text not in meta.get("merged", []):
        meta["merged"] = [*meta.get("merged", []), text]
    db.execute(
        "UPDATE items SET sources = ?, meta = ? WHERE seq = ?",
        (json.dumps(merged), json.dumps(meta, sort_keys=True), seq),
    )


def items_by_seq(db: sqlite3.Connection, seqs: Sequence[int]) -> list[MemoryItem]:
    """The items with these seqs (those SQLite still has), in no particular order."""
    rows: list[Any] = []
    for i in range(0, len(seqs), 500):  # stay under SQLite's bound-parameter limit
        part = list(seqs[i : i + 500])
        marks = ", ".join("?" * len(part))
        sql = f"SELECT {COLUMNS} FROM items WHERE seq IN ({marks})"
        rows += db.execute(sql, part).fetchall()
    return [MemoryItem.from_row(row) for row in rows]


def iter_embeddings(
    db: sqlite3.Connection, dim: int, where: str, args: tuple[Any, ...]
) -> Iterator[tuple[list[int], FloatArray]]:
    """(seqs, vectors) of the items matching ``where``, in seq order, in bounded chunks."""
    last = -1
    while True:
        clause = f"{where} AND seq > ?" if where else "WHERE seq > ?"
        rows = db.execute(
            f"SELECT seq, embedding FROM items {clause} ORDER BY seq LIMIT ?",
            (*args, last, ROWS_PER_CHUNK),
        ).fetchall()
        if not rows:
            return
        seqs = [int(r[0]) for r in rows]
        yield seqs, decode_vectors([r[1] for r in rows], dim)
        last = seqs[-1]


def cosines(
    db: sqlite3.Connection, dim: int, seqs: Sequence[int], vector: FloatArray
) -> dict[int, float]:
    """seq -> cosine to ``vector`` of the stored items ``seqs`` (those SQLite still has)."""
    result: dict[int, float] = {}
    for i in range(0, len(seqs), 500):  # stay under SQLite's bound-parameter limit
        part = list(seqs[i : i + 500])
        marks = ", ".join("?" * len(part))
        rows = db.execute(
            f"SELECT seq, embedding FROM items WHERE seq IN ({marks})", part
        ).fetchall()
        if rows:
            sims = decode_vectors([r[1] for r in rows], dim) @ vector
            result.update(zip((int(r[0]) for r in rows), (float(x) for x in sims), strict=True))
    return result


def decode_vectors(blobs: Sequence[bytes], dim: int) -> FloatArray:
    """Stored embeddings (little-endian float32) as an ``(n, dim)`` array; checks each width."""
    width = dim * 4
    for blob in blobs:
        if len(blob) != width:
            raise MemoryStoreError(f"stored embedding is {len(blob)} bytes, expected {width}")
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim)


class AccessTimes:
    """Last-access times set by searches, held in memory and written to SQLite in batches.

    The caller holds the store's lock around every call.
    """

    def __init__(self) -> None:
        self._pending: dict[str, float] = {}  # id -> latest access not yet in SQLite
        self._searches = 0

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, ids: Iterable[str], stamp: float) -> bool:
        """Note one search's accesses; True when :data:`TOUCH_FLUSH_EVERY` are pending."""
        for item_id in ids:
            self._pending[item_id] = max(stamp, self._pending.get(item_id, stamp))
        self._searches += 1
        return self._searches >= TOUCH_FLUSH_EVERY

    def latest(self, item: MemoryItem) -> MemoryItem:
        """``item`` with its last access including any pending (unflushed) one."""
        pending = self._pending.get(item.id)
        if pending is None or pending <= item.accessed:
            return item
        return dataclasses.replace(item, accessed=pending)

    def clear(self) -> None:
        """Forget the pending access times (a read-only store never writes them)."""
        self._pending.clear()
        self._searches = 0

    def flush(self, db: sqlite3.Connection) -> None:
        """Write the pending access times in one transaction.

        ``synchronous=NORMAL`` for this transaction only: in WAL mode that never corrupts the
        database, it only lets a power loss undo this last commit, and access times are
        ranking hints, not user data. The next FULL commit (an add or delete) syncs the WAL,
        and with it this update. A crash before the flush loses at most
        :data:`TOUCH_FLUSH_EVERY` searches' worth of access times, never an item.
        """
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            with transaction(db) as tx:
                tx.executemany(
                    "UPDATE items SET accessed = MAX(accessed, ?) WHERE id = ?",
                    [(stamp, item_id) for item_id, stamp in self._pending.items()],
                )
        finally:
            db.execute("PRAGMA synchronous=FULL")
        self.clear()
