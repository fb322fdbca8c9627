"""``/v1/chat/completions``: the request checked field by field, and the turn it becomes.

With a session, the server holds the conversation. The client sends either only the new user
message or the whole history; a history is compared with the session's journal (user and
assistant texts, whitespace at the ends ignored) and only what the journal lacks is added.
A history that contradicts the journal is a 409. Without a session the request is stateless:
it runs in an ephemeral session (``_tmp-<hex>``, :func:`runtime.layout.ephemeral_id`: a
client may not name one) that is deleted, with its files, after the reply; none of its turns
reach long-term memory.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runtime.app import (
    MAX_STOP_STRINGS,
    ContextFullError,
    RuntimeArgumentError,
    Sampling,
    SessionLeasedError,
    SessionLimitError,
)
from runtime.arguments import check_text as runtime_check_text
from runtime.arguments import check_user
from runtime.errors import PersistError, SessionError, SessionNotFoundError
from runtime.layout import TENANT_SEP, is_ephemeral, validate_session_id
from runtime.server.api_errors import RETRY_AFTER_S, APIError, bad_request, known_fields

if TYPE_CHECKING:
    from runtime.app import Reply

#: Request fields accepted and ignored (documented as such).
IGNORED_FIELDS = frozenset(
    {"model", "parallel_tool_calls", "store", "metadata", "service_tier", "tool_choice"}
)
#: Fields accepted only at their "off" value (what OpenAI clients send by default).
_OFF_FIELDS = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {})}
#: Every field a chat request may carry; any other is a 400 (a ``max_token`` typo would
#: otherwise silently get the default).
KNOWN_FIELDS = IGNORED_FIELDS | _OFF_FIELDS.keys() | {
    "messages", "session_id", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop", "n",
    "presence_penalty", "frequency_penalty", "remember", "use_memory", "importance", "user",
    "tools", "functions", "response_format",
}  # fmt: skip
#: Fields whose only supported value is the default.
_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class ChatRequest:
    """A checked chat request."""

    session_id: str | None
    system: str | None
    turns: list[tuple[str, str]]  # (role, text), alternating, ending with a user message
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    remember: bool
    use_memory: bool
    importance: float
    user: str | None = None  #: OpenAI's end-user id, recorded in the turn's journal meta

    @property
    def text(self) -> str:
        """The new user message."""
        return self.turns[-1][1]


def number(body: Mapping[str, Any], name: str, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(name, f"must be a number, got {type(value).__name__}")
    if integer:
        if isinstance(value, float):
            if not value.is_integer():
                raise bad_request(name, f"must be an integer, got {value}")
            value = int(value)
    elif not math.isfinite(value):
        raise bad_request(name, f"must be finite, got {value}")
    return value


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(name, f"must be a boolean, got {type(value).__name__}")
    return value


def check_text(value: object, param: str) -> str:
    """A text the runtime takes (its own rule, :func:`runtime.arguments.check_text`: not
    blank, at most :data:`runtime.arguments.MAX_TEXT_CHARS` characters, valid Unicode, no
    NUL), as a 400 naming ``param``."""
    try:
        return runtime_check_text(value, param)
    except RuntimeArgumentError as exc:
        raise bad_request(param, str(exc).split(": ", 1)[-1]) from None


def check_session_id(value: object, param: str) -> str:
    """A valid session id (``runtime.layout.validate_session_id``), as a 400 naming ``param``."""
    if not isinstance(value, str):
        raise bad_request(param, f"must be a string, got {type(value).__name__}")
    if is_ephemeral(value):
        raise bad_request(param, "ids of the form _tmp-<32 hex> are the server's own")
    try:
        return validate_session_id(value)
    except ValueError as exc:
        raise bad_request(param, str(exc)) from None


def message_content(message: Mapping[str, Any], i: int) -> str:
    """Message ``i``'s text: a string, or OpenAI's text parts joined; a 400 naming the part
    that is not text."""
    param = f"messages[{i}].content"
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(f"{param}[{j}]", "only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{param}[{j}].text", "must be a string")
            parts.append(text)
        content = "".join(parts)
    return check_text(content, param)


def _messages(body: Mapping[str, Any]) -> tuple[str | None, list[tuple[str, str]]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "must be a non-empty array")
    if len(messages) > 1000:
        raise bad_request("messages", "at most 1000 messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}]", "must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise bad_request(
                f"messages[{i}].role", f"must be one of {', '.join(_ROLES)}, got {role!r}"
            )
        if message.get("tool_calls"):
            raise bad_request(f"messages[{i}].tool_calls", "tools are not supported")
        text = message_content(message, i)
        if role in ("system", "developer"):
            if turns:
                raise bad_request(f"messages[{i}].role", "system messages must come first")
            system.append(text)
            continue
        # a reply answers a user turn; user turns may follow each other (a multi-party
        # import, or a turn whose reply a crash cut off): any history the server produced
        if role == "assistant" and (not turns or turns[-1][0] == "assistant"):
            raise bad_request(f"messages[{i}].role", "an assistant message must follow a user one")
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise bad_request("messages", "the last message must be from the user")
    return ("\n\n".join(system) if system else None), turns


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or len(items) > MAX_STOP_STRINGS:
        raise bad_request("stop", f"must be a string or at most {MAX_STOP_STRINGS} strings")
    for item in items:
        if not isinstance(item, str) or not 1 <= len(item) <= 64:
            raise bad_request("stop", "each stop string must be 1-64 characters")
    return tuple(items)


def parse_chat(
    body: Mapping[str, Any], header_session: str | None, defaults: Sampling, n_ctx: int
) -> ChatRequest:
    """Check every field of a chat request; a 400 :class:`APIError` names the first bad one."""
    known_fields(body, KNOWN_FIELDS)
    for name, off in _OFF_FIELDS.items():
        value = body.get(name)
        if not any(value == v and type(value) is type(v) for v in off):
            raise bad_request(name, f"is not supported (only {off[-1]!r})")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("response_format", "only {'type': 'text'} is supported")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools", "tools are not supported")
    n = number(body, "n", integer=True)
    if n is not None and n != 1:
        raise bad_request("n", f"only n=1 is supported, got {n}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = number(body, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise bad_request(name, f"must be in [-2, 2], got {value}")  # accepted, ignored
    session_id: str | None = None
    if header_session is not None:
        session_id = check_session_id(header_session, "X-Session-Id")
    if body.get("session_id") is not None:
        body_session = check_session_id(body["session_id"], "session_id")
        if session_id is not None and body_session != session_id:
            raise bad_request("session_id", "differs from the X-Session-Id header")
        session_id = body_session
    system, turns = _messages(body)

    changes: dict[str, Any] = {}
    max_tokens = number(body, "max_completion_tokens", integer=True)
    max_name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_name = number(body, "max_tokens", integer=True), "max_tokens"
    if max_tokens is not None:
        changes["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
        value = number(body, name)
        if value is not None:
            changes[name] = value
    for name in ("top_k", "seed"):
        value = number(body, name, integer=True)
        if value is not None:
            changes[name] = value
    try:
        sampling = dataclasses.replace(defaults, **changes).check(n_ctx)
    except RuntimeArgumentError as exc:
        param = max_name if exc.field == "max_tokens" else exc.field
        raise bad_request(param, str(exc).split(": ", 1)[-1]) from None

    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options", "must be an object")
    include_usage = bool(options and _bool(options, "include_usage", False))
    importance = number(body, "importance")
    if importance is not None and not 0.0 <= importance <= 1.0:
        raise bad_request("importance", f"must be in [0, 1], got {importance}")
    return ChatRequest(
        session_id=session_id,
        system=system,
        turns=turns,
        sampling=sampling,
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        remember=_bool(body, "remember", True) and session_id is not None,
        use_memory=_bool(body, "use_memory", True),
        importance=0.5 if importance is None else float(importance),
        user=_user(body),
    )


def _user(body: Mapping[str, Any]) -> str | None:
    try:
        return check_user(body.get("user"))
    except RuntimeArgumentError as exc:
        raise bad_request("user", str(exc).split(": ", 1)[-1]) from None


# -- the conversation against the journal -------------------------------------------------------


def _turns_of(journal: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in journal if e["role"] in ("user", "assistant")]


def same_turn(turn: tuple[str, str], entry: Mapping[str, Any]) -> bool:
    """Whether the client's ``(role, text)`` is the journal's turn ``entry``: the same role
    and text (whitespace at the ends ignored). A reply the server cut short (a client that
    went away, a shutdown: ``finish`` ``"cancelled"``) may have been journalled a few
    tokens past what reached the client, so there the client's text need only begin it."""
    role, text = turn[0], turn[1].strip()
    if role != entry["role"]:
        return False
    kept = str(entry["text"]).strip()
    if entry.get("finish") == "cancelled":
        return kept.startswith(text)
    return text == kept


