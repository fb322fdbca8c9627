"""The runtime's PostgreSQL database (psycopg 3; the ``cluster`` extra): one connection,
:class:`PgDatabase`, shared by the journals (:mod:`runtime.storage.postgres`), the leases and
manifest pointers (:mod:`runtime.storage.leases`) and the shared memory
(:mod:`runtime.storage.pgmemory`), and the schema of their tables.

Tables (created on first use; the schema version is checked on every open)::

    llamaffi_schema (component text PRIMARY KEY, version int)
    llamaffi_journal (
        session  text, seq bigint,      -- PRIMARY KEY (session, seq): the total order
        segment  int,  sealed boolean,  -- segment_entries per segment (indexed with session);
                                    -- retention drops sealed segments
        n_tokens int,                   -- the exact tokens are in the payload; their count here
        payload  jsonb,                 -- runtime.journal.Entry.to_payload(), tokens included
        written  timestamptz            -- the server's time of the append (expiry counts from it)
    )
    llamaffi_lease (session text PRIMARY KEY, owner text, incarnation text, address text,
                    token bigint, expires timestamptz)      -- runtime.storage.leases
    llamaffi_manifest (session text PRIMARY KEY, generation bigint, token bigint)
                                                  -- each session's live KV manifest

Durability: an append is one transaction (a per-session advisory lock, ``max(seq) + 1``, the
INSERT, COMMIT) on a connection with ``synchronous_commit = on``: it returns only once the
commit's WAL is flushed on the primary, so an acknowledged entry survives a crash of the
server. With synchronous standbys configured, ``on`` also waits for their flush; a deployment
that must survive the loss of the primary's disk sets ``synchronous_standby_names`` (or
``remote_apply`` for read-your-writes on a standby). ``off`` or ``local`` with standbys
would break the contract: never lower it for this table.

Reconnect: the database's connection is made again when it was lost (the server restarted,
a network cut), by the next call that needs it, once per call. The call that finds it lost
raises :class:`runtime.errors.PersistError` (retry), as does every call while the server is
away; nothing is retried inside a call, so a request never waits on a loop. A reconnect
never weakens fencing: each write checks the lease in its own transaction, on whichever
connection it runs, and an append cut during its ``COMMIT`` closes its journal (its outcome is
unknown: the session is read again from the table).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from runtime.errors import ClosedError, JournalError, PersistError

logger = logging.getLogger(__name__)

__all__ = ["CONNECT_TIMEOUT_S", "SCHEMA_VERSION", "PgDatabase", "connect", "ensure_schema"]

#: The version of the tables below; an open of a database with another version is refused.
SCHEMA_VERSION = 2
#: Seconds a connection attempt may take unless the URL sets ``connect_timeout``: a reconnect
#: runs on a request's path, so it must be bounded.
CONNECT_TIMEOUT_S = 5
_COMPONENT = "journal"

_DDL = """
CREATE TABLE IF NOT EXISTS llamaffi_schema (
    component text PRIMARY KEY,
    version   integer NOT NULL
);
CREATE TABLE IF NOT EXISTS llamaffi_journal (
    session  text    NOT NULL,
    seq      bigint  NOT NULL CHECK (seq >= 0),
    segment  integer NOT NULL,
    sealed   boolean NOT NULL DEFAULT false,
    n_tokens integer NOT NULL,
    payload  jsonb   NOT NULL,
    written  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session, seq)
);
CREATE INDEX IF NOT EXISTS llamaffi_journal_segment ON llamaffi_journal (session, segment);
CREATE TABLE IF NOT EXISTS llamaffi_lease (
    session     text        PRIMARY KEY,
    owner       text        NOT NULL,
    incarnation text        NOT NULL,
    address text        NOT NULL DEFAULT '',
    token   bigint      NOT NULL CHECK (token > 0),
    expires timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS llamaffi_manifest (
    session    text   PRIMARY KEY,
    generation bigint NOT NULL,
    token      bigint NOT NULL
);
"""


#: libpq settings a URL gets unless it names them: a bounded connection attempt (a reconnect
#: runs on a request's path), and TCP keepalives, so that a server that vanished (a cut
#: network, a dead host) fails the call waiting on it within about a minute, not the
#: kernel's two hours. A Unix socket ignores the keepalives.
CONNECTION_DEFAULTS: dict[str, int] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def connect(url: str) -> Any:
    """A psycopg connection to ``url`` with ``synchronous_commit = on`` (see the module's
    docstring for why) and :data:`CONNECTION_DEFAULTS` unless the URL says otherwise."""
    try:
        import psycopg  # the cluster extra; imported only when PostgreSQL is used
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "a postgresql:// store needs the cluster extra: pip install '.[cluster]'"
        ) from exc

    given = psycopg.conninfo.conninfo_to_dict(url)
    defaults = {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}
    if defaults:
        url = psycopg.conninfo.make_conninfo(url, **defaults)
    conn = psycopg.connect(url, autocommit=True)
    try:
        conn.execute("SET synchronous_commit = on")
    except BaseException:
        conn.close()
        raise
    return conn


def ensure_schema(conn: Any) -> None:
    """Create the tables on first use; refuse a database whose schema version differs."""
    with conn.transaction():
        # one creator at a time (CREATE TABLE IF NOT EXISTS races on the catalog)
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('llamaffi_schema'))")
        conn.execute(_DDL)
        row = conn.execute(
            "SELECT version FROM llamaffi_schema WHERE component = %s", (_COMPONENT,)
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO llamaffi_schema (component, version) VALUES (%s, %s)",
                (_COMPONENT, SCHEMA_VERSION),
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise JournalError(
                f"the database's journal schema is version {row[0]}; this runtime reads "
                f"version {SCHEMA_VERSION}"
            )


class PgDatabase:
    """One connection to the database (``synchronous_commit = on``), shared by a runtime's
    journals, leases and manifest pointers; :attr:`lock` serialises its use (psycopg
    connections are not for two threads at once). The schema is checked on open.

    A lost connection is made again by the next call that needs it (:meth:`use`,
    :meth:`conn`), with one attempt per call; while the server is away, and in the call that
    finds the connection lost, :meth:`use` raises :class:`runtime.errors.PersistError`
    (retry). Nothing is retried inside a call.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.RLock()
        self._closed = False
        #: connections made again after one was lost (for logs and tests)
        self.reconnects = 0
        self._conn: Any = connect(url)
        try:
            ensure_schema(self._conn)
        except BaseException:
            self._conn.close()
            raise

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def describe(self) -> str:
        """``postgresql://host/db``: the database without credentials, for messages."""
        parts = urlsplit(self.url)
        return f"postgresql://{parts.hostname or ''}{parts.path}"

    def conn(self) -> Any:
        """The connection (hold :attr:`lock`), made again first if it was lost (one attempt;
        :class:`PersistError` when the server cannot be reached); :class:`ClosedError` after
        :meth:`close`. Within a transaction it is the transaction's own: a connection is
        only replaced once it is broken, and a broken one has no transaction left."""
        if self._closed:
            raise ClosedError("the database connection is closed")
        if self._conn is None or self._conn.broken or self._conn.closed:
            self._reconnect()
        return self._conn

    def _reconnect(self) -> None:
        import psycopg

        old, self._conn = self._conn, None
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
        try:
            self._conn = connect(self.url)
        except psycopg.OperationalError as exc:
            raise self.unavailable(exc) from exc
        self.reconnects += 1
        logger.warning("reconnected to %s", self.describe())

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        """Hold :attr:`lock` and yield the connection (see :meth:`conn`). A connection lost
        meanwhile, or a server that refuses it (restarting, out of connections), raises
        :class:`PersistError`; the next call connects again."""
        import psycopg

        with self.lock:
            conn = self.conn()
            try:
                yield conn
            except psycopg.OperationalError as exc:
                raise self.unavailable(exc) from exc

    def unavailable(self, exc: BaseException) -> PersistError:
        """The retryable error of a call the server did not answer."""
        detail = str(exc).strip().splitlines()
        return PersistError(
            f"PostgreSQL {self.describe()} is unavailable ({detail[0] if detail else exc!r}): "
            "nothing was acknowledged; retry (the next call connects again)"
        )

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self.lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
