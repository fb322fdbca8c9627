"""A memory store shared by nodes: each node's SQLite store is a replica of one
:class:`runtime.storage.MemoryLog` (PostgreSQL with ``db=``).

* **Write through.** Temporary triggers on the store's own connection note every item row
  (and watermark) a write transaction inserts, changes or deletes. Before that transaction
  commits, :meth:`Replica.publish` sends the rows' new images to the log. A write is
  acknowledged only once the log has committed it, and a failed publish rolls the local
  transaction back. So a replica never holds an item the log lacks, and the log is the truth.
* **Read before use.** :meth:`Replica.pull` applies the log's changes since the replica's
  revision (one indexed query, usually empty) before every search, read and write, so a node
  sees what the others wrote. It copies images; it never re-runs merges or supersession.
  Those ran once, on the writer, and their results (a merged item's sources, a superseded
  fact's link) are images too.
* **Derived.** A replica can be deleted at any time; the next open rebuilds it from the log.
  A replica of another log (the database was replaced) is emptied and rebuilt.

Access times (recency) travel apart from the images: a flush of the store's access times
(every few dozen searches) records them in the log's own access table, and a pull applies
the others' (each time only moves forward). A search never writes an image, so it can never
make another node's write stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime.errors import ClosedError, MemoryStoreError, PersistError
from runtime.longterm import db as sql
from runtime.longterm import forget, links
from runtime.longterm.lexical import normalise
from runtime.storage import MemoryChange, MemoryLog

if TYPE_CHECKING:
    from runtime.longterm.index import StoreIndex
    from runtime.longterm.retrieval import Retriever

logger = logging.getLogger(__name__)

#: Changes read from the log per query while catching up.
PULL_PAGE = 500
#: Seconds a read waits, after a pull failed, before it tries the log again (meanwhile it
#: reads the replica as it is, without a connection attempt per search).
RETRY_AFTER_S = 5.0
#: The item columns an image carries (besides its id, session, kind and embedding).
IMAGE_FIELDS = (
    "text",
    "created",
    "accessed",
    "importance",
    "meta",
    "said_at",
    "speaker",
    "sources",
    "superseded_by",
    "subject",
    "attribute",
    "body",
)
_JSON_FIELDS = ("meta", "sources")

_TRIGGERS = """
CREATE TEMP TABLE IF NOT EXISTS shared_changes (
    id TEXT PRIMARY KEY, session TEXT, gone INTEGER NOT NULL
);
CREATE TEMP TRIGGER IF NOT EXISTS shared_item_added AFTER INSERT ON main.items BEGIN
    INSERT OR REPLACE INTO shared_changes VALUES (new.id, new.session, 0);
END;
CREATE TEMP TRIGGER IF NOT EXISTS shared_item_changed AFTER UPDATE OF
    text, kind, session, importance, meta, said_at, speaker, sources, superseded_by, subject,
    attribute ON main.items BEGIN
    INSERT OR REPLACE INTO shared_changes VALUES (new.id, new.session, 0);
END;
CREATE TEMP TRIGGER IF NOT EXISTS shared_item_deleted AFTER DELETE ON main.items BEGIN
    INSERT OR REPLACE INTO shared_changes VALUES (old.id, old.session, 1);
END;
CREATE TEMP TRIGGER IF NOT EXISTS shared_mark_set AFTER INSERT ON main.meta
    WHEN new.key LIKE 'mark:%' BEGIN
    INSERT OR REPLACE INTO shared_changes VALUES (new.key, NULL, 0);
END;
CREATE TEMP TRIGGER IF NOT EXISTS shared_mark_raised AFTER UPDATE ON main.meta
    WHEN new.key LIKE 'mark:%' BEGIN
    INSERT OR REPLACE INTO shared_changes VALUES (new.key, NULL, 0);
END;
CREATE TEMP TRIGGER IF NOT EXISTS shared_mark_cleared AFTER DELETE ON main.meta
    WHEN old.key LIKE 'mark:%' BEGIN
    INSERT OR REPLACE INTO shared_changes VALUES (old.key, NULL, 1);
