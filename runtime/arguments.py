"""The arguments of the public API and their rules, in one place: texts, numbers, stop
strings, a turn's time and end-user id, and a turn's :class:`Sampling`. The runtime, the
server and long-term memory check with these (session and tenant ids are
:mod:`runtime.layout`'s, where they become names on disk)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from runtime.errors import ArgumentError, ArgumentTypeError, RuntimeArgumentError

__all__ = [
    "MAX_EMBED_TEXTS",
    "MAX_STOP_STRINGS",
    "MAX_TEXT_CHARS",
    "MAX_USER_CHARS",
    "Sampling",
    "SamplingOverrides",
    "check_created",
    "check_int",
    "check_number",
    "check_stop",
    "check_text",
    "check_user",
    "stored_text",
]

#: Texts longer than this (in characters) are refused: a turn, a memory, a message.
MAX_TEXT_CHARS = 100_000
MAX_STOP_STRINGS = 8
#: Texts one embeddings call takes at most.
MAX_EMBED_TEXTS = 256
#: The longest end-user id (OpenAI's ``user``) a turn records.
MAX_USER_CHARS = 256


def check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` if it is an integer in ``[low, high]``; else :class:`RuntimeArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeArgumentError(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise RuntimeArgumentError(name, f"must be in [{low}, {high}], got {value}")
    return value


def check_number(
    name: str, value: object, low: float, high: float, *, low_open: bool = False
) -> float:
    """``value`` as a float if it is a number in ``[low, high]`` (``(low, high]`` with
    ``low_open``); else :class:`RuntimeArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RuntimeArgumentError(name, f"must be a number, got {value!r}")
    v = float(value)
    ok = (low < v if low_open else low <= v) and v <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise RuntimeArgumentError(name, f"must be in {bracket}{low}, {high}], got {value}")
    return v


def stored_text(text: object) -> str:
    """``text`` if it may be stored or said: a non-blank str of at most
    :data:`MAX_TEXT_CHARS` characters that UTF-8 can encode (no lone UTF-16 surrogate: a
    JSON ``"\\ud800"`` escape or undecodable input read with ``surrogateescape``) and that
    holds no NUL (llama.cpp's C strings end at one) (:class:`ArgumentTypeError` for another
    type, :class:`ArgumentError` otherwise). Long-term memory checks every item with it."""
    if not isinstance(text, str):
        raise ArgumentTypeError(f"text must be str, not {type(text).__name__}")
    if not text.strip():
        raise ArgumentError("text must not be empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ArgumentError(f"text is {len(text)} characters; at most {MAX_TEXT_CHARS}")
    if "\x00" in text:
        raise ArgumentError(f"text contains a NUL character (at {text.index(chr(0))})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ArgumentError(
            f"text is not valid Unicode: a lone surrogate at {exc.start} (bytes that are not "
            "UTF-8, or an escape such as \\ud800)"
        ) from None
    return text


def check_text(text: object, name: str = "text") -> str:
    """:func:`stored_text`'s rule for a runtime call's argument: the error is a
    :class:`RuntimeArgumentError` naming ``name``."""
    try:
        return stored_text(text)
    except (ArgumentError, ArgumentTypeError) as exc:
        message = str(exc).removeprefix("text ")
        raise RuntimeArgumentError(name, message) from None


def check_stop(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    """The caller's stop strings: at most :data:`MAX_STOP_STRINGS`, each 1-64 characters."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    items = list(stop)
    if len(items) > MAX_STOP_STRINGS:
        raise RuntimeArgumentError("stop", f"at most {MAX_STOP_STRINGS} strings")
    for item in items:
        if not isinstance(item, str) or not item or len(item) > 64:
            raise RuntimeArgumentError("stop", "each stop string must be 1-64 characters")
    return tuple(items)


def check_created(value: object, name: str = "created_at") -> float | None:
    """A turn's time: ``None`` (now), UNIX seconds, or an ISO-8601 string (naive: UTC)."""
    import datetime as dt

    if value is None:
        return None
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            raise RuntimeArgumentError(name, f"is not an ISO-8601 time: {value!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        value = when.timestamp()
    seconds = check_number(name, value, 0.0, 1e11)
    if not math.isfinite(seconds):
        raise RuntimeArgumentError(name, f"must be finite, got {value!r}")
    return seconds


def check_user(value: object) -> str | None:
    """An end-user id: ``None``, or a non-empty string of at most :data:`MAX_USER_CHARS`
    printable characters (it is recorded, never put into a prompt)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RuntimeArgumentError("user", f"must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_USER_CHARS or not value.isprintable():
        raise RuntimeArgumentError(
            "user", f"must be 1-{MAX_USER_CHARS} printable characters, got {value[:40]!r}"
        )
    return value


@dataclass(frozen=True)
class Sampling:
    """How a reply is sampled. ``temperature=0`` is greedy (deterministic).

    The defaults were chosen on SmolLM2-135M-Instruct: greedy decoding there sometimes loops
    ("Eenie een een ..."); a low temperature with a mild repeat penalty over the last 64
    tokens keeps answers short and on topic. ``seed=None`` derives the seed from the session
    id and the turn's journal position, so a replayed conversation samples the same way.
    """

    max_tokens: int = 128
    temperature: float = 0.2
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None

    def check(self, n_ctx: int) -> Sampling:
        """Validate every field; raises :class:`RuntimeArgumentError` naming the first bad one."""
        check_int("max_tokens", self.max_tokens, 1, n_ctx)
        check_number("temperature", self.temperature, 0.0, 5.0)
        check_int("top_k", self.top_k, 0, 1_000_000)
        check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_number("min_p", self.min_p, 0.0, 1.0)
        check_number("repeat_penalty", self.repeat_penalty, 0.0, 10.0, low_open=True)
        check_int("repeat_last_n", self.repeat_last_n, 0, n_ctx)
        if self.seed is not None:
            check_int("seed", self.seed, 0, 2**32 - 1)
        return self

    def with_overrides(self, **changes: Any) -> Sampling:
        """A copy with the fields given (``None`` values keep this one's)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def for_turn(self, overrides: Mapping[str, Any], n_ctx: int) -> Sampling:
        """A turn's sampling: these defaults with the :class:`SamplingOverrides` given,
        checked for a context of ``n_ctx``. An unknown name is a ``TypeError``, as for any
        unexpected keyword argument."""
        known = SamplingOverrides.__annotations__
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise TypeError(
                f"unexpected keyword argument {unknown[0]!r} (the sampling arguments are "
                f"{', '.join(known)})"
            )
        return self.with_overrides(**overrides).check(n_ctx)


class SamplingOverrides(TypedDict, total=False):
    """The sampling keyword arguments of ``Runtime.chat`` and ``Runtime.answer``: each one
    left out (or ``None``) takes the runtime's :class:`Sampling` default."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repeat_penalty: float | None
    repeat_last_n: int | None
    seed: int | None
