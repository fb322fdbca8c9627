"""Tenants behind one server (``--api-keys``): every endpoint, tried by each tenant against the
other's sessions, memories and stats, by id, search and listing; the keys file; the queue's
fairness between tenants; per-tenant session caps; the layout of tenant ids."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.app import Runtime
from runtime.errors import ArgumentError, InvalidNameError, SessionLimitError
from runtime.layout import (
    ephemeral_id,
    is_ephemeral,
    local_id,
    tenant_of,
    tenant_root,
    validate_session_id,
)
from runtime.server import create_app
from runtime.server.scheduler import FairQueue, QueueFullError
from runtime.server.tenants import read_keys
from tests.runtime.server_helpers import ThreadServer

ACME, ACME_HASHED, GLOBEX = "sk-acme-0123456789", "sk-acme-rotated-42", "sk-globex-9876543210"
# what each tenant tells the server; no word of one tenant's texts is in the other's
SECRET = {
    "acme": ("My locker code is 4417.", "The acme vault opens on Tuesdays."),
    "globex": ("My locker code is 9902.", "The globex vault opens on Fridays."),
}
OPERATOR_NOTE = "The operator's locker code is 1234 and the vault opens on Sundays."


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys"
    hashed = hashlib.sha256(ACME_HASHED.encode()).hexdigest()
    path.write_text(
        f"# tenant key\nacme {ACME}\n\nacme   sha256:{hashed}\nglobex\t{GLOBEX}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    from runtime.embed import Embedder

    root = tmp_path_factory.mktemp("tenants")
    with Runtime.open(
        root / "data", model="tiny", embedder=Embedder.default(), n_ctx=2048, max_resident=2
    ) as runtime:
        runtime.remember(OPERATOR_NOTE)  # a global memory of no tenant: no tenant sees it
        yield runtime


@pytest.fixture(scope="module")
def base(rt: Runtime, keys_file: Path) -> Iterator[str]:
    app = create_app(rt, api_keys=read_keys(keys_file), max_queue=8)
    with ThreadServer(app) as server:
        yield server.base


def _client(base: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def seeded(base: str) -> dict[str, dict[str, Any]]:
    """Each tenant: a chat in session ``alice`` (the same id for both), a session of its own
    (``only-<tenant>``), a memory of ``alice`` and a tenant-wide one; their ids."""
    made: dict[str, dict[str, Any]] = {}
    for tenant, key in (("acme", ACME), ("globex", GLOBEX)):
        with _client(base, key) as http:
            said, note = SECRET[tenant]
            body = {"messages": [{"role": "user", "content": said}], "max_tokens": 4}
            r = http.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "alice"})
            assert r.status_code == 200, r.text
            assert r.json()["session_id"] == "alice"  # the tenant's own name for it
            r = http.post(
                f"/v1/sessions/only-{tenant}/import",
                json={
                    "messages": [
                        {"role": "user", "content": f"{tenant} private import"},
                        {"role": "assistant", "content": "noted"},
                    ]
                },
            )
            assert r.status_code == 200, r.text
            r = http.post("/v1/memories", json={"text": note})
            assert r.status_code == 201, r.text
            wide = r.json()["id"]
            r = http.post("/v1/memories", json={"text": f"{tenant} alice note", "session": "alice"})
            assert r.status_code == 201, r.text
            made[tenant] = {"wide": wide, "alice": r.json()["id"]}
    return made


def _other(tenant: str) -> str:
    return "globex" if tenant == "acme" else "acme"


def _foreign_words(tenant: str) -> list[str]:
    other = _other(tenant)
    return [*SECRET[other], f"{other} private import", f"{other} alice note", OPERATOR_NOTE]


@pytest.mark.parametrize("tenant,key", [("acme", ACME), ("globex", GLOBEX)])
def test_a_tenant_reaches_none_of_the_others_data(
    base: str, rt: Runtime, seeded: dict[str, dict[str, Any]], tenant: str, key: str
) -> None:
    other = _other(tenant)
    foreign = _foreign_words(tenant)
    with _client(base, key) as http:
        # listing: its own sessions only, by its own names
        r = http.get("/v1/sessions")
        assert r.status_code == 200, r.text
        ids = [s["id"] for s in r.json()["data"]]
        assert ids == ["alice", f"only-{tenant}"]
        r = http.get("/v1/sessions", params={"limit": 1, "after": "alice"})
        assert [s["id"] for s in r.json()["data"]] == [f"only-{tenant}"]
        assert r.json()["has_more"] is False
        # by id: the other's own session does not exist for it
        theirs = f"only-{other}"
        assert http.get(f"/v1/sessions/{theirs}").status_code == 404
        assert http.post(f"/v1/sessions/{theirs}/checkpoint").status_code == 404
        assert http.delete(f"/v1/sessions/{theirs}").status_code == 404
        # the shared name is its own session: its history holds its turns only
        r = http.get("/v1/sessions/alice")
        assert r.status_code == 200, r.text
        texts = " ".join(h["text"] for h in r.json()["history"])
        assert SECRET[tenant][0] in texts
        assert not any(w in texts for w in foreign)
        # search: everything it can reach, sessionless and in a session, never another's hit
        for params in (
            {"q": "locker code vault opens", "k": 100},
            {"q": "locker code vault opens", "k": 100, "session": "alice"},
            {"q": f"{other} private import alice note", "k": 100},
            {"q": "operator Sundays 1234", "k": 100},
        ):
            r = http.get("/v1/memories/search", params=params)
            assert r.status_code == 200, r.text
            hits = r.json()["data"]
            assert not any(any(w in h["text"] for w in foreign) for h in hits), hits
            assert all(h["session"] in (None, "alice", f"only-{tenant}") for h in hits), hits
        r = http.get("/v1/memories/search", params={"q": "vault opens", "k": 100})
        mine = {h["text"]: h for h in r.json()["data"]}
        assert SECRET[tenant][1] in mine  # its tenant-wide memory, global to it
        assert mine[SECRET[tenant][1]]["session"] is None
        # forgetting the other's memories: 404, and they stay
        for item in seeded[other].values():
            assert http.delete(f"/v1/memories/{item}").status_code == 404
        # metrics: counters only, no id or text of anyone
        metrics = http.get("/metrics").text
        assert not any(w in metrics for w in [*foreign, theirs])
    # the other tenant's data is all still there
    with _client(base, GLOBEX if tenant == "acme" else ACME) as http:
        assert http.get(f"/v1/sessions/only-{other}").status_code == 200
        r = http.get("/v1/memories/search", params={"q": "vault opens", "k": 100})
        assert SECRET[other][1] in {h["text"] for h in r.json()["data"]}
    assert rt.session_info(f"{other}~only-{other}")["exists"]


def test_a_tenants_turn_recalls_its_own_memories_only(
    rt: Runtime, seeded: dict[str, dict[str, Any]]
) -> None:
    """The prompt's memories (the runtime's retrieval, a stateless request's too) come from
    the tenant only: its sessions' and its tenant-wide ones, never another's or the
    operator's global ones."""
    for tenant in ("acme", "globex"):
        for sid in (f"{tenant}~alice", ephemeral_id(tenant)):
            reply = rt.chat(
                sid,
                "What is my locker code and when does the vault open?",
                max_tokens=2,
                temperature=0.0,
            )
            assert reply.memories, "nothing recalled: the test would prove nothing"
            assert all(
                m.session is not None and tenant_of(m.session) == tenant for m in reply.memories
            ), reply.memories
            if is_ephemeral(sid):
                rt.delete_session(sid)
    acme_wide = [
        m.text
        for m in rt.chat(
            "acme~carol", "When does the vault open?", max_tokens=2, temperature=0.0
        ).memories
    ]
    assert SECRET["acme"][1] in acme_wide  # the tenant-wide memory reaches a new session
    rt.delete_session("acme~carol")


