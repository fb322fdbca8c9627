"""A session's KV sequence: the few llama.cpp calls a session makes on its cells
(:class:`SequenceKV`), the tokens they hold, span by span (:class:`Window`), and the record a
checkpoint keeps of them, so that a resume reads the checkpoint and the entries after it, never
the whole journal."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runtime.chunks import Lineage, shift_lineage
from runtime.errors import SessionError
from runtime.journal import Entry, JournalError
from runtime.storage import JournalBackend

#: Journal role of a context-window shift: ``meta["drop"] = [a, b)``, window token offsets.
WINDOW_ROLE = "window"
#: The ``meta`` key of journal entries an import wrote (its turns and its window shifts): a
#: resume decodes only what of them the final window keeps (resume.py ``_decode_import``).
IMPORTED = "imported"
#: The ``meta`` key of the vocabulary whose token ids an entry holds (:func:`model_tag`): a
#: resume refuses to decode another vocabulary's ids, which would mean other tokens.
MODEL_TAG = "model"


if TYPE_CHECKING:
    from llamaffi import Context, Model
    from runtime.chunks import Manifest


#: :func:`model_tag` of each GGUF seen in this process, by its sha256
_TAGS: dict[str, str] = {}


def model_tag(model: Model) -> str:
    """What a journal entry records of the model whose token ids it holds: 16 hex digits of
    a sha256 over its vocabulary (every token's text, in id order) and its chat template. Two
    files of one model (another quantisation, a re-conversion) read each other's journals;
    another vocabulary or template does not. Computed once per GGUF in a process (about
    0.1 s for 49k tokens); call it once per session, not per entry."""
    key = model.fingerprint
    tag = _TAGS.get(key)
    if tag is None:
        digest = hashlib.sha256(f"{model.n_vocab}\0".encode())
        for token in range(model.n_vocab):
            digest.update(model.token_to_piece(token, special=True) + b"\0")
        digest.update((model.chat_template() or "").encode())
        tag = _TAGS[key] = digest.hexdigest()[:16]
    return tag


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


class SequenceKV:
    """Sequence ``seq_id`` of ``ctx`` as one session holds it.

    ``resident`` says whether the cells hold the session's window; any call that leaves them
    behind the journal clears them and drops ``resident``, so that the next use resumes.
    ``shift_pending`` says a window shift waits for the next decode: llama.cpp rotates the
    shifted keys only then, so a state copied before holds unrotated K and would restore wrong.
    """

    def __init__(self, ctx: Context, seq_id: int) -> None:
        self.ctx = ctx
        self.seq_id = seq_id
        self.resident = False
        self.shift_pending = False

    def decode(self, tokens: Sequence[int], pos: int | None = None) -> None:
        """Decode ``tokens`` into the sequence (at ``pos``, default: after its last cell)."""
        self.ctx.decode(tokens, seq_id=self.seq_id, pos=pos)
        self.shift_pending = False

    def drop(self, a: int, b: int) -> None:
        """Remove positions [a, b) and shift the rest down (llama.cpp's context shift)."""
        memory = self.ctx.memory
        if not memory.seq_rm(self.seq_id, a, b):
            self.clear()
            raise SessionError(f"llama.cpp could not remove positions [{a}, {b})")
        memory.seq_add(self.seq_id, b, -1, -(b - a))
        self.shift_pending = True

    def cut(self, keep: int) -> bool:
        """Remove every position from ``keep`` on; False if llama.cpp could not."""
        return bool(self.ctx.memory.seq_rm(self.seq_id, keep, -1))

    def next_pos(self) -> int:
        """The position after the sequence's last cell."""
        return int(self.ctx.memory.pos_max(self.seq_id)) + 1

    def clear(self) -> None:
        """Free the sequence's cells; the session is no longer resident."""
        self.ctx.memory.seq_rm(self.seq_id)
        self.resident = False
