"""The journal on PostgreSQL: :class:`PgJournal` (a :class:`runtime.storage.JournalBackend`)
and :class:`PgJournals` (the :class:`runtime.storage.JournalStore` of a runtime, each
session's writes fenced by its lease, :mod:`runtime.storage.leases`), in the
``llamaffi_journal`` table of :mod:`runtime.storage.pgdb`.

Fencing: a journal opened by :class:`PgJournals` holds its session's lease token, and every
append checks, in its own transaction, that the lease row still carries that token
(``SELECT ... FOR SHARE``, so a takeover's ``UPDATE`` of the row waits for the append's
commit, or the append waits for the takeover's and is refused). A node that lost the lease
(paused, partitioned) therefore has every later append refused
(:class:`runtime.errors.SessionLeasedError`), and its journal closes itself.

Order: the advisory lock serialises appends of one session across nodes and the primary key
refuses a duplicate seq, so entries are numbered ``0, 1, 2, ...`` without gaps. Reads are one
index range scan on the primary key from the first seq a resume replays (``seq >= $1``), so a
resume costs what it replays, never the session's age.

Retention is the local one's: :meth:`PgJournal.rotate` seals the entries so far (one segment),
:meth:`PgJournal.drop_segments_before` deletes whole sealed segments older than a seq unless
they hold an entry in ``keep``, and never the newest sealed segment while nothing follows it
(the numbering resumes from its last seq). A dropped entry raises
:class:`runtime.errors.JournalCompactedError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from runtime.errors import (
    ClosedError,
    JournalCompactedError,
    JournalError,
    SessionLeasedError,
)
from runtime.journal import DEFAULT_SEGMENT_ENTRIES
from runtime.journal.record import Entry
from runtime.layout import validate_session_id
from runtime.storage.pgdb import PgDatabase

if TYPE_CHECKING:
    from runtime.storage.leases import Leases

logger = logging.getLogger(__name__)

__all__ = ["PgJournal", "PgJournals", "lease_lost"]


class PgJournal:
    """One session's journal in the ``llamaffi_journal`` table.

    Args:
        db: a ``postgresql://`` URL (a connection of its own, closed with the journal) or a
            shared :class:`PgDatabase`.
        session_id: the session.
        readonly: refuse appends and retention.
        leases: check every append against the session's lease (the token held when the
            journal was opened); ``None``: no fencing (one writer known by other means).
        segment_entries: entries per sealed segment (the unit retention drops), as locally.
    """

    def __init__(
        self,
        db: str | PgDatabase,
        session_id: str,
        *,
        readonly: bool = False,
        leases: Leases | None = None,
        segment_entries: int = DEFAULT_SEGMENT_ENTRIES,
    ) -> None:
        self.session_id = validate_session_id(session_id)
        self.readonly = readonly
        self._segment_entries = max(1, segment_entries)
        self._own_db = isinstance(db, str)
        self._database = PgDatabase(db) if isinstance(db, str) else db
        self._lock = self._database.lock
        self._conn: Any = self._database
        self._leases = leases
        self._token = 0
        if leases is not None and not readonly:
            try:
                self._token = leases.acquire(self.session_id)
            except BaseException:
                self._close_db()
                raise

    # -- lifetime -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._conn is None

    def close(self) -> None:
        """Close the journal (release its lease; close its own connection); safe to call
        twice."""
        with self._lock:
            if self._conn is None:
                return
            self._conn = None
        if self._token and self._leases is not None:
            self._leases.release(self.session_id, self._token)
        self._close_db()

    def _close_db(self) -> None:
        if self._own_db:
            self._database.close()

    def __enter__(self) -> PgJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._conn is None:
            raise ClosedError(f"journal of session {self.session_id} is closed")

    @contextlib.contextmanager
    def _use(self) -> Iterator[Any]:
        """The database's connection (:meth:`PgDatabase.use`) while the journal is open."""
        with self._lock:
            self._require_open()
            with self._database.use() as conn:
                yield conn

    def _one(self, sql: str, *params: Any) -> tuple[Any, ...]:
        with self._use() as conn:
            row: tuple[Any, ...] = conn.execute(sql, (self.session_id, *params)).fetchone()
            return row

    # -- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """The next entry's seq (dropped entries still count)."""
        row = self._one("SELECT max(seq) FROM llamaffi_journal WHERE session = %s")
        return 0 if row[0] is None else int(row[0]) + 1

    @property
    def first_seq(self) -> int:
        """The oldest entry still stored."""
        row = self._one("SELECT min(seq) FROM llamaffi_journal WHERE session = %s")
        return 0 if row[0] is None else int(row[0])

    @property
    def compacted(self) -> bool:
        """Whether retention dropped any entry (fewer rows than the numbering)."""
        row = self._one("SELECT count(*), max(seq) FROM llamaffi_journal WHERE session = %s")
        return row[1] is not None and int(row[0]) < int(row[1]) + 1

    @property
    def n_segments(self) -> int:
        """Sealed segments kept."""
        row = self._one(
            "SELECT count(DISTINCT segment) FROM llamaffi_journal WHERE session = %s AND sealed"
        )
        return int(row[0])

    @property
    def n_tokens(self) -> int:
        """Total tokens of all stored entries."""
        row = self._one("SELECT sum(n_tokens) FROM llamaffi_journal WHERE session = %s")
        return 0 if row[0] is None else int(row[0])

    def __getitem__(self, index: int) -> Entry:
        n = len(self)
        seq = index + n if index < 0 else index
        if not 0 <= seq < n:
            raise IndexError(f"journal entry {index} out of range (0..{n - 1})")
        row = self._one("SELECT payload FROM llamaffi_journal WHERE session = %s AND seq = %s", seq)
        if row is None:
            raise self._dropped(seq)
        return _entry(row[0])

    def _dropped(self, seq: int) -> JournalCompactedError:
        return JournalCompactedError(
            f"journal of session {self.session_id}: entry {seq} was removed by journal retention"
        )

    def iter_from(self, seq: int) -> Iterator[Entry]:
        """Entries ``seq``, ``seq + 1``, ... up to the end as of this call, in order: one range
        scan of the primary key (gaps left by retention are skipped, as locally)."""
        seq = max(seq, 0)
        if seq < self.first_seq:
            raise self._dropped(seq)
        with self._use() as conn:
            rows = conn.execute(
                "SELECT payload FROM llamaffi_journal WHERE session = %s AND seq >= %s "
                "ORDER BY seq",
                (self.session_id, seq),
            ).fetchall()
        for row in rows:
            yield _entry(row[0])

    def __iter__(self) -> Iterator[Entry]:
        return self.iter_from(self.first_seq)

    def tokens(self) -> list[int]:
        """All tokens of all stored entries, in order."""
        return [t for e in self for t in e.tokens]

    # -- writing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """:meth:`_use` for a write (refused on a read-only journal)."""
        with self._use() as conn:
            if self.readonly:
                raise JournalError(f"journal of session {self.session_id} was opened read-only")
            yield conn

    def _fence(self, db: Any) -> None:
        """Inside a write's transaction: refuse it unless this node still holds the
        session's lease with the journal's token; a refused journal closes itself (the pool
        then drops the session instead of serving its stale KV)."""
        if self._leases is None:
            return
        lost = self._leases.check(db, self.session_id, self._token)
        if lost is not None:
            self._conn = None
            self._token = 0
            raise lost

    def append(
        self,
        role: str,
        text: str,
        tokens: Sequence[int],
        meta: dict[str, Any] | None = None,
        *,
        created: float | None = None,
    ) -> Entry:
        """Append one entry; it has committed (``synchronous_commit = on``) when this
        returns. A refused append (too large, or fenced) commits nothing. Any other failure
        once the transaction began (the connection lost during ``COMMIT``:
        :class:`runtime.errors.PersistError`, retry) leaves the outcome unknown, so the
        journal closes itself: its session is then read again from the table, never
        guessed."""
        # a connection that cannot be made again fails before anything is sent: the journal
        # stays open, and its session resident
        with self._writing() as db:
            try:
                return self._append(db, role, text, tokens, meta, created)
            except (JournalError, SessionLeasedError):
                raise
            except BaseException:
                self._close_broken()
                raise

    def _close_broken(self) -> None:
        """Close after a write whose outcome is unknown, letting its lease go."""
        self._conn = None
        token, self._token = self._token, 0
        if token and self._leases is not None:
            self._leases.release(self.session_id, token)

    def _append(
        self,
        db: Any,
        role: str,
        text: str,
        tokens: Sequence[int],
        meta: dict[str, Any] | None,
        created: float | None,
    ) -> Entry:
        with db.transaction():
            self._fence(db)
            db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.session_id,))
            seq, segment = self._next_position(db)
            entry, payload = Entry.new(seq, role, text, tokens, meta, created)
            db.execute(
                "INSERT INTO llamaffi_journal (session, seq, segment, n_tokens, payload) "
                "VALUES (%s, %s, %s, %s, %s::jsonb)",
                (self.session_id, seq, segment, len(entry.tokens), payload.decode()),
            )
        return entry

    def _next_position(self, db: Any) -> tuple[int, int]:
        """The seq and segment of the next entry (inside the append's transaction): after the
        last entry, in its segment unless that one is sealed or holds ``segment_entries``
        entries, which seals it. Two index lookups, whatever the journal's age."""
        row = db.execute(
            "WITH last AS (SELECT seq, segment, sealed FROM llamaffi_journal WHERE session = %s"
            " ORDER BY seq DESC LIMIT 1) SELECT last.seq, last.segment, last.sealed,"
            " (SELECT min(seq) FROM llamaffi_journal j WHERE j.session = %s"
            " AND j.segment = last.segment) FROM last",
            (self.session_id, self.session_id),
        ).fetchone()
        if row is None:
            return 0, 0
        last, segment, sealed, first = int(row[0]), int(row[1]), bool(row[2]), int(row[3])
        if sealed:
            return last + 1, segment + 1
        if last + 1 - first >= self._segment_entries:
            db.execute(
                "UPDATE llamaffi_journal SET sealed = true WHERE session = %s AND segment = %s",
                (self.session_id, segment),
            )
            return last + 1, segment + 1
        return last + 1, segment

    def rotate(self) -> None:
        """Seal the entries so far (the next append starts a new segment)."""
        with self._writing() as db, db.transaction():
            self._fence(db)
            db.execute(
                "UPDATE llamaffi_journal SET sealed = true WHERE session = %s AND NOT sealed",
                (self.session_id,),
            )

    def drop_segments_before(self, seq: int, keep: Collection[int] = ()) -> int:
        """Delete sealed segments whose every entry is older than ``seq`` and that hold no
        entry in ``keep`` (the newest sealed one stays while nothing follows it); return the
        payload bytes freed."""
        with self._writing() as db, db.transaction():
            self._fence(db)  # a node that lost the session must not drop what it needs
            db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.session_id,))
            segments = db.execute(
                "SELECT segment, min(seq), max(seq), bool_and(sealed) FROM llamaffi_journal "
                "WHERE session = %s GROUP BY segment ORDER BY segment",
                (self.session_id,),
            ).fetchall()
            if not segments:
                return 0
            keep_last = bool(segments[-1][3])  # no unsealed entry follows
            sealed = [s for s in segments if s[3]]
            gone = []
            for i, (segment, first, last, _) in enumerate(sealed):
                newest = i == len(sealed) - 1
                needed = any(first <= k <= last for k in keep)
                if last + 1 > seq or needed or (keep_last and newest):
                    continue
                gone.append(segment)
            if not gone:
                return 0
            row = db.execute(
                "WITH d AS (DELETE FROM llamaffi_journal WHERE session = %s "
                "AND segment = ANY(%s) RETURNING octet_length(payload::text) AS n) "
                "SELECT coalesce(sum(n), 0) FROM d",
                (self.session_id, gone),
            ).fetchone()
            return int(row[0])


