"""The distiller: what long-term memory derives from the journal, as pure functions of it.

Three kinds of item come from a session's journal, each behind its own watermark and each
named by its sources (:func:`item_id`), so a re-run after a ``kill -9`` adds nothing twice
and misses nothing:

* **turns**: every user turn with its speaker and time, plus (for the lexical index only)
  the turns just before it in the same sitting;
* **facts**: short, self-contained statements from each user turn, the speaker resolved
  (:func:`runtime.longterm.facts.extract`); a fact with an attribute supersedes the older
  one about the same subject and attribute;
* **summaries**: an extractive summary of every :data:`SUMMARY_SPAN` entries that have
  left the session's KV window.

The facts' and summaries' watermarks live in the store and are written in the same SQLite
transaction as the items they cover.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from runtime.errors import JournalCompactedError
from runtime.longterm.db import NewItem
from runtime.longterm.facts import extract
from runtime.longterm.lexical import day_label, query_terms

if TYPE_CHECKING:
    from runtime.journal import Entry
    from runtime.longterm.store import MemoryStore
    from runtime.storage import JournalBackend

__all__ = ["Distiller", "item_id", "summarise"]

#: Items written per transaction (and per embedding batch).
BATCH = 256
#: Neighbouring turns indexed with a turn (lexical side only): this many before it, said
#: within SITTING_S of it.
CONTEXT_TURNS = 3
SITTING_S = 30 * 60.0
#: Entries out of the window that one summary covers.
SUMMARY_SPAN = 24
#: Sentences an extractive summary keeps, and its length at most.
SUMMARY_SENTENCES = 4
MAX_SUMMARY_CHARS = 1200
_ITEM_NAMESPACE = uuid.UUID("6f1c2a52-4d0e-4a53-9a43-2b1f0e1c7d11")


def item_id(session_id: str, kind: str, *key: object) -> str:
    """The id of an item derived from the journal: the same sources give the same id, so a
    re-run after a crash adds nothing twice."""
    name = "/".join((session_id, kind, *(str(k) for k in key)))
    return str(uuid.uuid5(_ITEM_NAMESPACE, name))


def lineage_key(sid: str, journal: JournalBackend) -> str:
    """The session id and its journal's first time: a session deleted (its memories kept)
    and started again under the same id names its items afresh, instead of colliding with
    the old ones' ids."""
    first = entry_at(journal, 0) if len(journal) else None
    return f"{sid}@{first.created!r}" if first is not None else sid


class Distiller:
    """Writes a session's derived items into ``store``; every method is idempotent."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def turns(self, sid: str, journal: JournalBackend, first: int, last: int) -> int:
        """Store the user turns among entries ``first..last``; returns how many."""
        key = lineage_key(sid, journal)
        items = [
            turn_item(sid, journal, entry, key)
            for seq in range(first, last + 1)
            if (entry := entry_at(journal, seq)) is not None and memorable(entry)
        ]
        for i in range(0, len(items), BATCH):
            self.store.put(items[i : i + BATCH])
        return len(items)

    def facts(self, sid: str, journal: JournalBackend) -> int:
        """Facts from the user turns after the facts' watermark; returns how many."""
        key = f"facts:{sid}"
        lineage = lineage_key(sid, journal)
        last = len(journal) - 1
        made = 0
        for start in range(self.store.watermark(key) + 1, last + 1, BATCH):
            stop = min(last, start + BATCH - 1)
            items = [
                item
                for seq in range(start, stop + 1)
                if (entry := entry_at(journal, seq)) is not None and memorable(entry)
                for item in fact_items(sid, entry, lineage)
            ]
            self.store.put(items, mark=(key, stop))
            made += len(items)
        return made

    def summaries(self, sid: str, journal: JournalBackend, window: set[int]) -> int:
        """A summary of every SUMMARY_SPAN entries before the window; returns how many."""
        key = f"summary:{sid}"
        lineage = lineage_key(sid, journal)
        # the window's first turn is pinned (it never shifts out): what left starts after it
        ordered = sorted(window)
        end = ordered[1] if len(ordered) > 1 else len(journal) if not ordered else ordered[0]
        made = 0
        for start in range(self.store.watermark(key) + 1, end - SUMMARY_SPAN + 1, SUMMARY_SPAN):
            entries = [
                e for seq in range(start, start + SUMMARY_SPAN) if (e := entry_at(journal, seq))
            ]
            items = []
            summary = summarise(entries)
            if summary is not None:
                text, said_at = summary
                items.append(
                    NewItem(
                        text,
                        kind="summary",
                        session=sid,
                        said_at=said_at,
                        sources=tuple(e.seq for e in entries),
                        importance=0.6,
                        id=item_id(lineage, "summary", start),
                    )
                )
            self.store.put(items, mark=(key, start + SUMMARY_SPAN - 1))
            made += len(items)
        return made


def entry_at(journal: JournalBackend, seq: int) -> Entry | None:
    """Entry ``seq``, or None where retention dropped it (only what was ingested)."""
    try:
        return journal[seq]
    except JournalCompactedError:
        return None


def memorable(entry: Entry) -> bool:
    """A user turn with text that was not marked ``remember=False``."""
    return (
        entry.role == "user"
        and bool(entry.text.strip())
        and entry.meta.get("remember") is not False
    )


def turn_item(sid: str, journal: JournalBackend, entry: Entry, lineage: str) -> NewItem:
    """The item of one user turn (``lineage``: :func:`lineage_key`)."""
    return NewItem(
        entry.text,
        kind="turn",
        session=sid,
        said_at=entry.created,
        speaker=entry.meta.get("name"),
        sources=(entry.seq,),
        context=context_of(journal, entry),
        importance=float(entry.meta.get("importance", 0.5)),
        meta={"journal_seq": entry.seq, "role": entry.role},
        id=item_id(lineage, "turn", entry.seq),
    )


def fact_items(sid: str, entry: Entry, lineage: str) -> list[NewItem]:
    """The fact items of one user turn (``lineage``: :func:`lineage_key`)."""
    speaker = entry.meta.get("name")
    return [
        NewItem(
            fact.text,
            kind="fact",
            session=sid,
            said_at=entry.created,
            speaker=speaker,
            sources=(entry.seq,),
            subject=fact.subject,
            attribute=fact.attribute,
            importance=0.6 if fact.attribute else 0.5,
            meta={"journal_seq": entry.seq, "value": fact.value},
            id=item_id(lineage, "fact", entry.seq, i),
        )
        for i, fact in enumerate(extract(entry.text, speaker))
    ]


def context_of(journal: JournalBackend, entry: Entry) -> str:
    """The turns just before ``entry`` in the same sitting, as ``speaker: text``."""
    parts: list[str] = []
    for seq in range(entry.seq - 1, max(-1, entry.seq - 1 - CONTEXT_TURNS), -1):
        before = entry_at(journal, seq)
        if before is None or before.role == "system" or entry.created - before.created > SITTING_S:
            break
        if before.meta.get("remember") is False:
            continue  # kept out of long-term memory: not even as a neighbour's context
        parts.append(f"{before.meta.get('name') or before.role}: {before.text}")
    return " ".join(reversed(parts))


def summarise(entries: Sequence[Entry]) -> tuple[str, float] | None:
    """An extractive summary of ``entries`` and the time it starts: its date span, then the
    user sentences that say the most (content words; numbers count double), in order."""
    scored: list[tuple[float, int, str]] = []
    for order, entry in enumerate(e for e in entries if memorable(e)):
        speaker = entry.meta.get("name") or "User"
        for sentence in re.split(r"(?<=[.!?])\s+", entry.text.strip()):
            terms = query_terms(sentence)
            if len(terms) < 3:
                continue
            weight = len(terms) + 2 * sum(any(c.isdigit() for c in t) for t in terms)
            scored.append((-weight, order, f"{speaker}: {sentence.strip()}"))
    if not scored:
        return None
    best = sorted(sorted(scored)[:SUMMARY_SENTENCES], key=lambda row: row[1])
    first, last = day_label(entries[0].created), day_label(entries[-1].created)
    span = first if first == last else f"{first[:-1]} to {last[1:]}"
    text = f"{span} " + " ".join(text for _, _, text in best)
    return text[:MAX_SUMMARY_CHARS], entries[0].created
