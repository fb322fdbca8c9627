"""The cluster tier under faults, on real servers of this module's own (stopped and started
again here, so the shared ones are never disturbed):

* PostgreSQL restarted (killed, then started on its data directory) while clients chat:
  the turns it cuts fail with :class:`runtime.errors.PersistError`, which says to retry and
  which the server answers with 503 and ``Retry-After``; no acknowledged turn is lost; once
  it is back, the same :class:`Runtime` serves again (it connects again by itself), and its
  writes are still fenced by their lease.
* S3 stopped: turns go on (the journal is the truth), checkpoints fail and are taken again
  later; a resume on another node, with S3 still down, replays the journal; with S3 back,
  checkpoints are written and restored again.
* A chunk damaged in S3 is quarantined (moved aside with its reason, as the local store
  does) and the resume falls back to the journal.

Each test prints what it measured (``pytest -s``); nothing here passes or fails on a time.
"""

# ruff: noqa: F811 (pg_server and s3_server are fixtures imported from cluster_fixtures)

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runtime.app import Runtime, SessionLeasedError
from runtime.errors import PersistError
from runtime.server.chat_request import map_runtime_error
from runtime.session.checkpointer import CheckpointPolicy
from tests.runtime.cluster_fixtures import (  # noqa: F401 (fixtures)
    S3_BUCKET,
    RestartablePostgres,
    SeaweedS3,
    pg_server,
    s3_server,
)
from tests.runtime.memory_helpers import HashEmbedder

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 6}
TTL = 2.0
#: a checkpoint after every turn, in the background (as a busy server's would be)
EVERY_TURN = CheckpointPolicy(every_tokens=1, every_seconds=0.0, idle_seconds=0.0)
CLIENTS = 3
#: seconds PostgreSQL stays down: longer than a lease's TTL, so leases expire meanwhile
PG_DOWN_S = 1.5 * TTL
#: seconds a phase may take before the test gives up on it (never reached when it works)
PATIENCE_S = 45.0


@pytest.fixture
def kv_url(s3_server: SeaweedS3) -> str:
    """A fresh prefix in this module's bucket."""
    return f"s3://{S3_BUCKET}/faults-{secrets.token_hex(4)}"


@pytest.fixture
def servers_up(pg_server: RestartablePostgres, s3_server: SeaweedS3) -> Iterator[None]:
    """Whatever a test stopped is running again after it (for the next test)."""
    yield
    pg_server.start()
    s3_server.start()


def open_node(root: Path, name: str, db: str, kv: str, **kw: Any) -> Runtime:
    kw.setdefault("n_ctx", 1024)
    return Runtime.open(
        root / name,
        model="tiny",
        embedder=False,
        db=db,
        kv=kv,
        node_id=name,
        lease_ttl_s=TTL,
        journal_fsync=False,
        **kw,
    )


def sid() -> str:
    return f"s-{secrets.token_hex(4)}"


def journal_tokens(url: str, session: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(n_tokens), 0) FROM llamaffi_journal WHERE session = %s",
            (session,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def pointer(url: str, session: str) -> int | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT generation FROM llamaffi_manifest WHERE session = %s", (session,)
        ).fetchone()
    return None if row is None else int(row[0])


def assert_acknowledged(history: list[dict[str, Any]], acked: list[tuple[str, str]]) -> None:
    """Every acknowledged turn is in the history, in order, its reply right after it (turns
    that failed may be there too: one cut after its commit, or a user turn left unanswered)."""
    pos = 0
    for text, reply in acked:
        while pos < len(history) and not (
            history[pos]["role"] == "user" and history[pos]["text"] == text
        ):
            pos += 1
        assert pos < len(history), f"acknowledged turn {text!r} is not in the history"
        assert history[pos + 1]["role"] == "assistant"
        assert history[pos + 1]["text"] == reply
        pos += 2


# -- PostgreSQL restarted under load -----------------------------------------------------------


