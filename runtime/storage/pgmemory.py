"""Long-term memory shared by nodes on PostgreSQL + pgvector: :class:`PgMemoryLog`, the
:class:`runtime.storage.MemoryLog` every node's store publishes its changes to and replicates
from (:mod:`runtime.longterm.replica`).

Tables (created on first use, beside the journal's; the version is checked on open)::

    llamaffi_memory_store (one boolean PRIMARY KEY, store_id text, model_id text, dim int)
    llamaffi_memory (
        id        text PRIMARY KEY,   -- the item's id, or 'mark:<key>' for a watermark
        rev       bigint UNIQUE,      -- from llamaffi_memory_rev, at every change
        session   text,               -- NULL: a global item
        kind      text,               -- turn | fact | summary | mark (NULL once deleted)
        deleted   boolean,            -- a tombstone: the id and session stay, nothing else
        item      jsonb,              -- text, meta, said_at, speaker, sources, superseded_by ...
        embedding vector(dim),        -- all-MiniLM-L6-v2, computed by the node that wrote it
        writer    text,               -- the node id
        written   timestamptz
    )

Order: :meth:`PgMemoryLog.publish` takes one advisory lock for the whole table, then draws
its revisions and commits. Writers therefore commit in revision order, so a reader that saw
revision ``r`` has seen everything committed before it, and reading ``rev > r`` (one index
range scan on the UNIQUE index) never skips a change that commits later. Memory writes are a
few items per turn, so one writer at a time costs little; the journal's appends do not take
this lock.

Vectors travel as pgvector's text form. Both ends print a float32 in its shortest exact form,
so a replica's vectors are bit-identical to the writer's. Searches run on each node's replica
(SQLite FTS5 BM25 fused with hnswlib cosine: the local store's ranking, unchanged, at local
latency); the table's pgvector HNSW index (``vector_cosine_ops``) is for other tools that
query the memories in SQL (``ORDER BY embedding <=> $1``; ``benchmarks/test_bench_cluster.py``
measures it against hnswlib). Access times, the ranking's recency, are a table of their own
(``llamaffi_memory_access``: id, time, ``arev``), written in batches and read like the items,
so that a search never writes an item's image and never conflicts with another node's write.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.errors import MemoryStoreError, PersistError, StoreMismatchError
from runtime.storage import MemoryChange

if TYPE_CHECKING:
    from runtime.storage.leases import Leases
    from runtime.storage.pgdb import PgDatabase

__all__ = ["SCHEMA_VERSION", "PgMemoryLog"]

#: The version of the tables below; an open of a database with another version is refused.
SCHEMA_VERSION = 1
#: How long a publish waits for the table's write lock before it fails (retryably).
LOCK_TIMEOUT_MS = 5000
_COMPONENT = "memory"


def _ddl(dim: int) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS llamaffi_memory_store (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    store_id text    NOT NULL,
    model_id text    NOT NULL,
    dim      integer NOT NULL CHECK (dim > 0)
);
CREATE SEQUENCE IF NOT EXISTS llamaffi_memory_rev;
CREATE TABLE IF NOT EXISTS llamaffi_memory (
    id        text    PRIMARY KEY,
    rev       bigint  NOT NULL UNIQUE,
    session   text,
    kind      text,
    deleted   boolean NOT NULL DEFAULT false,
    item      jsonb,
    embedding vector({dim}),
    writer    text    NOT NULL,
    written   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS llamaffi_memory_session ON llamaffi_memory (session);
CREATE INDEX IF NOT EXISTS llamaffi_memory_hnsw ON llamaffi_memory
    USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 200);
CREATE SEQUENCE IF NOT EXISTS llamaffi_memory_arev;
CREATE TABLE IF NOT EXISTS llamaffi_memory_access (
    id       text             PRIMARY KEY,
    accessed double precision NOT NULL,
    arev     bigint           NOT NULL UNIQUE
);
"""


def vector_text(embedding: bytes) -> str:
    """pgvector's text form of little-endian float32 ``embedding`` (exact: each float32
    printed as the shortest decimal that reads back as it)."""
    values = np.frombuffer(embedding, dtype="<f4")
    return "[" + ",".join(str(v) for v in values.tolist()) + "]"


