"""The distiller: what long-term memory derives from the journal, as pure functions of it.

Three kinds of item come from a session's journal, each behind its own watermark and each
named by its sources (:func:`item_id`), so a re-run after a ``kill -9`` adds nothing twice
and misses nothing:

* **turns**: every user turn with its speaker and time, plus (for the lexical index only)
  the turns just before it in the same sitting;
* **facts**: short, self-contained statements from each user turn, the speaker resolved
  (:func:`runtime.longterm.facts.extract`, or the loaded model asked for JSON facts with
  ``extract="llm"``); a fact with an attribute supersedes the older one about the same
  subject and attribute;
* **summaries**: a summary of every :data:`SUMMARY_SPAN` entries that have left the
  session's KV window (extractive, or the model's with ``summarize="llm"``).

The facts' and summaries' watermarks live in the store and are written in the same SQLite
transaction as the items they cover. When the model is asked (an :data:`Ask`), a bad answer
(not JSON, too long, no content) falls back to the rules for that turn or span, so nothing
is lost to it; and at most :data:`LLM_TURNS_PER_CALL` turns and one summary are asked per
call and :data:`LLM_QUESTIONS_PER_TICK` per housekeeping tick over all sessions
(:class:`AskBudget`), because the housekeeping thread holds the runtime's lock while it asks.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from runtime.errors import JournalCompactedError
from runtime.longterm.facts import FACT_INSTRUCTIONS, extract, parse_llm_facts
from runtime.longterm.items import NewItem
from runtime.longterm.lexical import day_label, query_terms

if TYPE_CHECKING:
    from runtime.journal import Entry
    from runtime.storage import JournalBackend, MemoryBackend

__all__ = ["Ask", "AskBudget", "Distiller", "item_id", "summarise"]

#: A one-shot question to the loaded model: ``(instructions, text) -> answer`` ("" when it
#: could not be asked).
Ask = Callable[[str, str], str]
#: User turns whose facts one call asks the model for at most (then the lock is let go).
LLM_TURNS_PER_CALL = 8
#: Questions to the model one housekeeping tick asks at most, over all its sessions: the
#: tick holds the runtime's lock, and a turn waits for it.
LLM_QUESTIONS_PER_TICK = LLM_TURNS_PER_CALL + 1


class AskBudget:
    """How many more questions the model may be asked (one housekeeping tick's, shared by
    the sessions it consolidates)."""

    def __init__(self, questions: int = LLM_QUESTIONS_PER_TICK) -> None:
        self.left = questions

    def counted(self, ask: Ask) -> Ask:
        """``ask``, each call taking one question from the budget."""

        def asking(instructions: str, text: str) -> str:
            self.left -= 1
            return ask(instructions, text)

        return asking


#: What the LLM summariser (``summarize="llm"``) asks, and how much transcript it sends.
SUMMARY_INSTRUCTIONS = (
    "Summarise this part of a conversation in at most three sentences. Keep names, places, "
    "dates and numbers. Answer with the summary only."
)
MAX_SUMMARY_INPUT_CHARS = 6000

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
    """Writes a session's derived items into ``store``; every method is idempotent.

    ``ask_facts`` and ``ask_summary`` (an :data:`Ask` each, or ``None``: the rules) put the
    loaded model to the facts and the summaries.
    """

    def __init__(
        self,
        store: MemoryBackend,
        *,
        ask_facts: Ask | None = None,
        ask_summary: Ask | None = None,
        budget: AskBudget | None = None,
    ) -> None:
        self.store = store
        self.budget = budget if budget is not None else AskBudget()
        self.ask_facts = self.budget.counted(ask_facts) if ask_facts is not None else None
        self.ask_summary = self.budget.counted(ask_summary) if ask_summary is not None else None

    def turns(
        self, sid: str, journal: JournalBackend, first: int, last: int, *, mark: str | None = None
    ) -> int:
        """Store the user turns among entries ``first..last``; returns how many. ``mark``:
        the watermark written with each batch (the last entry it covers, ``last`` with the
        final one), so that a crash leaves a batch and its mark together."""
        key = lineage_key(sid, journal)
        found = [
            (seq, turn_item(sid, journal, entry, key))
            for seq in range(first, last + 1)
            if (entry := entry_at(journal, seq)) is not None and memorable(entry)
        ]
        if not found and mark is not None:
            self.store.put([], mark=(mark, last))
        for i in range(0, len(found), BATCH):
            batch = found[i : i + BATCH]
            end = last if i + BATCH >= len(found) else batch[-1][0]
            self.store.put([item for _, item in batch], mark=None if mark is None else (mark, end))
        return len(found)

    def facts(self, sid: str, journal: JournalBackend) -> int:
        """Facts from the user turns after the facts' watermark; returns how many."""
        key = f"facts:{sid}"
        lineage = lineage_key(sid, journal)
        last = len(journal) - 1
        first = self.store.watermark(key) + 1
        step = BATCH
        if self.ask_facts is not None:  # one short batch per call: the lock is held
            questions = min(LLM_TURNS_PER_CALL, self.budget.left)
            if questions <= 0 or first > last:
                return 0  # the tick's questions are spent: the next tick goes on
            last = questions_end(journal, first, last, questions)
            step = last - first + 1
        made = 0
        for start in range(first, last + 1, step):
            stop = min(last, start + step - 1)
            items = [
                item
                for seq in range(start, stop + 1)
                if (entry := entry_at(journal, seq)) is not None and memorable(entry)
                for item in fact_items(sid, entry, lineage, self.ask_facts)
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
        asked = 0
        for start in range(self.store.watermark(key) + 1, end - SUMMARY_SPAN + 1, SUMMARY_SPAN):
            if self.ask_summary is not None and (asked or self.budget.left <= 0):
                break  # one question per call, within the tick's budget: the lock is held
            entries = [
                e for seq in range(start, start + SUMMARY_SPAN) if (e := entry_at(journal, seq))
            ]
            items = []
            summary = None
            if self.ask_summary is not None and entries:
                asked += 1
                summary = llm_summary(entries, self.ask_summary)
            summary = summary or summarise(entries)
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


def questions_end(journal: JournalBackend, first: int, last: int, questions: int) -> int:
    """The seq (at most ``last``) of the ``questions``-th memorable entry from ``first`` on:
    a batch that asks the model that many questions, whatever else lies between."""
    asked = 0
    for seq in range(first, last + 1):
        entry = entry_at(journal, seq)
        if entry is not None and memorable(entry):
            asked += 1
            if asked == questions:
                return seq
    return last


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


def fact_items(sid: str, entry: Entry, lineage: str, ask: Ask | None = None) -> list[NewItem]:
    """The fact items of one user turn (``lineage``: :func:`lineage_key`): the model's, when
    ``ask`` is given and its answer is valid JSON facts, else the rules'."""
    speaker = entry.meta.get("name")
    facts = None
    if ask is not None:
        facts = parse_llm_facts(
            ask(FACT_INSTRUCTIONS, f"{speaker or 'User'}: {entry.text}"), speaker
        )
    if facts is None:
        facts = extract(entry.text, speaker)
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
        for i, fact in enumerate(facts)
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
    text = f"{date_span(entries)} " + " ".join(text for _, _, text in best)
    return text[:MAX_SUMMARY_CHARS], entries[0].created


def llm_summary(entries: Sequence[Entry], ask: Ask) -> tuple[str, float] | None:
    """The model's summary of ``entries`` after their date span, and the time it starts; or
    None when the answer is not a summary (empty, fewer than three content words), so the
    caller falls back to :func:`summarise`."""
    lines = [f"{e.meta.get('name') or 'User'}: {e.text}" for e in entries if memorable(e)]
    if not lines:
        return None
    answer = " ".join(ask(SUMMARY_INSTRUCTIONS, "\n".join(lines)[:MAX_SUMMARY_INPUT_CHARS]).split())
    if len(query_terms(answer)) < 3:
        return None
    return f"{date_span(entries)} {answer}"[:MAX_SUMMARY_CHARS], entries[0].created


def date_span(entries: Sequence[Entry]) -> str:
    """``[2023-05-08]``, or ``[2023-05-08 to 2023-05-09]``: the days ``entries`` span."""
    first, last = day_label(entries[0].created), day_label(entries[-1].created)
    return first if first == last else f"{first[:-1]} to {last[1:]}"
