"""One turn of :meth:`Runtime.chat`: retrieval, render, journal, decode, generate,
journal, memory write, checkpoint by policy."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from runtime.layout import validate_session_id
from runtime.session import Session
from runtime.template import Message

if TYPE_CHECKING:
    from llamaffi import Sampler

from runtime.app.options import (
    Reply,
    Sampling,
    _check_stop,
    _check_text,
    _common_prefix,
    _num_field,
    _RuntimeState,
    _with_memories,
)

logger = logging.getLogger(__name__)


class _TurnMixin(_RuntimeState):
    """The turn (part of :class:`Runtime`)."""

    # -- the turn -----------------------------------------------------------------------------

    def chat(
        self,
        session_id: str,
        text: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        on_token: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        remember: bool = True,
        importance: float = 0.5,
        use_memory: bool = True,
    ) -> Reply:
        """One user turn and the assistant's reply, in session ``session_id``.

        Sampling arguments left ``None`` take the runtime's :class:`Sampling` defaults.
        ``on_token`` receives the reply's text as it is generated; ``cancelled`` is polled
        between tokens (a cancelled reply is kept, shortened, with ``finish_reason``
        ``"cancelled"``). ``remember=False`` keeps this turn out of long-term memory;
        ``use_memory=False`` skips retrieval. Bad arguments raise
        :class:`RuntimeArgumentError` before anything is written.
        """
        self._require_open()
        validate_session_id(session_id)
        text = _check_text(text)
        params = self._sampling(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed)
        stops = _check_stop(stop)
        _num_field("importance", importance, 0.0, 1.0)
        with self._lock:
            self._require_open()
            return self._chat(
                session_id,
                text,
                params,
                stops,
                on_token,
                cancelled,
                remember,
                importance,
                use_memory,
            )

    def _sampling(self, *args: Any) -> Sampling:
        names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")
        base = asdict(self.sampling)
        for name, value in zip(names, args, strict=True):
            if value is not None:
                base[name] = value
        return Sampling(**base).check(self.ctx.n_ctx)

    def _chat(
        self,
        session_id: str,
        text: str,
        params: Sampling,
        stops: tuple[str, ...],
        on_token: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
        remember: bool,
        importance: float,
        use_memory: bool,
    ) -> Reply:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        session, report = self._session(session_id)
        t1 = time.perf_counter()
        timings["resume"] = (t1 - t0) * 1000

        memories = self._retrieve(session, text) if use_memory else []
        t2 = time.perf_counter()
        timings["retrieval"] = (t2 - t1) * 1000
        if self.memory is not None and use_memory:
            self._retrieval_ms.append(timings["retrieval"])

        content = _with_memories(text, memories)
        if session.first_turn and self.system_prompt and not self.format.supports_system:
            content = f"{self.system_prompt}\n\n{content}"  # e.g. Gemma: no system role
        n_before = session.n_tokens  # what the KV already held: reused, never re-prefilled
        system_tokens = self._start_session(session)
        user = Message("user", content)
        tokens, keep = self._render_user(session, user, params.max_tokens)
        cached = min(keep, n_before)
        t3 = time.perf_counter()
        timings["render"] = (t3 - t2) * 1000

        meta: dict[str, object] = {"importance": importance}
        if content != text:
            meta["content"] = content
            meta["memories"] = [m.id for m in memories]
        if not remember:
            meta["remember"] = False
        entry = session.append_tokens("user", text, tokens, meta=meta, checkpoint=False)
        t4 = time.perf_counter()
        timings["prefill"] = (t4 - t3) * 1000  # journal append + decode of the new tokens

        history = [Message(r, c) for r, c in session.messages()[:-1]]
        sampler = self._make_sampler(params, session, entry.seq)
        try:
            reply_entry, finish = session.generate(
                self._room(session, params.max_tokens),
                sampler,
                close=lambda reply: self._close_tokens(history, user, reply),
                stop=self.format.stop_strings + stops,
                clean=self.format.clean,
                on_text=on_token,
                cancelled=cancelled,
            )
        finally:
            sampler.close()
        t5 = time.perf_counter()
        timings["generation"] = (t5 - t4) * 1000

        if remember:
            self._safe_ingest(session)
        t6 = time.perf_counter()
        timings["memory_write"] = (t6 - t5) * 1000
        timings["total"] = (t6 - t0) * 1000
        self._turns += 1
        reply = Reply(
            session_id=session_id,
            text=reply_entry.text,
            finish_reason=finish,
            prompt_tokens=len(tokens) + system_tokens,
            cached_tokens=cached,
            completion_tokens=int(reply_entry.meta.get("generated", len(reply_entry.tokens))),
            timings=timings,
            memories=memories,
            resumed=report,
            journal_seq=reply_entry.seq,
        )
        self._turn_ms.append(reply.runtime_ms)
        return reply

    def _start_session(self, session: Session) -> int:
        """Journal the system prompt as the first turn of a new session; its token count."""
        if not session.first_turn or not self.system_prompt or not self.format.supports_system:
            return 0
        system = Message("system", self.system_prompt)
        text = self.format.render([system], False)
        tokens = self.format.tokenize(self.model, text, first=True)
        if not tokens:
            return 0
        session.reserve(len(tokens))
        session.append_tokens("system", self.system_prompt, tokens, checkpoint=False)
        return len(tokens)

    def _render_user(
        self, session: Session, user: Message, max_tokens: int
    ) -> tuple[list[int], int]:
        """The tokens to decode for ``user`` (room made for them and the reply); and how many
        tokens of the window were reused."""
        for _attempt in range(2):
            history = [Message(r, c) for r, c in session.messages()]
            first = session.n_tokens == 0
            delta, extends = self.format.user_delta(history, user)
            if extends:
                tokens = self.format.tokenize(self.model, delta, first=first)
                keep = session.n_tokens
            else:
                full = self.format.tokenize(self.model, delta, first=True)
                window = session.tokens()
                keep = _common_prefix(window, full)
                tokens = full[keep:]
                logger.info(
                    "session %s: template %s does not render the conversation incrementally; "
                    "decoding from token %d of %d",
                    session.session_id,
                    self.format.name,
                    keep,
                    len(window),
                )
            before = len(session.journal)
            session.reserve(len(tokens) + self._reply_budget(max_tokens) + 16)
            if len(session.journal) == before:  # no window shift: the render stands
                if keep < session.n_tokens:
                    session.rewind(keep)
                return tokens, keep
        # the shift changed the history; the second render is on the shifted window
        if keep < session.n_tokens:
            session.rewind(keep)
        return tokens, keep

    def _reply_budget(self, max_tokens: int) -> int:
        """Cells reserved for a reply: ``max_tokens``, but at most a quarter of the context, so
        a client's large ``max_tokens`` does not shift most of the conversation out."""
        return min(max_tokens, max(16, self.ctx.n_ctx // 4))

    def _room(self, session: Session, max_tokens: int) -> int:
        left = self.ctx.n_ctx - session.n_tokens - 16
        return max(1, min(self._reply_budget(max_tokens), left))

    def _close_tokens(self, history: list[Message], user: Message, reply: str) -> list[int]:
        close = self.format.assistant_close([*history, user], Message("assistant", reply))
        return self.format.tokenize(self.model, close, first=False) if close else []

    def _make_sampler(self, p: Sampling, session: Session, seq: int) -> Sampler:
        from llamaffi import Sampler

        sampler = Sampler()
        if p.repeat_penalty != 1.0 and p.repeat_last_n:
            sampler.penalties(self.model.n_vocab, last_n=p.repeat_last_n, repeat=p.repeat_penalty)
            for token in session.tokens()[-p.repeat_last_n :]:
                sampler.accept(token)
        if p.temperature <= 0:
            return sampler.add_greedy()
        if p.top_k:
            sampler.top_k(p.top_k)
        if p.top_p < 1.0:
            sampler.top_p(p.top_p)
        if p.min_p > 0:
            sampler.min_p(p.min_p)
        sampler.temp(p.temperature)
        if p.seed is not None:
            seed = p.seed
        else:
            digest = hashlib.sha256(f"{session.session_id}/{seq}".encode()).digest()
            seed = int.from_bytes(digest[:4], "little")
        return sampler.dist(seed)
