"""The runtime on shared storage: journals, leases and manifest pointers in a real PostgreSQL,
KV chunks in a real S3 store (SeaweedFS), two runtimes (nodes) in one process.

A node serves a session only while it holds the session's lease; another node is refused
(SessionLeasedError naming the owner) until the lease is let go or expires, then takes the
session over from the shared journal and checkpoint. A node that lost its lease has every
write refused (fencing). The failover with real ``serve`` processes is in
``test_cluster_failover.py``.
"""

# ruff: noqa: F811 (pg_url and s3_env are fixtures imported from cluster_fixtures)

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runtime.app import Runtime, SessionLeasedError
from tests.runtime.cluster_fixtures import S3_BUCKET, pg_url, s3_env  # noqa: F401

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 6}
TTL = 2.0


@pytest.fixture
def kv_url(s3_env: dict[str, str]) -> str:
    """A fresh prefix in the test bucket, so tests never see each other's checkpoints."""
    return f"s3://{S3_BUCKET}/cluster-{secrets.token_hex(4)}"


def open_node(root: Path, name: str, pg_url: str, kv_url: str, **kw: Any) -> Runtime:
    return Runtime.open(
        root / name,
        model="tiny",
        n_ctx=1024,
        embedder=False,
        db=pg_url,
        kv=kv_url,
        node_id=name,
        lease_ttl_s=TTL,
        journal_fsync=False,
        **kw,
    )


