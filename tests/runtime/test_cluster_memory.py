"""Long-term memory shared by nodes: each node's store is a replica of one table in a real
PostgreSQL (pgvector), written through and read before use (:mod:`runtime.longterm.replica`).

What one node stores, merges, supersedes, deletes or marks, another node finds exactly as the
writer does, with the same ranking; a write the database refuses is not kept anywhere; a
replica that is lost is rebuilt from the database; a node's own local memories are never
overwritten. Each test gets a database of its own (one database is one shared memory).
"""

# ruff: noqa: F811 (pg_url is a fixture imported from cluster_fixtures)

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from runtime.app import Runtime
from runtime.errors import (
    ClosedError,
    MemoryStoreError,
    RuntimeArgumentError,
    StoreMismatchError,
)
from runtime.longterm import MemoryStore
from runtime.longterm.items import NewItem
from runtime.storage.pgdb import PgDatabase
from runtime.storage.pgmemory import PgMemoryLog
from tests.runtime.cluster_fixtures import S3_BUCKET, pg_url, s3_env  # noqa: F401
from tests.runtime.memory_helpers import HashEmbedder

NOTES = [
    "Caroline moved to Lisbon in May",
    "Melanie paints sunsets on Saturdays",
    "the door code of the studio is 4321",
    "Caroline's sister is called Dana",
    "the team standup is at nine",
]


@pytest.fixture
def db_url(pg_url: str) -> str:
    """A database of its own on the shared server."""
    name = f"mem_{secrets.token_hex(4)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(pg_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


class Node:
    """One node's side: its own connection to the database and its replica directory."""

    def __init__(self, root: Path, name: str, url: str, dim: int = 32) -> None:
        self.directory = root / name
        self.url, self.name, self.dim = url, name, dim
        self.db = PgDatabase(url)
        self.store = self.open()

    def open(self) -> MemoryStore:
        log = PgMemoryLog(self.db, self.name)
        return MemoryStore(self.directory, HashEmbedder(self.dim), shared=log)

    def close(self) -> None:
        self.store.close()
        self.db.close()


@pytest.fixture
def two(tmp_path: Path, db_url: str) -> Iterator[tuple[Node, Node]]:
    a, b = Node(tmp_path, "A", db_url), Node(tmp_path, "B", db_url)
    try:
        yield a, b
    finally:
        for node in (a, b):
            node.close()


def ranked(store: MemoryStore, query: str, **kw: Any) -> list[tuple[str, float]]:
    """The ids and scores of a search, asked at one fixed time (recency moves with it)."""
    hits = store.search(query, 5, touch=False, now=2_000_000_000.0, **kw)
    return [(h.id, h.score) for h in hits]


def test_what_one_node_stores_another_finds_with_the_same_ranking(
    two: tuple[Node, Node],
) -> None:
    a, b = two
    ids = a.store.add_many(NOTES, session="s1")
    turn = NewItem("we talked about Lisbon again", kind="turn", session="s1", sources=(3,))
    (turn_id,) = a.store.put([turn])
    assert len(b.store) == len(NOTES) + 1
    for item_id in [*ids, turn_id]:
        mine, theirs = a.store.get(item_id), b.store.get(item_id)
        assert theirs is not None and mine is not None
        assert (theirs.text, theirs.session, theirs.kind, theirs.sources) == (
            mine.text,
            mine.session,
            mine.kind,
            mine.sources,
        )
    for query in ("Lisbon", "door code", "who paints", "Caroline sister", NOTES[4]):
        assert ranked(b.store, query, session="s1") == ranked(a.store, query, session="s1")
    assert ranked(b.store, NOTES[2], session="s1")[0][0] == ids[2]
    assert b.store.search("Lisbon", 5, session="another") == []  # the scope is in the query


