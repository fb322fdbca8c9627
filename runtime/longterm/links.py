"""How stored items relate: merges, supersession and watermarks.

* merges: a turn or fact that says the same thing as a stored item of its session, kind and
  speaker joins it (its sources added) instead of being stored again; "the same thing" is the
  same normalised text, or a near-duplicate vector that names the same numbers, names and
  negations (:func:`runtime.longterm.lexical.signature`);
* supersession: a fact about a subject and attribute replaces the one said before it (and
  that one's source turns), which is kept and linked by ``superseded_by``;
* watermarks: named integers in the meta table, written in the same transaction as the
  items they account for.

Everything here takes the :class:`sqlite3.Connection` (inside the caller's transaction for
writes), as :mod:`runtime.longterm.db` does.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from runtime.longterm import db as sql
from runtime.longterm.db import FloatArray
from runtime.longterm.hnsw import HnswIndex
from runtime.longterm.items import COLUMNS, MemoryItem, NewItem, check_fields
from runtime.longterm.lexical import normalise, signature

#: Two items may be merged only at this cosine or above, and only when they name the same
#: numbers, names and negations (:func:`runtime.longterm.lexical.signature`).
DEDUP_SIMILARITY = 0.95

# -- storing items ----------------------------------------------------------------------------


def store_items(
    db: sqlite3.Connection,
    items: Sequence[NewItem],
    vectors: FloatArray,
    *,
    stamp: float,
    merge_with: tuple[HnswIndex, float] | None,
    mark: tuple[str, int] | None = None,
) -> tuple[list[str], list[tuple[int, int]]]:
    """Store ``items`` one at a time (:func:`store_item`), then write the watermark ``mark``
    (key, value) if given, inside the caller's transaction: a repeat later in the batch finds
    an earlier one. Returns their ids in order and the (position in ``items``, seq) of the
    new rows."""
    ids: list[str] = []
    added: list[tuple[int, int]] = []
    for i, item in enumerate(items):
        item_id, seq = store_item(db, item, vectors[i : i + 1], stamp=stamp, merge_with=merge_with)
        ids.append(item_id)
        if seq:
            added.append((i, seq))
    if mark is not None:
        write_mark(db, *mark)
    return ids, added


def store_item(
    db: sqlite3.Connection,
    item: NewItem,
    vectors: FloatArray,
    *,
    stamp: float,
    merge_with: tuple[HnswIndex, float] | None,
) -> tuple[str, int]:
    """Store ``item`` (its embedding the one row of ``vectors``) inside the caller's
    transaction; returns its id and its new seq (0 when it merged into a stored item or its
    id is stored already).

    ``merge_with`` (the index and the merge similarity) lets it merge (:func:`merge_target`);
    a new fact with an attribute supersedes the older ones (:func:`supersede_older`).
    """
    into = merge_target(db, item, vectors[0], *merge_with) if merge_with is not None else None
    if into is not None:
        return into, 0
    item_id = item.id or str(uuid.uuid4())
    meta = check_fields(item.kind, item.session, item.importance, item.meta)
    (seq,) = sql.insert_items(db, [item_id], [item], stamp=stamp, metas=[meta], vectors=vectors)
    if seq and item.attribute is not None:
        supersede_older(db, seq)
    return item_id, seq


# -- merges -----------------------------------------------------------------------------------


def merge_target(
    db: sqlite3.Connection, item: NewItem, vector: Any, index: HnswIndex, similarity: float
) -> str | None:
    """The id of the stored item ``item`` merges into (its sources added), or None."""
    if item.id is not None:
        row = db.execute("SELECT seq FROM items WHERE id = ?", (item.id,)).fetchone()
        if row is not None:
            return item.id
    if item.kind not in ("turn", "fact"):
        return None
    target = same_text(db, item.session, item.kind, normalise(item.text), item.speaker)
    if target is None:
        target = near_duplicate(db, item, vector, index, similarity)
    if target is None:
        return None
    add_sources(db, target, item.sources, item.text)
    row = db.execute("SELECT id FROM items WHERE seq = ?", (target,)).fetchone()
    return str(row[0])


def near_duplicate(
    db: sqlite3.Connection, item: NewItem, vector: Any, index: HnswIndex, similarity: float
) -> int | None:
    """A stored item of the same session and kind at ``similarity`` or above that names the
    same numbers, names and negations."""
    labels, sims = index.query(vector, 8)
    close = [int(q) for q, sim in zip(labels, sims, strict=True) if sim >= similarity]
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


# -- supersession -----------------------------------------------------------------------------


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
            # every turn item that came from the entry, a merged repeat included
            db.execute(
                "UPDATE items SET superseded_by = ? WHERE session IS ? AND kind = 'turn'"
                " AND superseded_by IS NULL AND EXISTS (SELECT 1 FROM"
                " json_each(items.sources) WHERE json_each.value = ?)",
                (by, row[0], source),
            )


def current_fact(
    db: sqlite3.Connection, session: str | None, subject: str, attribute: str
) -> MemoryItem | None:
    """The newest fact of ``session`` about ``subject``/``attribute`` that nothing has
    superseded, or None."""
    row = db.execute(
        f"SELECT {COLUMNS} FROM items WHERE session IS ? AND kind = 'fact'"
        " AND subject = ? AND attribute = ? AND superseded_by IS NULL"
        " ORDER BY said_at DESC, seq DESC LIMIT 1",
        (session, subject, attribute),
    ).fetchone()
    return None if row is None else MemoryItem.from_row(row)


def history(
    db: sqlite3.Connection, session: str | None, subject: str, attribute: str
) -> list[MemoryItem]:
    """Every fact of ``session`` about ``subject``/``attribute``, newest first."""
    rows = db.execute(
        f"SELECT {COLUMNS} FROM items WHERE session IS ? AND kind = 'fact'"
        " AND subject = ? AND attribute = ? ORDER BY said_at DESC, seq DESC",
        (session, subject, attribute),
    ).fetchall()
    return [MemoryItem.from_row(r) for r in rows]


def lineage_keys(db: sqlite3.Connection, item_id: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The session of item ``item_id`` and the (subject, attribute) pairs whose history is its
    lineage, sorted: its own, or for a turn those of the facts distilled from it; none when
    there is no such item."""
    row = db.execute(
        "SELECT session, kind, subject, attribute, sources FROM items WHERE id = ?",
        (item_id,),
    ).fetchone()
    if row is None:
        return None, []
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
    return session, sorted(keys)


