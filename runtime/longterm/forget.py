"""Forgetting: deleting items, bounding a session's raw turns, and leaving no trace of a
deleted text on disk.

A delete removes the row and its lexical row and leaves a tombstone (its number tells the
index, :mod:`runtime.longterm.index`, what to drop) inside the caller's transaction. After a
bulk delete, :func:`scrub` merges the lexical index, saves the vector index and truncates
the WAL; ``secure_delete`` (set on every connection) has zeroed the freed pages.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from runtime.longterm import db as sql
from runtime.longterm import links

#: (seq, tombstone number) of each deleted item, for the index.
Deleted = list[tuple[int, int | None]]

logger = logging.getLogger(__name__)


def delete_item(db: sqlite3.Connection, seq: int) -> int | None:
    """Delete one item and its lexical row inside the caller's transaction; returns the
    tombstone's number for the index."""
    db.execute("DELETE FROM items WHERE seq = ?", (seq,))
    db.execute("DELETE FROM items_fts WHERE rowid = ?", (seq,))
    return db.execute("INSERT INTO tombstones (seq) VALUES (?)", (seq,)).lastrowid


def delete_id(db: sqlite3.Connection, item_id: str) -> Deleted:
    """Delete the item ``item_id`` (inside the caller's transaction); empty if there is none."""
    row = db.execute("SELECT seq FROM items WHERE id = ?", (item_id,)).fetchone()
    if row is None:
        return []
    return [(int(row[0]), delete_item(db, int(row[0])))]


def delete_session(db: sqlite3.Connection, session: str) -> Deleted:
    """Delete every item of ``session`` and its distiller watermarks (inside the caller's
    transaction): a new session under the same id starts from nothing."""
    rows = db.execute("SELECT seq FROM items WHERE session = ?", (session,))
    done = [(seq, delete_item(db, seq)) for (seq,) in rows.fetchall()]
    links.clear_marks(db, session)
    return done


def archive_turns(db: sqlite3.Connection, session: str, max_items: int) -> Deleted | None:
    """Delete the session's lowest-value raw turns (least important, then superseded, then
    oldest) until it holds ``max_items`` (inside the caller's transaction); None when it
    holds no more than that already."""
    total = db.execute("SELECT COUNT(*) FROM items WHERE session = ?", (session,)).fetchone()[0]
    excess = int(total) - max_items
    if excess <= 0:
        return None
    rows = db.execute(
        "SELECT seq FROM items WHERE session = ? AND kind = 'turn'"
        " ORDER BY importance, superseded_by IS NULL, said_at, seq LIMIT ?",
        (session, excess),
    ).fetchall()
    return [(seq, delete_item(db, seq)) for (seq,) in rows]


def scrub(db: sqlite3.Connection, save_index: Callable[[], None]) -> None:
    """After a bulk delete: merge the lexical index, save the vector index (``save_index``)
    and truncate the WAL."""
    with sql.transaction(db) as tx:
        merge_lexical(tx)
    save_index()
    compact(db)


def merge_lexical(db: sqlite3.Connection) -> None:
    """Merge the lexical index's segments (inside the caller's transaction): FTS5 keeps a
    deleted document's terms in old segments until a merge."""
    db.execute("INSERT INTO items_fts (items_fts) VALUES ('optimize')")


def compact(db: sqlite3.Connection) -> None:
    """Checkpoint and truncate the WAL around a VACUUM (outside any transaction). A reader
    holding old pages (a ``memory search`` process) keeps the WAL from truncating: that is
    logged, and the next delete truncates it."""
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("VACUUM")
    busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy and busy[0]:
        logger.warning("a reader kept the memory store's WAL from truncating after a delete")
