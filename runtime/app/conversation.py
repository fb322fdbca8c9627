"""A turn, end to end, over the runtime's parts: resume, retrieve, render and decode the
user turn, reply, journal, ingest, count. :class:`~runtime.app.facade.Runtime` checks the
arguments and takes the lock; this part runs the steps in order (listed in
:mod:`runtime.app`), never calling back into the runtime. The reply is generated with every
other session generating now (:mod:`runtime.app.batching`), which lets go of the lock
between decode steps; the session itself is held for the whole turn."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from runtime.app.turn import make_reply
from runtime.errors import RuntimeArgumentError, SessionNotFoundError

if TYPE_CHECKING:
    from runtime.app.batching import Batcher
    from runtime.app.recall import Recall
    from runtime.app.sessions import ImportMessage, Sessions
    from runtime.app.turn import MemoryUsed, Prompt, Reply, TurnEngine
    from runtime.arguments import Sampling
    from runtime.session import ResumeReport, Session

__all__ = ["Conversation"]

logger = logging.getLogger(__name__)

OnToken = Callable[[str], None] | None
Cancelled = Callable[[], bool] | None


class Conversation:
    """The steps of :meth:`Runtime.chat` and :meth:`Runtime.answer` (arguments checked,
    called with the runtime's lock taken).

    It counts what it ran, for :class:`runtime.app.stats.Stats` to read: ``turns`` finished
    and the ``runtime_ms`` of the last 512.
    """

    def __init__(
        self, sessions: Sessions, recall: Recall, turns: TurnEngine, batcher: Batcher
    ) -> None:
        self._batcher = batcher
        self._sessions = sessions
        self._recall = recall
        self._turns = turns
        self._turns_run = 0
        self._runtime_ms: deque[float] = deque(maxlen=512)

    @property
    def turns(self) -> int:
        """Turns finished since the runtime opened."""
        return self._turns_run

    @property
    def runtime_ms(self) -> tuple[float, ...]:
        """The runtime's own milliseconds of each of the last 512 turns."""
        return tuple(self._runtime_ms)

    def import_history(self, session_id: str, items: list[ImportMessage], n_ctx: int) -> list[int]:
        """Journal checked messages (see :meth:`Runtime.import_history`); their seqs."""
        with self._batcher.turn(session_id):
            # a new session has no window to render after: nothing is opened for it until
            # the history is known to import
            session = None
            if self._sessions.exists(session_id):
                session, _report = self._sessions.get(session_id)
            plan = self._turns.render_history(session, items)
            seqs = self._sessions.append_history(session_id, plan, len(items), n_ctx)
            # into long-term memory now, at the time each message was said (the import is
            # durable in the journal already: a failure here catches up on the next turn);
            # the session stays suspended, so the journal is read apart from it
            with self._sessions.open_journal(session_id) as journal:
                self._recall.catch_up_journal(session_id, journal)
            return seqs

    def consolidate(self, session_id: str) -> dict[str, int]:
        """Long-term memory's background work on one session now (see
        :meth:`Runtime.consolidate`), resident or suspended."""
        session = self._sessions.peek(session_id)
        if session is not None:
            self._recall.catch_up(session)
            return self._recall.consolidate(session)
        if session_id not in self._sessions.known():
            raise SessionNotFoundError(f"no session {session_id!r}")
        with self._sessions.open_journal(session_id) as journal:
            self._recall.catch_up_journal(session_id, journal)
            # suspended: nothing of it is in the KV now
            return self._recall.consolidate_journal(session_id, journal, set())

    def chat(
        self,
        session_id: str,
        text: str,
        params: Sampling,
        stops: tuple[str, ...],
        on_token: OnToken,
        cancelled: Cancelled,
        *,
        remember: bool,
        importance: float,
        use_memory: bool,
        created: float | None,
        user: str | None = None,
    ) -> Reply:
        """One user turn and its reply (see :meth:`Runtime.chat`): the session is held for
        the whole turn, after any turn it is in ends."""
        with self._batcher.turn(session_id):
            marks = [time.perf_counter()]
            new = not self._sessions.exists(session_id)
            session, report = self._sessions.get(session_id)
            marks.append(time.perf_counter())
            meta: dict[str, object] = {"importance": importance}
            if not remember:
                meta["remember"] = False
            if user is not None:
                meta["user"] = user
            try:
                # "last week" in the question means the week before the turn's own time
                memories = self._recall.retrieve(session, text, now=created) if use_memory else []
                marks.append(time.perf_counter())
                prompt = self._turns.prompt(
                    session,
                    text,
                    memories,
                    max_tokens=params.max_tokens,
                    meta=meta,
                    created=created,
                )
            except Exception:
                if new:  # a refused first turn leaves no session behind (nor its system turn)
                    self._discard_refused(session_id)
                raise
            marks.append(time.perf_counter())
            return self._reply(
                session, prompt, params, stops, on_token, cancelled, memories, report, marks,
                ingest=remember,
            )  # fmt: skip

    def answer(
        self,
        session_id: str,
        params: Sampling,
        stops: tuple[str, ...],
        on_token: OnToken,
        cancelled: Cancelled,
    ) -> Reply:
        """The reply to the session's unanswered last user turn (see :meth:`Runtime.answer`)."""
        with self._batcher.turn(session_id):
            if not self._sessions.exists(session_id):
                raise SessionNotFoundError(f"no session {session_id!r}")
            marks = [time.perf_counter()]
            session, report = self._sessions.get(session_id)
            marks += [time.perf_counter()] * 2  # resumed; nothing retrieved
            prompt = self._turns.pending(session, params.max_tokens)
            if prompt is None:
                raise RuntimeArgumentError(
                    "session_id", "the last turn in the window has its reply already"
                )
            marks.append(time.perf_counter())
            return self._reply(
                session, prompt, params, stops, on_token, cancelled, [], report, marks,
                ingest=True,
            )  # fmt: skip

    def _discard_refused(self, session_id: str) -> None:
        """Delete the journal and KV of a session whose first turn was refused; its
        long-term memories stay (``remember(..., session=)`` may have put some there before
        it had a journal). Never raises: the refusal is the error the caller sees."""
        try:
            self._sessions.delete(session_id, memories=False)
        except Exception:
            logger.exception("session %s: could not remove it after its refused turn", session_id)

    def _reply(
        self,
        session: Session,
        prompt: Prompt,
        params: Sampling,
        stops: tuple[str, ...],
        on_token: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
        memories: list[MemoryUsed],
        report: ResumeReport | None,
        marks: list[float],
        *,
        ingest: bool,
    ) -> Reply:
        """The end of a turn whose prompt is decoded (:meth:`chat`, :meth:`answer`):
        generate and journal the reply, catch long-term memory up (``ingest``), record it.
        ``marks`` are the times so far (start, resume, retrieval, prompt)."""
        entry, finish = self._turns.reply(session, prompt, params, stops, on_token, cancelled)
        marks.append(time.perf_counter())
        if ingest:
            self._recall.catch_up(session)
        marks.append(time.perf_counter())
        reply = make_reply(session.session_id, prompt, entry, finish, memories, report, marks)
        self._turns_run += 1
        self._runtime_ms.append(reply.runtime_ms)
        return reply
