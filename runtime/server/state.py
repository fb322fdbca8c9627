"""What every endpoint shares: limits, metrics, the server state (the runtime behind one
fair queue), body parsing and the error-mapping endpoint wrapper."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import Response

from runtime.server import chat_request as chatmod
from runtime.server.api_errors import RETRY_AFTER_S, APIError
from runtime.server.scheduler import FairQueue, QueueFullError

if TYPE_CHECKING:
    from runtime.app import Reply, Runtime

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20
DEFAULT_MAX_QUEUE = 64
ADMIN_KEY = "\x00admin"  # the queue key of non-chat calls (never a valid session id)


def admin_key(tenant: str | None) -> str:
    """The queue key of a tenant's non-chat calls (never a session id, nor another's key)."""
    return ADMIN_KEY if tenant is None else f"{ADMIN_KEY}~{tenant}"


def request_tenant(request: Request) -> str | None:
    """The tenant whose key the request presented (``None``: the server has no tenants)."""
    tenant: str | None = request.scope.get("state", {}).get("tenant")
    return tenant


class Metrics:
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
        self.auth_failed = Counter(
            "runtime_auth_failed", "Requests refused for a missing or wrong API key", registry=r
        )
        depth = Gauge("runtime_queue_depth", "Requests waiting for the runtime", registry=r)
        depth.set_function(lambda: queue.waiting)
        busy = Gauge("runtime_queue_busy", "Jobs running in the runtime now", registry=r)
        busy.set_function(lambda: float(queue.running))

    def turn(self, reply: Reply) -> None:
        self.tokens.labels("prompt").inc(reply.prompt_tokens)
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
    metrics: Metrics
    max_body: int
    stopping: bool = False
    draining: bool = False
    grace_s: float = 10.0  # what in-flight turns get on SIGTERM (serve's grace_s)
    started: int = field(default_factory=lambda: int(time.time()))
    jobs: set[asyncio.Task[Any]] = field(default_factory=set)

    async def run(self, key: str, fn: Callable[[], Any], tenant: str | None = None) -> Any:
        """``fn`` in a worker thread, holding the runtime's turn (503 when the queue, or the
        tenant's share of it, is full)."""
        if self.stopping or self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        try:
            return await self.queue.run(key, fn, tenant)
        except QueueFullError:
            raise queue_full(self) from None


def queue_full(state: ServerState) -> APIError:
    """The 503 for a full queue (counted in the metrics), with ``Retry-After``."""
    state.metrics.rejected.inc()
    return APIError(
        503,
        f"the server is busy ({state.queue.waiting} requests waiting); retry shortly",
        code="queue_full",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def too_big(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read at most ``limit`` bytes far (chunked bodies too)."""
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise too_big(limit)
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        # a few thousand nested arrays exhaust the parser's stack
        raise APIError(400, "the body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


Handler = Callable[[Request, ServerState], Awaitable[Response]]


def endpoint(name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: OpenAI-format errors, request counts and latencies."""

    async def wrapped(request: Request) -> Response:
        state: ServerState = request.app.state.server
        start = time.perf_counter()
        try:
            response = await handler(request, state)
        except APIError as exc:
            response = exc.response()
        except Exception as exc:
            err = chatmod.map_runtime_error(exc, request_tenant(request))
            if err.status >= 500:
                logger.exception("%s failed", name)
            response = err.response()
        state.metrics.requests.labels(name, str(response.status_code)).inc()
        state.metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    return wrapped
