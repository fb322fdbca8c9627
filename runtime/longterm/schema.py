"""Opening ``memory.sqlite3``: its schema, the upgrade of older versions, and its meta table.

A writer opens the file in WAL mode with ``synchronous=FULL``, so an acknowledged add survives
power loss, not only a process crash; a reader opens it read-only and writes nothing. What is
said through an open connection (rows, transactions, queries) is :mod:`runtime.longterm.db`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import DamagedStoreError, MemoryStoreError, PersistError, StoreMismatchError
from runtime.fsutil import DirLock, ensure_dir, open_nofollow, remove_stale_temps, warn_if_exposed
from runtime.longterm.db import DB_NAME
from runtime.longterm.failures import sqlite_error
from runtime.longterm.lexical import FTS_TOKENIZER, normalise

SCHEMA_VERSION = 2
#: Versions this code opens; version 1 (no time, sources or lexical index) is upgraded in
#: place by the first writer that opens it.
READABLE_VERSIONS = (1, 2)

logger = logging.getLogger(__name__)

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
_SCHEMA_V2 = f"""
ALTER TABLE items ADD COLUMN said_at REAL;
ALTER TABLE items ADD COLUMN speaker TEXT;
ALTER TABLE items ADD COLUMN sources TEXT NOT NULL DEFAULT '[]';
ALTER TABLE items ADD COLUMN norm TEXT NOT NULL DEFAULT '';
ALTER TABLE items ADD COLUMN superseded_by TEXT;
ALTER TABLE items ADD COLUMN subject TEXT;
ALTER TABLE items ADD COLUMN attribute TEXT;
CREATE INDEX IF NOT EXISTS items_norm ON items (session, norm);
CREATE INDEX IF NOT EXISTS items_fact ON items (session, subject, attribute);
CREATE VIRTUAL TABLE IF NOT EXISTS items_fts USING fts5 (body, tokenize = '{FTS_TOKENIZER}');
"""


@dataclass(frozen=True)
class StoreMeta:
    """What the ``meta`` table says about the store."""

    store_id: bytes
    model_id: str
    dim: int


def open_db(
    directory: Path, *, read_only: bool, model_id: str, dim: int
) -> tuple[sqlite3.Connection, DirLock | None, StoreMeta]:
    """Open the store's database for an embedder of ``model_id`` and width ``dim``: the
    connection, the directory lock (a writer's, None for a reader) and the meta table.

    A writer creates the directory and the schema, takes the lock and removes the temp files
    a crashed writer left. On any failure, what was opened is closed and the lock released.
    """
    db: sqlite3.Connection | None = None
    lock: DirLock | None = None
    try:
        if read_only:
            db = connect_read_only(directory)
        else:
            ensure_dir(directory)
            warn_if_exposed(directory)
            lock = DirLock(directory).acquire()
            removed = remove_stale_temps(directory)
            if removed:
                logger.info("removed %d temp files left by a crashed writer", removed)
            db = connect(directory)
            create_schema(db, model_id=model_id, dim=dim)
        db.execute("PRAGMA busy_timeout=5000")
        meta = read_meta(db, directory / DB_NAME)
        if meta.model_id != model_id or meta.dim != dim:
            raise StoreMismatchError(
                f"{directory} was written with {meta.model_id} (dim {meta.dim}); "
                f"this embedder is {model_id} (dim {dim})"
            )
    except BaseException:
        close_db(db, lock, directory / DB_NAME)
        raise
    return db, lock, meta


def close_db(
    db: sqlite3.Connection | None, lock: DirLock | None, path: Path
) -> MemoryStoreError | PersistError | None:
    """Close the connection (if any) to the database at ``path``, then release the lock (if
    any); never raises: returns the error closing raised."""
    error: MemoryStoreError | PersistError | None = None
    if db is not None:
        try:
            db.close()
        except sqlite3.Error as exc:
            error = sqlite_error(exc, path)
    if lock is not None:
        lock.release()
    return error


def db_bytes(directory: Path) -> int:
    """The size of the database in ``directory``, its ``-wal`` and ``-shm`` files included."""
    return sum(p.stat().st_size for p in directory.glob(f"{DB_NAME}*") if p.is_file())


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
        # an exact-text lookup in any scope (items_norm serves one session's)
        db.execute("CREATE INDEX IF NOT EXISTS items_exact ON items (norm, session)")
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