def vector_bytes(text: str) -> bytes:
    """The little-endian float32 bytes of pgvector's text form ``text``."""
    values = np.array(text.strip("[]").split(","), dtype=np.float32)
    return values.astype("<f4").tobytes()


class PgMemoryLog:
    """The shared memory table on the runtime's :class:`runtime.storage.pgdb.PgDatabase`
    connection (:meth:`~runtime.storage.pgdb.PgDatabase.use`: its lock held, a lost
    connection a retryable :class:`runtime.errors.PersistError`); ``writer`` is this node's
    id."""

    def __init__(self, db: PgDatabase, writer: str, leases: Leases | None = None) -> None:
        self._db = db
        self.writer = writer
        self._leases = leases

    def describe(self) -> str:
        """The table, for messages."""
        return "the llamaffi_memory table of the --db database"

    def open(self, model_id: str, dim: int) -> str:
        """Create the tables if needed; the store's id. Another model or width is refused."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise StoreMismatchError(f"an embedding width must be a positive int, got {dim!r}")
        with self._db.use() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('llamaffi_schema'))")
            self._create_extension(conn)
            conn.execute(_ddl(dim))
            self._check_version(conn)
            row = conn.execute(
                "SELECT store_id, model_id, dim FROM llamaffi_memory_store"
            ).fetchone()
            if row is None:
                store_id = uuid.uuid4().hex
                conn.execute(
                    "INSERT INTO llamaffi_memory_store (store_id, model_id, dim) "
                    "VALUES (%s, %s, %s)",
                    (store_id, model_id, dim),
                )
                return store_id
        store_id, stored_model, stored_dim = str(row[0]), str(row[1]), int(row[2])
        if (stored_model, stored_dim) != (model_id, dim):
            raise StoreMismatchError(
                f"the shared memory in {self.describe()} was written with {stored_model} "
                f"({stored_dim} dims); this node embeds with {model_id} ({dim} dims)"
            )
        return store_id

    @staticmethod
    def _create_extension(conn: Any) -> None:
        """pgvector, once per database; a role that may not create it gets a clear error."""
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
            return
        try:
            with conn.transaction():
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except Exception as exc:
            raise MemoryStoreError(
                f"the shared memory needs the pgvector extension, and this role could not "
                f"create it ({exc}): run CREATE EXTENSION vector; in the database as its "
                "owner, once"
            ) from exc

    @staticmethod
    def _check_version(conn: Any) -> None:
        row = conn.execute(
            "SELECT version FROM llamaffi_schema WHERE component = %s", (_COMPONENT,)
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO llamaffi_schema (component, version) VALUES (%s, %s)",
                (_COMPONENT, SCHEMA_VERSION),
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise MemoryStoreError(
                f"the database's memory schema is version {row[0]}; this runtime reads "
                f"version {SCHEMA_VERSION}"
            )

    def publish(self, changes: Sequence[MemoryChange], *, base: int) -> list[int]:
        """Commit ``changes`` in one transaction, in revision order; their revisions.

        Refused with :class:`runtime.errors.PersistError` (nothing written; retry after a
        pull) when another node changed one of the items after revision ``base``, and with
        :class:`runtime.errors.SessionLeasedError` for a session whose lease this node held
        and lost. Watermarks merge instead: a mark never goes back.
        """
        if not changes:
            return []
        revs: list[int] = []
        with self._db.use() as conn, conn.transaction():
            # a node stuck holding the lock (partitioned mid-publish) must not stall the rest
            conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'")
            # writers commit in revision order (the module's docstring says why)
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('llamaffi_memory'))")
            self._fence(conn, changes)
            items = [c.id for c in changes if c.kind != "mark" and not c.id.startswith("mark:")]
            stale = conn.execute(
                "SELECT id FROM llamaffi_memory WHERE id = ANY(%s) AND rev > %s LIMIT 1",
                (items, base),
            ).fetchone()
            if stale is not None:
                raise PersistError(
                    f"memory {stale[0]} was changed on another node since this one read it; "
                    "nothing was written: retry (the next write reads it first)"
                )
            for change in changes:
                revs.append(self._upsert(conn, change))
        return revs

    def _fence(self, conn: Any, changes: Sequence[MemoryChange]) -> None:
        """Inside the publish: refuse it for a session whose lease this node held and lost
        (a node that woke from a pause must not write the memories of a session another
        node serves now)."""
        if self._leases is None:
            return
        for session in sorted({c.session for c in changes if c.session is not None}):
            token = self._leases.token_of(session)
            if token is not None and (lost := self._leases.check(conn, session, token)):
                raise lost

    def _upsert(self, conn: Any, change: MemoryChange) -> int:
        deleted = change.item is None
        item: dict[str, Any] | None = dict(change.item or {})
        if deleted:
            item = {"scrub": True} if change.scrub else None
        vector = None if change.embedding is None or deleted else vector_text(change.embedding)
        row = conn.execute(
            "INSERT INTO llamaffi_memory AS m (id, rev, session, kind, deleted, item, embedding,"
            " writer) VALUES (%s, nextval('llamaffi_memory_rev'), %s, %s, %s, %s::jsonb,"
            " %s::vector, %s) ON CONFLICT (id) DO UPDATE SET rev = EXCLUDED.rev,"
            " session = EXCLUDED.session, kind = EXCLUDED.kind, deleted = EXCLUDED.deleted,"
            # a watermark never goes back (a stale writer's lower mark keeps the higher one)
            " item = CASE WHEN m.kind = 'mark' AND NOT m.deleted AND NOT EXCLUDED.deleted"
            " AND (m.item->>'value')::bigint > (EXCLUDED.item->>'value')::bigint THEN m.item"
            " ELSE EXCLUDED.item END,"
            " embedding = EXCLUDED.embedding, writer = EXCLUDED.writer,"
            " written = now() RETURNING rev",
            (
                change.id,
                change.session,
                None if deleted and change.kind != "mark" else change.kind,
                deleted,
                None if item is None else json.dumps(item, allow_nan=False),
                vector,
                self.writer,
            ),
        ).fetchone()
        return int(row[0])

    def touch(self, times: Mapping[str, float]) -> None:
        """Record items' last access times (each only moves forward), in one transaction."""
        if not times:
            return
        rows = sorted(times.items())
        with self._db.use() as conn, conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'")
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('llamaffi_memory_access'))")
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO llamaffi_memory_access AS a (id, accessed, arev) VALUES"
                    " (%s, %s, nextval('llamaffi_memory_arev')) ON CONFLICT (id) DO UPDATE SET"
                    " accessed = EXCLUDED.accessed, arev = EXCLUDED.arev"
                    " WHERE a.accessed < EXCLUDED.accessed",
                    rows,
                )

    def top(self) -> tuple[int, int]:
        """The newest item revision and access revision stored (0 when none)."""
        with self._db.use() as conn:
            row = conn.execute(
                "SELECT (SELECT coalesce(max(rev), 0) FROM llamaffi_memory),"
                " (SELECT coalesce(max(arev), 0) FROM llamaffi_memory_access)"
            ).fetchone()
        return int(row[0]), int(row[1])

    def touches(self, after: int, limit: int) -> list[tuple[int, str, float]]:
        """Up to ``limit`` access times recorded after access revision ``after``, in order."""
        with self._db.use() as conn:
            rows = conn.execute(
                "SELECT arev, id, accessed FROM llamaffi_memory_access WHERE arev > %s"
                " ORDER BY arev LIMIT %s",
                (after, limit),
            ).fetchall()
        return [(int(r), str(i), float(a)) for r, i, a in rows]

    def changes(self, after: int, limit: int) -> list[tuple[int, MemoryChange]]:
        """Up to ``limit`` changes after revision ``after``, in revision order."""
        with self._db.use() as conn:
            rows = conn.execute(
                "SELECT rev, id, session, kind, deleted, item, embedding::text "
                "FROM llamaffi_memory WHERE rev > %s ORDER BY rev LIMIT %s",
                (after, limit),
            ).fetchall()
        out: list[tuple[int, MemoryChange]] = []
        for rev, item_id, session, kind, deleted, item, vector in rows:
            scrub = bool(deleted and isinstance(item, dict) and item.get("scrub"))
            change = MemoryChange(
                id=str(item_id),
                session=session,
                kind=kind,
                item=None if deleted else item,
                embedding=None if vector is None else vector_bytes(vector),
                scrub=scrub,
            )
            out.append((int(rev), change))
        return out
