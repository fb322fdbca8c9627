"""What a turn returns: :class:`Reply`, with the :class:`MemoryUsed` put into its prompt."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.session import ResumeReport

__all__ = ["MemoryUsed", "Reply"]


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
