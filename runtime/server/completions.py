"""``POST /v1/chat/completions``: a turn on the runtime, streamed (SSE) or not, cancelled
when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runtime.errors import SessionNotFoundError
from runtime.layout import ephemeral_id
from runtime.server import chat_request as chatmod
from runtime.server.api_errors import APIError
from runtime.server.scheduler import QueueFullError

if TYPE_CHECKING:
    from runtime.app import Reply

from runtime.server.state import ServerState, json_body, queue_full, request_tenant
from runtime.server.tenants import inner

logger = logging.getLogger(__name__)

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
    retry: bool = False  # the request retries the unanswered last turn: answer it

    def cancelled(self) -> bool:
        # a stream stops at the next token once the server drains (then ends with its
        # finish_reason and [DONE]); a non-streamed turn gets the grace period
        return self.flag[0] or self.state.stopping or (self.req.stream and self.state.draining)

    def prepare(self) -> None:
        """Check the history against the journal and import what it lacks (worker thread).

        The queue runs one job per session at a time, so the journal read here is still the
        journal when the import appends to it."""
        rt, req = self.state.rt, self.req
        if not self.ephemeral:
            rt.admit(self.session_id)  # a 429 now, not an error chunk after a 200
        if self.ephemeral:
            missing = list(req.turns[:-1])
            is_new = True
        elif len(req.turns) == 1 and req.system is None:
            # only the new user message: nothing to compare, and no need to read the
            # whole history of a long session on every request; but the same text as a
            # turn a crash left unanswered is its retry (the client never saw a reply)
            pending = rt.unanswered(self.session_id)
            self.retry = pending is not None and pending.strip() == req.text.strip()
            return
        else:
            journal = rt.history(self.session_id)
            if chatmod.is_retry(journal, req.turns):
                self.retry = True
                return
            missing = chatmod.missing_turns(journal, req.turns)
            is_new = not journal
        messages = chatmod.import_messages(req.system, missing, is_new=is_new)
        if messages:
            rt.import_history(self.session_id, messages, remember=req.remember)

    def run(self, on_token: Callable[[str], None] | None) -> Reply:
        """The turn itself (worker thread); an ephemeral session is deleted after it."""
        rt, req, p = self.state.rt, self.req, self.req.sampling
        sampling: dict[str, Any] = {
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "min_p": p.min_p,
            "repeat_penalty": p.repeat_penalty,
            "seed": p.seed,
            "stop": req.stop,
            "on_token": on_token,
            "cancelled": self.cancelled,
        }
        try:
            if self.retry:
                reply = rt.answer(self.session_id, **sampling)
            else:
                reply = rt.chat(
                    self.session_id,
                    req.text,
                    remember=req.remember,
                    importance=req.importance,
                    use_memory=req.use_memory,
                    user=req.user,
                    **sampling,
                )
            self.state.metrics.turn(reply)  # counted even when nobody listens
            return reply
        finally:
            if self.ephemeral:
                self.discard()

    def discard(self) -> None:
        try:
            self.state.rt.delete_session(self.session_id)
        except SessionNotFoundError:
            pass  # a refused first turn removed it already
        except Exception:
            logger.exception("could not delete ephemeral session %s", self.session_id)


async def chat_completions(request: Request, state: ServerState) -> Response:
    rt = state.rt
    body = await json_body(request, state.max_body)
    req = chatmod.parse_chat(body, request.headers.get("x-session-id"), rt.sampling, rt.n_ctx)
    tenant = request_tenant(request)
    ephemeral = req.session_id is None
    # the tenant's session (its stateless requests too: they see the tenant's memories)
    sid = (
        ephemeral_id(tenant)
        if req.session_id is None
        else inner(tenant, req.session_id, "session_id")
    )
    turn = _Turn(state, req, sid, ephemeral)
    key = sid  # an ephemeral session is its own key: stateless requests run side by side
    if state.stopping or state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    try:
        await state.queue.acquire(key, tenant)
    except QueueFullError:
        raise queue_full(state) from None
    # holding the runtime's turn from here: every path below releases it exactly once
    try:
        await asyncio.shield(asyncio.ensure_future(run_in_threadpool(turn.prepare)))
    except BaseException:
        if ephemeral:
            await asyncio.shield(asyncio.ensure_future(run_in_threadpool(turn.discard)))
        state.queue.release(key)
        raise
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    model = rt.model_name
    out_sid = req.session_id  # as the client named it (None: stateless)
    if not req.stream:
        watcher = asyncio.ensure_future(_watch_disconnect(request, turn))
        task = _track(state, state.queue.start(key, lambda: turn.run(None)))
        try:
            reply: Reply = await asyncio.shield(task)
        finally:
            watcher.cancel()
        return JSONResponse(chatmod.completion(cid, model, reply, out_sid))

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def on_token(piece: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    task = _track(state, state.queue.start(key, lambda: turn.run(on_token)))
    task.add_done_callback(lambda _t: pieces.put_nowait(None))

    created = int(time.time())

    def chunk(delta: dict[str, Any] | None, finish: str | None = None, **kw: Any) -> str:
        body = chatmod.chunk(
            cid, model, delta, finish, created=created, include_usage=req.include_usage, **kw
        )
        return json.dumps(body)

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            first = {"role": "assistant", "content": ""}
            yield {"data": chunk(first)}
            while (piece := await pieces.get()) is not None:
                yield {"data": chunk({"content": piece})}
            try:
                reply = task.result()
            except Exception as exc:
                logger.warning("streamed turn failed: %s", exc)
                err = chatmod.map_runtime_error(exc, request_tenant(request))
                yield {"data": json.dumps(err.body())}
                yield {"data": "[DONE]"}
                return
            yield {"data": chunk({}, reply.finish_reason)}
            if req.include_usage:
                yield {"data": chunk(None, usage_body=chatmod.usage(reply))}
            yield {"data": "[DONE]"}
        finally:
            turn.flag[0] = True  # a no-op when the turn has ended; stops it when not

    headers = {"X-Session-Id": out_sid} if out_sid else None
    # on SIGTERM sse-starlette would cut the stream at once; the grace lets events() see its
    # turn stop (cancelled() above) and send the finish chunk and [DONE] first
    return EventSourceResponse(
        events(), headers=headers, sep="\n", shutdown_grace_period=state.grace_s
    )


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
