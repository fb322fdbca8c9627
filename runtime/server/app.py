"""The Starlette application: routes, authentication, limits, and :func:`serve`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.errors import ArgumentError, SessionLeasedError, SessionNotFoundError
from runtime.layout import is_ephemeral
from runtime.server.api_errors import APIError
from runtime.server.connections import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REQUEST_TIMEOUT_S,
    uvicorn_config,
)
from runtime.server.scheduler import FairQueue
from runtime.server.tenants import Keys

if TYPE_CHECKING:
    from runtime.app import Runtime

from runtime.server.api_errors import RETRY_AFTER_S as RETRY_AFTER_S
from runtime.server.completions import chat_completions
from runtime.server.endpoints import (
    checkpoint_endpoint,
    delete_session_endpoint,
    embeddings_endpoint,
    forget_endpoint,
    health_endpoint,
    import_endpoint,
    metrics_endpoint,
    models_endpoint,
    remember_endpoint,
    search_endpoint,
    session_endpoint,
    sessions_endpoint,
)
from runtime.server.state import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_QUEUE,
    Metrics,
    ServerState,
    endpoint,
    too_big,
)
from runtime.server.state import Handler as Handler

logger = logging.getLogger(__name__)

# -- middleware ---------------------------------------------------------------------------------


class _Guard:
    """Bearer authentication (every path but /health; the scheme's case does not matter,
    RFC 7235), which names the request's tenant (``scope["state"]["tenant"]``), and the
    request body limit (413). ``failed`` counts refused credentials."""

    def __init__(
        self, app: ASGIApp, keys: Keys | None, max_body: int, failed: Callable[[], None]
    ) -> None:
        self.app = app
        self.keys = keys
        self.max_body = max_body
        self.failed = failed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.keys is not None and scope["path"] != "/health":
            scheme, _, given = headers.get("authorization", b"").strip().partition(b" ")
            known, tenant = self.keys.tenant(given.strip())
            if scheme.lower() != b"bearer" or not known:
                self.failed()
                err = APIError(401, "invalid or missing API key", code="invalid_api_key")
                err.headers["WWW-Authenticate"] = "Bearer"
                await err.response()(scope, receive, send)
                return
            scope.setdefault("state", {})["tenant"] = tenant
        length = headers.get("content-length")
        if length is not None:
            try:
                over = int(length) > self.max_body
            except ValueError:
                over = True
            if over:
                await too_big(self.max_body).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    rt: Runtime,
    *,
    api_key: str | None = None,
    api_keys: Keys | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> Starlette:
    """The OpenAI-compatible application over an open runtime (which the caller closes).

    Args:
        rt: the runtime; every call into it goes through one fair, bounded queue.
        api_key: when set, every endpoint but ``/health`` needs ``Authorization: Bearer``
            with this key (one tenant: the data directory's own ids).
        api_keys: instead, keys that each name a tenant (:mod:`runtime.server.tenants`):
            a request reaches only its tenant's sessions and memories, and the tenants
            take turns in the queue, each holding at most its share of the waiting places.
        max_body: request bodies larger than this many bytes get a 413.
        max_queue: requests waiting for the runtime at most; more get a 503 with
            ``Retry-After``.
    """
    if max_body < 1:
        raise ArgumentError("max_body must be >= 1")
    if api_key is not None and api_keys is not None:
        raise ArgumentError("give api_key or api_keys, not both")
    keys = Keys.single(api_key) if api_key is not None else api_keys
    tenants = len(keys.tenants) if keys is not None else 1
    # as many turns at once as the runtime has sequences: their replies share each decode
    queue = FairQueue(
        max_queue, slots=rt.config.max_resident, tenant_share=max(1, max_queue // tenants)
    )
    state = ServerState(rt, queue, Metrics(queue), max_body)
    routes = [
        Route("/v1/chat/completions", endpoint("chat", chat_completions), methods=["POST"]),
        Route("/v1/embeddings", endpoint("embeddings", embeddings_endpoint), methods=["POST"]),
        Route("/v1/models", endpoint("models", models_endpoint), methods=["GET"]),
        Route("/v1/memories", endpoint("remember", remember_endpoint), methods=["POST"]),
        Route("/v1/memories/search", endpoint("search", search_endpoint), methods=["GET"]),
        Route("/v1/memories/{item_id}", endpoint("forget", forget_endpoint), methods=["DELETE"]),
        Route("/v1/sessions", endpoint("sessions", sessions_endpoint), methods=["GET"]),
        Route("/v1/sessions/{session_id}", endpoint("session", session_endpoint), methods=["GET"]),
        Route(
            "/v1/sessions/{session_id}",
            endpoint("delete_session", delete_session_endpoint),
            methods=["DELETE"],
        ),
        Route(
            "/v1/sessions/{session_id}/checkpoint",
            endpoint("checkpoint", checkpoint_endpoint),
            methods=["POST"],
        ),
        Route(
            "/v1/sessions/{session_id}/import",
            endpoint("import", import_endpoint),
            methods=["POST"],
        ),
        Route("/health", endpoint("health", health_endpoint), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics_endpoint), methods=["GET"]),
    ]

    async def not_found_handler(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such endpoint" if status == 404 else "method not allowed"
        return APIError(status, f"{message}: {request.method} {request.url.path}").response()

    app = Starlette(
        routes=routes, exception_handlers={404: not_found_handler, 405: not_found_handler}
    )
    app.state.server = state
    app.add_middleware(_Guard, keys=keys, max_body=max_body, failed=state.metrics.auth_failed.inc)
    return app


def serve(
    rt: Runtime,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    api_keys: Keys | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    max_queue: int = DEFAULT_MAX_QUEUE,
    grace_s: float = 10.0,
    log_level: str = "warning",
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> int:
    """Serve ``rt`` until SIGTERM or SIGINT, then close it; returns the exit code (0).

    A client gets ``request_timeout`` seconds from a request's first byte to send all of it,
    and at most ``max_connections`` connections and requests are open at once (then 503s;
    :mod:`runtime.server.connections`). On the signal, uvicorn stops accepting connections
    and new requests on open ones get a 503. Non-streamed turns in flight get ``grace_s``
    seconds to finish; a stream stops at its next token and ends as any stream does: its
    finish chunk (``stop_reason`` ``"cancelled"``) and ``[DONE]``. A turn stopped either way
    is kept and journalled as its partial reply with finish_reason ``"cancelled"``. Then the
    runtime is closed: final checkpoints of the resident sessions and pending writes.
    """
    import contextlib
    import signal
    import threading
    from collections.abc import Iterator

    import uvicorn

    # Stateless requests run in ephemeral sessions deleted after the reply; a crash may have
    # left some behind, and "stateless" must not mean "kept on disk". No user id is one.
    for sid in rt.sessions():
        if is_ephemeral(sid):
            try:
                rt.delete_session(sid)
            except (SessionLeasedError, SessionNotFoundError):  # a live peer's, or gone
                continue
    app = create_app(rt, api_key=api_key, api_keys=api_keys, max_body=max_body, max_queue=max_queue)
    state: ServerState = app.state.server
    state.grace_s = grace_s

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True
            timer = threading.Timer(grace_s, lambda: setattr(state, "stopping", True))
            timer.daemon = True
            timer.start()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own version re-raises the signal once it has stopped, which would
            # kill us before the runtime's final checkpoints; we exit 0 ourselves instead
            if threading.current_thread() is not threading.main_thread():
                yield  # signals reach the main thread only
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            before = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

    config = uvicorn_config(
        app,
        host=host,
        port=port,
        request_timeout=request_timeout,
        max_connections=max_connections,
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
