"""Continuous batching: every session that is generating a reply shares each decode.

Each reply is a :class:`Generation` (sample, decode, stop strings, the closing tokens, the
journal entry); the :class:`Batcher` steps every session's at once.

A turn decodes its prompt in steps of its own that carry every generating session's pending
token too (:meth:`Batcher.prefill`: chunked prefill, a slice of at most ``n_batch`` less the
pending tokens per step, alone when nobody generates), takes its first token from the
prompt's logits, then joins the :class:`Batcher`: each *step* decodes the pending token of
every generating session in one ``llama_decode`` (one ``llama_batch``, a sequence id per
session), and samples each session's next token from its own output with its own
sampler. Stop strings, ``on_token`` and cancellation stay per session
(:class:`Generation`). A reply that ends is journalled in the step
that ends it, so a turn is acknowledged only once durable, as before.

There is no scheduler thread: the threads whose turns are generating take turns to run a step
(under the runtime's lock, which the stepping thread leaves free between two steps when
another thread waits for it or another reply ended, so that another turn's prompt, a resume
or the housekeeper may run in between). A step needs no logits from before it: a
session's state between steps is "token sampled, not decoded", so anything that decodes
between two steps (a prompt, a resume, a distiller question) cannot disturb a reply.

A session *in a turn* (from its resume to its journalled reply) is never suspended, checkpointed
or changed by anyone else: :meth:`Batcher.turn` holds it, and :meth:`Batcher.wait_idle` is
how other operations wait for it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from runtime.errors import ClosedError, SessionError

if TYPE_CHECKING:
    from llamaffi import Context, Sampler
    from runtime.journal import Entry
    from runtime.session.session import Session
    from runtime.session.window import SequenceKV

__all__ = ["Batcher", "Generation", "RuntimeLock"]

#: A prompt's slice in a step: (seq id, tokens, first position, holds the prompt's end).
_Slice = tuple[int, list[int], int, bool]

#: Seconds a generating thread leaves the lock free between two steps: long enough for a
#: thread blocked on the lock (a new turn, the housekeeper) to take it, short beside a step.
YIELD_S = 0.0002

#: Cells a reply may add beyond its tokens: the template's closing tokens.
CLOSE_CELLS = 16


class Generation:
    """The reply to the decoded prompt of ``session``, not started yet: drive it alone
    (:meth:`run_alone`) or with other sessions' (:class:`Batcher`). Its first :meth:`sample`
    must read the prompt's logits, so it is made before anything else decodes.

    The reply stops at an end-of-generation token (sampled, never decoded), at the first of
    the ``stop`` strings (cut from the text), after ``n_predict`` tokens, or when
    ``cancelled()`` turns true (the reply so far is kept and journalled, so the KV and the
    journal stay equal); its ``finish_reason`` is ``"stop"``, ``"length"`` or
    ``"cancelled"``. ``close(text)`` gives the tokens that end the turn in the template
    (``<|im_end|>\\n`` in ChatML); they are decoded so the next turn extends the sequence.
    ``on_text`` receives the reply's text as it grows, never a piece of a stop string. The
    journal entry holds exactly the tokens decoded (:meth:`Session.journal_reply`).

    A small state machine: :meth:`sample` takes the next token from an output of the last
    decode and holds it as ``pending`` (or ends the reply: an end-of-generation token, a stop
    string, cancellation); once the pending token is decoded, :meth:`decoded` emits its text
    and ends the reply at the length limit; :meth:`finish` decodes the template's closing
    tokens and journals the reply. A failure leaves the KV as the journal says (the reply's
    cells are cut).
    """

    def __init__(
        self,
        session: Session,
        n_predict: int,
        sampler: Sampler,
        *,
        close: Callable[[str], Sequence[int]],
        stop: Sequence[str] = (),
        clean: Callable[[str], str] | None = None,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        meta: dict[str, object] | None = None,
    ) -> None:
        self.session = session
        self.seq_id = session.seq_id
        self.n_predict = n_predict
        self.sampler = sampler
        self._close, self._stop, self._clean = close, tuple(stop), clean
        self._on_text, self._cancelled, self._meta = on_text, cancelled, dict(meta or {})
        self._holdback = max((len(x) for x in self._stop), default=1) - 1
        self.start = session.begin_reply(n_predict + CLOSE_CELLS)
        #: the position of the pending token
        self.pos = self.start
        #: the token sampled and not decoded yet (``None``: none)
        self.pending: int | None = None
        self.decoded_tokens: list[int] = []
        self._raw = b""
        self._text = ""
        self._emitted = 0
        self._samples = 0
        #: "stop", "length" or "cancelled" once the reply has ended
        self.finish_reason: str | None = None
        #: finished: journalled (``entry``) or failed (``error``)
        self.done = False
        self.entry: Entry | None = None
        self.error: BaseException | None = None

    @property
    def ending(self) -> bool:
        """The reply has ended and waits for :meth:`finish`."""
        return self.finish_reason is not None and not self.done

    def sample(self, idx: int) -> None:
        """Take the next token from output ``idx`` of the context's last decode, or end the
        reply (cancelled, end of generation, a stop string)."""
        if self._cancelled is not None and self._cancelled():
            self.finish_reason = "cancelled"
            return
        ctx = self.session.ctx
        token = self.sampler.sample(ctx, idx)
        self._samples += 1
        model = ctx.model
        if model.is_eog(token):
            self.finish_reason = "stop"
            return
        raw = self._raw + model.token_to_piece(token)
        text = raw.decode("utf-8", "ignore")
        cut = min((i for i in (text.find(x) for x in self._stop if x) if i >= 0), default=-1)
        if cut >= 0:
            self._text = text[:cut]
            self.finish_reason = "stop"
            return
        self._raw, self._text = raw, text
        self.pending = token

    def decoded(self) -> None:
        """The pending token is in the KV now: emit the text that is safe to show (never a
        piece of a stop string), and end the reply at ``n_predict`` tokens."""
        if self.pending is None:
            raise SessionError("no pending token was decoded")
        self.decoded_tokens.append(self.pending)
        self.pending = None
        self.pos += 1
        self.session.reply_decoded()
        if self._on_text is not None:
            safe = len(self._text) - self._holdback
            if safe > self._emitted:
                self._on_text(self._text[self._emitted : safe])
                self._emitted = safe
        if self._samples >= self.n_predict:
            self.finish_reason = "length"

    def finish(self) -> None:
        """Decode the closing tokens and journal the reply (``entry``); a failure is kept in
        ``error`` with the KV cut back to the prompt."""
        session = self.session
        try:
            reply = self._clean(self._text) if self._clean is not None else self._text.strip()
            if self._on_text is not None and len(self._text.rstrip()) > self._emitted:
                self._on_text(self._text.rstrip()[self._emitted :])
            tail = list(self._close(reply))
            if tail:
                session.decode_reply(tail)
            meta = dict(self._meta)
            meta["finish"] = self.finish_reason
            meta["generated"] = len(self.decoded_tokens)
            self.entry = session.journal_reply(reply, self.decoded_tokens + tail, meta)
        except Exception as exc:
            self.fail(exc)
            return
        except BaseException as exc:  # KeyboardInterrupt: this reply fails, and it goes on up
            self.fail(exc)
            raise
        self.done = True
        session.end_reply()
        try:
            session.after_reply(len(self.entry.tokens))
        except BaseException as exc:  # journalled: the caller still learns of the failure
            self.error = exc

    def fail(self, exc: BaseException) -> None:
        """End with ``exc``: nothing of the reply is journalled, its cells are cut (or the
        sequence dropped, for the next turn to resume it)."""
        if self.done:
            return
        self.done = True
        self.error = exc
        self.session.abandon_reply(self.start)

    def result(self) -> tuple[Entry, str]:
        """``(entry, finish_reason)``; raises the failure, if it failed."""
        if self.error is not None:
            raise self.error
        if self.entry is None or self.finish_reason is None:
            raise SessionError("the reply has not finished")
        return self.entry, self.finish_reason

    def run_alone(self) -> tuple[Entry, str]:
        """Generate the whole reply in this sequence alone, then journal it."""
        try:
            self.sample(-1)
            while self.pending is not None:
                self.session.decode_reply([self.pending], pos=self.pos)
                self.decoded()
                if not self.ending:
                    self.sample(-1)
        except BaseException as exc:
            self.fail(exc)
            raise
        self.finish()
        return self.result()


class RuntimeLock:
    """The runtime's lock: reentrant, and it knows whether a thread is waiting for it, so that
    a generating turn leaves it free between two steps only when someone needs it."""

    def __init__(self) -> None:
        #: the lock itself (a :class:`threading.Condition` waits on it)
        self.rlock = threading.RLock()
        self._waiters = 0
        self._count = threading.Lock()

    def __enter__(self) -> RuntimeLock:
        if not self.rlock.acquire(blocking=False):
            with self._count:
                self._waiters += 1
            try:
                self.rlock.acquire()
            finally:
                with self._count:
                    self._waiters -= 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.rlock.release()

    @property
    def contended(self) -> bool:
        """Whether a thread is waiting to enter."""
        return self._waiters > 0


class Batcher:
    """The generating sessions of one context, stepped together (see the module docstring).

    Every method is called with the runtime's ``lock`` held.
    """

    def __init__(self, ctx: Context, lock: RuntimeLock) -> None:
        self._ctx = ctx
        self._lock = lock
        #: notified whenever a step ran or a turn ended (waits release the runtime's lock)
        self._changed = threading.Condition(lock.rlock)
        self._active: list[Generation] = []
        self._busy: dict[str, int] = {}  # session id -> turns holding it (0 or 1)
        self._closing = False
        self.steps = 0
        self.tokens = 0
        self.widest = 0
        self.prefilled = 0  # prompt tokens decoded in steps beside replies

    # -- sessions in a turn -------------------------------------------------------------------

    def is_busy(self, session_id: str) -> bool:
        """Whether the session is in a turn now."""
        return session_id in self._busy

    @contextlib.contextmanager
    def turn(self, session_id: str) -> Iterator[None]:
        """Hold the session for one turn, after waiting for the turn it is in to end;
        :class:`~runtime.errors.ClosedError` once the runtime is closing."""
        self.wait_idle(session_id)
        if self._closing:
            raise ClosedError("the runtime is closed")
        self._busy[session_id] = 1
        try:
            yield
        finally:
            del self._busy[session_id]
            self._changed.notify_all()

    def wait_idle(self, session_id: str | None = None) -> None:
        """Wait until the session (``None``: every session) is in no turn."""
        while (session_id in self._busy) if session_id is not None else self._busy:
            self.wait()

    def wait(self) -> None:
        """Wait for a step or the end of a turn, with the lock released meanwhile."""
        self._changed.wait(timeout=1.0)

    # -- generating ---------------------------------------------------------------------------

    def run(self, gen: Generation) -> None:
        """Drive ``gen`` from its first sample (the prompt's logits are the last decode's)
        to its journalled end, stepping every other generating session with it."""
        try:
            gen.sample(-1)
        except BaseException as exc:
            gen.fail(exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt: the reply failed, and it goes on up
        if gen.ending:
            gen.finish()
        if gen.done:
            return
        self._active.append(gen)
        try:
            while not gen.done:
                others_ended = self._step()
                if gen.done:
                    break
                # the thread of a reply that ended, or anyone else, waits for the lock
                if others_ended or self._lock.contended:
                    self._changed.notify_all()
                    self._changed.wait(timeout=YIELD_S)
        finally:
            if gen in self._active:  # interrupted (KeyboardInterrupt): leave nothing behind
                self._active.remove(gen)
                gen.fail(RuntimeError("the turn was interrupted"))
            self._changed.notify_all()

    def prefill(self, kv: SequenceKV, tokens: Sequence[int]) -> None:
        """Decode a prompt into ``kv``'s sequence after its last cell, keeping the last
        token's logits as the last decode's last output (what :meth:`run` samples first).

        Alone (one ``Context.decode``) when no reply is generating; else in steps that also
        decode every generating reply's pending token, a slice of the prompt in each, so
        that a prompt never stalls the others' replies. Raises what the decode raised (the
        replies of a failed step fail too: nothing of that batch is in the KV).
        """
        if not self._active:
            kv.decode(tokens)
            return
        start, n = kv.next_pos(), len(tokens)
        done = 0
        try:
            while done < n:
                pending = [g for g in self._active if g.pending is not None]
                room = self._ctx.n_batch - len(pending)
                if room < 1:  # as many replies as a batch holds: the rest goes alone
                    kv.decode(list(tokens[done:]))
                    break
                part = list(tokens[done : done + room])
                last = done + len(part) == n
                # a reply ending in the last step is finished (its closing tokens decoded)
                # at the next step: the prompt's logits must stay the last decode's
                self._step((kv.seq_id, part, start + done, last), finish=not last)
                done += len(part)
                self.prefilled += len(part)
        finally:
            self._changed.notify_all()  # replies may have ended in these steps
        kv.shift_pending = False

    def close(self) -> None:
        """Refuse new turns, finish the replies being generated (each is journalled), then
        wait for the turns in progress to end (before the context closes)."""
        self._closing = True
        while self._active:
            self._step()
        self._changed.notify_all()
        self.wait_idle()

    def _step(self, prompt: _Slice | None = None, *, finish: bool = True) -> bool:
        """One decode of every pending token (in batches of at most ``n_batch``), the first
        batch with ``prompt``'s slice after them (it fits: :meth:`prefill`), then (``finish``)
        the replies that ended are finished; whether a reply ended (journalled or failed)."""
        try:
            pending = [g for g in self._active if g.pending is not None]
            width = self._ctx.n_batch
            if not pending and prompt is not None:
                self._decode([], prompt)
            for start in range(0, len(pending), width):
                self._decode(pending[start : start + width], prompt if start == 0 else None)
            # every sample is taken: a reply that ended may decode its closing tokens
            for g in self._active if finish else ():
                if g.ending:
                    g.finish()
        except Exception:  # the prompt slice's decode failed: its turn fails, no reply does
            self._active = [g for g in self._active if not g.done]
            raise
        except BaseException:  # KeyboardInterrupt mid-step: no reply is left half-done
            for g in self._active:
                g.fail(RuntimeError("the reply was interrupted"))
            self._active = []
            raise
        ended = any(g.done for g in self._active)
        self._active = [g for g in self._active if not g.done]
        return ended

    def _decode(self, gens: list[Generation], prompt: _Slice | None = None) -> None:
        """Decode these replies' pending tokens in one batch (and ``prompt``'s slice after
        them), then sample each reply's next token."""
        seqs = [g.seq_id for g in gens]
        tokens = [g.pending for g in gens if g.pending is not None]
        where = [g.pos for g in gens]
        try:
            if prompt is None:
                self._ctx.decode_batch(seqs, tokens, where)
            else:
                seq, part, at, last = prompt
                keep = [True] * len(gens) + [False] * len(part)
                keep[-1] = last  # the prompt's last token: the reply's first sample
                self._ctx.decode_batch(
                    seqs + [seq] * len(part),
                    tokens + part,
                    where + list(range(at, at + len(part))),
                    outputs=keep,
                )
        except Exception as exc:  # nothing of this batch is in the KV
            if prompt is not None:
                if gens:  # the replies go on without the prompt; only its turn fails
                    self._decode(gens)
                raise exc
            for g in gens:  # each of its replies fails
                g.fail(exc)
            return
        self.steps += 1
        self.tokens += len(gens)
        self.widest = max(self.widest, len(gens))
        for i, g in enumerate(gens):
            try:
                g.decoded()
                if not g.ending:
                    g.sample(i)
            except Exception as exc:  # its callback, its sampler: this reply only
                g.fail(exc)

    def stats(self) -> dict[str, int]:
        """Steps run, reply tokens decoded in them, the widest step (replies), prompt tokens
        decoded in steps beside replies, sessions generating now."""
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "widest": self.widest,
            "prefilled": self.prefilled,
            "generating": len(self._active),
        }