@pytest.fixture
def nodes(tmp_path: Path, pg_url: str, kv_url: str) -> Iterator[tuple[Runtime, Runtime]]:
    a = open_node(tmp_path, f"A-{secrets.token_hex(2)}", pg_url, kv_url)
    b = open_node(tmp_path, f"B-{secrets.token_hex(2)}", pg_url, kv_url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def expire_lease(pg_url: str, session: str) -> None:
    """As if the lease holder paused past its TTL: its renewals stopped, the lease expired."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE llamaffi_lease SET expires = now() - interval '1 second' WHERE session = %s",
            (session,),
        )


def sid() -> str:
    return f"s-{secrets.token_hex(4)}"


def test_a_session_moves_to_another_node_with_its_history_and_its_kv(
    tmp_path: Path, pg_url: str, kv_url: str
) -> None:
    s = sid()
    a = open_node(tmp_path, "A1", pg_url, kv_url)
    texts = ["My dog is called Biscuit.", "She is three years old."]
    for text in texts:
        a.chat(s, text, **GREEDY)
    history = a.history(s)
    a.close()  # final checkpoint (to S3, pointer in PostgreSQL), lease let go
    b = open_node(tmp_path, "B1", pg_url, kv_url)
    try:
        assert b.history(s) == history  # the journal is the database's
        reply = b.chat(s, "What is my dog called?", **GREEDY)
        # the KV came back from the checkpoint A wrote: no re-prefill of the conversation
        assert reply.resumed is not None and reply.resumed.source == "snapshot"
        assert reply.cached_tokens > 0
        info = b.session_info(s)
        assert info["lease"]["owner"] == "B1" and info["lease"]["live"]
        assert [h["text"] for h in b.history(s) if h["role"] == "user"] == [
            *texts,
            "What is my dog called?",
        ]
    finally:
        b.close()


def test_a_live_lease_refuses_another_node_naming_its_owner(
    nodes: tuple[Runtime, Runtime],
) -> None:
    a, b = nodes
    s = sid()
    a.chat(s, "hello from A", **GREEDY)
    with pytest.raises(SessionLeasedError) as err:
        b.chat(s, "hello from B", **GREEDY)
    assert err.value.owner == a.node_info()["node_id"]  # type: ignore[index]
    assert [h["text"] for h in b.history(s) if h["role"] == "user"] == ["hello from A"]
    # reading never needs the lease; deleting does
    with pytest.raises(SessionLeasedError):
        b.delete_session(s)
    assert a.history(s)


def test_a_suspended_session_is_let_go_and_taken_over(nodes: tuple[Runtime, Runtime]) -> None:
    a, b = nodes
    s = sid()
    a.chat(s, "first, on A", **GREEDY)
    a.suspend(s)  # checkpointed; the lease is let go one renewal period later
    deadline = TTL * 3
    start = time.monotonic()
    while True:
        try:
            reply = b.chat(s, "second, on B", **GREEDY)
            break
        except SessionLeasedError:
            assert time.monotonic() - start < deadline, "the lease was never let go"
            time.sleep(0.1)
    assert reply.resumed is not None and reply.resumed.source == "snapshot"
    assert b.session_info(s)["lease"]["owner"] == b.node_info()["node_id"]  # type: ignore[index]
    # and A is refused now, naming B
    with pytest.raises(SessionLeasedError) as err:
        a.chat(s, "third, on A", **GREEDY)
    assert err.value.owner == b.node_info()["node_id"]  # type: ignore[index]
    users = [h["text"] for h in a.history(s) if h["role"] == "user"]
    assert users == ["first, on A", "second, on B"]


def test_a_node_that_lost_its_lease_has_every_write_refused(
    nodes: tuple[Runtime, Runtime], pg_url: str
) -> None:
    """A pauses past its lease (simulated: the expiry is moved into the past, as if its
    renewals had stopped); B takes the session over and answers. A, resumed, still has the
    session resident and tries to append: refused, nothing written, and its journal is
    dropped so it never serves the session from its stale KV."""
    a, b = nodes
    s = sid()
    a.chat(s, "before the pause", **GREEDY)
    token_a = a.session_info(s)["lease"]["token"]
    expire_lease(pg_url, s)
    b.chat(s, "B took over", **GREEDY)
    token_b = b.session_info(s)["lease"]["token"]
    assert token_b > token_a
    with pytest.raises(SessionLeasedError) as err:
        a.chat(s, "A after the pause", **GREEDY)
    assert err.value.owner == b.node_info()["node_id"]  # type: ignore[index]
    users = [h["text"] for h in b.history(s) if h["role"] == "user"]
    assert users == ["before the pause", "B took over"]  # A's write is nowhere
    with psycopg.connect(pg_url) as conn:
        seqs = [
            r[0]
            for r in conn.execute(
                "SELECT seq FROM llamaffi_journal WHERE session = %s ORDER BY seq", (s,)
            )
        ]
    assert seqs == list(range(len(seqs)))  # one gapless order
    # A dropped its stale session: a read goes to the shared journal, a turn is refused
    assert [h["text"] for h in a.history(s) if h["role"] == "user"] == users
    with pytest.raises(SessionLeasedError):
        a.chat(s, "A again", **GREEDY)


def test_the_manifest_pointer_is_switched_only_under_the_lease(
    nodes: tuple[Runtime, Runtime], pg_url: str
) -> None:
    a, _b = nodes
    s = sid()
    a.chat(s, "one", **GREEDY)
    a.checkpoint(s)
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT generation, token FROM llamaffi_manifest WHERE session = %s", (s,)
        ).fetchone()
    assert row is not None
    assert row[1] == a.session_info(s)["lease"]["token"]
    assert a.checkpoints(s)[0]["generation"] == row[0]


def test_a_node_that_lost_its_lease_cannot_switch_the_manifest(
    nodes: tuple[Runtime, Runtime], pg_url: str, kv_url: str
) -> None:
    """A's checkpoint of its stale KV, after B took the session over, never becomes the live
    manifest and never replaces B's manifest object, even where A numbers it like B's."""
    import boto3

    a, b = nodes
    s = sid()
    a.chat(s, "one", **GREEDY)  # A has no checkpoint yet: its next generation is 1, as B's
    expire_lease(pg_url, s)
    b.chat(s, "two, on B", **GREEDY)
    b.checkpoint(s)
    with psycopg.connect(pg_url) as conn:
        before = conn.execute(
            "SELECT generation, token FROM llamaffi_manifest WHERE session = %s", (s,)
        ).fetchone()
    assert before is not None and before[1] == b.session_info(s)["lease"]["token"]
    bucket, prefix = kv_url.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3")
    key = f"{prefix}/manifests/{s}/{before[0]:012d}.kvman"
    etag = client.head_object(Bucket=bucket, Key=key)["ETag"]
    with pytest.raises(SessionLeasedError):  # A still has it resident: its old KV is refused
        a.checkpoint(s)
    a.close()  # its final checkpoints are refused too (logged)
    with psycopg.connect(pg_url) as conn:
        after = conn.execute(
            "SELECT generation, token FROM llamaffi_manifest WHERE session = %s", (s,)
        ).fetchone()
    assert after == before
    assert client.head_object(Bucket=bucket, Key=key)["ETag"] == etag  # B's object, untouched
    b.suspend(s)
    reply = b.chat(s, "three, on B", **GREEDY)
    assert reply.resumed is not None and reply.resumed.source == "snapshot"  # B's checkpoint


def test_a_node_never_collects_a_chunk_it_did_not_see_named(
    tmp_path: Path, pg_url: str, kv_url: str
) -> None:
    """On a shared store a chunk that no manifest names yet may be another node's, put for a
    manifest it is about to switch: a node's garbage collection must leave it. (A copy of a
    real chunk under a new key stands in for it.) A node's open reads the manifests only."""
    import boto3

    a = open_node(tmp_path, "A7", pg_url, kv_url)
    s = sid()
    a.chat(s, "a turn that leaves chunks in the bucket", **GREEDY)
    a.close()
    bucket, prefix = kv_url.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3")
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/chunks/")["Contents"]
    source = listed[0]["Key"]
    orphan = f"{'ab' * 16}"
    orphan_key = f"{prefix}/chunks/{orphan[:2]}/{orphan}.kvsnap"
    client.copy_object(Bucket=bucket, Key=orphan_key, CopySource={"Bucket": bucket, "Key": source})
    b = open_node(tmp_path, "B7", pg_url, kv_url)
    try:
        for i in range(3):  # checkpoints of a new session, each followed by a collection
            b.chat(sid(), f"turn {i} on B", **GREEDY)
        b.checkpoint()
    finally:
        b.close()
    client.head_object(Bucket=bucket, Key=orphan_key)  # still there


