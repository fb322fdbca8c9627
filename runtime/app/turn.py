"""The turn engine: render with the GGUF's chat template, tokenize, decode, sample; and what a
turn returns (:class:`Reply`, with the :class:`MemoryUsed` put into its prompt).

:class:`TurnEngine` is built with the model, the context's size, the chat format and the
system prompt; it works on the :class:`runtime.session.Session` it is handed and knows
nothing of long-term memory, the pool or the runtime above it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.app.batching import Generation
from runtime.app.options import MEMORY_PREFIX, QUESTION_PREFIX
from runtime.arguments import Sampling
from runtime.errors import RuntimeArgumentError
from runtime.journal import Entry
from runtime.session import ResumeReport, Session
from runtime.template import ChatFormat, Message

if TYPE_CHECKING:
    from llamaffi import Context, Model, Sampler
    from runtime.app.batching import Batcher

__all__ = [
    "ImportedTurn",
    "MemoryUsed",
    "Prompt",
    "Reply",
    "TurnEngine",
    "make_reply",
    "with_memories",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryUsed:
    """A long-term memory that was put into a turn's prompt (:attr:`rendered` is how the
    prompt shows it: with the date it was said and its speaker)."""

    id: str
    text: str
    score: float
    similarity: float
    session: str | None
    kind: str
    rendered: str = ""
    said_at: float = 0.0
    speaker: str | None = None
    sources: tuple[int, ...] = ()


@dataclass
class Reply:
    """What :meth:`runtime.Runtime.chat` returns.

    Attributes:
        session_id: the session.
        text: the reply, without template markers.
        finish_reason: ``"stop"`` (end of turn or a stop string), ``"length"`` (``max_tokens``)
            or ``"cancelled"``.
        prompt_tokens: tokens decoded for this turn's prompt (the new part only, with the
            system prompt on a session's first turn).
        cached_tokens: tokens of the conversation reused from the KV cache (not re-prefilled).
        completion_tokens: tokens generated for the reply (the template's end-of-turn marker,
            decoded after it, is not counted).
        timings: milliseconds: ``resume``, ``retrieval``, ``render``, ``prefill`` (journal
            append + decode), ``generation``, ``memory_write`` and ``total``.
        memories: the long-term memories put into the prompt.
        resumed: how the session came back, if this turn resumed it.
        journal_seq: the reply's journal entry.
    """

    session_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    timings: dict[str, float]
    memories: list[MemoryUsed] = field(default_factory=list)
    resumed: ResumeReport | None = None
    journal_seq: int = -1

    @property
    def runtime_ms(self) -> float:
        """The runtime's own cost: everything but prefill and generation."""
        t = self.timings
        return t["total"] - t.get("prefill", 0.0) - t.get("generation", 0.0) - t.get("resume", 0.0)


@dataclass(frozen=True)
class Prompt:
    """A user turn journalled and decoded, ready for the reply."""

    entry: Entry
    content: str  # what the model saw (the text with the memories before it)
    prompt_tokens: int  # decoded for it (with a first system turn)
    cached_tokens: int  # of the window reused
    render_ms: float  # rendering and making room, before the journal append


@dataclass(frozen=True)
class ImportedTurn:
    """One message of an imported history, rendered as a chat turn would have been."""

    role: str
    text: str
    tokens: list[int]
    meta: dict[str, object]
    created: float | None
    #: the indices of the messages this entry holds: () for the runtime's own system prompt,
    #: two for a system message folded into the first user turn (a template without a
    #: system role)
    sources: tuple[int, ...]


