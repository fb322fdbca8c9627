"""The other endpoints: embeddings, models, memories, sessions, health and metrics."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runtime.errors import SessionNotFoundError
from runtime.longterm.items import KINDS
from runtime.server import chat_request as chatmod
from runtime.server.api_errors import APIError, bad_request, known_fields, not_found
from runtime.server.state import ServerState, admin_key, json_body, request_tenant
from runtime.server.tenants import inner, outer

if TYPE_CHECKING:
    from runtime.longterm import Hit

logger = logging.getLogger(__name__)

# -- the other endpoints ------------------------------------------------------------------------


async def embeddings_endpoint(request: Request, state: ServerState) -> Response:
    body = await json_body(request, state.max_body)
    known_fields(body, ("input", "model", "encoding_format", "dimensions", "user"))
    raw = body.get("input")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise bad_request("input", "must be a string or a non-empty array of strings")
    if len(items) > 256:
        raise bad_request("input", "at most 256 texts per request")
    texts = [chatmod.check_text(t, f"input[{i}]") for i, t in enumerate(items)]
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad_request("encoding_format", "must be 'float' or 'base64'")
    rt = state.rt
    embedder = rt.embedder_info()
    if embedder is None:
        raise APIError(400, "embeddings are off (the server runs with --no-memory)", param="model")
    model_id, dim = embedder
    dims = body.get("dimensions")
    if dims is not None and dims != dim:
        raise bad_request("dimensions", f"this embedder only gives {dim}")
    tenant = request_tenant(request)
    embedded = await state.run(admin_key(tenant), lambda: rt.embed(texts), tenant)
    data = []
    for i, vec in enumerate(embedded.vectors):
        emb: Any
        if fmt == "base64":
            import base64

            emb = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
        else:
            emb = [float(x) for x in vec]
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": model_id,
            # the embedder's real tokens (special ones included, padding not)
            "usage": {"prompt_tokens": embedded.tokens or 0, "total_tokens": embedded.tokens or 0},
        }
    )


async def models_endpoint(request: Request, state: ServerState) -> Response:
    model = {
        "id": state.rt.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "runtime",
    }
    return JSONResponse({"object": "list", "data": [model]})


def _hit(hit: Hit, tenant: str | None) -> dict[str, Any]:
    return {
        "id": hit.id,
        "object": "memory",
        "text": hit.text,
        "kind": hit.kind,
        "session": outer(tenant, hit.session),  # None: global (the tenant's own)
        "score": hit.score,
        "similarity": hit.similarity,
        "importance": hit.importance,
        "said_at": hit.said_at,  # when it was said (an imported turn keeps its own time)
        "stored_at": hit.stored_at,
        "speaker": hit.speaker,
        "sources": list(hit.sources),  # the session's journal seqs it came from
        "superseded_by": hit.superseded_by,
        "meta": hit.meta,
    }


async def remember_endpoint(request: Request, state: ServerState) -> Response:
    body = await json_body(request, state.max_body)
    known_fields(body, ("text", "session", "kind", "importance", "meta"))
    text = chatmod.check_text(body.get("text"), "text")
    tenant = request_tenant(request)
    session = body.get("session")
    if session is not None:
        session = inner(tenant, chatmod.check_session_id(session, "session"), "session")
    kind = body.get("kind", "fact")
    if kind not in KINDS:
        raise bad_request("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    importance = chatmod.number(body, "importance")
    if importance is None:
        importance = 0.5
    if not 0.0 <= importance <= 1.0:
        raise bad_request("importance", f"must be in [0, 1], got {importance}")
    meta = body.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise bad_request("meta", "must be an object")
    if meta is not None:
        try:  # what the store will write: text that is valid UTF-8
            json.dumps(meta, allow_nan=False).encode("utf-8")
        except (ValueError, UnicodeEncodeError) as exc:
            raise bad_request("meta", f"is not storable JSON: {exc}") from None
    rt = state.rt
    if not rt.memory_enabled:
        raise APIError(400, "long-term memory is off (--no-memory)", param="text")

    def add() -> str:
        return rt.remember(
            text, session=session, kind=kind, importance=importance, meta=meta, tenant=tenant
        )

    item_id = await state.run(admin_key(tenant), add, tenant)
    return JSONResponse({"id": item_id, "object": "memory", "text": text}, status_code=201)


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    """The query parameter ``name`` as an int in [low, high] (``default`` when absent), or a
    400 naming it."""
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise bad_request(name, f"must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise bad_request(name, f"must be in [{low}, {high}], got {value}")
    return value


async def search_endpoint(request: Request, state: ServerState) -> Response:
    q = chatmod.check_text(request.query_params.get("q"), "q")
    k = _int_param(request, "k", 5, 1, 100)
    tenant = request_tenant(request)
    session = request.query_params.get("session")
    if session is not None:
        session = inner(tenant, chatmod.check_session_id(session, "session"), "session")
    rt = state.rt

    def search() -> list[Any]:
        return rt.search(q, k, session=session, tenant=tenant)

    hits = await state.run(admin_key(tenant), search, tenant)
    return JSONResponse({"object": "list", "data": [_hit(h, tenant) for h in hits]})


async def forget_endpoint(request: Request, state: ServerState) -> Response:
    item_id = request.path_params["item_id"]
    if not 1 <= len(item_id) <= 128 or not item_id.replace("-", "").isalnum():
        raise bad_request("id", "not a memory id")
    rt, tenant = state.rt, request_tenant(request)

    def forget() -> bool:
        return rt.forget(item_id, tenant=tenant)

    if not await state.run(admin_key(tenant), forget, tenant):
        raise not_found(f"memory {item_id}")
    return JSONResponse({"id": item_id, "object": "memory.deleted", "deleted": True})


async def sessions_endpoint(request: Request, state: ServerState) -> Response:
    """``GET /v1/sessions?limit=100&after=<id>``: one page of sessions by id, OpenAI's list
    shape (``has_more``, ``last_id``); the next page is ``after=<last_id>``."""
    rt, tenant = state.rt, request_tenant(request)
    limit = _int_param(request, "limit", 100, 1, 1000)
    after = request.query_params.get("after")
    if after is not None:
        after = inner(tenant, chatmod.check_session_id(after, "after"), "after")
    page = await state.run(
        admin_key(tenant), lambda: rt.session_page(limit, after, tenant=tenant), tenant
    )
    data = [{"object": "session", **i, "id": outer(tenant, i["id"])} for i in page[0]]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "has_more": page[1],
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


def _sid(request: Request) -> tuple[str, str, str | None]:
    """The path's session id as the client named it, as the runtime knows it, its tenant."""
    tenant = request_tenant(request)
    local = chatmod.check_session_id(request.path_params["session_id"], "session_id")
    return local, inner(tenant, local, "session_id"), tenant


