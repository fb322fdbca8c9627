"""A conversation's short-term memory: journal (truth) + KV sequence (cache) + checkpoints.

The order of a user turn is: tokenize, **append to the journal (fsynced)**, decode into the
session's KV sequence, then (when the checkpoint policy says so) checkpoint it; a reply is
generated first and journalled once complete. A context-window shift is a journal entry too,
written before it is applied. A crash at any point therefore loses nothing that was
acknowledged: on :meth:`Session.resume`, the newest valid checkpoint whose tokens are the
window after some journal entry is restored, and the later entries are repeated on top
(decodes and shifts). With no usable checkpoint the whole journal is repeated: slower, never
wrong.

A :class:`Session` is composed of three parts, each with its own module: the
:class:`~runtime.journal.Journal`, the :class:`~runtime.session.window.Window` (the tokens in
the KV sequence, span by span) and one injected
:class:`~runtime.session.checkpointer.Checkpointer`; its KV sequence is a
:class:`~runtime.session.window.SequenceKV`, and :class:`~runtime.session.resume.Rebuild` rebuilds
it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from runtime.errors import ArgumentError, ContextFullError, SessionError
from runtime.journal import Entry
from runtime.layout import validate_session_id
from runtime.session.checkpointer import Checkpointer
from runtime.session.resume import Rebuild, ResumeReport
from runtime.session.window import MODEL_TAG, WINDOW_ROLE, SequenceKV, Window, model_tag
from runtime.storage import JournalBackend

if TYPE_CHECKING:
    from llamaffi import Context

logger = logging.getLogger(__name__)


class Session:
    """One conversation bound to sequence ``seq_id`` of ``ctx``.

    Args:
        ctx: the context holding the KV cache.
        seq_id: the sequence this session uses (a pool hands one out at :meth:`resume`).
        session_id: a validated id (letters, digits, ``._-``; no path tricks).
        journal: the session's open journal (``journals/<id>.log``); the session closes it.
        checkpointer: where the session's checkpoints go and come from.
        make_room: called with ``(session, n_tokens)`` before tokens are added, so that a pool
            can suspend other sessions until the shared KV cache has the cells.
        overflow: what to do when a turn does not fit ``n_ctx``: ``"shift"`` (default) drops
            the oldest whole turns after the first one (kept: it is usually the system prompt)
            from the KV sequence, shifting the rest down (llama.cpp's context shift); the drop
            is journalled first, so a resume repeats it exactly. ``"refuse"`` raises
            :class:`ContextFullError` instead. Dropped turns stay in the journal (and in
            long-term memory, which the runtime ingests from the journal).

    A Session (like the Context under it) is not thread-safe: use it from one thread.
    """

    def __init__(
        self,
        ctx: Context,
        seq_id: int,
        session_id: str,
        journal: JournalBackend,
        checkpointer: Checkpointer,
        *,
        make_room: Callable[[Session, int], None] | None = None,
        overflow: Literal["shift", "refuse"] = "shift",
    ) -> None:
        if overflow not in ("shift", "refuse"):
            raise ArgumentError(f"overflow must be 'shift' or 'refuse', not {overflow!r}")
        self.ctx = ctx
        self.session_id = validate_session_id(session_id)
        self.overflow = overflow
        self.journal = journal
        self.checkpointer = checkpointer
        self.kv = SequenceKV(ctx, seq_id)
        self._make_room = make_room
        #: what each entry records of the vocabulary its ids are (once: it reads the model)
        self.model_tag = model_tag(ctx.model)
        self._rebuild = Rebuild(
            self.session_id, journal, self.kv, checkpointer, self._room, model_tag=self.model_tag
        )
        self.window: Window = self._rebuild.open_window()
        #: monotonic time of the last turn (for the idle sweeper)
        self.last_active = time.monotonic()
        #: KV cells a reply being generated may still add (the pool keeps them free)
        self.in_flight = 0

    def _room(self, n_tokens: int) -> None:
        if self._make_room is not None:
            self._make_room(self, n_tokens)

    @property
    def seq_id(self) -> int:
        """The KV sequence the session uses now."""
        return self.kv.seq_id

    @property
    def resident(self) -> bool:
        """Whether the session's tokens are in the KV cache now."""
        return self.kv.resident

    @property
    def n_tokens(self) -> int:
        """Tokens in the session's window (== its KV sequence when resident)."""
        return len(self.window.tokens)

    def tokens(self) -> list[int]:
        """The window's tokens, position by position (a copy)."""
        return list(self.window.tokens)

    def messages(self) -> list[tuple[str, str]]:
        """The window's turns as ``(role, content)``, oldest first: what a chat template
        renders for the KV sequence as it is now."""
        return [(span.role, span.content) for span in self.window.spans if span.role]

    def unanswered(self) -> Entry | None:
        """The window's last turn, when it is a user turn that no reply followed (a process
        that died mid-reply leaves one): the journal entry; else None."""
        turns = [span for span in self.window.spans if span.role in ("user", "assistant")]
        if not turns or turns[-1].role != "user" or turns[-1].seq < 0:
            return None
        return self.journal[turns[-1].seq]

    def prime(self) -> None:
        """Decode the window's last token again, so that the next sample reads this
        sequence's logits (a resumed KV has none, and another session may have decoded
        since). The window and the journal do not change."""
        self._require_resident()
        n = self.n_tokens
        if n == 0:
            raise SessionError(f"session {self.session_id!r} has nothing decoded to continue")
        if not self.kv.cut(n - 1):
            self.kv.clear()
            raise SessionError(f"llama.cpp could not remove position {n - 1}")
        self.kv.decode(self.window.tokens[-1:])

    def window_seqs(self) -> set[int]:
        """Journal entries whose tokens are (at least partly) in the window now."""
        return {span.seq for span in self.window.spans}

    @property
    def first_turn(self) -> bool:
        """Whether nothing has been journalled yet (the next tokens start the sequence)."""
        return len(self.journal) == 0

    def _require_resident(self) -> None:
        """Raise :class:`SessionError` unless the session is open and its KV resident."""
        if self.journal.closed:
            raise SessionError(
                f"session {self.session_id!r} is closed (suspended by its pool to free memory, "
                "or its journal failed): get it again with pool.get()"
            )
        if not self.kv.resident:
            raise SessionError(f"session {self.session_id!r} is not resident: call resume()")

    # -- the window ---------------------------------------------------------------------------

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` more tokens now: shift the window (journalled) if
        allowed, and let the pool free shared cells. Raises :class:`ContextFullError`."""
        self._require_resident()
        limit = self.ctx.n_ctx
        if self.n_tokens + n_tokens > limit:
            if self.overflow != "shift" or n_tokens > limit:
                raise ContextFullError(
                    f"session {self.session_id!r} holds {self.n_tokens} tokens; {n_tokens} "
                    f"more would exceed n_ctx={limit}"
                )
            self._shift(n_tokens)
        self._room(n_tokens)

    def _shift(self, n: int) -> None:
        """Drop the oldest whole turns after the first until ``n`` more tokens fit, with a
        quarter of the context free afterwards so that shifts stay rare."""
        limit = self.ctx.n_ctx
        goal = min(limit - n, (3 * limit) // 4)
        dropped = self.window.shift_range(goal) if self.ctx.memory.can_shift() else None
        if dropped is None:
            raise ContextFullError(
                f"session {self.session_id!r}: {n} more tokens do not fit n_ctx={limit} and "
                "the window cannot shift"
            )
        a, b = dropped
        if self.n_tokens - (b - a) + n > limit:
            raise ContextFullError(
                f"session {self.session_id!r}: even after dropping old turns, {n} more tokens "
                f"do not fit n_ctx={limit}"
            )
        # Journal first: a crash after this line replays the same shift on resume.
        entry = self.journal.append(WINDOW_ROLE, "", (), {"drop": [a, b]})
        self.window.apply(entry)
        if self.kv.resident:
            self.kv.drop(a, b)
        logger.info(
            "session %s: shifted the window, dropped positions [%d, %d)", self.session_id, a, b
        )

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
        self.window.apply(entry)
        if not self.kv.cut(keep):
            self.kv.clear()
            raise SessionError(f"llama.cpp could not remove positions [{keep}, {n})")

    # -- turns ----------------------------------------------------------------------------------

    def append_tokens(
        self,
        role: str,
        text: str,
        tokens: Sequence[int],
        *,
        meta: dict[str, object] | None = None,
        checkpoint: bool = True,
        created: float | None = None,
        decode: Callable[[SequenceKV, Sequence[int]], None] | None = None,
    ) -> Entry:
        """Journal a turn whose tokens the caller rendered (durable on return), then decode it
        (with ``decode(kv, tokens)`` when given: the runtime's batcher, which decodes a prompt
        beside the replies being generated; else alone).

        Room must have been made with :meth:`reserve`. ``meta["content"]`` records what the
        model saw when it differs from ``text`` (a user turn with retrieved memories).
        ``checkpoint=False`` counts the tokens toward the policy but leaves the checkpoint to
        the end of the reply (so a prompt is never delayed by a state copy). ``created`` is
        the turn's UNIX time (default: now; an imported history keeps its own).
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
        meta = {**(meta or {}), MODEL_TAG: self.model_tag}  # whose ids these are
        entry = self.journal.append(role, text, tokens, meta, created=created)
        self.window.apply(entry)
        try:
            if decode is None:
                self.kv.decode(tokens)
            else:
                decode(self.kv, tokens)
        except BaseException:
            self.kv.clear()  # journalled but not in the KV: the next resume replays it
            raise
        if checkpoint:
            self._after_turn(len(tokens))
        else:
            self.checkpointer.count(len(tokens))
        return entry

    # -- a reply being generated (by a runtime.app.batching.Generation) ------------------------

    def begin_reply(self, cells: int) -> int:
        """Start a reply that may hold ``cells`` cells (the pool keeps room for them); the
        position of its first token."""
        self._require_resident()
        self.in_flight = cells
        return self.kv.next_pos()

    def decode_reply(self, tokens: Sequence[int], pos: int | None = None) -> None:
        """Decode the reply's ``tokens`` in this sequence alone (at ``pos``, or after its last
        cell)."""
        self.kv.decode(tokens, pos=pos)

    def reply_decoded(self) -> None:
        """A token of the reply is in the KV now (decoded with other sessions' in one batch):
        no window shift waits for a decode any more."""
        self.kv.shift_pending = False

    def end_reply(self) -> None:
        """The reply is journalled: it keeps no cells aside any more."""
        self.in_flight = 0

    def abandon_reply(self, start: int) -> None:
        """The reply failed: nothing of it is journalled, so its cells from position
        ``start`` are cut (or the sequence dropped, for the next turn to resume it)."""
        self.in_flight = 0
        try:
            if not self.kv.cut(start):
                self.kv.clear()
        except Exception:
            self.kv.clear()

    def journal_reply(self, text: str, tokens: list[int], meta: dict[str, object]) -> Entry:
        """Journal a reply whose ``tokens`` are decoded already (by a
        :class:`runtime.app.batching.Generation`)."""
        meta = {**meta, MODEL_TAG: self.model_tag}
        entry = self.journal.append("assistant", text, tokens, meta)
        self.window.apply(entry)
        return entry

    def after_reply(self, n_tokens: int) -> None:
        """Count a journalled reply's tokens; checkpoint when the policy says so."""
        self._after_turn(n_tokens)

    def _after_turn(self, n_tokens: int) -> None:
        self.checkpointer.count(n_tokens)
        self.last_active = time.monotonic()
        if self.checkpointer.due():
            self._try_checkpoint()

    # -- checkpoints ----------------------------------------------------------------------------

    @property
    def shift_pending(self) -> bool:
        """Whether a window shift waits for the next decode (no checkpoint until then)."""
        return self.kv.shift_pending

    @property
    def pending_tokens(self) -> int:
        """Tokens added since the last checkpoint (what a crash now would replay)."""
        return self.checkpointer.unsaved_tokens

    @property
    def checkpoint_failures(self) -> int:
        """Checkpoints that could not be written (the turns themselves were safe)."""
        return self.checkpointer.failures

    def _last_seq(self) -> int:
        return self.journal[-1].seq if len(self.journal) else -1

    def _try_checkpoint(self) -> None:
        """Checkpoint now, but never fail a turn that is already safe in the journal."""
        if self.kv.shift_pending:
            logger.debug("session %s: shift not applied yet; checkpoint deferred", self.session_id)
            return
        self.checkpointer.take(self.ctx, self.seq_id, self.window, self._last_seq())

    def checkpoint(self) -> object:
        """Checkpoint the KV sequence now and wait for it; returns what was written."""
        self._require_resident()
        if self.kv.shift_pending:
            raise SessionError(
                f"session {self.session_id!r}: a window shift is not applied until the next "
                "decode; checkpoint after it"
            )
        return self.checkpointer.take_now(self.ctx, self.seq_id, self.window, self._last_seq())

    def checkpoint_if_idle(self, idle_seconds: float) -> bool:
        """Checkpoint (never failing) if tokens are unsaved and the session has been idle for
        ``idle_seconds``; True if one was taken."""
        if not self.kv.resident or self.journal.closed or not self.checkpointer.unsaved_turns:
            return False
        if time.monotonic() - self.last_active < idle_seconds:
            return False
        self._try_checkpoint()
        return True

    def journal_needs(self) -> tuple[int, set[int]] | None:
        """What a resume can still need of the journal (see
        :meth:`runtime.session.checkpointer.ChunkCheckpointer.journal_needs`)."""
        return self.checkpointer.journal_needs(len(self.journal))

    def compact_journal(self, keep_from: int) -> int:
        """Delete the journal's sealed segments that a resume no longer needs and that hold
        only entries older than ``keep_from`` (long-term memory's ingestion mark + 1); return
        the bytes freed. This is the opt-in retention policy: the history it removes lives on
        only in long-term memory."""
        if self.journal.closed or self.journal.n_segments == 0:
            return 0
        needs = self.journal_needs()
        if needs is None:
            return 0
        from_seq, window = needs
        return self.journal.drop_segments_before(min(keep_from, from_seq), keep=window)

    # -- residency ------------------------------------------------------------------------------

    def resume(
        self, *, seq_id: int | None = None, allow_build_mismatch: bool = False
    ) -> ResumeReport:
        """Rebuild the KV sequence from the newest valid checkpoint plus the journal.

        ``seq_id`` binds the session to that sequence first (a pool hands out a free one when
        it resumes a session); by default the session keeps its own.
        """
        if seq_id is not None:
            if not 0 <= seq_id < self.ctx.n_seq_max:
                raise SessionError(f"seq_id must be in [0, {self.ctx.n_seq_max}), got {seq_id}")
            self.kv.seq_id = seq_id
        if self.n_tokens > self.ctx.n_ctx:
            raise ContextFullError(
                f"session {self.session_id!r} holds {self.n_tokens} tokens, more than "
                f"n_ctx={self.ctx.n_ctx}: open it with a larger context"
            )
        report, self.window = self._rebuild.run(
            self.window, allow_build_mismatch=allow_build_mismatch
        )
        return report

    def discard(self) -> None:
        """Free the KV cells and close the journal without a checkpoint (the session is being
        deleted)."""
        if not self.ctx.closed and self.seq_id >= 0:
            self.kv.clear()
        self.journal.close()

    def suspend(self) -> None:
        """Checkpoint if anything is new, then free the sequence's KV cells."""
        if not self.kv.resident:
            return
        if self.checkpointer.unsaved_turns:
            self._try_checkpoint()
        self.kv.clear()

    def close(self) -> None:
        """Suspend (if the context is still open) and close the journal."""
        try:
            if not self.ctx.closed:
                self.suspend()
        finally:
            self.journal.close()
