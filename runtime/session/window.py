"""The tokens in a session's KV sequence, span by span, and the record a checkpoint keeps
of them, so that a resume reads the checkpoint and the entries after it, never the whole
journal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runtime.chunks import Lineage, shift_lineage
from runtime.journal import Entry, JournalError
from runtime.storage import JournalBackend

#: Journal role of a context-window shift: ``meta["drop"] = [a, b)``, window token offsets.
WINDOW_ROLE = "window"
#: The ``meta`` key of journal entries an import wrote (its turns and its window shifts): a
#: resume decodes only what of them the final window keeps (resume.py ``_decode_import``).
IMPORTED = "imported"

if TYPE_CHECKING:
    from runtime.chunks import Manifest


@dataclass
class Span:
    """One journal entry's tokens inside the window: positions [start, start + length).

    ``role`` and ``content`` are what a chat template renders for the entry (``content`` is the
    text the model saw, e.g. a user turn with its retrieved memories; ``meta["content"]`` in
    the journal when it differs from the entry's text). ``seq`` is the journal entry.
    """

    start: int
    length: int
    role: str = ""
    content: str = ""
    seq: int = -1


class Window:
    """The tokens in a session's KV sequence: the journal's, minus the ranges shifted out.

    Positions stay contiguous: a token's index in :attr:`tokens` is its KV position.
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.spans: list[Span] = []
        #: the window shifts so far, as chunk keys need them (runtime.chunks.shift_lineage)
        self.lineage: Lineage = ()

    def apply(self, entry: Entry) -> None:
        """Advance the window by one journal entry."""
        if entry.role == WINDOW_ROLE:
            a, b = (int(x) for x in entry.meta["drop"])
            self.drop(a, b)
        elif entry.tokens:
            content = str(entry.meta.get("content", entry.text))
            span = Span(len(self.tokens), len(entry.tokens), entry.role, content, entry.seq)
            self.spans.append(span)
            self.tokens.extend(entry.tokens)

    def drop(self, a: int, b: int) -> None:
        """Remove positions [a, b) and close the gap.

        A span cut by ``a`` keeps its head (a re-render that rewrote the tail of the window);
        spans wholly inside [a, b) go.
        """
        self.lineage = shift_lineage(self.lineage, a, self.tokens[a:b])
        del self.tokens[a:b]
        kept = []
        for span in self.spans:
            if span.start >= b:
                kept.append(
                    Span(span.start - (b - a), span.length, span.role, span.content, span.seq)
                )
            elif span.start + span.length <= a:
                kept.append(span)
            elif span.start < a:
                kept.append(Span(span.start, a - span.start, span.role, span.content, span.seq))
        self.spans = kept

    def shift_range(self, goal: int) -> tuple[int, int] | None:
        """The positions [a, b) a window shift drops so that at most ``goal`` tokens remain:
        the oldest whole turns after the first (the system prompt stays), stopping before a
        user turn, never before a reply, so the window still reads as a conversation. None
        when there is nothing to drop."""
        spans = self.spans
        if len(spans) < 2:
            return None
        a = b = spans[1].start
        n = len(self.tokens)
        for span in spans[1:]:
            if n - (b - a) <= goal and span.role != "assistant":
                break
            b = span.start + span.length
        return (a, b) if b > a else None

    def copy(self) -> Window:
        """An independent copy (spans are immutable in use, so the list is copied)."""
        out = Window()
        out.tokens = list(self.tokens)
        out.spans = list(self.spans)
        out.lineage = self.lineage
        return out

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps of the window (``meta["window"]``): its spans."""
        return {"spans": [[s.start, s.length, s.seq] for s in self.spans]}


def window_from_manifest(journal: JournalBackend, man: Manifest) -> Window | None:
    """The window after entry ``man.journal_seq`` as the manifest records it
    (``meta["window"]["spans"]``: ``[start, length, seq]`` per span), checked against the
    journal: the spans must tile the manifest's tokens, and each must be the head of its
    entry's tokens. None if it is missing or does not check out.

    What the check cannot see without reading the whole journal is an entry *between* spans
    that a shift dropped; the manifest body is checksummed, and the runtime only ever writes
    the window it holds.
    """
    record = man.meta.get("window")
    spans = record.get("spans") if isinstance(record, dict) else None
    if not isinstance(spans, list) or not -1 <= man.journal_seq < len(journal):
        return None
    window = Window()
    window.tokens = list(man.tokens)
    window.lineage = man.lineage
    pos = 0
    last_seq = -1
    try:
        for start, length, seq in spans:
            # spans tile the tokens in order, each from a later journal entry than the last
            if start != pos or length <= 0 or not last_seq < seq <= man.journal_seq:
                return None
            last_seq = seq
            entry = journal[seq]
            if list(entry.tokens[:length]) != window.tokens[start : start + length]:
                return None
            content = str(entry.meta.get("content", entry.text))
            window.spans.append(Span(start, length, entry.role, content, seq))
            pos = start + length
    except (TypeError, ValueError, LookupError, JournalError):
        return None
    return window if pos == len(window.tokens) else None


def window_after(journal: JournalBackend, seq: int) -> Window:
    """The window after entry ``seq``, walking the journal from its start (the slow way, for
    checkpoints that do not record their window)."""
    window = Window()
    for entry in journal:
        if entry.seq > seq:
            break
        window.apply(entry)
    return window