def test_a_stateless_request_runs_and_recalls_inside_its_tenant(
    base: str, rt: Runtime, seeded: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the server: a request without a session runs in an ephemeral session of its
    tenant, so the memories put into its prompt are the tenant's own only."""
    turns: list[Any] = []
    chat = rt.chat

    def recording(session_id: str, *args: Any, **kwargs: Any) -> Any:
        reply = chat(session_id, *args, **kwargs)
        turns.append(reply)
        return reply

    monkeypatch.setattr(rt, "chat", recording)
    question = "What is my locker code and when does the vault open?"
    for tenant, key in (("acme", ACME), ("globex", GLOBEX)):
        with _client(base, key) as http:
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 2}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["session_id"] is None
        reply = turns.pop()
        assert is_ephemeral(reply.session_id) and tenant_of(reply.session_id) == tenant
        assert reply.memories, "nothing recalled: the test would prove nothing"
        assert all(m.session is not None and tenant_of(m.session) == tenant
                   for m in reply.memories), reply.memories  # fmt: skip
        assert not rt.session_info(reply.session_id)["exists"]  # deleted after the reply


def test_keys_name_tenants_and_wrong_keys_are_refused(
    base: str, seeded: dict[str, dict[str, Any]]
) -> None:
    with _client(base, ACME_HASHED) as http:  # the hashed key is acme's too
        ids = [s["id"] for s in http.get("/v1/sessions").json()["data"]]
        assert "only-acme" in ids and "only-globex" not in ids
    for wrong in ("sk-acme", ACME + "x", hashlib.sha256(ACME_HASHED.encode()).hexdigest()):
        with _client(base, wrong) as http:
            assert http.get("/v1/sessions").status_code == 401
    assert httpx.get(f"{base}/v1/sessions").status_code == 401  # no key at all


def test_a_tenants_wire_ids_cannot_name_another_tenant(base: str) -> None:
    with _client(base, ACME) as http:
        for sid in ("globex~only-globex", "acme~alice", "~alice"):
            r = http.get(f"/v1/sessions/{sid}")
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "session_id"
        r = http.get("/v1/memories/search", params={"q": "x", "session": "globex~alice"})
        assert r.status_code == 400