async def session_endpoint(request: Request, state: ServerState) -> Response:
    (local, sid, tenant), rt = _sid(request), state.rt

    def read() -> dict[str, Any]:
        # the queue runs one job per session at a time: nothing deletes it between the calls
        info = rt.session_info(sid)
        if not info["exists"]:
            raise not_found(f"session {local}")
        return {"object": "session", **info, "id": local, "history": rt.history(sid)}

    return JSONResponse(await state.run(sid, read, tenant))


async def delete_session_endpoint(request: Request, state: ServerState) -> Response:
    (local, sid, tenant), rt = _sid(request), state.rt
    flag = request.query_params.get("memories", "true")
    if flag not in ("true", "false"):
        raise bad_request("memories", f"must be true or false, got {flag!r}")
    memories = flag == "true"  # default: every trace goes, long-term memories included

    def delete() -> None:
        try:
            rt.delete_session(sid, memories=memories)
        except SessionNotFoundError:
            raise not_found(f"session {local}") from None

    await state.run(sid, delete, tenant)
    return JSONResponse({"id": local, "object": "session.deleted", "deleted": True})


async def checkpoint_endpoint(request: Request, state: ServerState) -> Response:
    (local, sid, tenant), rt = _sid(request), state.rt

    def checkpoint() -> int:
        if not rt.session_info(sid)["exists"]:
            raise not_found(f"session {local}")
        return rt.checkpoint(sid)

    written = await state.run(sid, checkpoint, tenant)
    # 0: the session is not resident (suspended sessions are on disk already)
    return JSONResponse({"id": local, "object": "session.checkpoint", "checkpointed": written})


async def import_endpoint(request: Request, state: ServerState) -> Response:
    """``POST /v1/sessions/{id}/import``: ``{"messages": [...]}`` appended to the session's
    journal (:meth:`Runtime.import_history`); answers ``{"seqs": [...]}``."""
    (local, sid, tenant), rt = _sid(request), state.rt
    body = await json_body(request, state.max_body)
    known_fields(body, ("messages", "remember"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "must be a non-empty array")
    # text parts, as a chat request may send them (the runtime checks everything else)
    messages = [
        {**m, "content": chatmod.message_content(m, i)}
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        else m
        for i, m in enumerate(messages)
    ]
    remember = body.get("remember", True)
    if not isinstance(remember, bool):
        raise bad_request("remember", f"must be a boolean, got {type(remember).__name__}")

    def run() -> list[int]:
        return rt.import_history(sid, messages, remember=remember)

    seqs = await state.run(sid, run, tenant)
    return JSONResponse({"id": local, "object": "session.import", "seqs": seqs})


async def health_endpoint(request: Request, state: ServerState) -> Response:
    down = state.stopping or state.draining
    return JSONResponse(
        {
            "status": "stopping" if down else "ok",
            "model": state.rt.model_name,
            "queue": state.queue.waiting,
            # with --db: this node's id, address and leases (None with local storage)
            "node": state.rt.node_info(),
        },
        status_code=503 if down else 200,
    )


async def metrics_endpoint(request: Request, state: ServerState) -> Response:
    return Response(
        generate_latest(state.metrics.registry),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )
