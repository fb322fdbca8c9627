"""What a long-term memory is: :class:`MemoryItem` (a stored row), :class:`NewItem` (one to
store) and the checks every field passes before it reaches SQL (:mod:`runtime.longterm.db`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from runtime.arguments import stored_text
from runtime.errors import ArgumentError, ArgumentTypeError

KINDS: tuple[str, ...] = ("turn", "fact", "summary")

#: The columns of an item row, in :class:`MemoryItem`'s field order (seq first).
COLUMNS = (
    "seq, id, text, kind, session, created, accessed, importance, meta, said_at, speaker, "
    "sources, superseded_by, subject, attribute"
)


@dataclass(frozen=True)
class MemoryItem:
    """One stored memory.

    ``said_at`` is when it was said (the event time: a journal entry's or an imported
    message's time), ``stored_at`` when the store took it. ``sources`` are the journal entry
    seqs of its session it came from (one for a turn, several for a fact that merged or a
    summary). ``superseded_by`` is the id of the newer fact that replaced it (it is kept and
    ranked below); ``subject``/``attribute`` name what a fact is about.
    """

    id: str
    text: str
    kind: str
    session: str | None
    stored_at: float
    accessed: float
    importance: float
    meta: dict[str, Any]
    seq: int
    said_at: float
    speaker: str | None = None
    sources: tuple[int, ...] = ()
    superseded_by: str | None = None
    subject: str | None = None
    attribute: str | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> MemoryItem:
        """Decode a row selected with :data:`COLUMNS`."""
        (seq, item_id, text, kind, session, stored, accessed, importance, meta, said_at,
         speaker, sources, superseded_by, subject, attribute) = row  # fmt: skip
        return cls(
            id=item_id,
            text=text,
            kind=kind,
            session=session,
            stored_at=stored,
            accessed=accessed,
            importance=importance,
            meta=json.loads(meta),
            seq=seq,
            said_at=stored if said_at is None else said_at,
            speaker=speaker,
            sources=tuple(int(s) for s in json.loads(sources or "[]")),
            superseded_by=superseded_by,
            subject=subject,
            attribute=attribute,
        )


@dataclass(frozen=True)
class NewItem:
    """An item to store (see :class:`MemoryItem` for the fields).

    ``context`` is text indexed for the lexical search only (a turn's preceding turns in the
    same sitting: a reply such as "Yes, twice!" is found by the question it answers); it is
    never shown. ``id`` may be given to make a re-add after a crash a no-op (the distiller's
    items are named by their sources); by default a random UUID.
    """

    text: str
    kind: str = "fact"
    session: str | None = None
    said_at: float | None = None
    speaker: str | None = None
    sources: tuple[int, ...] = ()
    context: str = ""
    importance: float = 0.5
    meta: Mapping[str, Any] = field(default_factory=dict)
    subject: str | None = None
    attribute: str | None = None
    id: str | None = None


def embedded_text(item: NewItem) -> str:
    """What is embedded for an item: its text, after its speaker's name when it has one (a
    question that names the speaker then finds what they said)."""
    return f"{item.speaker}: {item.text}" if item.speaker else item.text


# -- what a row may hold ------------------------------------------------------------------------


def to_epoch(now: float | datetime | None) -> float:
    """``now`` as seconds since the epoch (``None``: the current time)."""
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return now.timestamp()
    if isinstance(now, (int, float)) and math.isfinite(now):
        return float(now)
    raise ArgumentTypeError(f"now must be a float timestamp or a datetime, got {now!r}")


def check_item(item: NewItem) -> NewItem:
    """``item`` if it may be stored: a :class:`NewItem` whose every field is valid."""
    if not isinstance(item, NewItem):
        raise ArgumentTypeError(f"items must be NewItem, not {type(item).__name__}")
    stored_text(item.text)
    check_fields(item.kind, item.session, item.importance, item.meta)
    if item.speaker is not None and not isinstance(item.speaker, str):
        raise ArgumentTypeError("speaker must be str or None")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in item.sources):
        raise ArgumentError(f"sources must be journal seqs (ints >= 0), got {item.sources}")
    if item.said_at is not None:
        to_epoch(item.said_at)
    return item


def note(
    text: str,
    kind: str,
    session: str | None,
    importance: float,
    meta: Mapping[str, Any] | None,
    said_at: float | datetime | None,
    speaker: str | None,
    sources: Sequence[int],
) -> NewItem:
    """The item of an ``add``: one explicit note."""
    when = None if said_at is None else to_epoch(said_at)
    return NewItem(
        text, kind=kind, session=session, said_at=when, speaker=speaker,
        sources=tuple(sources), importance=importance, meta=meta or {},
    )  # fmt: skip


def notes(
    texts: Sequence[str],
    *,
    kind: str,
    session: str | None,
    importance: float | Sequence[float],
    meta: Mapping[str, Any] | None,
) -> list[NewItem]:
    """The items of an ``add_many``: one per text, ``importance`` one for all or one each."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ArgumentTypeError("texts must be a sequence of str")
    if isinstance(importance, Sequence):
        if len(importance) != len(texts):
            raise ArgumentError(f"{len(importance)} importances for {len(texts)} texts")
        importances = [float(i) for i in importance]
    else:
        importances = [importance] * len(texts)
    return [
        NewItem(t, kind=kind, session=session, importance=imp, meta=meta or {})
        for t, imp in zip(texts, importances, strict=True)
    ]


def check_fields(
    kind: str, session: str | None, importance: float, meta: Mapping[str, Any] | None
) -> str:
    """Validate the shared fields of an add; returns the metadata as JSON."""
    if kind not in KINDS:
        raise ArgumentError(f"kind must be one of {KINDS}, got {kind!r}")
    if session is not None and not isinstance(session, str):
        raise ArgumentTypeError(f"session must be str or None, not {type(session).__name__}")
    if isinstance(importance, bool) or not isinstance(importance, (int, float)):
        raise ArgumentTypeError(f"importance must be a number, not {type(importance).__name__}")
    if not (0.0 <= float(importance) <= 1.0):
        raise ArgumentError(f"importance must be in [0, 1], got {importance}")
    if meta is not None and not isinstance(meta, Mapping):
        raise ArgumentTypeError(f"meta must be a mapping, not {type(meta).__name__}")
    try:
        return json.dumps(dict(meta or {}), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"meta is not JSON-serialisable: {exc}") from None