END;
"""
_OF_KEY = "replica:of"
_REV_KEY = "replica:rev"
_AREV_KEY = "replica:arev"
#: The highest revision this replica holds, pulled or published (own writes are not pulled).
_TOP_KEY = "replica:top"


@dataclass
class Applied:
    """What a :meth:`Replica.pull` changed, for the store's index: the new rows' seqs and
    embeddings, the deleted rows' (seq, tombstone), whether a speaker was added, and whether
    a session's erasure asks for a scrub."""

    added: list[tuple[int, bytes]] = field(default_factory=list)
    deleted: forget.Deleted = field(default_factory=list)
    speakers: bool = False
    scrub: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.deleted or self.speakers or self.scrub)


class Replica:
    """One store's link to its :class:`runtime.storage.MemoryLog`, on the store's connection.

    The store holds its lock around every call and passes its open connection.
    Its writes go through :meth:`writing`.
    """

    def __init__(self, db: sqlite3.Connection, log: MemoryLog, *, model_id: str, dim: int) -> None:
        self.log = log
        self.store_id = log.open(model_id, dim)
        db.executescript(_TRIGGERS)
        self._own: set[int] = set()  # revisions this node published (a pull skips them)
        self._published: list[int] = []  # revisions of the transaction now committing
        self._stale_since = 0.0  # when a pull last failed (0: the last one did not)
        self._tried_at = 0.0  # when the last pull was tried
        of = _meta(db, _OF_KEY)
        if of != self.store_id:
            self._adopt(db, of)
        self.rev = int(_meta(db, _REV_KEY) or 0)
        self.arev = int(_meta(db, _AREV_KEY) or 0)  # access times applied up to here
        top = log.top()
        held = max(self.rev, int(_meta(db, _TOP_KEY) or 0))
        if held > top[0] or self.arev > top[1]:
            # the database went back in time (restored from a backup): what this replica
            # holds past its revisions may be gone from the truth, and new revisions would
            # be taken for old ones
            logger.warning(
                "the memory replica is ahead of %s (revision %d, the table's newest %d): "
                "rebuilding it",
                log.describe(),
                held,
                top[0],
            )
            self._adopt(db, self.store_id)
            self.rev = self.arev = 0

    @staticmethod
    def refuse_local_writes(db: sqlite3.Connection, directory: object) -> None:
        """Refuse to open a replica for writing without its log (``memory add`` on a
        ``--db`` node's store, say): a write there would never reach the other nodes, and
        the next pull could not tell it from the truth."""
        if _meta(db, _OF_KEY) is not None:
            raise MemoryStoreError(
                f"{directory} is a replica of a shared memory store: it is written only "
                "through a runtime opened with db= (read it with read_only=True)"
            )

    def _adopt(self, db: sqlite3.Connection, of: str | None) -> None:
        """Make this store a replica of the log. A replica of another log (the database was
        replaced) is emptied first: it is derived, and the log is the truth. A store that
        is no replica but holds items is refused: those memories exist nowhere else."""
        held = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        if held and of is None:
            raise MemoryStoreError(
                f"this memory store holds {held} items and is not a replica of "
                f"{self.log.describe()}: open it without db=, or move it aside"
            )
        if held:
            logger.warning(
                "the memory replica (%d items) is of another shared store, not of %s: "
                "rebuilding it",
                held,
                self.log.describe(),
            )
        with sql.transaction(db):
            db.execute("DELETE FROM items")
            db.execute("DELETE FROM items_fts")
            db.execute("DELETE FROM meta WHERE key LIKE 'mark:%' OR key LIKE 'replica:%'")
            db.execute("DELETE FROM temp.shared_changes")
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_OF_KEY, self.store_id))

    # -- writes ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, db: sqlite3.Connection, *, scrub: bool) -> Iterator[sqlite3.Connection]:
        """A write transaction of the store that :meth:`publish` es what it changed just
        before its COMMIT (``scrub``: a session's erasure)."""
        try:
            with sql.transaction(db) as tx:
                yield tx
                self.publish(tx, scrub=scrub)
        except BaseException:
            self._published = []  # if published, the log's and not here yet: a pull brings it
            raise
        self._own.update(self._published)  # applied here already: a pull skips them
        self._published = []

    def publish(self, db: sqlite3.Connection, *, scrub: bool = False) -> None:
        """Inside a write transaction: send what it changed to the log (raises, so that the
        transaction rolls back, when the log refuses or cannot be reached)."""
        noted = db.execute("SELECT id, session, gone FROM temp.shared_changes").fetchall()
        if not noted:
            self._published = []
            return
        changes = [_capture(db, str(i), s, bool(gone), scrub) for i, s, gone in noted]
        # refused if another node changed one of these rows since this store's pull
        self._published = self.log.publish(changes, base=self.rev)
        raise_top(db, max(self._published, default=0))
        db.execute("DELETE FROM temp.shared_changes")

    def share_access(self, times: dict[str, float]) -> None:
        """After the store wrote access times: record them for the other nodes. A ranking
        hint: when the database cannot take them they are dropped (and logged)."""
        try:
            self.log.touch(times)
        except (PersistError, ClosedError) as exc:
            logger.info("long-term memory: %d access times not shared (%s)", len(times), exc)

    # -- reads ----------------------------------------------------------------------------------

    def refresh(
        self, db: sqlite3.Connection, index: StoreIndex, retriever: Retriever, *, strict: bool
    ) -> None:
        """:meth:`sync`, then what it applied told to the store's ``index`` and
        ``retriever`` (a session's erasure scrubs the store, as it did on the writer)."""
        applied = self.sync(db, strict=strict)
        if not applied:
            return
        index.apply(applied.added, applied.deleted)
        if applied.speakers:
            retriever.speakers.forget()
        if applied.scrub:
            forget.scrub(db, lambda: index.rebuild(db))
        else:
            index.maybe_save(db)

    def sync(self, db: sqlite3.Connection, *, strict: bool) -> Applied:
        """:meth:`pull`, for a read (``strict=False``) or a write. A read whose pull fails
        (the database is down) goes on with what the replica holds, all of it true though
        maybe not the newest, and says so in the log once; a write raises instead."""
        if not strict and self._stale_since and time.time() - self._tried_at < RETRY_AFTER_S:
            return Applied()  # it was down a moment ago: no reconnect on every search
        self._tried_at = time.time()
        try:
            applied = self.pull(db)
        except (PersistError, ClosedError) as exc:
            if strict:
                raise
            if not self._stale_since:
                logger.warning(
                    "long-term memory: could not read %s (%s); searching this node's replica "
                    "until it is back",
                    self.log.describe(),
                    exc,
                )
                self._stale_since = time.time()
            return Applied()
        if self._stale_since:
            logger.info("long-term memory: %s is back", self.log.describe())
            self._stale_since = 0.0
        return applied

    def pull(self, db: sqlite3.Connection) -> Applied:
        """Apply the log's changes since :attr:`rev` in one local transaction; :attr:`rev`
        moves only once it has committed (a pull that fails halfway applies nothing)."""
        applied = Applied()
        rev = self.rev
        seen: set[int] = set()  # own revisions met (applied when they were written)
        with sql.transaction(db):
            while True:
                page = self.log.changes(rev, PULL_PAGE)
                for rev, change in page:
                    if rev in self._own:
                        seen.add(rev)
                    else:
                        _apply(db, change, applied)
                if len(page) < PULL_PAGE:
                    break
            if rev != self.rev:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (_REV_KEY, str(rev))
                )
                raise_top(db, rev)
            arev = self._pull_access(db)
            db.execute("DELETE FROM temp.shared_changes")  # what applying noted is not news
        self.rev, self.arev = rev, arev
        self._own -= seen
        return applied

    def _pull_access(self, db: sqlite3.Connection) -> int:
        """Inside the pull: the other nodes' access times (each only moves forward); the
        access revision reached."""
        arev = self.arev
        while True:
            page = self.log.touches(arev, PULL_PAGE)
            db.executemany(
                "UPDATE items SET accessed = MAX(accessed, ?) WHERE id = ?",
                [(accessed, item_id) for _, item_id, accessed in page],
            )
            if page:
                arev = page[-1][0]
            if len(page) < PULL_PAGE:
                break
        if arev != self.arev:
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (_AREV_KEY, str(arev))
            )
        return arev


