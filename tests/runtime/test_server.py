"""``runtime.server``: the real openai client and httpx against a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from runtime.app import Runtime
from runtime.server import create_app
from runtime.server.scheduler import FairQueue, QueueFullError
from tests.runtime.server_helpers import ServeProcess, ThreadServer

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    from runtime.embed import Embedder

    root = tmp_path_factory.mktemp("serve")
    with Runtime.open(
        root / "data", model="tiny", embedder=Embedder.default(), n_ctx=2048, max_resident=2
    ) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def server(rt: Runtime) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(rt, api_key=KEY, max_body=64 * 1024, max_queue=8)) as s:
        yield s


@pytest.fixture
def client(server: ThreadServer) -> Any:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def http(server: ThreadServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.base, headers=headers, timeout=60) as c:
        yield c


def _history(http: httpx.Client, sid: str) -> list[dict[str, Any]]:
    r = http.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return [h for h in r.json()["history"] if h["role"] != "system"]


# -- the openai client --------------------------------------------------------------------------


def test_non_streamed_chat_in_a_session(client: Any, http: httpx.Client) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "My cat is called Miso."}],
        max_tokens=8,
        extra_headers={"X-Session-Id": "alice"},
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0
    assert r.usage.prompt_tokens > r.usage.prompt_tokens_details.cached_tokens >= 0
    history = _history(http, "alice")
    assert [h["role"] for h in history] == ["user", "assistant"]
    assert history[0]["text"] == "My cat is called Miso."
    assert history[1]["text"] == choice.message.content


def test_streamed_chat_matches_the_journal(client: Any, http: httpx.Client) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"session_id": "streamer"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert _history(http, "streamer")[-1]["text"] == text


def test_whole_history_appends_only_the_new_tail(client: Any, http: httpx.Client) -> None:
    first = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "one"}],
        max_tokens=4,
        extra_headers={"X-Session-Id": "whole"},
    )
    messages = [
        {"role": "system", "content": "ignored: the session has its system prompt"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "two"},
    ]
    second = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, extra_headers={"X-Session-Id": "whole"}
    )
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the KV prefix was reused
    texts = [h["text"] for h in _history(http, "whole")]
    assert texts == [
        "one",
        first.choices[0].message.content,
        "two",
        second.choices[0].message.content,
    ]


def test_a_new_session_takes_a_whole_history(client: Any, http: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, extra_headers={"X-Session-Id": "imported"}
    )
    full = http.get("/v1/sessions/imported").json()["history"]
    assert [(h["role"], h["text"]) for h in full][:4] == [
        ("system", "You are terse."),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
    ]
    assert full[4]["text"] == r.choices[0].message.content


def test_stateless_request_leaves_no_session(client: Any, http: httpx.Client) -> None:
    before = {s["id"] for s in http.get("/v1/sessions?limit=1000").json()["data"]}
    r = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y"},
            {"role": "user", "content": "z"},
        ],
        max_tokens=4,
    )
    assert r.choices[0].message.content is not None
    assert r.usage.prompt_tokens > 0
    after = {s["id"] for s in http.get("/v1/sessions?limit=1000").json()["data"]}
    assert after == before


def test_embeddings(client: Any) -> None:
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a dog", "a puppy", "taxes"])
    vectors = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_models_health_and_metrics(client: Any, server: ThreadServer, http: httpx.Client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.base}/health").json()["status"] == "ok"  # no key needed
    metrics = http.get("/metrics").text
    assert 'runtime_http_requests_total{endpoint="chat",status="200"}' in metrics
    assert "runtime_queue_depth 0.0" in metrics
    assert 'runtime_tokens_total{kind="completion"}' in metrics


def test_memories_add_search_delete(http: httpx.Client) -> None:
    r = http.post("/v1/memories", json={"text": "The vault code is 4711.", "importance": 0.9})
    assert r.status_code == 201, r.text
    item = r.json()["id"]
    hits = http.get("/v1/memories/search", params={"q": "vault code", "k": 3}).json()["data"]
    assert hits[0]["id"] == item and hits[0]["session"] is None
    assert http.delete(f"/v1/memories/{item}").json()["deleted"] is True
    gone = http.delete(f"/v1/memories/{item}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_session_checkpoint_and_delete(client: Any, http: httpx.Client, rt: Runtime) -> None:
    client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "remember the milk"}],
        max_tokens=4,
        extra_headers={"X-Session-Id": "doomed"},
    )
    r = http.post("/v1/sessions/doomed/checkpoint")
    assert r.status_code == 200 and r.json()["checkpointed"] == 1, r.text
    hits = http.get("/v1/memories/search", params={"q": "remember the milk", "session": "doomed"})
    assert hits.json()["data"][0]["text"] == "remember the milk"
    bad = http.delete("/v1/sessions/doomed", params={"memories": "maybe"})
    assert _error(bad, 400)["param"] == "memories"
    assert http.delete("/v1/sessions/doomed").json()["deleted"] is True
    gone = http.get("/v1/memories/search", params={"q": "remember the milk", "session": "doomed"})
    assert all(h["session"] != "doomed" for h in gone.json()["data"])
    assert http.get("/v1/sessions/doomed").status_code == 404
    assert "doomed" not in rt.sessions()
    # a second delete: the runtime's SessionNotFoundError, as a 404
    assert _error(http.delete("/v1/sessions/doomed"), 404)["code"] == "not_found"


def test_import_endpoint_journals_a_history(client: Any, http: httpx.Client) -> None:
    messages = [
        {"role": "user", "content": "I keep bees.", "name": "Ada", "created_at": 1683554160},
        {"role": "assistant", "content": "How many hives?"},
        {"role": "user", "content": "Three.", "created_at": "2023-05-08T14:00:00+00:00"},
    ]
    r = http.post("/v1/sessions/hive/import", json={"messages": messages})
    assert r.status_code == 200, r.text
    seqs = r.json()["seqs"]
    assert len(seqs) == 3 and seqs == sorted(seqs)
    history = http.get("/v1/sessions/hive").json()["history"]
    by_seq = {h["seq"]: h for h in history}
    assert [by_seq[s]["text"] for s in seqs] == [m["content"] for m in messages]
    assert by_seq[seqs[0]]["name"] == "Ada" and by_seq[seqs[0]]["created"] == 1683554160
    # the imported history is the conversation a chat continues
    follow = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What do I keep?"}],
        max_tokens=4,
        extra_headers={"X-Session-Id": "hive"},
    )
    assert follow.usage.prompt_tokens_details.cached_tokens > 0  # the imported window
    # in long-term memory at once, with who said it, when, and which journal entry
    hits = http.get("/v1/memories/search", params={"q": "bees", "session": "hive"}).json()["data"]
    bees = next(h for h in hits if h["kind"] == "turn")
    assert (bees["speaker"], bees["said_at"], bees["sources"], bees["session"]) == (
        "Ada",
        1683554160,
        [seqs[0]],
        "hive",
    )
    assert bees["stored_at"] > bees["said_at"] and bees["superseded_by"] is None
    bad = http.post("/v1/sessions/hive/import", json={"messages": [{"role": "tool"}]})
    assert _error(bad, 400)["param"] == "messages[0].role"
    assert _error(http.post("/v1/sessions/hive/import", json={}), 400)["param"] == "messages"


# -- bad input ----------------------------------------------------------------------------------


def _chat(http: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body, headers=headers)


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_wrong_or_missing_key_gets_401_that_reveals_nothing(server: ThreadServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for headers in ({"Authorization": "Bearer wrong"}, {}, {"Authorization": KEY}):
        r = httpx.post(f"{server.base}/v1/chat/completions", json=body, headers=headers)
        err = _error(r, 401)
        assert err["code"] == "invalid_api_key" and KEY not in r.text
    assert httpx.get(f"{server.base}/v1/sessions").status_code == 401
    assert httpx.get(f"{server.base}/metrics").status_code == 401
    wrong = {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}
    for headers in wrong:
        assert httpx.get(f"{server.base}/v1/models", headers=headers).status_code == 401


def test_the_auth_scheme_is_case_insensitive_and_failures_are_counted(
    server: ThreadServer,
) -> None:
    """RFC 7235: ``bearer`` and ``BEARER`` are the same scheme; every refusal is counted."""
    ok = {"Authorization": f"Bearer {KEY}"}

    def failures() -> float:
        text = httpx.get(f"{server.base}/metrics", headers=ok).text
        lines = [ln for ln in text.splitlines() if ln.startswith("runtime_auth_failed_total")]
        return float(lines[0].split()[-1])

    before = failures()
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = httpx.get(f"{server.base}/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200, r.text
    assert failures() == before
    for bad in ({"Authorization": "Bearer nope"}, {}, {"Authorization": "bearer"}):
        assert httpx.get(f"{server.base}/v1/models", headers=bad).status_code == 401
    assert failures() == before + 3


def test_oversized_body_gets_413(http: httpx.Client) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (70 * 1024)}]}
    assert _error(_chat(http, big), 413)["code"] == "body_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(70):
            yield b"x" * 1024
        yield b'"}]}'

    r = http.post("/v1/chat/completions", content=chunked())
    assert _error(r, 413)["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ({}, {"X-Session-Id": "../etc"}, "X-Session-Id"),
        ({"session_id": ".hidden"}, {}, "session_id"),
        ({"session_id": "_tmp-" + "0" * 32}, {}, "session_id"),
        ({"session_id": "a", "max_tokens": 1}, {"X-Session-Id": "b"}, "session_id"),
        ({"max_tokens": -1}, {"X-Session-Id": "badin"}, "max_tokens"),
        ({"max_completion_tokens": 0}, {"X-Session-Id": "badin"}, "max_completion_tokens"),
        ({"max_tokens": 1.5}, {"X-Session-Id": "badin"}, "max_tokens"),
        ({"temperature": "hot"}, {"X-Session-Id": "badin"}, "temperature"),
        ({"temperature": 99}, {"X-Session-Id": "badin"}, "temperature"),
        ({"top_p": 0}, {"X-Session-Id": "badin"}, "top_p"),
        ({"seed": -3}, {"X-Session-Id": "badin"}, "seed"),
        ({"n": 2}, {"X-Session-Id": "badin"}, "n"),
        ({"stop": [""]}, {"X-Session-Id": "badin"}, "stop"),
        ({"stream": "yes"}, {"X-Session-Id": "badin"}, "stream"),
        ({"importance": 2}, {"X-Session-Id": "badin"}, "importance"),
        ({"messages": []}, {"X-Session-Id": "badin"}, "messages"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            {"X-Session-Id": "badin"},
            "messages[0].role",
        ),
        (
            {"messages": [{"role": "user", "content": ""}]},
            {"X-Session-Id": "badin"},
            "messages[0].content",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x"}]},
            {"X-Session-Id": "badin"},
            "messages[0].role",
        ),
    ],
)
def test_bad_fields_get_400_naming_them_and_write_nothing(
    http: httpx.Client, rt: Runtime, body: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    request = {"messages": [{"role": "user", "content": "hi"}], **body}
    err = _error(_chat(http, request, **headers), 400)
    assert err["param"] == param and err["message"].startswith(param)
    assert "badin" not in rt.sessions()


def test_bad_json_and_query_parameters(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", content=b"{not json")
    assert _error(r, 400)["code"] == "invalid_json"
    assert _error(http.get("/v1/memories/search", params={"q": "x", "k": "0"}), 400)["param"] == "k"
    assert (
        _error(http.get("/v1/memories/search", params={"q": "x", "k": "many"}), 400)["param"] == "k"
    )
    assert _error(http.get("/v1/memories/search", params={"k": "1"}), 400)["param"] == "q"
    assert _error(http.get("/v1/sessions/..x"), 400)["param"] == "session_id"
    assert _error(http.post("/v1/embeddings", json={"input": [1, 2]}), 400)["param"] == "input[0]"
    assert _error(http.get("/v1/nothing"), 404)["message"].startswith("no such endpoint")


def test_history_that_contradicts_the_journal_gets_409(http: httpx.Client, rt: Runtime) -> None:
    r = _chat(
        http,
        {"messages": [{"role": "user", "content": "first"}], "max_tokens": 4},
        **{"X-Session-Id": "conflict"},
    )
    assert r.status_code == 200, r.text
    before = rt.history("conflict")
    wrong = [
        {"role": "user", "content": "not what I said"},
        {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "next"},
    ]
    err = _error(_chat(http, {"messages": wrong}, **{"X-Session-Id": "conflict"}), 409)
    assert err["code"] == "history_conflict" and "'first'" in err["message"]
    short = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "?"}]
    short.append({"role": "user", "content": "next"})
    _error(_chat(http, {"messages": short}, **{"X-Session-Id": "conflict"}), 409)
    assert rt.history("conflict") == before  # nothing written


def test_full_queue_gets_503_with_retry_after(http: httpx.Client, server: ThreadServer) -> None:
    state = server.server.config.app.state.server
    limit, state.queue.max_waiting = state.queue.max_waiting, 0
    held = {f"busy-{i}" for i in range(state.queue.slots)}
    state.queue._running |= held  # as if every slot ran a turn
    try:
        r = _chat(http, {"messages": [{"role": "user", "content": "hi"}]}, **{"X-Session-Id": "q"})
        err = _error(r, 503)
        assert err["code"] == "queue_full" and r.headers["Retry-After"] == "1"
    finally:
        state.queue._running -= held
        state.queue.max_waiting = limit


def test_disconnect_mid_stream_keeps_the_partial_reply(
    server: ThreadServer, http: httpx.Client
) -> None:
    body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 400, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}", "X-Session-Id": "gone"}
    with httpx.stream(
        "POST", f"{server.base}/v1/chat/completions", json=body, headers=headers
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the first chunk; then we hang up
    # the next request waits for the cancelled turn to release the runtime
    r2 = _chat(
        http,
        {"messages": [{"role": "user", "content": "back"}], "max_tokens": 2},
        **{"X-Session-Id": "gone"},
    )
    assert r2.status_code == 200, r2.text
    roles = [h["role"] for h in _history(http, "gone")]
    assert roles == ["user", "assistant", "user", "assistant"]  # the partial reply was journalled
    metrics = http.get("/metrics").text
    assert "runtime_chat_cancelled_total 1.0" in metrics  # stopped, not run to max_tokens


# -- the queue ----------------------------------------------------------------------------------


def test_fair_queue_alternates_between_sessions_and_is_bounded() -> None:
    async def scenario() -> list[str]:
        q = FairQueue(max_waiting=5)
        order: list[str] = []
        await q.acquire("first")  # holds the turn
        waiters = [asyncio.ensure_future(_wait(q, k, order)) for k in ["a", "a", "a", "b", "c"]]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await q.acquire("d")
        q.release("first")
        await asyncio.gather(*waiters)
        assert not q.busy and q.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c", "a", "a"]


async def _wait(q: FairQueue, key: str, order: list[str]) -> None:
    await q.acquire(key)
    order.append(key)
    await asyncio.sleep(0)
    q.release(key)


def test_slots_run_sessions_side_by_side_one_turn_each() -> None:
    async def scenario() -> list[set[str]]:
        q = FairQueue(max_waiting=10, slots=2)
        running: set[str] = set()
        seen: list[set[str]] = []

        async def turn(key: str) -> None:
            await q.acquire(key)
            assert key not in running  # never two turns of one session at once
            running.add(key)
            seen.append(set(running))
            await asyncio.sleep(0.01)
            running.discard(key)
            q.release(key)

        await asyncio.gather(*(turn(k) for k in ["a", "a", "b", "c", "a"]))
        assert not q.busy and q.waiting == 0
        return seen

    seen = asyncio.run(scenario())
    assert max(len(s) for s in seen) == 2  # two sessions at once, never three


def test_a_free_slot_is_not_held_back_by_another_sessions_waiter() -> None:
    async def scenario() -> None:
        q = FairQueue(max_waiting=10, slots=4)
        await q.acquire("a")  # a's turn runs
        second_a = asyncio.ensure_future(q.acquire("a"))  # a's next turn waits for it
        await asyncio.sleep(0)
        await asyncio.wait_for(q.acquire("b"), 1)  # b takes a free slot at once
        assert q.running == 2 and q.waiting == 1
        q.release("a")
        await asyncio.wait_for(second_a, 1)
        q.release("a")
        q.release("b")
        assert not q.busy

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario() -> None:
        q = FairQueue(max_waiting=2)
        await q.acquire("x")
        waiter = asyncio.ensure_future(q.acquire("y"))
        await asyncio.sleep(0)
        assert q.waiting == 1
        waiter.cancel()
        await asyncio.sleep(0)
        assert q.waiting == 0
        q.release("x")
        assert not q.busy

    asyncio.run(scenario())


# -- the process --------------------------------------------------------------------------------


def test_session_continues_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = ServeProcess(data).start()
    try:
        c = openai.OpenAI(base_url=f"{proc.base}/v1", api_key="none", max_retries=0)
        first = c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "My name is Ada."}],
            max_tokens=6,
            extra_headers={"X-Session-Id": "ada"},
        )
        assert proc.kill(signal.SIGKILL) == -signal.SIGKILL
        proc.start()
        history = [
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "What is my name?"},
        ]
        second = c.chat.completions.create(
            model="tiny", messages=history, max_tokens=6, extra_headers={"X-Session-Id": "ada"}
        )
        assert second.choices[0].message.content is not None
        session = httpx.get(f"{proc.base}/v1/sessions/ada").json()
        texts = [h["text"] for h in session["history"] if h["role"] != "system"]
        assert texts == [
            "My name is Ada.",
            first.choices[0].message.content,
            "What is my name?",
            second.choices[0].message.content,
        ]
        hits = httpx.get(
            f"{proc.base}/v1/memories/search", params={"q": "name Ada", "session": "ada"}
        )
        assert "My name is Ada." in [h["text"] for h in hits.json()["data"]]
        assert proc.kill(signal.SIGTERM) == 0  # graceful: final checkpoints, exit 0
    finally:
        if proc.proc is not None:
            proc.kill()
    assert any((data / "kv" / "manifests" / "ada").iterdir())  # final checkpoint written
    assert "Traceback" not in proc.log.read_text()


def test_api_key_file_is_enforced_by_the_command(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with ServeProcess(tmp_path / "data", "--api-key-file", str(key_file)) as proc:
        assert httpx.get(f"{proc.base}/v1/models").status_code == 401
        ok = httpx.get(f"{proc.base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
        assert json.loads(httpx.get(f"{proc.base}/health").text)["status"] == "ok"


# -- the kill loop ------------------------------------------------------------------------------

#: kill -9s of the loop (the issue asks for 30: RUNTIME_SERVER_KILLS=30; ~10 s a kill here).
KILLS = int(os.environ.get("RUNTIME_SERVER_KILLS", "6"))
CLIENTS = 4
_WORDS = [
    "apple",
    "anchor",
    "banjo",
    "cactus",
    "dolphin",
    "ember",
    "falcon",
    "glacier",
    "harbor",
    "igloo",
    "jungle",
    "kettle",
    "lantern",
    "meadow",
    "nectar",
    "oyster",
    "pepper",
    "quartz",
    "raven",
    "saddle",
    "tundra",
    "umbrella",
    "violet",
    "walnut",
    "yodel",
    "zebra",
    "bishop",
    "copper",
    "dragon",
    "fossil",
    "garlic",
    "hammer",
    "island",
    "jigsaw",
    "kernel",
    "lemon",
    "marble",
    "nickel",
    "orchid",
    "piano",
    "quiver",
    "rocket",
    "silver",
    "tiger",
    "velvet",
    "wizard",
    "yarn",
]


@dataclass
class _Client:
    sid: str
    acked: list[tuple[str, str]] = field(default_factory=list)  # (user text, reply text)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _talk(
    base: str, client: _Client, stop: threading.Event, go: threading.Event, seed: int
) -> None:
    rng = random.Random(seed)
    n = 0
    with httpx.Client(base_url=base, timeout=30) as http:
        while not stop.is_set():
            go.wait()
            time.sleep(rng.uniform(0.05, 0.25))  # a client thinks between turns
            n += 1
            text = f"{client.sid} says {' '.join(rng.sample(_WORDS, 4))} {n}"
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}
            try:
                r = http.post(
                    "/v1/chat/completions", json=body, headers={"X-Session-Id": client.sid}
                )
            except httpx.TransportError:
                time.sleep(0.1)  # the server is down (or died mid-answer): not acknowledged
                continue
            if r.status_code == 503:
                time.sleep(0.1)
                continue
            if r.status_code != 200:
                client.failures.append(f"{r.status_code}: {r.text}")
                continue
            with client.lock:
                client.acked.append((text, r.json()["choices"][0]["message"]["content"]))


def _check(base: str, client: _Client, acked: list[tuple[str, str]], search: list[str]) -> None:
    r = httpx.get(f"{base}/v1/sessions/{client.sid}", timeout=30)
    if r.status_code == 404:  # no turn was journalled yet
        assert not acked, client.sid
        return
    history = r.json()["history"]
    turns = [(h["role"], h["text"]) for h in history]
    pos = 0
    for text, reply in acked:  # in order, each user turn followed by its reply
        i = turns.index(("user", text), pos)
        assert turns[i + 1] == ("assistant", reply), (client.sid, text)
        pos = i + 2
    for text in search:
        params = {"q": text, "k": 5, "session": client.sid}
        hits = httpx.get(f"{base}/v1/memories/search", params=params, timeout=30).json()["data"]
        assert text in [h["text"] for h in hits], (client.sid, text)


@pytest.mark.slow
def test_kill_loop_loses_no_acknowledged_turn(tmp_path: Path) -> None:
    rng = random.Random(1234)
    proc = ServeProcess(tmp_path / "data").start()
    clients = [_Client(f"client-{i}") for i in range(CLIENTS)]
    stop, go = threading.Event(), threading.Event()
    go.set()
    threads = [
        threading.Thread(target=_talk, args=(proc.base, c, stop, go, i), daemon=True)
        for i, c in enumerate(clients)
    ]
    checked = [0] * CLIENTS
    start = time.monotonic()
    try:
        for t in threads:
            t.start()
        for _kill in range(KILLS):
            time.sleep(rng.uniform(0.2, 1.5))
            proc.kill(signal.SIGKILL)
            snapshot = []
            for c in clients:
                with c.lock:
                    snapshot.append(list(c.acked))
            proc.start()
            go.clear()  # the clients pause while we check (their turns in flight finish)
            for i, c in enumerate(clients):
                acked = snapshot[i]
                new = [t for t, _ in acked[checked[i] :]]
                old = [t for t, _ in rng.sample(acked[: checked[i]], min(2, checked[i]))]
                _check(proc.base, c, acked, new + old)
                checked[i] = len(acked)
            go.set()
        # every session resumes: each gets acknowledged turns after the last restart
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        for i, c in enumerate(clients):
            assert len(c.acked) > checked[i], f"{c.sid} made no turn after the last restart"
            assert not c.failures, c.failures[:3]
            _check(proc.base, c, c.acked, [t for t, _ in c.acked[checked[i] :]])
        assert proc.kill(signal.SIGTERM) == 0
    finally:
        stop.set()
        go.set()
        if proc.proc is not None:
            proc.kill()
    took = time.monotonic() - start
    total = sum(len(c.acked) for c in clients)
    print(f"kill loop: {KILLS} kills, {total} acknowledged turns, {took:.1f} s")
    assert total >= CLIENTS * 2


# -- the red team's defects (issue 21) ----------------------------------------------------------


def test_retry_of_an_unanswered_turn_answers_it_instead_of_adding_another(
    http: httpx.Client, rt: Runtime
) -> None:
    # as after a kill -9 mid-reply: the journal ends with a user turn nobody answered
    first = _chat(http, {"messages": [{"role": "user", "content": "u1"}], "max_tokens": 3},
                  **{"X-Session-Id": "retry1"})  # fmt: skip
    a1 = first.json()["choices"][0]["message"]["content"]
    rt.import_history("retry1", [{"role": "user", "content": "u2"}])
    retry = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": "u2"},
    ]
    r = _chat(http, {"messages": retry, "max_tokens": 3}, **{"X-Session-Id": "retry1"})
    assert r.status_code == 200, r.text
    history = _history(http, "retry1")
    assert [h["role"] for h in history] == ["user", "assistant", "user", "assistant"]
    assert history[-1]["text"] == r.json()["choices"][0]["message"]["content"]
    # the server accepts the very history it returns, and the next turn extends it
    turns = [{"role": h["role"], "content": h["text"]} for h in history]
    nxt = _chat(http, {"messages": [*turns, {"role": "user", "content": "u3"}], "max_tokens": 3},
                **{"X-Session-Id": "retry1"})  # fmt: skip
    assert nxt.status_code == 200, nxt.text
    assert [h["role"] for h in _history(http, "retry1")][-2:] == ["user", "assistant"]
    assert len(_history(http, "retry1")) == 6


def test_a_one_message_retry_of_an_unanswered_turn_answers_it(
    http: httpx.Client, rt: Runtime
) -> None:
    one = {"messages": [{"role": "user", "content": "u1"}], "max_tokens": 3}
    assert _chat(http, one, **{"X-Session-Id": "retry2"}).status_code == 200
    rt.import_history("retry2", [{"role": "user", "content": "u2"}])  # cut off by a crash
    assert rt.unanswered("retry2") == "u2"
    again = {"messages": [{"role": "user", "content": "u2"}], "max_tokens": 3}
    assert _chat(http, again, **{"X-Session-Id": "retry2"}).status_code == 200
    assert [h["role"] for h in _history(http, "retry2")] == ["user", "assistant"] * 2
    assert rt.unanswered("retry2") is None
    # once answered, the same text again is a new turn
    assert _chat(http, again, **{"X-Session-Id": "retry2"}).status_code == 200
    assert [h["role"] for h in _history(http, "retry2")] == ["user", "assistant"] * 3


def test_a_history_with_consecutive_user_turns_is_accepted_and_not_duplicated(
    http: httpx.Client, rt: Runtime
) -> None:
    # a multi-party import leaves user turns in a row: the server returns them, and takes
    # them back without adding any of them twice
    rt.import_history(
        "party",
        [
            {"role": "user", "name": "Ana", "content": "I am in Lisbon."},
            {"role": "user", "name": "Ben", "content": "I am in Porto."},
        ],
    )
    first = _chat(http, {"messages": [{"role": "user", "content": "Where is Ana?"}],
                         "max_tokens": 3}, **{"X-Session-Id": "party"})  # fmt: skip
    assert first.status_code == 200, first.text
    turns = [{"role": h["role"], "content": h["text"]} for h in _history(http, "party")]
    r = _chat(http, {"messages": [*turns, {"role": "user", "content": "And Ben?"}],
                     "max_tokens": 3}, **{"X-Session-Id": "party"})  # fmt: skip
    assert r.status_code == 200, r.text
    texts = [h["text"] for h in _history(http, "party") if h["role"] == "user"]
    assert texts == ["I am in Lisbon.", "I am in Porto.", "Where is Ana?", "And Ben?"]


def test_a_user_session_named_tmp_survives_a_server_start(tmp_path: Path) -> None:
    from runtime.layout import ephemeral_id

    data = tmp_path / "data"
    with Runtime(data, model="tiny", embedder=False, idle_suspend_s=0) as own:
        own.chat("tmp-mine", "keep me", max_tokens=2)  # a user's own id, e.g. from the CLI
        own.chat(ephemeral_id(), "a crashed stateless request", max_tokens=2)
    with ServeProcess(data) as proc:
        listed = httpx.get(f"{proc.base}/v1/sessions", timeout=30).json()["data"]
        assert [s["id"] for s in listed] == ["tmp-mine"]
        assert proc.kill(signal.SIGTERM) == 0
    with Runtime(data, model="tiny", embedder=False, idle_suspend_s=0) as after:
        assert after.sessions() == ["tmp-mine"]  # the leftover ephemeral one is gone


def test_sigterm_ends_a_stream_with_its_finish_reason_and_done(tmp_path: Path) -> None:
    body = {
        "messages": [{"role": "user", "content": "Count to ten thousand."}],
        "max_tokens": 2000,  # seconds of tokens: the stream is still going when the signal lands
        "stream": True,
    }
    with ServeProcess(tmp_path / "data", "--n-ctx", "8192") as proc:
        lines: list[str] = []
        with httpx.stream(
            "POST",
            f"{proc.base}/v1/chat/completions",
            json=body,
            headers={"X-Session-Id": "sig"},
            timeout=60,
        ) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                lines.append(line.removeprefix("data: "))
                if len(lines) == 3:  # content is flowing
                    assert proc.proc is not None
                    proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc is not None and proc.proc.wait(timeout=60) == 0
        proc.proc = None
    assert lines[-1] == "[DONE]", lines[-3:]
    last = json.loads(lines[-2])
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["choices"][0]["stop_reason"] == "cancelled"  # cut by the shutdown, said so


def test_sessions_are_listed_in_pages(tmp_path: Path) -> None:
    from runtime.layout import ephemeral_id

    data = tmp_path / "data"
    ids = [f"page-{i:03d}" for i in range(230)]
    with Runtime(data, model="tiny", embedder=False, idle_suspend_s=0) as own:
        for sid in ids:
            own.import_history(sid, [{"role": "user", "content": f"hello {sid}"}])
        own.import_history(ephemeral_id(), [{"role": "user", "content": "not listed"}])
        first, more = own.session_page(100)
        assert [i["id"] for i in first] == ids[:100] and more
        assert all(i["exists"] and i["journal_bytes"] > 0 for i in first)
        assert first[0] == own.session_info(ids[0])  # a page says what session_info says
        with pytest.raises(ValueError, match="limit"):
            own.session_page(0)
    with ServeProcess(data) as proc:
        seen: list[str] = []
        after = None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            page = httpx.get(f"{proc.base}/v1/sessions", params=params, timeout=30).json()
            seen += [s["id"] for s in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == ids  # every session once, in order, the ephemeral one left out
        bad = httpx.get(f"{proc.base}/v1/sessions", params={"limit": 0}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


def test_a_history_with_the_part_of_a_cut_reply_the_client_saw_continues(
    http: httpx.Client, rt: Runtime
) -> None:
    # a client that went away mid-stream saw less of the reply than the journal kept
    ticks = iter(range(1000))
    cut = rt.chat("partial", "Tell me a long story.", max_tokens=60, temperature=0.0,
                  cancelled=lambda: next(ticks) > 12)  # fmt: skip
    assert cut.finish_reason == "cancelled" and len(cut.text) > 4
    seen = cut.text[: len(cut.text) // 2]
    history = [
        {"role": "user", "content": "Tell me a long story."},
        {"role": "assistant", "content": seen},
        {"role": "user", "content": "Go on."},
    ]
    r = _chat(http, {"messages": history, "max_tokens": 3}, **{"X-Session-Id": "partial"})
    assert r.status_code == 200, r.text
    turns = [(h["role"], h["text"]) for h in _history(http, "partial") if h["role"] != "system"]
    assert [t[0] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1][1] == cut.text and turns[2][1] == "Go on."  # nothing added twice
    # a reply that ended normally must still match word for word
    done = rt.chat("whole", "hello", max_tokens=8)
    bad = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": done.text[:-1] or "x"},
        {"role": "user", "content": "again"},
    ]
    conflict = _chat(http, {"messages": bad, "max_tokens": 3}, **{"X-Session-Id": "whole"})
    assert _error(conflict, 409)["code"] == "history_conflict"


def test_a_refused_first_request_leaves_nothing_behind(http: httpx.Client, rt: Runtime) -> None:
    # too long for the 2,048-token context: refused before anything is said, so the new
    # session, its journal and its system turn must not exist afterwards
    body = {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 3}
    r = _chat(http, body, **{"X-Session-Id": "refused1"})
    assert 400 <= r.status_code < 500, r.text
    assert "refused1" not in rt.sessions()
    with pytest.raises(Exception, match="refused2"):
        rt.chat("refused2", "word " * 3000, max_tokens=3)
    assert "refused2" not in rt.sessions()
    # memories a session had before its first turn are not the refused turn's to delete
    rt.remember("Ivo is allergic to peanuts.", session="refused4")
    with pytest.raises(Exception, match="refused4"):
        rt.chat("refused4", "word " * 3000, max_tokens=3)
    assert "refused4" not in rt.sessions()
    hits = rt.search("Who is allergic to peanuts?", 3, session="refused4")
    assert [h.text for h in hits] == ["Ivo is allergic to peanuts."]
    # a refused turn in an existing session writes nothing either
    rt.chat("refused3", "hello", max_tokens=2)
    before = rt.history("refused3")
    with pytest.raises(Exception, match="refused3"):
        rt.chat("refused3", "word " * 3000, max_tokens=3)
    assert rt.history("refused3") == before


def test_answer_replies_to_the_unanswered_turn_only(rt: Runtime) -> None:
    from runtime.errors import RuntimeArgumentError

    rt.chat("ans", "hello", max_tokens=2)
    with pytest.raises(RuntimeArgumentError, match="session_id"):
        rt.answer("ans")  # answered already: nothing to do, nothing written
    rt.import_history("ans", [{"role": "user", "content": "still there?"}])
    reply = rt.answer("ans", max_tokens=3, temperature=0.0)
    roles = [h["role"] for h in rt.history("ans") if h["role"] != "system"]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert rt.history("ans")[-1]["seq"] == reply.journal_seq
    # the reply a chat turn that was never cut off gets (greedy, the same tokens in the KV)
    rt.chat("twin", "hello", max_tokens=2)
    plain = rt.chat("twin", "still there?", max_tokens=3, temperature=0.0, use_memory=False)
    assert plain.text == reply.text


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
         "messages[0].content"),
        ("/v1/memories", b'{"text": "a note", "kind": "note"}', "kind"),
        ("/v1/memories", b'{"text": "a note", "meta": {"x": NaN}}', "meta"),
        ("/v1/memories", b'{"text": "\\udfff"}', "text"),
        ("/v1/embeddings", b'{"input": "\\ud800"}', "input[0]"),
        # a NUL ends llama.cpp's C strings: it was a 500 ("the turn failed: ArgumentError")
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\u0000b"}]}',
         "messages[0].content"),
        ("/v1/chat/completions",
         b'{"stream": true, "messages": [{"role": "user", "content": "a\\u0000b"}]}',
         "messages[0].content"),
        ("/v1/memories", b'{"text": "a\\u0000b"}', "text"),
        ("/v1/embeddings", b'{"input": "a\\u0000b"}', "input[0]"),
        # an import checked its messages' surrogates nowhere: a 500 (UnicodeEncodeError)
        ("/v1/sessions/imp-sur/import",
         b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        ("/v1/sessions/imp-nul/import",
         b'{"messages": [{"role": "user", "content": "a\\u0000b"}]}', "messages[0].content"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_never_a_500(
    http: httpx.Client, path: str, raw: bytes, param: str | None
) -> None:
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    err = _error(r, 400)
    if param is not None:
        assert err["param"] == param and err["message"].startswith(param), err
    assert "the turn failed" not in err["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"max_token": 5}, "max_token"), ({"logprobs": True}, "logprobs"),
     ({"top_logprobs": 2}, "top_logprobs"), ({"logit_bias": {"1": 5}}, "logit_bias")],
)  # fmt: skip
def test_unknown_or_unsupported_fields_get_400(
    http: httpx.Client, rt: Runtime, extra: dict[str, Any], param: str
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    err = _error(_chat(http, body, **{"X-Session-Id": "unknownf"}), 400)
    assert err["param"] == param
    assert "unknownf" not in rt.sessions()
    # the defaults OpenAI clients send are accepted
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": False,
          "model": "tiny", "user": "u", "logit_bias": {}}  # fmt: skip
    assert _chat(http, ok).status_code == 200


def test_stream_format_is_openai(server: ThreadServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 40,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{server.base}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        lines = [x.removeprefix("data: ") for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert len({c["created"] for c in chunks}) == 1  # one stream, one time
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"] is not None


def test_a_cancelled_reply_has_an_openai_finish_reason(http: httpx.Client, rt: Runtime) -> None:
    from runtime.server import chat_request as chatmod

    reply = rt.chat("cancelme", "go", max_tokens=50, cancelled=lambda: True)
    assert reply.finish_reason == "cancelled"
    body = chatmod.completion("c1", "tiny", reply, "cancelme")
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["stop_reason"] == "cancelled"


def test_embeddings_usage_counts_tokens(http: httpx.Client) -> None:
    """The embedder's own tokens: [CLS] a dog [SEP] is 4, the second text 7 (MiniLM's
    WordPiece), so 11 in all, padding not counted."""
    r = http.post("/v1/embeddings", json={"input": ["a dog", "a much longer text here"]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage == {"prompt_tokens": 11, "total_tokens": 11}


def test_a_new_session_past_max_sessions_gets_429(tmp_path: Path) -> None:
    """--max-sessions over HTTP: a 429 naming the cap, nothing written; stateless requests
    and existing sessions are served."""
    with (
        Runtime.open(
            tmp_path / "d", model="tiny", embedder=False, n_ctx=512, max_sessions=1
        ) as capped,
        ThreadServer(create_app(capped)) as s,
        httpx.Client(base_url=s.base, timeout=60) as h,
    ):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert h.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "a"}).is_success
        r = h.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "b"})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "session_limit" and "max_sessions=1" in r.text
        assert r.headers["x-should-retry"] == "false"  # the OpenAI SDK would retry a 429
        streamed = h.post(
            "/v1/chat/completions", json={**body, "stream": True}, headers={"X-Session-Id": "c"}
        )
        assert streamed.status_code == 429, streamed.text  # before the stream, not inside it
        assert capped.sessions() == ["a"]
        assert h.post("/v1/chat/completions", json=body).is_success  # stateless
        assert h.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "a"}).is_success
        assert capped.sessions() == ["a"]


def test_the_openai_user_field_is_recorded_in_the_journal(http: httpx.Client, rt: Runtime) -> None:
    body = {
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 4,
        "user": "end-user-42",
    }
    r = http.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "with-user"})
    assert r.status_code == 200, r.text
    from runtime.journal import Journal
    from runtime.layout import journal_path

    with Journal(journal_path(rt.root, "with-user"), readonly=True) as journal:
        users = [e.meta.get("user") for e in journal if e.role == "user"]
    assert users == ["end-user-42"]
    for bad in ("", "x" * 300, "a\nb", 7):
        r = http.post(
            "/v1/chat/completions", json={**body, "user": bad}, headers={"X-Session-Id": "u2"}
        )
        assert _error(r, 400)["param"] == "user"


def test_a_session_that_cannot_go_on_is_a_409_not_a_500() -> None:
    """A SessionError the runtime raises for a session it cannot use as it is (its journal
    is another model's, say) says what to do: the client sees it, told not to retry."""
    from runtime.errors import SessionError, SessionNotFoundError
    from runtime.server.chat_request import map_runtime_error

    err = map_runtime_error(SessionError("session 'acme~a1' was journalled with model x"), "acme")
    assert err.status == 409 and err.code == "session_unusable"
    assert err.headers == {"x-should-retry": "false"}
    assert err.body()["error"]["message"] == "session 'a1' was journalled with model x"
    # only the tenant's own prefix goes, and only with a tenant
    assert map_runtime_error(SessionError("'acme~a1' 'x~y'")).message == "'acme~a1' 'x~y'"
    eph = map_runtime_error(SessionError("'acme~_tmp-0a' 'x~y'"), "acme")
    assert eph.message == "'_tmp-0a' 'x~y'"
    assert map_runtime_error(SessionNotFoundError("no session 'acme~a1'"), "acme").status == 404


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/memories", {"text": "a typo'd note", "sesion": "alice"}, "sesion"),
        ("/v1/sessions/typo1/import",
         {"messages": [{"role": "user", "content": "a typo'd import"}], "rememer": False},
         "rememer"),
        ("/v1/sessions/typo2/import",
         {"messages": [{"role": "user", "content": "x", "contnt": "a typo'd import"}]},
         "messages[0].contnt"),
        ("/v1/embeddings", {"input": "x", "dimension": 384}, "dimension"),
    ],
)  # fmt: skip
def test_a_typo_in_any_body_is_a_400_naming_it(
    http: httpx.Client, rt: Runtime, path: str, body: dict[str, Any], param: str
) -> None:
    """As in a chat request: the typo was dropped, so the note was stored under no session
    (tenant-global) and the import went ahead with the default."""
    err = _error(http.post(path, json=body), 400)
    assert err["param"] == param, err
    assert not {"typo1", "typo2"} & set(rt.sessions())
    assert all("typo'd" not in hit.text for hit in rt.search("a typo'd note import"))
    # the fields OpenAI clients send are accepted
    ok = {"input": "x", "model": "m", "encoding_format": "float", "user": "u"}
    assert http.post("/v1/embeddings", json=ok).status_code == 200


def test_an_import_takes_text_parts_as_a_chat_request_does(http: httpx.Client) -> None:
    """It refused them ('must be str, not list') where a chat request joins them."""
    parts = [{"type": "text", "text": "I moved "}, {"type": "text", "text": "to Lisbon."}]
    r = http.post(
        "/v1/sessions/parts1/import", json={"messages": [{"role": "user", "content": parts}]}
    )
    assert r.status_code == 200, r.text
    assert [t["text"] for t in _history(http, "parts1")] == ["I moved to Lisbon."]
    bad = [{"type": "image_url", "image_url": {"url": "x"}}]
    r = http.post(
        "/v1/sessions/parts2/import", json={"messages": [{"role": "user", "content": bad}]}
    )
    assert _error(r, 400)["param"] == "messages[0].content[0]"
