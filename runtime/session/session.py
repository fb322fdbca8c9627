"""A conversation's short-term memory: journal (truth) + KV sequence (cache) + snapshots.

The order of a user turn is: tokenize, **append to the journal (fsynced)**, decode into the
session's KV sequence, then (every ``snapshot_every`` turns) capture a snapshot into the
store; a reply is generated first and journalled once complete. A context-window shift is a
journal entry too, written before it is applied. A crash at any point therefore loses nothing
that was acknowledged: on :meth:`Session.resume`, the newest valid snapshot whose tokens are
the window after some journal entry is restored, and the later entries are repeated on top
(decodes and shifts). With no usable snapshot the whole journal is repeated: slower, never
wrong.

:class:`SessionPool` shares one context's ``n_ctx`` cells and ``n_seq_max`` sequences among
the resident sessions and suspends the least recently used ones (snapshot, free their KV
cells, close their journal) to make room, so idle sessions hold no KV memory and no files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from runtime.checkpoint import CheckpointPolicy, CheckpointWriter
from runtime.chunks import ChunkStore, Manifest
from runtime.journal import DEFAULT_SEGMENT_ENTRIES, Entry, Journal
from runtime.store import SnapshotStore, validate_session_id

if TYPE_CHECKING:
    from llamaffi import Context, Sampler


from runtime.errors import ArgumentError, ContextFullError, SessionError
from runtime.session.base import (
    JOURNAL_DIR,
    WINDOW_ROLE,
)
from runtime.session.capture import _CaptureMixin
from runtime.session.resume import _ResumeMixin

logger = logging.getLogger(__name__)


class Session(_ResumeMixin, _CaptureMixin):
    """One conversation bound to sequence ``seq_id`` of ``ctx``.

    Args:
        ctx: the context holding the KV cache.
        seq_id: the sequence this session uses.
        session_id: a validated id (letters, digits, ``._-``; no path tricks).
        root: the runtime's data directory; the journal is ``root/journals/<id>.log``.
        store: where snapshots go (its writer lock is held by the caller).
        snapshot_every: capture a snapshot after this many turns (0: only on suspend/close).
        journal_fsync: fsync each journal append (leave on outside tests).
        make_room: called with ``(session, n_tokens)`` before tokens are added, so that a pool
            can suspend other sessions until the shared KV cache has the cells.
        policy: when to checkpoint (tokens/seconds since the last one); ``None`` keeps the
            turn count ``snapshot_every``.
        writer: the background writer that encodes and writes checkpoints (only the state copy
            stays on the calling thread); ``None`` writes inline.
        chunks: checkpoint into this chunk store (only the chunks not stored yet are copied and
            written: a checkpoint costs what was added) instead of whole-sequence snapshots in
            ``store``; resume reads its manifests first, then ``store``'s snapshots.
        scratch_seq: the empty sequence the chunk store copies ranges through.
        journal_segment_entries: the journal seals a segment every this many entries
            (:class:`runtime.journal.Journal`).
        window: what to do when a turn does not fit ``n_ctx``: ``"shift"`` (default) drops
            the oldest whole turns after the first one (kept: it is usually the system prompt)
            from the KV sequence, shifting the rest down (llama.cpp's context shift); the drop
            is journalled first, so a resume repeats it exactly. ``"refuse"`` raises
            :class:`ContextFullError` instead. Dropped turns stay in the journal (and in
            long-term memory, via :func:`sync_longterm`).

    A Session (like the Context under it) is not thread-safe: use it from one thread.
    """

    def __init__(
        self,
        ctx: Context,
        seq_id: int,
        session_id: str,
        root: str | Path,
        store: SnapshotStore,
        *,
        snapshot_every: int = 1,
        journal_fsync: bool = True,
        make_room: Callable[[Session, int], None] | None = None,
        window: Literal["shift", "refuse"] = "shift",
        policy: CheckpointPolicy | None = None,
        writer: CheckpointWriter | None = None,
        chunks: ChunkStore | None = None,
        scratch_seq: int = -1,
        journal_segment_entries: int = DEFAULT_SEGMENT_ENTRIES,
    ) -> None:
        if window not in ("shift", "refuse"):
            raise ArgumentError(f"window must be 'shift' or 'refuse', not {window!r}")
        if chunks is not None and not 0 <= scratch_seq < ctx.n_seq_max:
            raise ArgumentError("chunked checkpoints need a scratch sequence of the context")
        self.policy = policy
        self._writer = writer
        self._chunks = chunks
        self._scratch = scratch_seq
        self.ctx = ctx
        self.window = window
        self.seq_id = seq_id
        self.session_id = validate_session_id(session_id)
        self.store = store
        self.snapshot_every = snapshot_every
        self.journal = Journal(
            Path(root) / JOURNAL_DIR / f"{self.session_id}.log",
            fsync=journal_fsync,
            segment_entries=journal_segment_entries,
        )
        self._make_room = make_room
        #: readable manifests, newest first, read once for the window and the next resume
        self._manifests: list[Manifest] | None = None
        self._window = self._initial_window()
        self._resident = False
        self._since_snapshot = 0
        self._new_tokens = 0  # tokens added since the last checkpoint
        self._last_checkpoint = time.monotonic()
        #: monotonic time of the last turn (for the idle sweeper)
        self.last_active = time.monotonic()
        self._shift_pending = False  # a window shift not yet applied by a decode
        self._last_snapshot_id = ""
        #: Snapshots that could not be written (the turn itself was safe in the journal).
        self.snapshot_failures = 0

    @property
    def n_tokens(self) -> int:
        """Tokens in the session's window (== its KV sequence when resident)."""
        return len(self._window.tokens)

    def tokens(self) -> list[int]:
        """The window's tokens, position by position (a copy)."""
        return list(self._window.tokens)

    def _reserve(self, n: int) -> None:
        """Make room for ``n`` more tokens (shifting the window if allowed), or refuse."""
        limit = self.ctx.n_ctx
        if self.n_tokens + n > limit:
            if self.window != "shift" or n > limit:
                raise ContextFullError(
                    f"session {self.session_id!r} holds {self.n_tokens} tokens; {n} more "
                    f"would exceed n_ctx={limit}"
                )
            self._shift(n)
        if self._make_room is not None:
            self._make_room(self, n)

    def _shift(self, n: int) -> None:
        """Drop the oldest whole turns after the first until ``n`` more tokens fit, with a
        quarter of the context free afterwards so that shifts stay rare."""
        limit = self.ctx.n_ctx
        goal = min(limit - n, (3 * limit) // 4)
        spans = self._window.spans
        if not self.ctx.memory.can_shift() or len(spans) < 2:
            raise ContextFullError(
                f"session {self.session_id!r}: {n} more tokens do not fit n_ctx={limit} and "
                "the window cannot shift"
            )
        a = b = spans[1].start
        for span in spans[1:]:
            # stop before a user turn (or an untyped one), never before a reply: the window
            # must read as a conversation after the drop
            if self.n_tokens - (b - a) <= goal and span.role != "assistant":
                break
            b = span.start + span.length
        if self.n_tokens - (b - a) + n > limit:
            raise ContextFullError(
                f"session {self.session_id!r}: even after dropping old turns, {n} more tokens "
                f"do not fit n_ctx={limit}"
            )
        # Journal first: a crash after this line replays the same shift on resume.
        entry = self.journal.append(WINDOW_ROLE, "", (), {"drop": [a, b]})
        self._window.apply(entry)
        if self._resident:
            self._apply_drop(a, b)
        logger.info(
            "session %s: shifted the window, dropped positions [%d, %d)", self.session_id, a, b
        )

    # -- turns --------------------------------------------------------------------------------

    def append(self, role: str, text: str, *, meta: dict[str, object] | None = None) -> Entry:
        """Journal one turn (durable on return), then decode it into the KV sequence."""
        self._require_resident()
        model = self.ctx.model
        tokens = model.tokenize(self.format_turn(role, text), add_special=len(self.journal) == 0)
        self._reserve(len(tokens))
        entry = self.journal.append(role, text, tokens, dict(meta or {}))
        self._window.apply(entry)
        try:
            self._decode(tokens)
        except BaseException:
            # The turn is journalled but the KV is behind the journal now: force a resume
            # (which replays it) before the next use.
            self._drop_kv()
            raise
        self._after_turn(len(tokens))
        return entry

    def reply(self, n_predict: int = 64, sampler: Sampler | None = None) -> Entry:
        """Generate the assistant's next turn, journal it, and keep it in the KV sequence."""
        self._require_resident()
        model = self.ctx.model
        prefix = model.tokenize("assistant:", add_special=False)
        newline = model.tokenize("\n", add_special=False)
        fixed = len(prefix) + len(newline)
        if self.window == "shift":
            # the window makes room by shifting (never the first turn); a reply may take up to
            # half the context
            first = self._window.spans[0].length if self._window.spans else 0
            room = min(self.ctx.n_ctx // 2, self.ctx.n_ctx - first - 1) - fixed
        else:
            room = self.ctx.n_ctx - self.n_tokens - fixed
        if room < 1:
            raise ContextFullError(
                f"session {self.session_id!r} has no room left for a reply "
                f"({self.n_tokens} of n_ctx={self.ctx.n_ctx} tokens used)"
            )
        n_predict = min(n_predict, room)
        self._reserve(fixed + n_predict)
        start = self.ctx.memory.pos_max(self.seq_id) + 1
        try:
            out = self.ctx.generate(prefix, n_predict, sampler, seq_id=self.seq_id)
            kept = [t for t in out if not model.is_eog(t)]  # an EOG is sampled, not decoded
            self._decode(newline)
            # The journal holds exactly the tokens now in the KV sequence, so replay is exact.
            # A crash before this append loses only a reply nobody was told about.
            tokens = prefix + kept + newline
            entry = self.journal.append("assistant", model.detokenize(kept), tokens)
            self._window.apply(entry)
        except BaseException:
            # Put the KV back in step with the journal; if that is impossible, drop it and
            # let the next resume() rebuild it.
            if not self.ctx.memory.seq_rm(self.seq_id, start, -1):
                self._drop_kv()
            raise
        self._after_turn(len(tokens))
        return entry

    # -- template-driven turns (what runtime.Runtime uses) ------------------------------------

    def messages(self) -> list[tuple[str, str]]:
        """The window's turns as ``(role, content)``, oldest first: what a chat template
        renders for the KV sequence as it is now."""
        return [(span.role, span.content) for span in self._window.spans if span.role]

    def window_seqs(self) -> set[int]:
        """Journal entries whose tokens are (at least partly) in the window now."""
        return {span.seq for span in self._window.spans}

    @property
    def first_turn(self) -> bool:
        """Whether nothing has been journalled yet (the next tokens start the sequence)."""
        return len(self.journal) == 0

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` more tokens now: shift the window (journalled) if
        allowed, and let the pool free shared cells. Raises :class:`ContextFullError`."""
        self._require_resident()
        self._reserve(n_tokens)

    def rewind(self, keep: int) -> None:
        """Cut the window back to its first ``keep`` tokens (journalled first, like a shift).

        For a chat template that does not render N+1 messages as an extension of N: the
        caller re-renders, keeps the common token prefix and decodes the rest.
        """
        self._require_resident()
        n = self.n_tokens
        if not 0 <= keep <= n:
            raise SessionError(f"rewind({keep}) outside the window of {n} tokens")
        if keep == n:
            return
        entry = self.journal.append(WINDOW_ROLE, "", (), {"drop": [keep, n]})
        self._window.apply(entry)
        if not self.ctx.memory.seq_rm(self.seq_id, keep, -1):
            self._drop_kv()
            raise SessionError(f"llama.cpp could not remove positions [{keep}, {n})")

    def append_tokens(
        self,
        role: str,
        text: str,
        tokens: Sequence[int],
        *,
        meta: dict[str, object] | None = None,
        checkpoint: bool = True,
        created: float | None = None,
    ) -> Entry:
        """Journal a turn whose tokens the caller rendered (durable on return), then decode it.

        Room must have been made with :meth:`reserve`. ``meta["content"]`` records what the
        model saw when it differs from ``text`` (a user turn with retrieved memories).
        ``checkpoint=False`` counts the tokens toward the policy but leaves the checkpoint to
        the end of the reply (so a prompt is never delayed by a state copy). ``created``: the
        entry's UNIX time (default now).
        """
        self._require_resident()
        tokens = list(tokens)
        if not tokens:
            raise SessionError("a turn needs at least one token")
        if self.n_tokens + len(tokens) > self.ctx.n_ctx:
            raise ContextFullError(
                f"session {self.session_id!r}: {len(tokens)} more tokens exceed "
                f"n_ctx={self.ctx.n_ctx}; reserve() first"
            )
        entry = self.journal.append(role, text, tokens, dict(meta or {}), created=created)
        self._window.apply(entry)
        try:
            self._decode(tokens)
        except BaseException:
            self._drop_kv()  # journalled but not in the KV: the next resume replays it
            raise
        if checkpoint:
            self._after_turn(len(tokens))
        else:
            self._since_snapshot += 1
            self._new_tokens += len(tokens)
        return entry

    def generate(
        self,
        n_predict: int,
        sampler: Sampler,
        *,
        close: Callable[[str], Sequence[int]],
        stop: Sequence[str] = (),
        clean: Callable[[str], str] | None = None,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        meta: dict[str, object] | None = None,
    ) -> tuple[Entry, str]:
        """Generate the assistant's turn after the decoded prompt, journal it; return
        ``(entry, finish_reason)`` with ``finish_reason`` ``"stop"``, ``"length"`` or
        ``"cancelled"``.

        Stops at an end-of-generation token (sampled, never decoded), at the first of the
        ``stop`` strings (cut from the text), after ``n_predict`` tokens, or when
        ``cancelled()`` turns true (the reply so far is kept and journalled, so the KV and the
        journal stay equal). ``close(text)`` gives the tokens that end the turn in the
        template (``<|im_end|>\\n`` in ChatML); they are decoded so the next turn extends
        the sequence. ``on_text`` receives the reply's text as it grows, never a piece of a
        stop string. The journal entry holds exactly the tokens decoded.
        """
        self._require_resident()
        model, memory = self.ctx.model, self.ctx.memory
        start = memory.pos_max(self.seq_id) + 1
        holdback = max((len(x) for x in stop), default=1) - 1
        decoded: list[int] = []
        raw = b""
        text = ""
        emitted = 0
        finish = "length"
        try:
            for _ in range(n_predict):
                if cancelled is not None and cancelled():
                    finish = "cancelled"
                    break
                token = sampler.sample(self.ctx, -1)
                if model.is_eog(token):
                    finish = "stop"
                    break
                raw += model.token_to_piece(token)
                text = raw.decode("utf-8", "ignore")
                cut = min((i for i in (text.find(x) for x in stop if x) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    finish = "stop"
                    break
                self._decode([token])
                decoded.append(token)
                if on_text is not None:
                    safe = len(text) - holdback
                    if safe > emitted:
                        on_text(text[emitted:safe])
                        emitted = safe
            reply = clean(text) if clean is not None else text.strip()
            if on_text is not None and len(text.rstrip()) > emitted:
                on_text(text.rstrip()[emitted:])
            tail = list(close(reply))
            if tail:
                self._decode(tail)
            tokens = decoded + tail
            entry_meta = dict(meta or {})
            entry_meta["finish"] = finish
            entry_meta["generated"] = len(decoded)
            entry = self.journal.append("assistant", reply, tokens, entry_meta)
            self._window.apply(entry)
        except BaseException:
            # Put the KV back in step with the journal (nothing of this reply is journalled);
            # if that is impossible, drop it and let the next resume() rebuild it.
            if not memory.seq_rm(self.seq_id, start, -1):
                self._drop_kv()
            raise
        self._after_turn(len(tokens))
        return entry, finish

    @staticmethod
    def format_turn(role: str, text: str) -> str:
        """How a turn is rendered into the sequence (one line per turn)."""
        return f"{role}: {text}\n"

    def _after_turn(self, n_tokens: int = 0) -> None:
        self._since_snapshot += 1
        self._new_tokens += n_tokens
        self.last_active = time.monotonic()
        if self.policy is not None:
            due = self.policy.due(self._new_tokens, time.monotonic() - self._last_checkpoint)
        else:
            due = bool(self.snapshot_every and self._since_snapshot >= self.snapshot_every)
        if due:
            self._try_checkpoint()

    # -- snapshots and residency ---------------------------------------------------------------

    def discard(self) -> None:
        """Free the KV cells and close the journal without a checkpoint (the session is being
        deleted)."""
        if not self.ctx.closed and self.seq_id >= 0:
            self._drop_kv()
        self.journal.close()

    def suspend(self) -> None:
        """Snapshot if anything is new, then free the sequence's KV cells."""
        if not self._resident:
            return
        if self._since_snapshot:
            self._try_checkpoint()
        self._drop_kv()

    def close(self) -> None:
        """Suspend (if the context is still open) and close the journal."""
        try:
            if not self.ctx.closed:
                self.suspend()
        finally:
            self.journal.close()
