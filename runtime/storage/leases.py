"""Session leases with fencing tokens, in PostgreSQL: which node serves a session now.

A node serves a session only while it holds the session's lease: one row of
``llamaffi_lease`` with the owner's node id, its advertised address, an expiry and a token
that grows by one at every acquisition (Martin Kleppmann's fencing token). The protocol:

* :meth:`Leases.acquire` takes the row when it is free, expired, or this node's own (a new
  token each time); while another node's lease is live it raises
  :class:`runtime.errors.SessionLeasedError` naming that node.
* A background thread renews every held lease each ``ttl / 3`` seconds, on a connection of
  its own (made again by the next renewal after it was lost); a lease whose token
  changed meanwhile (another node took it over after this one paused past the expiry) is
  dropped, and later writes with its token are refused.
* Every journal append and every manifest switch calls :meth:`Leases.check` inside its own
  transaction: the row must still carry the writer's owner and token. The check locks the row
  ``FOR SHARE``, so a takeover's ``UPDATE`` waits for a write in flight to commit, and a write
  after the takeover sees the new token and is refused. A write is never accepted from a node
  whose lease another node took, however long that node was paused.
* :meth:`Leases.release` lets a lease go when its session is suspended: the lease is kept
  one renewal period more (so that the suspended session's last checkpoint, written in the
  background, commits under it), then its expiry becomes now. The token stays in the row, so
  the next owner's is larger.

The manifest pointer (:class:`PointerBlobs`) puts the same fence on KV checkpoints: a
manifest in the blob store is live only once ``llamaffi_manifest`` points at its generation,
switched in a transaction that checks the lease.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from runtime.errors import ArgumentError, PersistError, SessionLeasedError
from runtime.storage.pgdb import PgDatabase
from runtime.storage.postgres import lease_lost

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LEASE_TTL_S", "Leases", "PointerBlobs", "default_node_id"]

#: Seconds a lease lasts without renewal: a dead node's sessions move after this.
DEFAULT_LEASE_TTL_S = 10.0
#: TTLs an unused lease is kept (and renewed) before it is let go: a suspended session's last
#: checkpoint, written in the background, commits under it first.
IDLE_TTLS = 1.0
_NODE_RE = re.compile(r"[A-Za-z0-9._:-]{1,200}")


def default_node_id() -> str:
    """``<host>-<pid>-<4 hex>``: unique per process, so two processes never share tokens."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass
class _Held:
    token: int
    holders: int  # journals (and deletes) using it now
    idle_since: float = 0.0  # monotonic time the last holder let go