@dataclass
class Client:
    session: str
    acked: list[tuple[str, str]] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)
    failures: list[tuple[float, Exception]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acked_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for a in self.acked_at if a >= t)


def chat_until(rt: Runtime, client: Client, stop: threading.Event) -> None:
    """Chat in the client's session until ``stop``, recording what was acknowledged and what
    failed; a failed turn is retried after a short pause, as an HTTP client would."""
    n = 0
    while not stop.is_set():
        n += 1
        text = f"{client.session} says {n}"
        try:
            reply = rt.chat(client.session, text, **GREEDY)
        except Exception as exc:
            with client.lock:
                client.failures.append((time.monotonic(), exc))
            time.sleep(0.05)
            continue
        with client.lock:
            client.acked.append((text, reply.text))
            client.acked_at.append(time.monotonic())


def wait_for(what: str, done: Any) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not done():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def test_postgres_restarted_under_load_fails_turns_retryably_and_the_runtime_recovers(
    tmp_path: Path, pg_server: RestartablePostgres, kv_url: str, servers_up: None
) -> None:
    # room for every session's window: three turns that all wait for KV room would wait for
    # each other (the pool's ROOM_WAIT_S), which is not what this test is about
    rt = open_node(tmp_path, "A", pg_server.url, kv_url, checkpoint=EVERY_TURN, n_ctx=4096)
    clients = [Client(sid()) for _ in range(CLIENTS)]
    stop = threading.Event()
    threads = [
        threading.Thread(target=chat_until, args=(rt, c, stop), name=f"client-{i}")
        for i, c in enumerate(clients)
    ]
    try:
        for t in threads:
            t.start()
        wait_for("turns before the restart", lambda: all(c.acked_since(0) >= 2 for c in clients))
        # and checkpoints (S3, and the pointer in PostgreSQL) go on in the background
        wait_for("checkpoints", lambda: rt.stats()["snapshots"]["written"] >= CLIENTS)
        down_at = time.monotonic()
        pg_server.stop()  # killed: every connection is cut, in the middle of whatever it did
        time.sleep(PG_DOWN_S)
        up_at = time.monotonic()
        pg_server.start()
        wait_for("turns after the restart", lambda: all(c.acked_since(up_at) >= 3 for c in clients))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=PATIENCE_S)
    try:
        failures = [f for c in clients for f in c.failures]
        assert failures, "no turn failed while PostgreSQL was down"
        for _, exc in failures:  # one clear error, which says what to do
            assert isinstance(exc, PersistError), repr(exc)
            assert "retry" in str(exc)
        api = map_runtime_error(failures[0][1])
        assert api.status == 503 and api.code == "storage_unavailable"
        assert "Retry-After" in api.headers
        for c in clients:
            # once its turns went through again, none failed: the recovery is whole
            back = min(a for a in c.acked_at if a >= up_at)
            assert not [exc for t, exc in c.failures if t > back]
            assert_acknowledged(rt.history(c.session), c.acked)
        with psycopg.connect(pg_server.url) as conn:
            for c in clients:
                seqs = [
                    r[0]
                    for r in conn.execute(
                        "SELECT seq FROM llamaffi_journal WHERE session = %s ORDER BY seq",
                        (c.session,),
                    )
                ]
                assert seqs == list(range(len(seqs)))  # one gapless order
        # the same runtime, not reopened: a new session too, with its lease
        fresh = sid()
        rt.chat(fresh, "a session begun after the restart", **GREEDY)
        assert rt.session_info(fresh)["lease"]["owner"] == "A"
        first_fail = min(t for t, _ in failures)
        last_fail = max(t for t, _ in failures)
        first_back = min(a for c in clients for a in c.acked_at if a >= up_at)
        print(
            f"\nPostgreSQL down {up_at - down_at:.2f} s: {len(failures)} turns refused "
            f"(PersistError), from {first_fail - down_at:.2f} s to {last_fail - down_at:.2f} s "
            f"after the kill; first turn acknowledged {first_back - up_at:.2f} s after the "
            f"restart; {sum(len(c.acked) for c in clients)} turns acknowledged, all in the "
            "journal"
        )
    finally:
        rt.close()


