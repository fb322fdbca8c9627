"""The Starlette application: routes, authentication, limits, metrics, and :func:`serve`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.server import chat as chatmod
from runtime.server.errors import APIError, bad_request, not_found
from runtime.server.scheduler import FairQueue, QueueFullError

if TYPE_CHECKING:
    from runtime.runtime import Reply, Runtime

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20
DEFAULT_MAX_QUEUE = 64
#: What a 503 for a full queue asks the client to wait, in seconds.
RETRY_AFTER_S = 1
_ADMIN_KEY = "\x00admin"  # the queue key of non-chat calls (never a valid session id)


class _Metrics:
    def __init__(self, queue: FairQueue) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "runtime_http_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "runtime_http_request_seconds",
            "Request latency (to the last byte)",
            ["endpoint"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens = Counter("runtime_tokens", "Tokens by kind", ["kind"], registry=r)
        self.resumes = Counter(
            "runtime_session_resumes", "Sessions brought back, by source", ["source"], registry=r
        )
        self.cancelled = Counter(
            "runtime_chat_cancelled", "Replies stopped by a disconnect or shutdown", registry=r
        )
        self.rejected = Counter("runtime_queue_rejected", "503s for a full queue", registry=r)
        depth = Gauge("runtime_queue_depth", "Requests waiting for the runtime", registry=r)
        depth.set_function(lambda: queue.waiting)
        busy = Gauge("runtime_queue_busy", "1 while a job holds the runtime", registry=r)
        busy.set_function(lambda: 1.0 if queue.busy else 0.0)

    def turn(self, reply: Reply, injected: int) -> None:
        self.tokens.labels("prompt").inc(reply.prompt_tokens + injected)
        self.tokens.labels("cached").inc(reply.cached_tokens)
        self.tokens.labels("completion").inc(reply.completion_tokens)
        if reply.resumed is not None:
            self.resumes.labels(reply.resumed.source).inc()
        if reply.finish_reason == "cancelled":
            self.cancelled.inc()


@dataclass
class ServerState:
    """What the routes share: the runtime, the queue, the metrics, the shutdown flag."""

    rt: Runtime
    queue: FairQueue
    metrics: _Metrics
    max_body: int
    stopping: bool = False
    draining: bool = False
    started: int = field(default_factory=lambda: int(time.time()))
    jobs: set[asyncio.Task[Any]] = field(default_factory=set)

    async def run(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn`` in a worker thread, holding the runtime's turn (503 when the queue is full)."""
        if self.stopping or self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        try:
            return await self.queue.run(key, fn)
        except QueueFullError:
            self.metrics.rejected.inc()
            raise APIError(
                503,
                f"the server is busy ({self.queue.waiting} requests waiting); retry shortly",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None


# -- middleware ---------------------------------------------------------------------------------


class _Guard:
    """Bearer authentication (every path but /health) and the request body limit (413)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key is not None else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.key is not None and scope["path"] != "/health":
            given = headers.get("authorization", b"")
            expected = b"Bearer " + self.key
            if not hmac.compare_digest(given, expected):
                err = APIError(401, "invalid or missing API key", code="invalid_api_key")
                err.headers["WWW-Authenticate"] = "Bearer"
                await err.response()(scope, receive, send)
                return
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                too_big = True
            if too_big:
                await _too_big(self.max_body).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_big(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read at most ``limit`` bytes far (chunked bodies too)."""
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise _too_big(limit)
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


Handler = Callable[[Request, ServerState], Awaitable[Response]]


def _endpoint(name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: OpenAI-format errors, request counts and latencies."""

    async def endpoint(request: Request) -> Response:
        state: ServerState = request.app.state.server
        start = time.perf_counter()
        try:
            response = await handler(request, state)
        except APIError as exc:
            response = exc.response()
        except Exception as exc:
            logger.exception("%s failed", name)
            response = chatmod.map_runtime_error(exc).response()
        state.metrics.requests.labels(name, str(response.status_code)).inc()
        state.metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    return endpoint


# -- chat ---------------------------------------------------------------------------------------


@dataclass
class _Turn:
    """One chat request on its way through the runtime."""

    state: ServerState
    req: chatmod.ChatRequest
    session_id: str
    ephemeral: bool
    cancel: asyncio.Event | None = None
    flag: list[bool] = field(default_factory=lambda: [False])
    injected: int = 0

    def cancelled(self) -> bool:
        return self.flag[0] or self.state.stopping

    def prepare(self) -> None:
        """Check the history against the journal and add what it lacks (worker thread)."""
        rt, req = self.state.rt, self.req
        with rt._lock:
            if self.ephemeral:
                missing = list(req.turns[:-1])
                is_new = True
            elif len(req.turns) == 1 and req.system is None:
                # only the new user message: nothing to compare, and no need to read the
                # whole history of a long session on every request
                missing, is_new = [], False
            else:
                journal = rt.history(self.session_id)
                missing = chatmod.missing_turns(journal, req.turns)
                is_new = not journal
            if missing or (is_new and req.system is not None):
                self.injected = chatmod.inject_turns(
                    rt, self.session_id, req.system, missing, remember=req.remember
                )

    def run(self, on_token: Callable[[str], None] | None) -> Reply:
        """The turn itself (worker thread); an ephemeral session is deleted after it."""
        rt, req, p = self.state.rt, self.req, self.req.sampling
        try:
            reply = rt.chat(
                self.session_id,
                req.text,
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k,
                min_p=p.min_p,
                repeat_penalty=p.repeat_penalty,
                seed=p.seed,
                stop=req.stop,
                on_token=on_token,
                cancelled=self.cancelled,
                remember=req.remember,
                importance=req.importance,
                use_memory=req.use_memory,
            )
            self.state.metrics.turn(reply, self.injected)  # counted even when nobody listens
            return reply
        finally:
            if self.ephemeral:
                self.discard()

    def discard(self) -> None:
        try:
            self.state.rt.delete_session(self.session_id)
        except Exception:
            logger.exception("could not delete ephemeral session %s", self.session_id)


async def _chat(request: Request, state: ServerState) -> Response:
    rt = state.rt
    body = await _json_body(request, state.max_body)
    req = chatmod.parse_chat(body, request.headers.get("x-session-id"), rt.sampling, rt.ctx.n_ctx)
    ephemeral = req.session_id is None
    sid = req.session_id or chatmod.ephemeral_id()
    turn = _Turn(state, req, sid, ephemeral)
    key = sid if not ephemeral else "\x00stateless"
    if state.stopping or state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    try:
        await state.queue.acquire(key)
    except QueueFullError:
        state.metrics.rejected.inc()
        raise APIError(
            503,
            f"the server is busy ({state.queue.waiting} requests waiting); retry shortly",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    # holding the runtime's turn from here: every path below releases it exactly once
    try:
        await asyncio.shield(asyncio.ensure_future(run_in_threadpool(turn.prepare)))
    except BaseException:
        if ephemeral:
            await asyncio.shield(asyncio.ensure_future(run_in_threadpool(turn.discard)))
        state.queue.release()
        raise
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    model = rt.model_name
    out_sid = None if ephemeral else sid
    if not req.stream:
        watcher = asyncio.ensure_future(_watch_disconnect(request, turn))
        task = _track(state, state.queue.start(lambda: turn.run(None)))
        try:
            reply: Reply = await asyncio.shield(task)
        finally:
            watcher.cancel()
        return JSONResponse(chatmod.completion(cid, model, reply, turn.injected, out_sid))

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def on_token(piece: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    task = _track(state, state.queue.start(lambda: turn.run(on_token)))
    task.add_done_callback(lambda _t: pieces.put_nowait(None))

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            first = {"role": "assistant", "content": ""}
            yield {"data": json.dumps(chatmod.chunk(cid, model, first))}
            while (piece := await pieces.get()) is not None:
                yield {"data": json.dumps(chatmod.chunk(cid, model, {"content": piece}))}
            try:
                reply = task.result()
            except Exception as exc:
                logger.warning("streamed turn failed: %s", exc)
                yield {"data": json.dumps(chatmod.map_runtime_error(exc).body())}
                yield {"data": "[DONE]"}
                return
            yield {"data": json.dumps(chatmod.chunk(cid, model, {}, reply.finish_reason))}
            if req.include_usage:
                u = chatmod.usage(reply, turn.injected)
                yield {"data": json.dumps(chatmod.chunk(cid, model, None, usage_body=u))}
            yield {"data": "[DONE]"}
        finally:
            turn.flag[0] = True  # a no-op when the turn has ended; stops it when not

    headers = {"X-Session-Id": out_sid} if out_sid else None
    return EventSourceResponse(events(), headers=headers, sep="\n")


def _track(state: ServerState, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
    state.jobs.add(task)
    task.add_done_callback(state.jobs.discard)
    return task


async def _watch_disconnect(request: Request, turn: _Turn) -> None:
    """Stop a non-streamed turn whose client went away."""
    while not turn.flag[0]:
        if await request.is_disconnected():
            logger.info("client of session %s went away; stopping its reply", turn.session_id)
            turn.flag[0] = True
            return
        await asyncio.sleep(0.1)


# -- the other endpoints ------------------------------------------------------------------------


async def _embeddings(request: Request, state: ServerState) -> Response:
    body = await _json_body(request, state.max_body)
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
    if rt.memory is None:
        raise APIError(400, "embeddings are off (the server runs with --no-memory)", param="model")
    dims = body.get("dimensions")
    if dims is not None and dims != rt.memory.embedder.dim:
        raise bad_request("dimensions", f"this embedder only gives {rt.memory.embedder.dim}")
    vectors = await state.run(_ADMIN_KEY, lambda: rt.embed(texts))
    data = []
    for i, vec in enumerate(vectors):
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
            "model": rt.memory.embedder.model_id,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }
    )


async def _models(request: Request, state: ServerState) -> Response:
    model = {
        "id": state.rt.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "runtime",
    }
    return JSONResponse({"object": "list", "data": [model]})


def _hit(hit: Any) -> dict[str, Any]:
    return {
        "id": hit.id,
        "object": "memory",
        "text": hit.text,
        "kind": hit.kind,
        "session": hit.session,
        "score": hit.score,
        "similarity": hit.similarity,
        "importance": hit.importance,
        "created": hit.created,
        "meta": hit.meta,
    }


async def _remember(request: Request, state: ServerState) -> Response:
    body = await _json_body(request, state.max_body)
    text = chatmod.check_text(body.get("text"), "text")
    session = body.get("session")
    if session is not None:
        session = chatmod.check_session_id(session, "session")
    kind = body.get("kind", "fact")
    if not isinstance(kind, str) or not 1 <= len(kind) <= 32 or not kind.isidentifier():
        raise bad_request("kind", "must be an identifier of 1-32 characters")
    importance = chatmod._number(body, "importance")
    if importance is None:
        importance = 0.5
    if not 0.0 <= importance <= 1.0:
        raise bad_request("importance", f"must be in [0, 1], got {importance}")
    meta = body.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise bad_request("meta", "must be an object")
    rt = state.rt
    if rt.memory is None:
        raise APIError(400, "long-term memory is off (--no-memory)", param="text")

    def add() -> str:
        with rt._lock:
            return rt.remember(text, session=session, kind=kind, importance=importance, meta=meta)

    item_id = await state.run(_ADMIN_KEY, add)
    return JSONResponse({"id": item_id, "object": "memory", "text": text}, status_code=201)


async def _search(request: Request, state: ServerState) -> Response:
    q = chatmod.check_text(request.query_params.get("q"), "q")
    k_text = request.query_params.get("k", "5")
    try:
        k = int(k_text)
    except ValueError:
        raise bad_request("k", f"must be an integer, got {k_text!r}") from None
    if not 1 <= k <= 100:
        raise bad_request("k", f"must be in [1, 100], got {k}")
    session = request.query_params.get("session")
    if session is not None:
        session = chatmod.check_session_id(session, "session")
    rt = state.rt

    def search() -> list[Any]:
        with rt._lock:
            return rt.search(q, k, session=session)

    hits = await state.run(_ADMIN_KEY, search)
    return JSONResponse({"object": "list", "data": [_hit(h) for h in hits]})


async def _forget(request: Request, state: ServerState) -> Response:
    item_id = request.path_params["item_id"]
    if not 1 <= len(item_id) <= 128 or not item_id.replace("-", "").isalnum():
        raise bad_request("id", "not a memory id")
    rt = state.rt

    def forget() -> bool:
        with rt._lock:
            return rt.forget(item_id)

    if not await state.run(_ADMIN_KEY, forget):
        raise not_found(f"memory {item_id}")
    return JSONResponse({"id": item_id, "object": "memory.deleted", "deleted": True})


async def _sessions(request: Request, state: ServerState) -> Response:
    rt = state.rt

    def listing() -> list[dict[str, Any]]:
        return [
            rt.session_info(s) for s in rt.sessions() if not s.startswith(chatmod.EPHEMERAL_PREFIX)
        ]

    data = await state.run(_ADMIN_KEY, listing)
    return JSONResponse({"object": "list", "data": [{"object": "session", **i} for i in data]})


def _sid(request: Request) -> str:
    return chatmod.check_session_id(request.path_params["session_id"], "session_id")


async def _session(request: Request, state: ServerState) -> Response:
    sid, rt = _sid(request), state.rt

    def read() -> dict[str, Any]:
        with rt._lock:
            info = rt.session_info(sid)
            if not info["exists"]:
                raise not_found(f"session {sid}")
            return {"object": "session", **info, "history": rt.history(sid)}

    return JSONResponse(await state.run(sid, read))


async def _delete_session(request: Request, state: ServerState) -> Response:
    sid, rt = _sid(request), state.rt

    def delete() -> None:
        with rt._lock:
            if not rt.session_info(sid)["exists"]:
                raise not_found(f"session {sid}")
            rt.delete_session(sid)

    await state.run(sid, delete)
    return JSONResponse({"id": sid, "object": "session.deleted", "deleted": True})


async def _checkpoint(request: Request, state: ServerState) -> Response:
    sid, rt = _sid(request), state.rt

    def checkpoint() -> int:
        with rt._lock:
            if not rt.session_info(sid)["exists"]:
                raise not_found(f"session {sid}")
            return rt.checkpoint(sid)

    written = await state.run(sid, checkpoint)
    # 0: the session is not resident (suspended sessions are on disk already)
    return JSONResponse({"id": sid, "object": "session.checkpoint", "checkpointed": written})


async def _health(request: Request, state: ServerState) -> Response:
    down = state.stopping or state.draining
    return JSONResponse(
        {
            "status": "stopping" if down else "ok",
            "model": state.rt.model_name,
            "queue": state.queue.waiting,
        },
        status_code=503 if down else 200,
    )


async def _metrics(request: Request, state: ServerState) -> Response:
    return Response(
        generate_latest(state.metrics.registry),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


def create_app(
    rt: Runtime,
    *,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> Starlette:
    """The OpenAI-compatible application over an open runtime (which the caller closes).

    Args:
        rt: the runtime; every call into it goes through one fair, bounded queue.
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer``.
        max_body: request bodies larger than this many bytes get a 413.
        max_queue: requests waiting for the runtime at most; more get a 503 with
            ``Retry-After``.
    """
    if max_body < 1:
        raise ValueError("max_body must be >= 1")
    queue = FairQueue(max_queue)
    state = ServerState(rt, queue, _Metrics(queue), max_body)
    routes = [
        Route("/v1/chat/completions", _endpoint("chat", _chat), methods=["POST"]),
        Route("/v1/embeddings", _endpoint("embeddings", _embeddings), methods=["POST"]),
        Route("/v1/models", _endpoint("models", _models), methods=["GET"]),
        Route("/v1/memories", _endpoint("remember", _remember), methods=["POST"]),
        Route("/v1/memories/search", _endpoint("search", _search), methods=["GET"]),
        Route("/v1/memories/{item_id}", _endpoint("forget", _forget), methods=["DELETE"]),
        Route("/v1/sessions", _endpoint("sessions", _sessions), methods=["GET"]),
        Route("/v1/sessions/{session_id}", _endpoint("session", _session), methods=["GET"]),
        Route(
            "/v1/sessions/{session_id}",
            _endpoint("delete_session", _delete_session),
            methods=["DELETE"],
        ),
        Route(
            "/v1/sessions/{session_id}/checkpoint",
            _endpoint("checkpoint", _checkpoint),
            methods=["POST"],
        ),
        Route("/health", _endpoint("health", _health), methods=["GET"]),
        Route("/metrics", _endpoint("metrics", _metrics), methods=["GET"]),
    ]

    async def not_found_handler(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such endpoint" if status == 404 else "method not allowed"
        return APIError(status, f"{message}: {request.method} {request.url.path}").response()

    app = Starlette(
        routes=routes, exception_handlers={404: not_found_handler, 405: not_found_handler}
    )
    app.state.server = state
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body)
    return app


def serve(
    rt: Runtime,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    max_queue: int = DEFAULT_MAX_QUEUE,
    grace_s: float = 10.0,
    log_level: str = "warning",
) -> int:
    """Serve ``rt`` until SIGTERM or SIGINT, then close it; returns the exit code (0).

    On the signal, uvicorn stops accepting connections and new requests on open ones get a
    503. Non-streamed turns in flight get ``grace_s`` seconds to finish; streams are ended
    at once (sse-starlette watches the same signal). A turn stopped either way is kept and
    journalled as its partial reply with finish_reason ``"cancelled"``. Then the runtime is
    closed: final checkpoints of the resident sessions and pending writes.
    """
    import threading

    import uvicorn

    # Stateless requests run in tmp-* sessions deleted after the reply; a crash may have
    # left some behind, and "stateless" must not mean "kept on disk".
    for sid in rt.sessions():
        if sid.startswith(chatmod.EPHEMERAL_PREFIX):
            rt.delete_session(sid)
    app = create_app(rt, api_key=api_key, max_body=max_body, max_queue=max_queue)
    state: ServerState = app.state.server

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True
            timer = threading.Timer(grace_s, lambda: setattr(state, "stopping", True))
            timer.daemon = True
            timer.start()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has stopped, which would kill us before
            # the runtime's final checkpoints; we exit 0 ourselves instead
            self._captured_signals.clear()

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(grace_s) + 1,
        lifespan="off",
        access_log=False,
    )
    server = _Server(config)
    try:
        server.run()
    finally:
        state.stopping = True  # whatever still runs stops at its next token
        rt.close()
    return 0 if server.started else 1
