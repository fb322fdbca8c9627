"""One reply being generated in a session's KV sequence, a token at a time.

A :class:`Generation` is a small state machine: :meth:`~Generation.sample` takes the next token
from an output of the last decode and holds it as ``pending`` (or ends the reply: an
end-of-generation token, a stop string, cancellation); once the pending token is decoded,
:meth:`~Generation.decoded` emits its text and ends the reply at the length limit;
:meth:`~Generation.finish` decodes the template's closing tokens and journals the reply.
Whoever drives it decides how the pending token is decoded: alone
(:meth:`~Generation.run_alone`) or in one batch with
other sessions' pending tokens (:class:`runtime.app.batching.Batcher`). Either way the
journal entry holds exactly the tokens decoded, and a failure leaves the KV as the journal
says (the reply's cells are cut).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from runtime.errors import SessionError

if TYPE_CHECKING:
    from llamaffi import Sampler
    from runtime.journal import Entry
    from runtime.session.session import Session

__all__ = ["Generation"]

#: Cells a reply may add beyond its tokens: the template's closing tokens.
CLOSE_CELLS = 16


class Generation:
    """The reply to the decoded prompt of ``session``: see the module docstring and
    :meth:`Session.start_generation`, which makes it, for the arguments."""

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
        self.start = session.kv.next_pos()
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
        session.in_flight = n_predict + CLOSE_CELLS  # cells the pool must keep for it

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
        self.session.kv.shift_pending = False
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
                session.kv.decode(tail)
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
        session.in_flight = 0
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
        self.session.in_flight = 0
        kv = self.session.kv
        try:
            if not kv.cut(self.start):
                kv.clear()
        except Exception:
            kv.clear()

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
                self.session.kv.decode([self.pending], pos=self.pos)
                self.decoded()
                if not self.ending:
                    self.sample(-1)
        except BaseException as exc:
            self.fail(exc)
            raise
        self.finish()
        return self.result()