class PgJournals:
    """A :class:`runtime.storage.JournalStore` in the ``llamaffi_journal`` table, shared by
    every node on the database: a writable journal holds its session's lease
    (:meth:`runtime.storage.leases.Leases.acquire`, refused with
    :class:`runtime.errors.SessionLeasedError` while another live node holds it) and fences
    every append with it.

    Args:
        db: the shared connection.
        leases: this node's leases.
        segment_entries: entries per sealed segment.
    """

    def __init__(
        self, db: PgDatabase, leases: Leases, *, segment_entries: int = DEFAULT_SEGMENT_ENTRIES
    ) -> None:
        self.db = db
        self.leases = leases
        self.segment_entries = segment_entries

    def open(self, session_id: str, *, readonly: bool = False) -> PgJournal:
        """The session's journal (writable: with its lease)."""
        return PgJournal(
            self.db,
            session_id,
            readonly=readonly,
            leases=self.leases,
            segment_entries=self.segment_entries,
        )

    def _rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with self.db.use() as conn:
            rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
            return rows

    def exists(self, session_id: str) -> bool:
        """Whether the session has an entry."""
        return bool(
            self._rows(
                "SELECT 1 FROM llamaffi_journal WHERE session = %s LIMIT 1",
                validate_session_id(session_id),
            )
        )

    def sessions(self) -> list[str]:
        """Every session with an entry, sorted (one scan of the primary key's index)."""
        rows = self._rows("SELECT DISTINCT session FROM llamaffi_journal ORDER BY session")
        return [str(r[0]) for r in rows]

    def usage(self, session_ids: Sequence[str]) -> dict[str, tuple[int, float]]:
        """Payload bytes and the newest entry's time of each session (one query)."""
        if not session_ids:
            return {}
        rows = self._rows(
            "SELECT session, sum(octet_length(payload::text)), "
            "extract(epoch FROM max(written)) FROM llamaffi_journal "
            "WHERE session = ANY(%s) GROUP BY session",
            list(session_ids),
        )
        return {str(r[0]): (int(r[1]), float(r[2] or 0.0)) for r in rows}

    def delete(self, session_id: str) -> None:
        """Delete the session's journal and its manifest pointer, under its lease
        (:class:`runtime.errors.SessionLeasedError` when another node serves it). The lease
        row stays, let go, so a new session of the id gets a larger token."""
        sid = validate_session_id(session_id)
        token = self.leases.acquire(sid)
        try:
            with self.db.use() as conn, conn.transaction():
                lost = self.leases.check(conn, sid, token)
                if lost is not None:
                    raise lost
                conn.execute("DELETE FROM llamaffi_journal WHERE session = %s", (sid,))
                conn.execute("DELETE FROM llamaffi_manifest WHERE session = %s", (sid,))
        finally:
            self.leases.release(sid, token, now=True)  # the row stays: tokens only grow

    def total_bytes(self) -> int:
        """The journal table's size on the server (with its indexes)."""
        return int(self._rows("SELECT pg_total_relation_size('llamaffi_journal')")[0][0])

    def describe(self) -> str:
        """The database (without credentials)."""
        return f"{self.db.describe()} (table llamaffi_journal)"

    def close(self) -> None:
        """Nothing of its own (the runtime closes the database and the leases)."""


def lease_lost(session_id: str, owner: str, address: str, expires: float) -> SessionLeasedError:
    """The error of a write refused, or a session refused, because ``owner`` holds it."""
    where = f" at {address}" if address else ""
    return SessionLeasedError(
        f"session {session_id!r} is served by node {owner!r}{where}; nothing was written",
        owner=owner,
        address=address,
        expires=expires,
    )


def _entry(payload: Any) -> Entry:
    # psycopg decodes jsonb to Python objects; Entry.from_payload parses bytes
    raw = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    return Entry.from_payload(raw.encode() if isinstance(raw, str) else raw)