def test_a_node_that_reconnected_is_still_fenced(
    tmp_path: Path, pg_server: RestartablePostgres, kv_url: str, servers_up: None
) -> None:
    """A connection made again carries no lease of its own: A's journal keeps the token it
    had, and its append after the restart is checked against the lease row like any other.
    B took the session over while A was cut off, so A is refused."""
    a = open_node(tmp_path, "A", pg_server.url, kv_url)
    b = open_node(tmp_path, "B", pg_server.url, kv_url)
    try:
        s = sid()
        a.chat(s, "before the restart, on A", **GREEDY)
        pg_server.stop()
        pg_server.start()
        # A's lease runs out (as if A stayed cut off past its TTL), and B takes the session:
        # B's first call finds its own connection cut, and A's renewal thread, once it has
        # connected again, may renew the lease before B's next call (then it is expired again)
        deadline = time.monotonic() + PATIENCE_S
        while True:
            with psycopg.connect(pg_server.url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE llamaffi_lease SET expires = now() - interval '1 second' "
                    "WHERE session = %s",
                    (s,),
                )
            try:
                b.chat(s, "B took over", **GREEDY)
                break
            except (PersistError, SessionLeasedError):
                assert time.monotonic() < deadline, "B never took the session over"
        refused: list[Exception] = []
        for _ in range(2):  # the same for A, whose second call is fenced
            try:
                a.chat(s, "A after the restart", **GREEDY)
            except (PersistError, SessionLeasedError) as exc:
                refused.append(exc)
                if isinstance(exc, SessionLeasedError):
                    break
        assert refused and isinstance(refused[-1], SessionLeasedError)
        assert refused[-1].owner == "B"
        users = [h["text"] for h in b.history(s) if h["role"] == "user"]
        assert users == ["before the restart, on A", "B took over"]  # A's turn is nowhere
    finally:
        a.close()
        b.close()


# -- S3 down -----------------------------------------------------------------------------------


def test_with_s3_down_turns_go_on_and_a_resume_replays_the_journal(
    tmp_path: Path,
    pg_server: RestartablePostgres,
    s3_server: SeaweedS3,
    kv_url: str,
    servers_up: None,
) -> None:
    s = sid()
    a = open_node(tmp_path, "A", pg_server.url, kv_url, checkpoint=EVERY_TURN)
    try:
        a.chat(s, "My dog is called Biscuit.", **GREEDY)
        a.checkpoint(s)
        live = pointer(pg_server.url, s)
        assert live is not None
        s3_server.stop()
        failed = a.stats()["snapshots"]["failed"]
        start = time.monotonic()
        for text in ("She is three years old.", "She likes the beach."):
            a.chat(s, text, **GREEDY)  # the journal is in PostgreSQL: the turn goes through
        turns_s = time.monotonic() - start
        # their checkpoints, in the background, were tried and failed
        wait_for("a failed checkpoint", lambda: a.stats()["snapshots"]["failed"] > failed)
        with pytest.raises(PersistError, match="retry"):
            a.checkpoint(s)
        assert pointer(pg_server.url, s) == live  # nothing half-published
        history = a.history(s)
    finally:
        a.close()  # its final checkpoint fails too (logged); the lease is let go

    start = time.monotonic()
    b = open_node(tmp_path, "B", pg_server.url, kv_url, checkpoint=EVERY_TURN)
    open_s = time.monotonic() - start
    try:
        assert b.history(s) == history
        before = journal_tokens(pg_server.url, s)
        reply = b.chat(s, "What is my dog called?", **GREEDY)
        assert reply.resumed is not None and reply.resumed.source == "journal"
        assert reply.resumed.restored_tokens == 0
        assert reply.resumed.n_tokens == reply.resumed.replayed_tokens == before
        assert b.session_info(s)["window_tokens"] == journal_tokens(pg_server.url, s)
        assert [h["text"] for h in b.history(s) if h["role"] == "user"] == [
            "My dog is called Biscuit.",
            "She is three years old.",
            "She likes the beach.",
            "What is my dog called?",
        ]

        s3_server.start()
        done = b.stats()["snapshots"]
        b.chat(s, "And how old is she?", **GREEDY)  # its checkpoint is taken again
        wait_for(
            "the background checkpoint",
            lambda: (
                sum(b.stats()["snapshots"][k] for k in ("written", "failed"))
                > done["written"] + done["failed"]
            ),
        )
        assert b.stats()["snapshots"]["written"] == done["written"] + 1
        newer = pointer(pg_server.url, s)
        assert newer is not None and newer > live  # numbered after the one S3 could not list
        assert b.checkpoints(s)[0]["generation"] == newer
        b.suspend(s)
        again = b.chat(s, "Thanks.", **GREEDY)
        assert again.resumed is not None and again.resumed.source == "snapshot"
        print(
            f"\nS3 down: 2 turns in {turns_s:.2f} s, a node opened in {open_s:.2f} s and "
            f"replayed {reply.resumed.replayed_tokens} tokens from the journal in "
            f"{reply.resumed.seconds:.2f} s"
        )
    finally:
        b.close()


