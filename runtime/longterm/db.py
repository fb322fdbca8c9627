"""The long-term memory's source of truth: the rows of ``memory.sqlite3`` and what is said
through a connection to it (transactions, inserts, deletes, queries).

Items live in SQLite; the hnswlib index (:mod:`runtime.longterm.index`) is derived from it and
can always be rebuilt. Opening the file (schema, upgrade, meta) is
:mod:`runtime.longterm.schema`; how items relate (merges, supersession, watermarks) is
:mod:`runtime.longterm.links`. Deletes leave a row in ``tombstones`` until the saved index
has applied them.

Everything here takes the :class:`sqlite3.Connection` as an argument: the store owns the one
connection (and the directory lock), this module owns what is said through it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import MemoryStoreError
from runtime.layout import memory_scope, tenant_of, tenant_root, validate_tenant
from runtime.longterm.items import COLUMNS, MemoryItem, NewItem
from runtime.longterm.lexical import normalise

DB_NAME = "memory.sqlite3"
#: Rows read per query when streaming embeddings (bounded memory on a large store).
ROWS_PER_CHUNK = 10_000
#: Access-time updates from searches are kept in memory and written after this many
#: searches (and on save and close): a search no longer costs a synchronous write.
TOUCH_FLUSH_EVERY = 64

FloatArray = npt.NDArray[np.float32]

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


def count(db: sqlite3.Connection, session: str | None = None, kind: str | None = None) -> int:
    """How many items (of a session, of a kind) the store holds."""
    clauses, args = [], []
    if session is not None:
        clauses.append("session = ?")
        args.append(session)
    if kind is not None:
        clauses.append("kind = ?")
        args.append(kind)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    return int(db.execute(f"SELECT COUNT(*) FROM items{where}", args).fetchone()[0])


def tally(db: sqlite3.Connection) -> tuple[dict[str, int], int]:
    """The item count of each kind, and how many distinct sessions (None among them) hold
    items."""
    by_kind = dict(db.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall())
    sessions = db.execute("SELECT COUNT(DISTINCT session) FROM items").fetchone()[0]
    return by_kind, int(sessions)


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


def scope_clause(
    session: str | None,
    kinds: Sequence[str] | None,
    *,
    global_only: bool,
    with_global: bool,
    tenant: str | None = None,
) -> tuple[str, list[Any]]:
    """The WHERE conditions (joined by AND, "" for none) that scope a search.

    The "global" memories of a session are those of its tenant's root
    (:func:`runtime.layout.tenant_root`), or, for a session of no tenant, those stored
    without a session. Without a session, ``tenant`` keeps that tenant's items only: its
    sessions' and its root's (ids ``<tenant>~...``, one index range)."""
    clauses: list[str] = []
    args: list[Any] = []
    memory_scope(session, tenant)  # the session is one of the tenant's
    if global_only:
        clauses.append("session IS ?")
        args.append(tenant_root(tenant) if tenant is not None else None)
    elif session is not None:
        owner = tenant_of(session)
        if with_global:
            clauses.append("(session = ? OR session IS ?)")
            args += [session, tenant_root(owner) if owner is not None else None]
        else:
            clauses.append("session = ?")
            args.append(session)
    elif tenant is not None:
        # "~" is followed by DEL (0x7f) in ASCII: the range holds exactly "<tenant>~..."
        clauses.append("session >= ? AND session < ?")
        args += [tenant_root(tenant), f"{validate_tenant(tenant)}\x7f"]
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


def exact_matches(
    db: sqlite3.Connection, norm: str, where: str, args: Sequence[Any], limit: int
) -> list[int]:
    """The seqs of the newest ``limit`` items ``where`` allows whose own text, reduced to
    its words (:func:`runtime.longterm.lexical.normalise`), is ``norm`` (the ``items_exact``
    index); none for an empty ``norm`` (a text of no words: emoji, punctuation)."""
    if not norm:
        return []
    scope = f" AND {where}" if where else ""
    rows = db.execute(
        f"SELECT seq FROM items WHERE norm = ?{scope} ORDER BY seq DESC LIMIT ?",
        (norm, *args, limit),
    ).fetchall()
    return [int(r[0]) for r in rows]


def document_frequencies(
    db: sqlite3.Connection, stems: Iterable[str]
) -> tuple[int, dict[str, int]]:
    """How many items the FTS index holds, and in how many of them each of the (already
    stemmed) ``stems`` occurs (one absent from the index is left out). Reads FTS5's own
    term statistics through a per-connection ``fts5vocab`` table: no scan of the items."""
    wanted = sorted(set(stems))
    if not wanted:
        return 0, {}
    db.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS temp.items_vocab USING fts5vocab(main, items_fts, row)"
    )
    marks = ", ".join("?" * len(wanted))
    rows = db.execute(f"SELECT term, doc FROM temp.items_vocab WHERE term IN ({marks})", wanted)
    frequencies = {str(r[0]): int(r[1]) for r in rows}
    total = int(db.execute("SELECT count(*) FROM items").fetchone()[0])
    return total, frequencies


def count_where(db: sqlite3.Connection, where: str, args: Sequence[Any]) -> int:
    """How many items ``where`` allows (``""``: all)."""
    clause = f" WHERE {where}" if where else ""
    return int(db.execute(f"SELECT count(*) FROM items{clause}", tuple(args)).fetchone()[0])


def count_matches(
    db: sqlite3.Connection, expression: str, where: str, args: Sequence[Any], *, limit: int
) -> int:
    """How many items ``where`` allows match the FTS5 ``expression``, counted up to
    ``limit`` (the walk stops there)."""
    scope = f" AND {where}" if where else ""
    row = db.execute(
        "SELECT count(*) FROM (SELECT 1 FROM items_fts f CROSS JOIN items ON items.seq = f.rowid"
        f" WHERE items_fts MATCH ?{scope} LIMIT ?)",
        (expression, *args, limit),
    ).fetchone()
    return int(row[0])


def item_by_id(db: sqlite3.Connection, item_id: str) -> MemoryItem | None:
    """The item with this id, or None."""
    row = db.execute(f"SELECT {COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
    return None if row is None else MemoryItem.from_row(row)


def find_by_meta(
    db: sqlite3.Connection, session: str | None, meta_key: str, value: str | int | float
) -> list[str]:
    """Ids of the session's items whose ``meta[meta_key]`` equals ``value`` (exact)."""
    path = f"$.{meta_key}"
    rows = db.execute(
        "SELECT id FROM items WHERE session IS ? AND json_extract(meta, ?) = ?",
        (session, path, value),
    ).fetchall()
    return [str(r[0]) for r in rows]