class Leases:
    """This node's session leases in the shared database.

    Args:
        db: the shared connection.
        node_id: this node's id (unique per process: a restarted node is a new owner).
        address: the URL other nodes send a client to (``--advertise-url``; may be empty).
        ttl_s: how long a lease lasts without renewal.
    """

    def __init__(
        self, db: PgDatabase, node_id: str, *, address: str = "", ttl_s: float = DEFAULT_LEASE_TTL_S
    ) -> None:
        if not _NODE_RE.fullmatch(node_id):
            raise ArgumentError(
                f"node_id {node_id!r}: 1-200 characters of letters, digits, '.', '_', '-', ':'"
            )
        if not 0.5 <= ttl_s <= 3600:
            raise ArgumentError("the lease TTL must be 0.5-3600 seconds")
        self.db = db
        #: renewals have a connection of their own: a long query of a turn never delays them
        self._renew_db = PgDatabase(db.url)
        self.node_id = node_id
        #: this process: a second live process with the same node id is another owner
        self.incarnation = secrets.token_hex(8)
        self.address = address
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        #: several journals of one session share its lease
        self._held: dict[str, _Held] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()

    # -- taking and letting go -----------------------------------------------------------------

    def acquire(self, session_id: str) -> int:
        """The session's lease for this node (its token); :class:`SessionLeasedError` while
        another node's lease on it is live."""
        with self._lock:
            held = self._held.get(session_id)
            if held is not None:
                held.holders += 1
                return held.token
        with self.db.use() as conn:
            row = conn.execute(
                "INSERT INTO llamaffi_lease AS l "
                "(session, owner, incarnation, address, token, expires) "
                "VALUES (%s, %s, %s, %s, 1, now() + make_interval(secs => %s)) "
                "ON CONFLICT (session) DO UPDATE SET owner = EXCLUDED.owner, "
                "incarnation = EXCLUDED.incarnation, address = EXCLUDED.address, "
                "token = l.token + 1, expires = EXCLUDED.expires "
                "WHERE l.expires <= now() OR l.incarnation = EXCLUDED.incarnation "
                "RETURNING token",
                (session_id, self.node_id, self.incarnation, self.address, self.ttl_s),
            ).fetchone()
            if row is None:
                raise self.refusal(conn, session_id)
        token = int(row[0])
        with self._lock:
            held = self._held.get(session_id)
            if held is not None:  # another thread took it meanwhile: keep the newer token
                held.token = max(held.token, token)
                held.holders += 1
                return held.token
            self._held[session_id] = _Held(token, 1)
        logger.debug("lease on %s taken (token %d)", session_id, token)
        return token

    def release(self, session_id: str, token: int, *, now: bool = False) -> None:
        """One holder of the lease is done. After the last, the lease is let go at the
        renewal after :data:`IDLE_TTLS` TTLs (its session's background checkpoint commits
        under it meanwhile), or at once with ``now`` (the session was deleted). The row stays,
        with its token, so the next owner's token is larger."""
        with self._lock:
            held = self._held.get(session_id)
            if held is None or held.token != token:
                return
            held.holders = max(0, held.holders - 1)
            if held.holders > 0:
                return
            if not now:
                held.idle_since = time.monotonic()
                return
            del self._held[session_id]
        self._let_go(session_id, token)

    def _let_go(self, session_id: str, token: int) -> None:
        try:
            with self._renew_db.lock:
                if self._renew_db.closed:
                    return
                with self._renew_db.use() as conn:
                    conn.execute(
                        "UPDATE llamaffi_lease SET expires = now() "
                        "WHERE session = %s AND incarnation = %s AND token = %s",
                        (session_id, self.incarnation, token),
                    )
        except Exception as exc:  # it expires by itself
            logger.warning("could not release the lease on %s: %s", session_id, exc)

    def check(self, conn: Any, session_id: str, token: int) -> SessionLeasedError | None:
        """Inside the caller's transaction on ``conn``: ``None`` if this node still holds the
        session's lease with ``token`` (the row is then locked until the caller commits), else
        the error to raise (the lease is dropped here)."""
        row = conn.execute(
            "SELECT 1 FROM llamaffi_lease WHERE session = %s AND incarnation = %s "
            "AND token = %s FOR SHARE",
            (session_id, self.incarnation, token),
        ).fetchone()
        if row is not None:
            return None
        with self._lock:
            held = self._held.get(session_id)
            if held is not None and held.token == token:
                del self._held[session_id]
        return self.refusal(conn, session_id)

    def token_of(self, session_id: str) -> int | None:
        """The token of the session's lease if this node holds it (used or not), else
        ``None``; takes nothing."""
        with self._lock:
            held = self._held.get(session_id)
            return None if held is None else held.token

    def refusal(self, conn: Any, session_id: str) -> SessionLeasedError:
        """The error naming the session's current owner (read on ``conn``)."""
        row = conn.execute(
            "SELECT owner, address, extract(epoch FROM expires) FROM llamaffi_lease "
            "WHERE session = %s",
            (session_id,),
        ).fetchone()
        if row is None:
            return SessionLeasedError(
                f"session {session_id!r}: this node does not hold its lease any more (the "
                "session was deleted or moved); nothing was written, retry"
            )
        return lease_lost(session_id, str(row[0]), str(row[1]), float(row[2]))

    # -- reading ---------------------------------------------------------------------------------

    def held(self) -> dict[str, int]:
        """The sessions whose lease this node holds, with their tokens."""
        with self._lock:
            return {sid: held.token for sid, held in self._held.items()}

    def info(self, session_id: str) -> dict[str, Any] | None:
        """The session's lease row: ``owner``, ``address``, ``token``, ``expires`` (Unix
        time) and ``live``; ``None`` when it has none."""
        with self.db.use() as conn:
            row = conn.execute(
                "SELECT owner, address, token, extract(epoch FROM expires), "
                "expires > now() FROM llamaffi_lease WHERE session = %s",
                (session_id,),
            ).fetchone()
        if row is None:
            return None
        return {
            "owner": str(row[0]),
            "address": str(row[1]),
            "token": int(row[2]),
            "expires": float(row[3]),
            "live": bool(row[4]),
        }

    # -- renewal ---------------------------------------------------------------------------------

    def renew(self) -> list[str]:
        """Extend every held lease by the TTL (one statement); the sessions whose lease was
        lost (taken over), which are dropped."""
        held = self.held()
        if not held:
            return []
        sids, tokens = list(held), [held[s] for s in held]
        with self._renew_db.use() as conn:  # after a lost connection: a new one
            rows = conn.execute(
                "UPDATE llamaffi_lease AS l SET expires = now() + make_interval(secs => %s) "
                "FROM unnest(%s::text[], %s::bigint[]) AS h(session, token) "
                "WHERE l.session = h.session AND l.token = h.token "
                "AND l.incarnation = %s RETURNING l.session",
                (self.ttl_s, sids, tokens, self.incarnation),
            ).fetchall()
        kept = {str(r[0]) for r in rows}
        lost = [s for s in sids if s not in kept]
        idle: list[tuple[str, int]] = []
        now = time.monotonic()
        with self._lock:
            for sid in lost:
                held_now = self._held.get(sid)
                if held_now is not None and held_now.token == held[sid]:
                    del self._held[sid]
            for sid, h in list(self._held.items()):
                if h.holders == 0 and now - h.idle_since >= IDLE_TTLS * self.ttl_s:
                    del self._held[sid]
                    idle.append((sid, h.token))
        for sid in lost:
            logger.warning("lease on session %s was lost to another node", sid)
        for sid, token in idle:
            self._let_go(sid, token)
        return lost

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as exc:  # the database is away: retry; writes check anyway
                logger.warning("lease renewal failed: %s", exc)

    def close(self) -> None:
        """Stop renewing and let every held lease go (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            held, self._held = self._held, {}
        for sid, h in held.items():
            self._let_go(sid, h.token)
        self._renew_db.close()


class PointerBlobs:
    """A :class:`runtime.storage.BlobStore` whose manifests are live only through a pointer
    row in PostgreSQL, switched under the session's lease.

    Chunks and manifests are stored in ``inner`` (an S3 bucket) as before;
    :meth:`switch_manifest` first puts the manifest object, then in one transaction checks
    this node's lease on the session (:meth:`Leases.check`) and points
    ``llamaffi_manifest`` at the new generation. A node that lost the lease has the switch
    refused (:class:`runtime.errors.SessionLeasedError`), and its manifest object is never
    read: :meth:`generations` lists only those at or below the pointer.

    While the object store cannot be reached, a reader sees the pointer's manifest as absent
    (a resume replays the journal instead, and nothing is quarantined), and :meth:`generations`
    still names the pointer's generation, so that a later checkpoint never reuses its number;
    writes raise :class:`runtime.errors.PersistError` (a checkpoint is retried later).
    """

    def __init__(self, inner: Any, db: PgDatabase, leases: Leases) -> None:
        self.inner = inner
        self.db = db
        self.leases = leases
        self.readonly: bool = inner.readonly
        self.fetch_ahead: int = inner.fetch_ahead

    def _pointer(self, session_id: str) -> int | None:
        with self.db.use() as conn:
            row = conn.execute(
                "SELECT generation FROM llamaffi_manifest WHERE session = %s", (session_id,)
            ).fetchone()
        return None if row is None else int(row[0])

    def switch_manifest(self, session_id: str, generation: int, data: bytes) -> None:
        """Put the manifest, then point at it under this node's lease (refused when this
        node does not hold it, and never moved back to an older generation)."""
        token = self.leases.token_of(session_id)
        with self.db.use() as conn:  # checked before any object is written
            if token is None:
                raise self.leases.refusal(conn, session_id)
            lost = self.leases.check(conn, session_id, token)
        if lost is not None:
            raise lost
        if not self.inner.create_manifest(session_id, generation, data):
            # another writer (the node this one lost the session to) has this generation
            raise SessionLeasedError(
                f"manifest {generation} of session {session_id!r} was written by another "
                "node; this node's checkpoint is not published"
            )
        with self.db.use() as conn, conn.transaction():
            lost = self.leases.check(conn, session_id, token)
            if lost is not None:
                raise lost
            conn.execute(
                "INSERT INTO llamaffi_manifest AS m (session, generation, token) "
                "VALUES (%s, %s, %s) ON CONFLICT (session) DO UPDATE "
                "SET generation = EXCLUDED.generation, token = EXCLUDED.token "
                "WHERE m.generation < EXCLUDED.generation",
                (session_id, generation, token),
            )

    def generations(self, session_id: str) -> list[int]:
        """The session's manifest generations at or below its pointer, newest first; the
        pointer's alone while the object store cannot be listed (it is stored: a pointer is
        switched only after its manifest object is)."""
        pointer = self._pointer(session_id)
        if pointer is None:
            return []
        try:
            stored = self.inner.generations(session_id)
        except PersistError as exc:
            logger.warning("session %s: %s; only manifest %d is known", session_id, exc, pointer)
            return [pointer]
        return [g for g in stored if g <= pointer]

    def sessions(self) -> list[str]:
        """The sessions with a live manifest pointer, sorted."""
        with self.db.use() as conn:
            rows = conn.execute("SELECT session FROM llamaffi_manifest").fetchall()
        return sorted(str(r[0]) for r in rows)

    def delete_session(self, session_id: str) -> None:
        """Drop the pointer, then every manifest object."""
        with self.db.use() as conn:
            conn.execute("DELETE FROM llamaffi_manifest WHERE session = %s", (session_id,))
        self.inner.delete_session(session_id)

    # -- the rest is the inner store's ---------------------------------------------------------

    def put_all(self, blobs: Sequence[tuple[str, Callable[[BinaryIO], int]]]) -> list[int]:
        """See :meth:`runtime.storage.BlobStore.put_all`."""
        sizes: list[int] = self.inner.put_all(blobs)
        return sizes

    def get(self, key: str) -> memoryview:
        """See :meth:`runtime.storage.BlobStore.get`."""
        view: memoryview = self.inner.get(key)
        return view

    def has(self, key: str) -> bool:
        """See :meth:`runtime.storage.BlobStore.has`."""
        return bool(self.inner.has(key))

    def list_keys(self) -> Iterator[str]:
        """See :meth:`runtime.storage.BlobStore.list_keys`."""
        keys: Iterator[str] = self.inner.list_keys()
        return keys

    def delete(self, key: str) -> None:
        """See :meth:`runtime.storage.BlobStore.delete`."""
        self.inner.delete(key)

    def sync_deletes(self, keys: Collection[str]) -> None:
        """See :meth:`runtime.storage.BlobStore.sync_deletes`."""
        self.inner.sync_deletes(keys)

    def quarantine(self, key: str, reason: str) -> None:
        """See :meth:`runtime.storage.BlobStore.quarantine`."""
        self.inner.quarantine(key, reason)

    def describe(self, key: str) -> str:
        """See :meth:`runtime.storage.BlobStore.describe`."""
        return str(self.inner.describe(key))

    def describe_manifest(self, session_id: str, generation: int) -> str:
        """See :meth:`runtime.storage.BlobStore.describe_manifest`."""
        return str(self.inner.describe_manifest(session_id, generation))

    def get_manifest(self, session_id: str, generation: int, max_size: int) -> bytes:
        """See :meth:`runtime.storage.BlobStore.get_manifest`; ``FileNotFoundError`` while
        the object store cannot be reached: readers skip the manifest (the journal rebuilds
        the session), and never take it for damage."""
        try:
            return bytes(self.inner.get_manifest(session_id, generation, max_size))
        except PersistError as exc:
            where = self.describe_manifest(session_id, generation)
            raise FileNotFoundError(f"{where} cannot be read now: {exc}") from exc

    def delete_manifest(self, session_id: str, generation: int) -> None:
        """See :meth:`runtime.storage.BlobStore.delete_manifest` (never the pointed one)."""
        if generation != self._pointer(session_id):
            self.inner.delete_manifest(session_id, generation)

    def quarantine_manifest(self, session_id: str, generation: int, reason: str) -> None:
        """See :meth:`runtime.storage.BlobStore.quarantine_manifest`."""
        self.inner.quarantine_manifest(session_id, generation, reason)

    def close(self) -> None:
        """Close the inner store."""
        self.inner.close()