def raise_top(db: sqlite3.Connection, rev: int) -> None:
    """Note (in the caller's transaction) that the replica holds revision ``rev``."""
    links.raise_mark(db, _TOP_KEY, rev)


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _capture(
    db: sqlite3.Connection, item_id: str, session: str | None, gone: bool, scrub: bool
) -> MemoryChange:
    """The change a write made to row ``item_id`` (an item or a ``mark:`` watermark)."""
    if item_id.startswith("mark:"):
        value = None if gone else _meta(db, item_id)
        mark = None if value is None else {"value": int(value)}
        return MemoryChange(item_id, None, "mark", mark)
    row = None
    if not gone:
        row = db.execute(
            "SELECT kind, session, text, created, accessed, importance, meta, said_at, speaker,"
            " sources, superseded_by, subject, attribute,"
            " (SELECT body FROM items_fts WHERE rowid = items.seq), embedding"
            " FROM items WHERE id = ?",
            (item_id,),
        ).fetchone()
    if row is None:
        return MemoryChange(item_id, session, None, None, scrub=scrub)
    kind, session, *values, embedding = row
    image: dict[str, Any] = dict(zip(IMAGE_FIELDS, values, strict=True))
    for name in _JSON_FIELDS:
        image[name] = json.loads(image[name])
    return MemoryChange(item_id, session, str(kind), image, bytes(embedding))