@dataclass(frozen=True, slots=True)
class RankRow:
    """What ranking reads of a candidate: the rest of its row (text, meta, sources) is read
    for the hits only (:func:`items_by_seq`)."""

    seq: int
    id: str
    speaker: str | None
    said_at: float
    accessed: float
    importance: float
    superseded_by: str | None


def rank_rows(db: sqlite3.Connection, seqs: Sequence[int]) -> list[RankRow]:
    """The :class:`RankRow` of each of these seqs that SQLite still has, in no order."""
    rows: list[Any] = []
    for i in range(0, len(seqs), 500):  # stay under SQLite's bound-parameter limit
        part = list(seqs[i : i + 500])
        marks = ", ".join("?" * len(part))
        rows += db.execute(
            "SELECT seq, id, speaker, COALESCE(said_at, created), accessed, importance,"
            f" superseded_by FROM items WHERE seq IN ({marks})",
            part,
        ).fetchall()
    return [RankRow(*row) for row in rows]


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
    """Last-access times set by searches, held in memory and written to SQLite in batches
    through the connection ``conn`` returns (never for a ``read_only`` store).

    The caller holds the store's lock around every call.
    """

    def __init__(self, conn: Callable[[], sqlite3.Connection], *, read_only: bool) -> None:
        self._conn = conn
        self._read_only = read_only
        self._pending: dict[str, float] = {}  # id -> latest access not yet in SQLite
        self._searches = 0
        #: called with what a flush wrote (a replica shares it with the other nodes)
        self.on_flush: Callable[[dict[str, float]], None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, ids: Iterable[str], stamp: float) -> None:
        """Note one search's accesses; written (:meth:`flush`) every :data:`TOUCH_FLUSH_EVERY`
        searches."""
        for item_id in ids:
            self._pending[item_id] = max(stamp, self._pending.get(item_id, stamp))
        self._searches += 1
        if self._searches >= TOUCH_FLUSH_EVERY:
            self.flush()

    def latest(self, item_id: str, accessed: float) -> float:
        """The last access of the item ``item_id`` whose row says ``accessed``, including any
        pending (unflushed) one."""
        return max(accessed, self._pending.get(item_id, accessed))

    def clear(self) -> None:
        """Forget the pending access times (a read-only store never writes them)."""
        self._pending.clear()
        self._searches = 0

    def flush(self) -> None:
        """Write the pending access times in one transaction (a read-only store forgets them).

        ``synchronous=NORMAL`` for this transaction only: in WAL mode that never corrupts the
        database, it only lets a power loss undo this last commit, and access times are
        ranking hints, not user data. The next FULL commit (an add or delete) syncs the WAL,
        and with it this update. A crash before the flush loses at most
        :data:`TOUCH_FLUSH_EVERY` searches' worth of access times, never an item.
        """
        if self._read_only or not self._pending:
            self.clear()
            return
        db = self._conn()
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            with transaction(db) as tx:
                tx.executemany(
                    "UPDATE items SET accessed = MAX(accessed, ?) WHERE id = ?",
                    [(stamp, item_id) for item_id, stamp in self._pending.items()],
                )
        finally:
            db.execute("PRAGMA synchronous=FULL")
        if self.on_flush is not None:
            self.on_flush(dict(self._pending))
        self.clear()