# -- a damaged chunk in S3 ---------------------------------------------------------------------


def test_a_damaged_chunk_in_s3_is_quarantined_and_the_resume_replays_the_journal(
    tmp_path: Path,
    pg_server: RestartablePostgres,
    s3_server: SeaweedS3,
    kv_url: str,
    servers_up: None,
) -> None:
    """As ``test_session``'s damaged checkpoint, on S3: the chunk that both kept checkpoints
    start with has a byte flipped. The newest checkpoint finds it damaged (its digest) and
    moves it aside with the reason; the older one then finds it missing; the journal rebuilds
    the session, and the next checkpoint stores the chunk again."""
    s = sid()
    a = open_node(tmp_path, "A", pg_server.url, kv_url, chunk_tokens=16)
    try:
        for text in ("My dog is called Biscuit.", "She is three.", "She likes the beach."):
            a.chat(s, text, **GREEDY)
            a.checkpoint(s)
        newest, older = a.checkpoints(s)
        history = a.history(s)
    finally:
        a.close()
    first = newest["files"][0]
    assert older["files"][0] == first  # a full chunk both checkpoints name
    bucket, key = first.removeprefix("s3://").split("/", 1)
    chunk = key.rsplit("/", 1)[-1].split(".")[0]
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    b = open_node(tmp_path, "B", pg_server.url, kv_url, chunk_tokens=16)
    try:
        before = journal_tokens(pg_server.url, s)
        reply = b.chat(s, "What is my dog called?", **GREEDY)
        report = reply.resumed
        assert report is not None and report.source == "journal"
        assert report.n_tokens == report.replayed_tokens == before
        damaged, missing = report.skipped
        assert damaged.startswith(f"manifest {newest['generation']}: chunk {chunk}: ")
        assert "does not exist" not in damaged  # damage, found by its digest
        assert missing.startswith(f"manifest {older['generation']}: chunk {chunk}: ")
        assert "does not exist" in missing  # quarantined by then
        # moved aside, with the reason, as the local store does
        with pytest.raises(client.exceptions.ClientError):
            client.head_object(Bucket=bucket, Key=key)
        prefix = kv_url.removeprefix(f"s3://{bucket}/")
        aside = client.list_objects_v2(
            Bucket=bucket, Prefix=f"{prefix}/quarantine/chunks/{chunk}.kvsnap."
        )["Contents"]
        assert len(aside) == 1
        moved = client.get_object(Bucket=bucket, Key=aside[0]["Key"])
        assert moved["Body"].read() == bytes(data)
        assert moved["Metadata"]["reason"].startswith(f"chunk {chunk}: ")
        assert b.history(s)[: len(history)] == history
        assert b.session_info(s)["window_tokens"] == journal_tokens(pg_server.url, s)
        # the next checkpoint stores the chunk again, and it restores
        b.checkpoint(s)
        client.head_object(Bucket=bucket, Key=key)
        b.suspend(s)
        again = b.chat(s, "Thanks.", **GREEDY)
        assert again.resumed is not None and again.resumed.source == "snapshot"
    finally:
        b.close()


