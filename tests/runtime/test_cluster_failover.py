"""Failover with real processes: two ``serve`` nodes share one embedded PostgreSQL and one
SeaweedFS S3 store. Four clients chat in eight sessions through the node that serves; it is
``kill -9``'d at a random moment (mid-reply, as the clients never pause), the clients move to
the other node, which answers 409 (naming the dead owner) until the lease expires and then
takes every session over: the newest checkpoint from S3, the journal tail from PostgreSQL.
Every acknowledged turn must then be in each session's history, word for word and in order.

``RUNTIME_FAILOVER_KILLS`` sets the number of kills (3 by default, as CI runs it; the slow
suite's figure is 20). Each kill prints the time from the kill to the other node's first
reply.
"""

# ruff: noqa: F811 (pg_url and s3_env are fixtures imported from cluster_fixtures)

from __future__ import annotations

import os
import random
import secrets
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.runtime.cluster_fixtures import S3_BUCKET, pg_url, s3_env  # noqa: F401
from tests.runtime.server_helpers import ServeProcess

KILLS = int(os.environ.get("RUNTIME_FAILOVER_KILLS", "3"))
TTL = 3.0
SESSIONS_PER_CLIENT = 2
CLIENTS = 4
WORDS = ["apple", "banjo", "cactus", "dolphin", "ember", "falcon", "glacier", "harbor"]


@dataclass
class Client:
    sids: list[str]
    acked: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Cluster:
    """Which node the clients talk to, and when each node first answered after a kill."""

    base: str
    kills: int = 0  # so far
    killed_at: float = 0.0
    #: per kill, seconds from the kill to the first reply of the node the clients moved to
    first_reply_after_kill: dict[int, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def talk(cluster: Cluster, client: Client, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    n = 0
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            n += 1
            sid = client.sids[n % len(client.sids)]
            text = f"{sid} says {' '.join(rng.sample(WORDS, 3))} {n}"
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
            with cluster.lock:
                base = cluster.base
            try:
                r = http.post(
                    f"{base}/v1/chat/completions", json=body, headers={"X-Session-Id": sid}
                )
            except httpx.TransportError:
                time.sleep(0.05)  # the node died (maybe mid-answer): not acknowledged
                continue
            if r.status_code in (409, 503):  # another node's live lease, or a busy queue
                time.sleep(0.05)
                continue
            if r.status_code != 200:
                client.failures.append(f"{r.status_code}: {r.text[:300]}")
                continue
            with cluster.lock:
                # the first reply of the node the clients moved to (sent after the kill)
                first = cluster.kills not in cluster.first_reply_after_kill
                if cluster.kills and base == cluster.base and first:
                    took = time.monotonic() - cluster.killed_at
                    cluster.first_reply_after_kill[cluster.kills] = took
            with client.lock:
                client.acked.setdefault(sid, []).append(
                    (text, r.json()["choices"][0]["message"]["content"])
                )


def check(base: str, sid: str, acked: list[tuple[str, str]]) -> None:
    r = httpx.get(f"{base}/v1/sessions/{sid}", timeout=30)
    if r.status_code == 404:
        assert not acked, sid
        return
    assert r.status_code == 200, r.text
    turns = [(h["role"], h["text"]) for h in r.json()["history"]]
    pos = 0
    for text, reply in acked:  # in order, each user turn followed by its reply, word for word
        i = turns.index(("user", text), pos)
        assert turns[i + 1] == ("assistant", reply), (sid, text)
        pos = i + 2


def test_a_killed_node_s_sessions_move_to_the_other_with_every_acknowledged_turn(
    tmp_path: Path, pg_url: str, s3_env: dict[str, str]
) -> None:
    kv = f"s3://{S3_BUCKET}/failover-{secrets.token_hex(4)}"

    def node(name: str) -> ServeProcess:
        common = ("--db", pg_url, "--kv", kv, "--lease-ttl", str(TTL), "--max-resident", "4")
        proc = ServeProcess(tmp_path / name, "--node-id", name, *common)
        proc.extra = (*proc.extra, "--advertise-url", proc.base)
        return proc

    nodes = [node("A").start(), node("B").start()]
    serving = 0
    cluster = Cluster(nodes[serving].base)
    rng = random.Random(7)
    clients = [Client([f"s{c}-{k}" for k in range(SESSIONS_PER_CLIENT)]) for c in range(CLIENTS)]
    stop = threading.Event()
    threads = [
        threading.Thread(target=talk, args=(cluster, c, stop, i), daemon=True)
        for i, c in enumerate(clients)
    ]
    try:
        for t in threads:
            t.start()
        for kill in range(KILLS):
            time.sleep(rng.uniform(1.5, 3.0))  # turns in flight: the kill lands mid-reply
            victim, survivor = nodes[serving], nodes[1 - serving]
            with cluster.lock:
                cluster.killed_at = time.monotonic()
                cluster.kills = kill + 1
                cluster.base = survivor.base
                marks = {sid: len(c.acked.get(sid, [])) for c in clients for sid in c.sids}
            victim.kill(signal.SIGKILL)
            # the survivor refuses the dead node's sessions (409, naming it) until they expire
            deadline = time.monotonic() + TTL + 60
            while kill + 1 not in cluster.first_reply_after_kill:
                assert time.monotonic() < deadline, "no node answered after the kill"
                time.sleep(0.05)
            print(
                f"kill {kill + 1}: the other node's first reply "
                f"{cluster.first_reply_after_kill[kill + 1]:.2f} s after kill -9 (ttl {TTL} s)"
            )
            victim.start()  # back as a standby for the next kill
            serving = 1 - serving
        # every session gets a turn answered by the survivor before the end (none is stuck
        # behind a lease nobody renews)
        deadline = time.monotonic() + 60
        while any(len(c.acked.get(sid, [])) <= marks[sid] for c in clients for sid in c.sids):
            assert time.monotonic() < deadline, "a session got no reply after the last kill"
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        base = nodes[serving].base
        for c in clients:
            assert not c.failures, c.failures[:3]
            for sid in c.sids:
                check(base, sid, c.acked.get(sid, []))
        total = sum(len(v) for c in clients for v in c.acked.values())
        survivor_id = ("A", "B")[serving]
        for sid in marks:  # each was answered by the survivor since, which holds it
            info = httpx.get(f"{base}/v1/sessions/{sid}", timeout=30).json()
            assert info["lease"]["owner"] == survivor_id, (sid, info["lease"])
        health = httpx.get(f"{base}/health", timeout=30).json()
        assert health["node"]["node_id"] == survivor_id
        took = list(cluster.first_reply_after_kill.values())
        print(
            f"failover: {KILLS} kills, {total} acknowledged turns in "
            f"{CLIENTS * SESSIONS_PER_CLIENT} sessions; kill -> first reply on the other node: "
            f"median {statistics.median(took):.2f} s, max {max(took):.2f} s (ttl {TTL} s)"
        )
        assert total >= CLIENTS * 2
    finally:
        stop.set()
        for n in nodes:
            if n.proc is not None:
                n.kill()