def test_a_delete_on_another_node_is_refused_before_anything_is_deleted(
    nodes: tuple[Runtime, Runtime], pg_url: str
) -> None:
    a, b = nodes
    s = sid()
    a.chat(s, "keep me", **GREEDY)
    a.checkpoint(s)
    before = a.checkpoints(s)
    with pytest.raises(SessionLeasedError):
        b.delete_session(s)
    assert a.checkpoints(s) == before  # A's checkpoints were not touched
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT generation FROM llamaffi_manifest WHERE session = %s", (s,)
        ).fetchone()
    assert row is not None and row[0] == before[0]["generation"]
    a.suspend(s)
    reply = a.chat(s, "still here?", **GREEDY)
    assert reply.resumed is not None and reply.resumed.source == "snapshot"


def test_the_stats_command_shows_the_database_s_figures(
    tmp_path: Path, pg_url: str, kv_url: str
) -> None:
    from runtime.app import read_stats

    rt = open_node(tmp_path, "A9", pg_url, kv_url)
    try:
        for i in range(2):
            rt.chat(sid(), f"session {i}", **GREEDY)
        rt.checkpoint()
        rt.publish_stats()
        known = rt.stats()["sessions"]["known"]
    finally:
        rt.close()
    shown = read_stats(tmp_path / "A9")
    assert known >= 2 and shown["sessions"]["known"] == known  # not the local directory's 0
    assert shown["journal"]["where"].startswith("postgresql://")
    assert shown["journal"]["bytes"] > 0 and shown["snapshots"]["bytes"] > 0