def is_retry(journal: Sequence[Mapping[str, Any]], turns: Sequence[tuple[str, str]]) -> bool:
    """Whether ``turns`` retries the journal's last turn, a user turn whose reply never came
    (the process died mid-reply): the history before it is the journal's, and its text is
    that turn's. The retry is then answered (:meth:`Runtime.answer`), not added again."""
    known = _turns_of(journal)
    if not known or known[-1]["role"] != "user" or len(known) != len(turns):
        return False
    return all(same_turn(t, e) for t, e in zip(turns, known, strict=True))


def missing_turns(
    journal: Sequence[Mapping[str, Any]], turns: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The turns of ``turns`` before its last (new) user message that the journal lacks.

    ``journal`` is :meth:`Runtime.history`. A single message is always new. Raises a 409
    :class:`APIError` when the two disagree, or when the journal holds turns the history
    does not. Trailing user turns whose reply never came (the process died mid-reply) are
    left out of the comparison: the client never saw them answered (:func:`is_retry`
    tells a retry of the last one).
    """
    if len(turns) == 1:
        return []
    known = _turns_of(journal)
    while known and known[-1]["role"] == "user" and len(known) > len(turns) - 1:
        known.pop()
    prior = turns[:-1]
    for i, ((role, text), entry) in enumerate(zip(prior, known, strict=False)):
        if not same_turn((role, text), entry):
            j_role, j_text = entry["role"], str(entry["text"])
            raise APIError(
                409,
                f"messages: the history contradicts session turn {i + 1} ({j_role}: "
                f"{_clip(j_text)!r}, got {role}: {_clip(text)!r}); send only the new user "
                "message, or the history exactly as the server returned it",
                param="messages",
                code="history_conflict",
            )
    if len(known) > len(prior):
        raise APIError(
            409,
            f"messages: the session has {len(known)} turns but the history sent has "
            f"{len(prior)} before the new message; send only the new user message, or the "
            "whole history (GET /v1/sessions/{id})",
            param="messages",
            code="history_conflict",
        )
    return list(prior[len(known) :])


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def import_messages(
    system: str | None, turns: Sequence[tuple[str, str]], *, is_new: bool
) -> list[dict[str, str]]:
    """The messages :meth:`Runtime.import_history` adds before the new user message: the
    client's system message (only for a new session: a session keeps its own) and the turns
    the journal lacks."""
    messages = []
    if is_new and system is not None:
        messages.append({"role": "system", "content": system})
    messages += [{"role": role, "content": text} for role, text in turns]
    return messages


def wire_ids(message: str, tenant: str | None) -> str:
    """A runtime message with the tenant's quoted session ids as the tenant sends them: the
    runtime knows tenant ``acme``'s session ``a1`` as ``'acme~a1'`` (an ephemeral one as
    ``'acme~_tmp-...'``); the tenant's name is the operator's. Without a tenant, as it is."""
    return message if tenant is None else message.replace(f"'{tenant}{TENANT_SEP}", "'")


def map_runtime_error(exc: Exception, tenant: str | None = None) -> APIError:
    """A runtime exception raised during a turn of ``tenant``'s, as an API error."""
    if isinstance(exc, APIError):
        return exc
    message = wire_ids(str(exc), tenant)
    if isinstance(exc, SessionNotFoundError):
        return APIError(404, message, code="not_found")
    if isinstance(exc, RuntimeArgumentError):
        return bad_request(exc.field, message.split(": ", 1)[-1])
    if isinstance(exc, ContextFullError):
        return APIError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(exc, SessionLeasedError):
        # another node serves it: the client goes there (or retries here after the lease)
        headers = {"x-session-owner": exc.owner}
        if exc.address:
            headers["x-session-owner-url"] = exc.address
        return APIError(409, message, code="session_leased", headers=headers)
    if isinstance(exc, SessionLimitError):
        # not transient: the OpenAI SDK would retry a 429 without this header
        return APIError(429, message, code="session_limit", headers={"x-should-retry": "false"})
    if isinstance(exc, SessionError):
        # the session cannot go on as it is (its journal is another model's, or retention
        # left nothing to rebuild it from): the message says what to do, and the same
        # request gets the same answer, so the SDK must not retry it
        return APIError(409, message, code="session_unusable", headers={"x-should-retry": "false"})
    if isinstance(exc, PersistError):
        # the journal's store could not be written or reached (a disk, PostgreSQL, S3):
        # nothing was acknowledged, and the same request works once it is back. The details
        # (paths, hosts) go to the log, not to the client.
        return APIError(
            503,
            f"the server's storage is unavailable ({type(exc).__name__}); nothing was "
            "acknowledged, retry",
            code="storage_unavailable",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return APIError(500, f"the turn failed: {type(exc).__name__}", code="internal_error")


# -- responses ----------------------------------------------------------------------------------


def usage(reply: Reply) -> dict[str, Any]:
    """OpenAI usage: ``prompt_tokens`` counts the cached ones too (``cached_tokens``: the
    window the turn found in the KV, an imported history included)."""
    prompt = reply.prompt_tokens + reply.cached_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": prompt + reply.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
    }