# -- the keys file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,error",
    [
        ("", "no API keys"),
        ("# only a comment\n", "no API keys"),
        ("acme\n", ":1: expected 'tenant key'"),
        ("acme key extra\n", ":1: expected 'tenant key'"),
        ("a~b key\n", ":1: invalid tenant"),
        ("acme sk-0123456789abcdef\nglobex sk-0123456789abcdef\n", "the same key is given twice"),
        ("acme sha256:abc\n", ":1: a hashed key is sha256: and 64 hex digits"),
        ("acme SHA256:abc\n", ":1: a hashed key is sha256: and 64 hex digits"),
        ("acme short-key\n", ":1: a key has 16 characters or more"),
        ("acme sk-acme-0123456789\nAcme sk-Acme-0123456789\n", ":2: .* only in case"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_line(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ArgumentError, match=error):
        read_keys(path)


def test_a_keys_file_with_a_bom_and_an_upper_case_hash_prefix_reads(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    digest = hashlib.sha256(b"sk-acme-0123456789").hexdigest().upper()
    path.write_text(f"acme SHA256:{digest}\n", encoding="utf-8-sig")
    assert read_keys(path).tenant(b"sk-acme-0123456789") == (True, "acme")


def test_serve_refuses_both_kinds_of_key(rt: Runtime, keys_file: Path) -> None:
    with pytest.raises(ArgumentError, match="not both"):
        create_app(rt, api_key="k", api_keys=read_keys(keys_file))


# -- fairness and limits ------------------------------------------------------------------------


def test_a_tenant_rotating_session_ids_cannot_starve_another() -> None:
    async def scenario() -> list[str]:
        q = FairQueue(max_waiting=10, slots=1, tenant_share=6)
        order: list[str] = []
        await q.acquire("a~busy", "a")

        async def turn(key: str, tenant: str) -> None:
            await q.acquire(key, tenant)
            order.append(key)
            await asyncio.sleep(0)
            q.release(key)

        waiters = [asyncio.ensure_future(turn(f"a~s{i}", "a")) for i in range(6)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="share"):
            await q.acquire("a~s6", "a")  # tenant a holds its whole share
        waiters.append(asyncio.ensure_future(turn("b~one", "b")))
        await asyncio.sleep(0)
        q.release("a~busy")
        await asyncio.gather(*waiters)
        assert not q.busy and q.waiting == 0
        return order

    order = asyncio.run(scenario())
    # b asked after all six of a's, and goes second: one turn of a, then b, then a's rest
    assert order == ["a~s0", "b~one", "a~s1", "a~s2", "a~s3", "a~s4", "a~s5"]


def test_max_sessions_counts_each_tenant_apart(tmp_path: Path) -> None:
    with Runtime.open(tmp_path / "data", model="tiny", embedder=False, max_sessions=2) as rt:
        for sid in ("acme~a", "acme~b", "globex~a", "globex~b", "a", "b"):
            rt.import_history(sid, [{"role": "user", "content": "hi"}])
        for sid in ("acme~c", "globex~c", "c"):
            with pytest.raises(SessionLimitError):
                rt.admit(sid)
        rt.delete_session("acme~a")
        rt.admit("acme~c")  # room again for acme, and only acme
        with pytest.raises(SessionLimitError):
            rt.admit("globex~c")


def test_tenant_ids_in_the_layout() -> None:
    assert validate_session_id("acme~alice") == "acme~alice"
    assert (tenant_of("acme~alice"), local_id("acme~alice")) == ("acme", "alice")
    assert (tenant_of("alice"), local_id("alice")) == (None, "alice")
    assert tenant_root("acme") == "acme~" and local_id("acme~") == ""
    assert is_ephemeral(ephemeral_id("acme")) and tenant_of(ephemeral_id("acme")) == "acme"
    for bad in ("acme~", "~alice", "a~b~c", "acme~..x", "ac me~x", "acme~_tmp-x", "x" * 65 + "~a"):
        with pytest.raises(InvalidNameError):
            validate_session_id(bad)


def test_errors_name_a_session_as_its_tenant_sent_it(base: str) -> None:
    """The runtime knows acme's session ``wire1`` as ``acme~wire1``; the tenant's name is the
    operator's label, and the client sent ``wire1``."""
    long = " ".join(f"word{i}" for i in range(3000))  # past n_ctx=2048
    with _client(base, ACME) as http:
        assert http.post(
            "/v1/chat/completions", headers={"X-Session-Id": "wire1"},
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ).status_code == 200  # fmt: skip
        r = http.post(
            "/v1/chat/completions", headers={"X-Session-Id": "wire1"},
            json={"messages": [{"role": "user", "content": long}], "max_tokens": 2},
        )  # fmt: skip
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "'wire1'" in message and "acme" not in message, message