def test_merges_and_supersession_travel_as_the_writer_decided_them(
    two: tuple[Node, Node],
) -> None:
    a, b = two
    first = NewItem("I live in Paris", kind="fact", session="s", subject="user",
                    attribute="city", said_at=100.0, sources=(1,))  # fmt: skip
    again = NewItem("I live in Paris", kind="fact", session="s", subject="user",
                    attribute="city", said_at=150.0, sources=(2,))  # fmt: skip
    later = NewItem("I live in Berlin", kind="fact", session="s", subject="user",
                    attribute="city", said_at=200.0, sources=(5,))  # fmt: skip
    (paris,) = a.store.put([first])
    assert a.store.put([again]) == [paris]  # merged: the same thing said twice
    (berlin,) = b.store.put([later])  # written on the other node
    for store in (a.store, b.store):
        old = store.get(paris)
        assert old is not None and old.sources == (1, 2)
        assert old.superseded_by == berlin
        assert [m.id for m in store.lineage(paris)] == [berlin, paris]
        current = store.current_fact("s", "user", "city")
        assert current is not None and current.text == "I live in Berlin"


def test_deletes_and_erasures_reach_every_node_and_leave_no_text_there(
    two: tuple[Node, Node],
) -> None:
    a, b = two
    ids = a.store.add_many(NOTES, session="s1")
    a.store.add("the vault word is quokkaberry", session="s1")
    (other,) = a.store.add_many(["zebra crossings are striped"], session="s2")
    assert len(b.store) == len(NOTES) + 2
    assert a.store.delete(ids[2])
    assert b.store.get(ids[2]) is None
    assert ids[2] not in [h.id for h in b.store.search(NOTES[2], 10, session="s1")]
    assert b.store.delete_session("s1") == len(NOTES)  # erased from the other node
    for node in (a, b):
        assert node.store.count(session="s1") == 0
        assert node.store.get(other) is not None
    for node in (a, b):  # the erasure's writer and the node it reached
        # its files (the WAL too, still open): no deleted text anywhere in them
        blob = b"".join(p.read_bytes() for p in node.directory.iterdir() if p.is_file())
        # FTS5 keeps a deleted text's words in old segments until the scrub merges them
        assert b"quokkaberry" not in blob and b"Lisbon" not in blob, node.name
        assert b"zebra" in blob  # what was kept is there (the check can see text)
    with psycopg.connect(a.url) as conn:
        rows = conn.execute("SELECT item::text FROM llamaffi_memory WHERE deleted").fetchall()
    assert len(rows) == len(NOTES) + 1  # tombstones: the ids stay, no text
    assert all("quokkaberry" not in str(r[0]) for r in rows)


def test_watermarks_travel_with_their_items(two: tuple[Node, Node]) -> None:
    a, b = two
    a.store.put([NewItem("a fact", kind="fact", session="s")], mark=("facts:s", 7))
    assert b.store.watermark("facts:s") == 7
    b.store.forget_marks("s")
    assert a.store.watermark("facts:s") == -1


def test_a_write_the_database_does_not_commit_is_kept_nowhere(two: tuple[Node, Node]) -> None:
    a, b = two
    a.store.add("kept", session="s")
    a.db.close()  # the node lost its database
    with pytest.raises(ClosedError):
        a.store.add("never acknowledged", session="s")
    assert a.store.count(session="s") == 1  # a read goes on with the replica it has
    assert [h.text for h in a.store.search("never acknowledged", 5, session="s")] == ["kept"]
    assert b.store.count(session="s") == 1


def test_a_lost_replica_is_rebuilt_from_the_database(tmp_path: Path, db_url: str) -> None:
    a = Node(tmp_path, "A", db_url)
    try:
        ids = a.store.add_many(NOTES, session="s1")
        a.store.delete(ids[0])
        want = ranked(a.store, "Caroline", session="s1")
        a.store.close()
        shutil.rmtree(a.directory)
        a.store = a.open()
        assert len(a.store) == len(NOTES) - 1
        assert ranked(a.store, "Caroline", session="s1") == want
    finally:
        a.close()