def finish_reason(reason: str | None) -> str | None:
    """An OpenAI ``finish_reason``: ours when OpenAI has it, else ``"stop"`` (a cancelled
    reply stopped; our own reason goes in the choice's ``stop_reason``)."""
    if reason is None or reason in ("stop", "length"):
        return reason
    return "stop"


def completion(cid: str, model: str, reply: Reply, session_id: str | None) -> dict[str, Any]:
    """The non-streamed response body."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": finish_reason(reply.finish_reason),
                "stop_reason": reply.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(reply),
        "session_id": session_id,
        "system_fingerprint": None,
    }


def chunk(
    cid: str,
    model: str,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    *,
    created: int,
    include_usage: bool = False,
    usage_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed chunk (``delta=None``: the usage-only chunk with no choices).

    Every chunk of a stream has the stream's ``created``. With ``include_usage``, every chunk
    carries ``usage`` (``null`` but in the last), as OpenAI's do."""
    choice: dict[str, Any] = {
        "index": 0,
        "delta": delta,
        "finish_reason": finish_reason(finish),
        "logprobs": None,
    }
    if finish is not None:
        choice["stop_reason"] = finish
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [] if delta is None else [choice],
    }
    if include_usage or usage_body is not None:
        body["usage"] = usage_body
    return body