# -- watermarks -------------------------------------------------------------------------------


def write_mark(db: sqlite3.Connection, key: str, value: int) -> None:
    """Raise watermark ``key`` to ``value`` (inside the caller's transaction); a mark never
    goes back (a stale writer cannot un-ingest what another ingested): only
    :func:`clear_marks` lowers it."""
    raise_mark(db, f"mark:{key}", value)


def raise_mark(db: sqlite3.Connection, meta_key: str, value: int) -> None:
    """Set the meta row ``meta_key`` to ``value`` unless it holds more already."""
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET"
        " value = excluded.value WHERE CAST(meta.value AS INTEGER) < CAST(excluded.value AS"
        " INTEGER)",
        (meta_key, str(value)),
    )


def read_mark(db: sqlite3.Connection, key: str) -> int:
    """Watermark ``key``, or -1."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (f"mark:{key}",)).fetchone()
    return -1 if row is None else int(row[0])


def clear_marks(db: sqlite3.Connection, session: str) -> None:
    """Forget the ingest and distiller watermarks of ``session`` (inside the caller's
    transaction): a new journal under the same id starts from its first entry."""
    db.execute(
        "DELETE FROM meta WHERE key IN (?, ?, ?)",
        tuple(f"mark:{name}:{session}" for name in ("turns", "facts", "summary")),
    )