def test_a_store_that_is_no_replica_is_never_overwritten(tmp_path: Path, db_url: str) -> None:
    with MemoryStore(tmp_path / "A", HashEmbedder()) as local:
        local.add("only here", session="s")
    db = PgDatabase(db_url)
    try:
        with pytest.raises(MemoryStoreError, match="not a replica"):
            MemoryStore(tmp_path / "A", HashEmbedder(), shared=PgMemoryLog(db, "A"))
    finally:
        db.close()
    with MemoryStore(tmp_path / "A", HashEmbedder(), read_only=True) as local:
        assert [h.text for h in local.search("only here", 1)] == ["only here"]


def test_another_embedding_model_is_refused(tmp_path: Path, db_url: str) -> None:
    a = Node(tmp_path, "A", db_url, dim=32)
    try:
        with pytest.raises(StoreMismatchError, match="32 dims"):
            Node(tmp_path, "B", db_url, dim=16)
    finally:
        a.close()


def test_runtimes_on_one_database_share_their_memories(tmp_path: Path, db_url: str) -> None:
    def node(name: str) -> Runtime:
        return Runtime.open(
            tmp_path / name,
            model="tiny",
            n_ctx=1024,
            embedder=HashEmbedder(),
            db=db_url,
            node_id=name,
            lease_ttl_s=2.0,
            journal_fsync=False,
        )

    a = node("A")
    try:
        a.chat("s", "my locker is number 31", temperature=0.0, max_tokens=4)
        a.remember("the wifi password is hunter2", session="s")
        a.suspend("s")  # lets the session's lease go
        made = {h.id for h in a.search("locker", session="s", k=10)}
    finally:
        a.close()
    b = node("B")
    try:
        assert {h.id for h in b.search("locker", session="s", k=10)} == made
        assert b.search("wifi password", session="s", k=1)[0].text == (
            "the wifi password is hunter2"
        )
        b.chat("s", "and my bike is blue", temperature=0.0, max_tokens=4)  # takes s over
        turns = [h.text for h in b.search("locker", session="s", k=10) if h.kind == "turn"]
        assert turns.count("my locker is number 31") == 1  # caught up, not stored twice
    finally:
        b.close()


def test_a_replica_is_read_without_the_database_and_never_written_so(
    two: tuple[Node, Node],
) -> None:
    a, _b = two
    a.store.add("the boiler is serviced in March", session="s")
    with MemoryStore(a.directory, HashEmbedder(), read_only=True) as reader:  # memory search
        assert [h.text for h in reader.search("boiler", 1)] == ["the boiler is serviced in March"]
    a.store.close()
    with pytest.raises(MemoryStoreError, match="replica of a shared memory store"):
        MemoryStore(a.directory, HashEmbedder())  # memory add without the database
    a.store = a.open()
    assert len(a.store) == 1


def test_a_role_that_may_not_create_pgvector_is_told_what_to_run(
    tmp_path: Path, db_url: str
) -> None:
    role = f"r_{secrets.token_hex(3)}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")
    parts = urlsplit(db_url)
    url = urlunsplit(parts._replace(netloc=f"{role}:@{parts.hostname or ''}"))
    db = PgDatabase(url)
    try:
        with pytest.raises(MemoryStoreError, match="CREATE EXTENSION vector"):
            MemoryStore(tmp_path / "A", HashEmbedder(), shared=PgMemoryLog(db, "A"))
    finally:
        db.close()