def _apply(db: sqlite3.Connection, change: MemoryChange, applied: Applied) -> None:
    """Write one change from the log into the replica (inside the pull's transaction)."""
    if change.kind == "mark" or change.id.startswith("mark:"):
        if change.item is None:
            db.execute("DELETE FROM meta WHERE key = ?", (change.id,))
        else:
            links.raise_mark(db, change.id, int(change.item["value"]))
        return
    if change.item is None:
        applied.deleted += forget.delete_id(db, change.id)
        applied.scrub = applied.scrub or change.scrub
        return
    image = change.item
    values = _columns(change, image)
    row = db.execute("SELECT seq, embedding FROM items WHERE id = ?", (change.id,)).fetchone()
    if row is not None and change.embedding is not None and bytes(row[1]) != change.embedding:
        # deleted and stored again with another text: a new row, with its own vector
        applied.deleted += forget.delete_id(db, change.id)
        row = None
    if row is not None:
        seq = int(row[0])
        db.execute(
            "UPDATE items SET kind = ?, session = ?, text = ?, created = ?,"
            " accessed = MAX(accessed, ?), importance = ?, meta = ?, said_at = ?, speaker = ?,"
            " sources = ?, superseded_by = ?, subject = ?, attribute = ?, norm = ?"
            " WHERE seq = ?",
            (*values, seq),
        )
        db.execute("DELETE FROM items_fts WHERE rowid = ?", (seq,))
    else:
        if change.embedding is None:
            logger.warning("memory %s came from the shared store without a vector", change.id)
            return
        cur = db.execute(
            "INSERT INTO items (kind, session, text, created, accessed, importance, meta,"
            " said_at, speaker, sources, superseded_by, subject, attribute, norm, id,"
            " embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*values, change.id, change.embedding),
        )
        seq = int(cur.lastrowid or 0)
        applied.added.append((seq, change.embedding))
    db.execute(
        "INSERT INTO items_fts (rowid, body) VALUES (?, ?)",
        (seq, str(image.get("body") or image["text"])),
    )
    applied.speakers = applied.speakers or bool(image.get("speaker"))


def _columns(change: MemoryChange, image: Any) -> Sequence[Any]:
    """The item columns of an image, in the order :func:`_apply` writes them."""
    return (
        change.kind,
        change.session,
        str(image["text"]),
        float(image["created"]),
        float(image["accessed"]),
        float(image["importance"]),
        json.dumps(image["meta"], allow_nan=False, sort_keys=True),
        image["said_at"],
        image["speaker"],
        json.dumps(image["sources"]),
        image["superseded_by"],
        image["subject"],
        image["attribute"],
        normalise(str(image["text"])),
    )
