"""Split brain with real processes: node A is ``SIGSTOP``'d in the middle of a streamed reply
while it holds its sessions' leases; node B takes them over once they expire and serves them;
then A is ``SIGCONT``'d and finishes generating.

A's reply must then be refused by the database (its lease's token is stale): the client gets
a retryable ``session_leased`` error naming B instead of a finished reply, A logs that it lost
the lease and drops the session from its KV, and no history forks: each session's journal is
numbered without a gap, holds every acknowledged turn once and in order, and never the reply
A generated after it lost the lease; B's KV holds exactly the journal's tokens.
"""

# ruff: noqa: F811 (pg_url and s3_env are fixtures imported from cluster_fixtures)

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.runtime.cluster_fixtures import S3_BUCKET, pg_url, s3_env  # noqa: F401
from tests.runtime.server_helpers import ServeProcess

TTL = 2.0


def chat(base: str, sid: str, text: str, *, until: float = 0.0) -> str:
    """One turn; retried while the session is another live node's (409) until ``until``."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
    while True:
        r = httpx.post(
            f"{base}/v1/chat/completions", json=body, headers={"X-Session-Id": sid}, timeout=60
        )
        if r.status_code == 409 and time.monotonic() < until:
            time.sleep(0.1)
            continue
        assert r.status_code == 200, r.text
        content: str = r.json()["choices"][0]["message"]["content"]
        return content


def journal(pg_url: str, sid: str) -> list[tuple[int, dict[str, Any]]]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT seq, payload FROM llamaffi_journal WHERE session = %s ORDER BY seq", (sid,)
        ).fetchall()
    return [(int(seq), payload) for seq, payload in rows]


def test_a_paused_node_that_wakes_has_its_writes_refused_and_no_history_forks(
    tmp_path: Path, pg_url: str, s3_env: dict[str, str]
) -> None:
    kv = f"s3://{S3_BUCKET}/split-{secrets.token_hex(4)}"
    tag = secrets.token_hex(3)
    sids = [f"split-{tag}-1", f"split-{tag}-2"]

    def node(name: str) -> ServeProcess:
        common = ("--db", pg_url, "--kv", kv, "--lease-ttl", str(TTL), "--max-resident", "4")
        proc = ServeProcess(tmp_path / name, "--node-id", name, *common)
        proc.extra = (*proc.extra, "--advertise-url", proc.base)
        return proc

    a, b = node("A").start(), node("B").start()
    acked: dict[str, list[tuple[str, str]]] = {sid: [] for sid in sids}
    try:
        for n in range(2):
            for sid in sids:
                text = f"{sid} turn {n} on A"
                acked[sid].append((text, chat(a.base, sid, text)))
        paused_text = f"{sids[0]} the turn A is paused in"
        body = {
            "messages": [{"role": "user", "content": paused_text}],
            "max_tokens": 96,
            "stream": True,
        }
        events: list[dict[str, Any]] = []
        assert a.proc is not None
        with httpx.stream(
            "POST",
            f"{a.base}/v1/chat/completions",
            json=body,
            headers={"X-Session-Id": sids[0]},
            timeout=120,
        ) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            for line in lines:  # up to the first generated piece: A is generating now
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    delta = events[-1].get("choices", [{}])[0].get("delta", {})
                    if delta.get("content"):
                        break
            os.kill(a.proc.pid, signal.SIGSTOP)
            paused_at = time.monotonic()
            try:
                # B takes both sessions over once A's leases expire (409 until then)
                for sid in sids:
                    text = f"{sid} turn on B"
                    acked[sid].append((text, chat(b.base, sid, text, until=paused_at + 60)))
                took_over = time.monotonic() - paused_at
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            for line in lines:  # A wakes, finishes its reply, and is refused
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
        errors = [e["error"] for e in events if "error" in e]
        finished = [e for e in events if e.get("choices") and e["choices"][0].get("finish_reason")]
        assert finished == [], "a reply written after the lease was lost was acknowledged"
        assert len(errors) == 1 and errors[0]["code"] == "session_leased", events[-3:]
        assert "B" in errors[0]["message"]
        print(f"split brain: B served A's sessions {took_over:.2f} s after A was paused")

        # A dropped the session from its KV and sends its clients to B
        info = httpx.get(f"{a.base}/v1/sessions/{sids[0]}", timeout=30).json()
        assert info["resident"] is False, info
        r = httpx.post(
            f"{a.base}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hello again"}], "max_tokens": 2},
            headers={"X-Session-Id": sids[1]},
            timeout=60,
        )
        assert r.status_code == 409 and r.headers["x-session-owner"] == "B", r.text
        a.kill(signal.SIGTERM)
        log = a.log.read_text()
        assert "lost" in log and "lease" in log, log[-2000:]

        # one history per session: numbered without a gap, every acknowledged turn once
        # and in order, and never the reply A generated without its lease
        for sid in sids:
            rows = journal(pg_url, sid)
            assert [seq for seq, _ in rows] == list(range(len(rows)))
            turns = [(p["role"], p["text"]) for _, p in rows]
            users = [t for role, t in turns if role == "user"]
            assert len(users) == len(set(users)), users
            pos = 0
            for text, reply in acked[sid]:
                i = turns.index(("user", text), pos)
                assert turns[i + 1] == ("assistant", reply), (sid, text)
                pos = i + 2
            for _, p in rows:
                assert len(p["tokens"]) > 0
            if sid == sids[0]:
                i = turns.index(("user", paused_text))
                assert turns[i + 1] == ("user", f"{sid} turn on B"), turns[i:]
            info = httpx.get(f"{b.base}/v1/sessions/{sid}", timeout=30).json()
            assert [(h["role"], h["text"]) for h in info["history"]] == turns
            # B's KV is the journal's tokens exactly (restored and replayed): none of the
            # reply A generated without its lease, nothing twice
            journalled = sum(len(p["tokens"]) for _, p in rows)
            assert info["window_tokens"] == info["kv_cells"] == journalled, info
    finally:
        for n in (a, b):
            if n.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.proc.pid, signal.SIGCONT)
                n.kill()