def test_an_open_journal_that_reconnected_checks_its_token_on_the_new_connection(
    pg_server: RestartablePostgres, servers_up: None
) -> None:
    """Below the runtime: A's journal stays open across the restart (a read finds the
    connection lost and the next call connects again), B takes the lease, and A's append on
    the new connection is refused by the token check inside its own transaction."""
    from runtime.storage.leases import Leases
    from runtime.storage.pgdb import PgDatabase
    from runtime.storage.postgres import PgJournals

    s = sid()
    dbs = [PgDatabase(pg_server.url) for _ in range(2)]
    leases = [Leases(db, name, ttl_s=30.0) for db, name in zip(dbs, ("A", "B"), strict=True)]
    try:
        a = PgJournals(dbs[0], leases[0]).open(s)
        a.append("user", "before the restart", [1, 2])
        pg_server.stop()
        pg_server.start()
        with pytest.raises(PersistError):
            len(a)  # finds the connection lost (a read: the journal stays open)
        assert not a.closed and len(a) == 1  # connected again
        with psycopg.connect(pg_server.url, autocommit=True) as conn:  # A paused past its TTL
            conn.execute(
                "UPDATE llamaffi_lease SET expires = now() - interval '1 second' "
                "WHERE session = %s",
                (s,),
            )
        with pytest.raises(PersistError):  # B's connection was cut by the restart too
            PgJournals(dbs[1], leases[1]).open(s)
        b = PgJournals(dbs[1], leases[1]).open(s)  # B takes the session: a new token
        with pytest.raises(SessionLeasedError) as refused:
            a.append("user", "A after the restart", [3])
        assert refused.value.owner == "B"
        b.append("user", "B's turn", [4])
        assert [e.text for e in b] == ["before the restart", "B's turn"]
    finally:
        for lease in leases:
            lease.close()
        for db in dbs:
            db.close()


def test_with_s3_down_a_compacted_session_is_refused_retryably_not_lost(
    tmp_path: Path,
    pg_server: RestartablePostgres,
    s3_server: SeaweedS3,
    kv_url: str,
    servers_up: None,
) -> None:
    """With journal retention the journal alone no longer rebuilds the window: a node that
    takes the session over while S3 is down must say "retry" (503), never that the session
    cannot be rebuilt, and serve it once S3 is back."""
    s = sid()
    # the turns must be in long-term memory for retention to drop them: an embedder
    kw: dict[str, Any] = {"n_ctx": 256, "journal_retention": "window", "journal_segment_entries": 8}

    a = Runtime.open(
        tmp_path / "A", model="tiny", embedder=HashEmbedder(), db=pg_server.url, kv=kv_url,
        node_id="A", lease_ttl_s=TTL, journal_fsync=False, **kw,
    )  # fmt: skip
    try:
        for i in range(30):
            a.chat(s, f"My locker number {i} is {1000 + i}.", **GREEDY)
        a.checkpoint(s)
        assert a.compact_journals() > 0
    finally:
        a.close()
    s3_server.stop()
    b = Runtime.open(
        tmp_path / "B", model="tiny", embedder=HashEmbedder(), db=pg_server.url, kv=kv_url,
        node_id="B", lease_ttl_s=TTL, journal_fsync=False, **kw,
    )  # fmt: skip
    try:
        with pytest.raises(PersistError, match="retry") as refused:
            b.chat(s, "Which locker is number 0?", **GREEDY)
        assert map_runtime_error(refused.value).status == 503
        s3_server.start()
        reply = b.chat(s, "Which locker is number 0?", **GREEDY)
        assert reply.resumed is not None and reply.resumed.source == "snapshot"
    finally:
        b.close()