class CountingEmbedder(HashEmbedder):
    """A hash embedder that notes every text it embeds."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def embed(self, texts: list[str]) -> Any:
        self.texts += texts
        return super().embed(texts)


def test_a_node_that_takes_a_session_over_ingests_only_what_no_node_did(
    tmp_path: Path, db_url: str
) -> None:
    embedders = {"A": CountingEmbedder(), "B": CountingEmbedder()}

    def node(name: str) -> Runtime:
        return Runtime.open(
            tmp_path / name,
            model="tiny",
            n_ctx=1024,
            embedder=embedders[name],
            db=db_url,
            node_id=name,
            lease_ttl_s=2.0,
            journal_fsync=False,
        )

    with node("A") as a:
        for n in range(3):
            a.chat("s", f"turn number {n} about kites", temperature=0.0, max_tokens=2)
        a.suspend("s")
    with node("B") as b:
        b.chat("s", "and one more about boats", temperature=0.0, max_tokens=2)
        turns = [h for h in b.search("kites boats", session="s", k=10) if h.kind == "turn"]
    assert len(turns) == 4
    assert not [t for t in embedders["B"].texts if "turn number" in t], embedders["B"].texts


def test_journal_retention_on_the_database_keeps_memory_and_the_window_for_the_next_node(
    tmp_path: Path, db_url: str, s3_env: dict[str, str]
) -> None:
    kv = f"s3://{S3_BUCKET}/retention-{secrets.token_hex(4)}"
    facts = [f"My locker number {i} is {1000 + i}." for i in range(30)]

    def node(name: str) -> Runtime:
        return Runtime.open(
            tmp_path / name,
            model="tiny",
            n_ctx=256,
            embedder=HashEmbedder(),
            db=db_url,
            kv=kv,
            node_id=name,
            lease_ttl_s=2.0,
            journal_fsync=False,
            journal_retention="window",
            journal_segment_entries=8,
        )

    with node("A") as a:
        for fact in facts:
            a.chat("s", fact, temperature=0.0, max_tokens=4)
        a.checkpoint("s")
        freed = a.compact_journals()
        kept = a.history("s")
        a.suspend("s")
    assert freed > 0
    assert 0 < len([h for h in kept if h["role"] == "user"]) < len(facts)
    with psycopg.connect(db_url) as conn:
        rows, top = conn.execute(
            "SELECT count(*), max(seq) FROM llamaffi_journal WHERE session = 's'"
        ).fetchone()
    assert rows < top + 1  # entries really left the table (the pinned first one stays)
    with node("B") as b:
        reply = b.chat("s", "Which locker is number 0?", temperature=0.0, max_tokens=4)
        assert reply.resumed is not None and reply.resumed.source == "snapshot"
        assert b.history("s")[: len(kept)] == kept
        hits = b.search(facts[0], k=1, session="s")
        assert hits and hits[0].text == facts[0]  # gone from the journal, not from memory


def test_journal_retention_with_a_database_needs_shared_checkpoints(
    tmp_path: Path, db_url: str
) -> None:
    with pytest.raises(RuntimeArgumentError, match="needs kv="):
        Runtime.open(
            tmp_path / "A", model="tiny", embedder=False, db=db_url, journal_retention="window"
        )


def test_a_pull_that_fails_halfway_applies_nothing_and_the_next_gets_everything(
    two: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.errors import PersistError
    from runtime.longterm import replica

    a, b = two
    monkeypatch.setattr(replica, "PULL_PAGE", 2)
    ids = a.store.add_many(NOTES, session="s")
    assert b.store._replica is not None
    log = b.store._replica.log
    real = log.changes
    calls = {"n": 0}

    def flaky(after: int, limit: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the second page: the database went away mid-pull
            raise PersistError("the database went away")
        return real(after, limit)

    monkeypatch.setattr(log, "changes", flaky)
    monkeypatch.setattr(replica, "RETRY_AFTER_S", 0.0)
    assert b.store.count(session="s") == 0  # the read went on with the replica as it was
    assert b.store.count(session="s") == len(NOTES)  # the next pull brought every page
    assert {b.store.get(i) is not None for i in ids} == {True}


def test_a_change_to_an_image_another_node_changed_since_is_refused(
    two: tuple[Node, Node],
) -> None:
    from runtime.errors import PersistError
    from runtime.storage import MemoryChange

    a, b = two
    item_id = a.store.add("the shed key is under the mat", session="s")
    assert b.store._replica is not None and a.store._replica is not None
    assert b.store.get(item_id) is not None
    base = a.store._replica.rev
    assert b.store.delete(item_id)  # B deletes it; A has not read that yet
    stale = MemoryChange(item_id, "s", "fact", {"text": "a merge into the stale image"})
    with pytest.raises(PersistError, match="changed on another node"):
        a.store._replica.log.publish([stale], base=base)
    assert a.store.get(item_id) is None and b.store.get(item_id) is None  # still deleted


def test_a_watermark_never_goes_back(two: tuple[Node, Node]) -> None:
    a, b = two
    a.store.put([], mark=("facts:s", 7))
    a.store.put([], mark=("facts:s", 9))  # raised: an update of the mark travels too
    assert b.store.watermark("facts:s") == 9
    b.store.put([], mark=("facts:s", 5))  # a stale writer's lower mark
    assert a.store.watermark("facts:s") == 9 and b.store.watermark("facts:s") == 9
    with psycopg.connect(a.url) as conn:
        row = conn.execute("SELECT item FROM llamaffi_memory WHERE id = 'mark:facts:s'").fetchone()
    assert row is not None and row[0] == {"value": 9}
    b.store.forget_marks("s")  # clearing is the one way down
    assert a.store.watermark("facts:s") == -1


def test_access_times_travel_apart_from_the_images(two: tuple[Node, Node]) -> None:
    a, b = two
    item_id = a.store.add("the piano tuner comes on Fridays", session="s", now=1_000.0)
    assert b.store.get(item_id) is not None
    a.store.touch([item_id], now=2_000_000_000.0)
    a.store.save_index()  # writes the pending access times, and shares them
    got = b.store.get(item_id)
    assert got is not None and got.accessed == 2_000_000_000.0
    b.store.touch([item_id], now=1_500.0)  # an older access never moves it back
    b.store.save_index()
    got = a.store.get(item_id)
    assert got is not None and got.accessed == 2_000_000_000.0
    b.store.delete(item_id)  # a search's access time never conflicts with a write
    assert a.store.get(item_id) is None


def test_the_shared_table_has_a_cosine_hnsw_index_for_sql_readers(two: tuple[Node, Node]) -> None:
    a, _b = two
    a.store.add_many(NOTES, session="s")
    with psycopg.connect(a.url) as conn:
        indexes = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'llamaffi_memory'"
        ).fetchall()
        nearest = conn.execute(
            "SELECT item->>'text' FROM llamaffi_memory WHERE NOT deleted AND session = 's'"
            " ORDER BY embedding <=> (SELECT embedding FROM llamaffi_memory"
            " WHERE item->>'text' = %s) LIMIT 1",
            (NOTES[3],),
        ).fetchone()
    assert any("hnsw" in d[0] and "vector_cosine_ops" in d[0] for d in indexes), indexes
    assert nearest == (NOTES[3],)


def test_a_replica_ahead_of_a_database_restored_from_a_backup_is_rebuilt(
    tmp_path: Path, db_url: str
) -> None:
    a = Node(tmp_path, "A", db_url)
    try:
        kept = a.store.add("written before the backup", session="s")
        with psycopg.connect(db_url, autocommit=True) as conn:  # the backup
            saved = conn.execute("SELECT max(rev) FROM llamaffi_memory").fetchone()[0]
        lost = a.store.add("written after the backup", session="s")
        a.store.close()
        with psycopg.connect(db_url, autocommit=True) as conn:  # restored: later rows gone
            conn.execute("DELETE FROM llamaffi_memory WHERE rev > %s", (saved,))
            conn.execute("SELECT setval('llamaffi_memory_rev', %s)", (saved,))
        a.store = a.open()
        assert a.store.get(kept) is not None
        assert a.store.get(lost) is None  # the truth is the database's
        again = a.store.add("written after the restore", session="s")
        b = Node(tmp_path, "B", db_url)
        try:
            assert b.store.get(again) is not None and b.store.get(kept) is not None
            assert b.store.get(lost) is None
        finally:
            b.close()
    finally:
        a.close()