class TurnEngine:
    """Render, tokenize, decode and sample one turn on a session.

    Args:
        model: the model (tokenizer and vocabulary).
        n_ctx: the context's cells (the reply budget and the room a turn needs).
        chat_format: the GGUF's chat template.
        system_prompt: the first turn of every new session (``None``: none).
    """

    def __init__(
        self,
        model: Model,
        n_ctx: int,
        chat_format: ChatFormat,
        system_prompt: str | None,
        batcher: Batcher,
    ) -> None:
        self.model = model
        self._batcher = batcher
        self.n_ctx = n_ctx
        self.format = chat_format
        self.system_prompt = system_prompt

    # -- the prompt ---------------------------------------------------------------------------

    def prompt(
        self,
        session: Session,
        text: str,
        memories: Sequence[MemoryUsed],
        *,
        max_tokens: int,
        meta: dict[str, object],
        created: float | None,
    ) -> Prompt:
        """Render the user turn (memories just before the text), make room, journal it
        (fsynced) with exactly the tokens about to be decoded, then decode only those."""
        start = time.perf_counter()
        content = with_memories(text, memories)
        if session.first_turn and self.system_prompt and not self.format.supports_system:
            content = f"{self.system_prompt}\n\n{content}"  # e.g. Gemma: no system role
        n_before = session.n_tokens  # what the KV already held: reused, never re-prefilled
        system_tokens = self._start_session(session, created)
        tokens, keep = self._render_user(session, Message("user", content), max_tokens)
        meta = dict(meta)
        if content != text:
            meta["content"] = content
            meta["memories"] = [m.id for m in memories]
        render_ms = (time.perf_counter() - start) * 1000
        entry = session.append_tokens(
            "user", text, tokens, meta=meta, checkpoint=False, created=created,
            decode=self._batcher.prefill,  # beside the replies being generated
        )  # fmt: skip
        return Prompt(entry, content, len(tokens) + system_tokens, min(keep, n_before), render_ms)

    def pending(self, session: Session, max_tokens: int) -> Prompt | None:
        """The session's unanswered user turn as a decoded :class:`Prompt`, room made for
        the reply and its logits fresh; None when the last turn is not one."""
        start = time.perf_counter()
        entry = session.unanswered()
        if entry is None:
            return None
        session.reserve(self.reply_budget(max_tokens) + 16)
        if session.unanswered() is None:  # the shift took the turn out of the window
            return None
        session.prime()
        content = str(entry.meta.get("content", entry.text))
        render_ms = (time.perf_counter() - start) * 1000
        return Prompt(entry, content, 1, session.n_tokens - 1, render_ms)  # one re-decoded

    def _start_session(self, session: Session, created: float | None) -> int:
        """Journal the system prompt as the first turn of a new session; its token count."""
        if not session.first_turn or not self.system_prompt or not self.format.supports_system:
            return 0
        tokens = self._system_tokens(self.system_prompt)
        if not tokens:
            return 0
        session.reserve(len(tokens))
        session.append_tokens(
            "system", self.system_prompt, tokens, checkpoint=False, created=created,
            decode=self._batcher.prefill,
        )  # fmt: skip
        return len(tokens)

    def _system_tokens(self, text: str) -> list[int]:
        rendered = self.format.render([Message("system", text)], False)
        return self.format.tokenize(self.model, rendered, first=True, plain=[text])

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
                tokens = self.format.tokenize(self.model, delta, first=first, plain=[user.content])
                keep = session.n_tokens
            else:
                contents = [m.content for m in history] + [user.content]
                full = self.format.tokenize(self.model, delta, first=True, plain=contents)
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
            session.reserve(len(tokens) + self.reply_budget(max_tokens) + 16)
            if len(session.journal) == before:  # no window shift: the render stands
                if keep < session.n_tokens:
                    session.rewind(keep)
                return tokens, keep
        # the shift changed the history; the second render is on the shifted window
        if keep < session.n_tokens:
            session.rewind(keep)
        return tokens, keep

    # -- the reply ----------------------------------------------------------------------------

    def reply(
        self,
        session: Session,
        prompt: Prompt,
        params: Sampling,
        stops: tuple[str, ...],
        on_token: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> tuple[Entry, str]:
        """Generate and journal the reply to ``prompt``; ``(entry, finish_reason)``."""
        history = [Message(r, c) for r, c in session.messages()[:-1]]
        user = Message("user", prompt.content)
        sampler = self._make_sampler(params, session, prompt.entry.seq)
        try:
            gen = Generation(
                session,
                self._room(session, params.max_tokens),
                sampler,
                close=lambda reply: self._close_tokens(history, user, reply),
                stop=self.format.stop_strings + stops,
                clean=self.format.clean,
                on_text=on_token,
                cancelled=cancelled,
            )
            self._batcher.run(gen)  # stepped with every other session generating now
            return gen.result()
        finally:
            sampler.close()

    def reply_budget(self, max_tokens: int) -> int:
        """Cells reserved for a reply: ``max_tokens``, but at most a quarter of the context, so
        a client's large ``max_tokens`` does not shift most of the conversation out."""
        return min(max_tokens, max(16, self.n_ctx // 4))

    def _room(self, session: Session, max_tokens: int) -> int:
        left = self.n_ctx - session.n_tokens - 16
        return max(1, min(self.reply_budget(max_tokens), left))

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

    # -- one-shot questions (the distiller's LLM extractor and summariser) ---------------------

    def ask(self, ctx: Context, seq_id: int, instructions: str, text: str, max_tokens: int) -> str:
        """The model's greedy answer to ``instructions`` about ``text``, on the scratch
        sequence ``seq_id`` (cleared before and after), as a fresh two-message chat. ``text``
        is user content: tokenized as text, never as control tokens. Returns ``""`` when the
        context has no room for it (the caller falls back to its rules)."""
        from llamaffi import DecodeError

        if self.format.supports_system:
            messages = [Message("system", instructions), Message("user", text)]
        else:
            messages = [Message("user", f"{instructions}\n\n{text}")]
        rendered = self.format.render(messages, True)
        plain = [m.content for m in messages]
        tokens = self.format.tokenize(self.model, rendered, first=True, plain=plain)
        if len(tokens) + max_tokens > self.n_ctx // 2:
            return ""  # a question must never crowd the sessions out of the context
        ctx.memory.seq_rm(seq_id)
        try:
            out = ctx.generate(tokens, max_tokens, seq_id=seq_id)
        except DecodeError as exc:  # no KV room now (the sessions hold it): the rules answer
            logger.info("one-shot question not asked: %s", exc)
            return ""
        finally:
            ctx.memory.seq_rm(seq_id)
        pieces = [t for t in out if not self.model.is_eog(t)]
        answer = self.model.detokenize(pieces) if pieces else ""
        return self.format.clean(answer)

    def time_prefill(self, ctx: Context, seq_id: int, tokens: Sequence[int]) -> float:
        """Seconds a from-scratch prefill of ``tokens`` takes on the scratch sequence
        ``seq_id`` (cleared after): what a resume from a checkpoint saves."""
        if not tokens:
            return 0.0
        start = time.perf_counter()
        try:
            ctx.decode(tokens, seq_id=seq_id)
            return time.perf_counter() - start
        finally:
            ctx.memory.seq_rm(seq_id)

    # -- imported history ---------------------------------------------------------------------

    def render_history(
        self,
        session: Session | None,
        messages: Sequence[tuple[str, str, dict[str, object], float | None]],
    ) -> list[ImportedTurn]:
        """Render ``(role, text, meta, created)`` messages after the session's window
        (``None``: a new session, nothing journalled yet) exactly
        as :meth:`prompt` and :meth:`reply` render chatted turns (a user turn ends with the
        assistant opener; an assistant turn is its text plus the template's close), so that
        a later chat continues the same KV. A system message may only open a new session.

        Raises :class:`RuntimeArgumentError` (naming ``messages[i]``) for a history that this
        template cannot extend turn by turn. A history longer than the context is fine: the
        window shifts through it (``Sessions.append_history``). Nothing is journalled here.
        """
        fmt = self.format
        plan: list[ImportedTurn] = []
        history = [Message(r, c) for r, c in session.messages()] if session is not None else []
        in_window = session.n_tokens if session is not None else 0
        n_tokens = 0
        first = session is None or session.first_turn
        fold: str | None = None  # a system text for a template without a system role
        folded: tuple[int, ...] = ()
        for i, (role, text, meta, created) in enumerate(messages):
            if role == "system":
                if not (first and i == 0):
                    raise RuntimeArgumentError(
                        f"messages[{i}].role", "a system message may only open a new session"
                    )
                if fmt.supports_system:
                    tokens = self._system_tokens(text)
                    plan.append(ImportedTurn("system", text, tokens, meta, created, (i,)))
                    history.append(Message("system", text))
                    n_tokens += len(tokens)
                else:
                    fold, folded = text, (i,)
                continue
            if i == 0 and first and self.system_prompt:
                # a new session without its own system message starts like a chatted one
                if fmt.supports_system:
                    tokens = self._system_tokens(self.system_prompt)
                    plan.append(ImportedTurn("system", self.system_prompt, tokens, {}, created, ()))
                    history.append(Message("system", self.system_prompt))
                    n_tokens += len(tokens)
                else:
                    fold = self.system_prompt
            meta = dict(meta)
            if role == "user":
                content = text
                sources = (*folded, i)
                if fold is not None:
                    content, fold, folded = f"{fold}\n\n{text}", None, ()
                    meta["content"] = content
                delta, extends = fmt.user_delta(history, Message("user", content))
                if not extends:
                    raise RuntimeArgumentError(
                        f"messages[{i}]",
                        f"the {fmt.name} chat template cannot extend this session turn by "
                        "turn; send only the new user message",
                    )
                first = in_window + n_tokens == 0
                tokens = fmt.tokenize(self.model, delta, first=first, plain=[content])
                history.append(Message("user", content))
            else:
                sources = (i,)
                close = fmt.assistant_close(history, Message("assistant", text))
                # a reply is all content: none of it becomes a control token
                tokens = fmt.tokenize(self.model, text, first=False, plain=[text])
                if close:
                    tokens += fmt.tokenize(self.model, close, first=False)
                history.append(Message("assistant", text))
            plan.append(ImportedTurn(role, text, tokens, meta, created, sources))
            n_tokens += len(tokens)
        return plan


def make_reply(
    session_id: str,
    prompt: Prompt,
    entry: Entry,
    finish: str,
    memories: list[MemoryUsed],
    resumed: ResumeReport | None,
    marks: Sequence[float],
) -> Reply:
    """The :class:`Reply` of a finished turn; ``marks`` are the ``perf_counter`` times at its
    start and after the resume, retrieval, prompt, reply and memory write."""
    t0, t1, t2, t3, t4, t5 = marks

    def ms(a: float, b: float) -> float:
        return (b - a) * 1000

    timings = {
        "resume": ms(t0, t1),
        "retrieval": ms(t1, t2),
        "render": prompt.render_ms,
        "prefill": ms(t2, t3) - prompt.render_ms,  # journal append + decode of the new tokens
        "generation": ms(t3, t4),
        "memory_write": ms(t4, t5),
        "total": ms(t0, t5),
    }
    return Reply(
        session_id=session_id,
        text=entry.text,
        finish_reason=finish,
        prompt_tokens=prompt.prompt_tokens,
        cached_tokens=prompt.cached_tokens,
        completion_tokens=int(entry.meta.get("generated", len(entry.tokens))),
        timings=timings,
        memories=memories,
        resumed=resumed,
        journal_seq=entry.seq,
    )


def with_memories(text: str, memories: Sequence[MemoryUsed]) -> str:
    """The user's text with the retrieved memories before it (never in the system prompt,
    so the KV prefix stays reusable)."""
    if not memories:
        return text
    context = " ".join((m.rendered or m.text).strip() for m in memories)
    return f"{MEMORY_PREFIX}{context}\n{QUESTION_PREFIX}{text}"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
