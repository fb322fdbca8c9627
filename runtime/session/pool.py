"""Resident sessions over one context: the least recently used are suspended to make room,
so idle sessions hold no KV memory and no open files."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from runtime.chunks import ChunkStore
from runtime.errors import ArgumentError, ContextFullError, SessionError
from runtime.layout import validate_session_id
from runtime.session.checkpointer import CheckpointPolicy, CheckpointWriter, ChunkCheckpointer
from runtime.session.resume import ResumeReport
from runtime.session.session import Session
from runtime.session.window import model_tag

if TYPE_CHECKING:
    from llamaffi import Context
    from runtime.storage import JournalStore

logger = logging.getLogger(__name__)

#: Seconds a turn waits for KV room or a sequence while every other session is in a turn,
#: before it is refused (ContextFullError) instead of waiting for ever.
ROOM_WAIT_S = 30.0


class SessionPool:
    """Resident sessions over one context; the least recently used ones are suspended.

    A session is resident while its tokens are in the KV cache. All resident sessions share
    the context's ``n_ctx`` cells and ``n_seq_max`` sequences: before a session is resumed or
    grows, the least recently used others are suspended (checkpoint, then their cells freed,
    their journal closed) until it fits. Idle sessions thus hold no KV memory and no open files.

    Args:
        ctx: the shared context (a unified KV cache: chunked checkpoints need one).
        journals: where the sessions' journals are (opened on resume, closed on suspend).
        chunks: the chunk store every session checkpoints into; the pool closes it.
        scratch_seq: the sequence the chunk store copies ranges through (never a session's).
        n_seq: sequence ids ``0 .. n_seq-1`` are the pool's (default: those below
            ``scratch_seq``); the scratch sequence is never one of them.
        overflow: see :class:`Session`.
        policy: when to checkpoint (default: after every turn).
        writer: the background checkpoint writer (``None``: write inline).
    """

    def __init__(
        self,
        ctx: Context,
        journals: JournalStore,
        *,
        chunks: ChunkStore,
        scratch_seq: int,
        n_seq: int | None = None,
        overflow: Literal["shift", "refuse"] = "shift",
        policy: CheckpointPolicy | None = None,
        writer: CheckpointWriter | None = None,
        busy: Callable[[str], bool] = lambda _sid: False,
        wait: Callable[[], None] | None = None,
    ) -> None:
        if not 0 <= scratch_seq < ctx.n_seq_max:
            raise ArgumentError("chunked checkpoints need a scratch sequence of the context")
        self.ctx = ctx
        self.journals = journals
        self.chunks = chunks
        self.scratch_seq = scratch_seq
        self.overflow = overflow
        #: sequence ids 0 .. n_seq-1 are the pool's; the rest are left to the caller (scratch)
        self.n_seq = scratch_seq if n_seq is None else n_seq
        if not 1 <= self.n_seq <= ctx.n_seq_max or self.n_seq > scratch_seq:
            raise SessionError(
                f"n_seq must be in [1, {ctx.n_seq_max}] and below the scratch sequence "
                f"{scratch_seq}, got {self.n_seq}"
            )
        self.policy = policy
        self.writer = writer
        #: how the sessions resumed so far came back: source -> count
        self.resumes: dict[str, int] = {"snapshot": 0, "journal": 0, "empty": 0}
        self.last_resume: ResumeReport | None = None
        # Hash the GGUF now (cached on disk by file identity), not inside the first turn.
        self.model_fingerprint = ctx.model.fingerprint
        #: what journal entries record of this model's vocabulary (:func:`model_tag`)
        self.model_tag = model_tag(ctx.model)
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # resident only, LRU first
        #: a session in a turn (generating, maybe with others) is never suspended to make room
        self._busy = busy
        #: blocks until a turn ends (releasing the caller's lock), when every victim is busy
        self._wait = wait
        #: sequences handed to a resume still in progress (it may wait, releasing the lock)
        self._claimed: set[int] = set()

    def get(self, session_id: str) -> tuple[Session, ResumeReport | None]:
        """The session, resumed if it was not resident; the report says how, if it was."""
        session = self._sessions.get(session_id)
        if session is not None and (session.journal.closed or not session.resident):
            # Its journal closed itself (a failed append on a full disk), or a failed decode
            # dropped its KV: the KV is not the journal's any more. Forget it here; it is
            # reopened and resumed from disk below.
            logger.warning("session %s: KV or journal was dropped; resuming it", session_id)
            del self._sessions[session_id]
            session.discard()
            session = None
        if session is not None:
            self._sessions.move_to_end(session_id)
            return session, None
        if self.writer is not None:
            # A checkpoint still in the writer's queue is this session's newest state.
            self.writer.flush(validate_session_id(session_id))
        session = self._open(session_id)
        try:
            if session.n_tokens > self.ctx.n_ctx:
                raise ContextFullError(
                    f"session {session_id!r} holds {session.n_tokens} tokens, more than "
                    f"n_ctx={self.ctx.n_ctx}: open it with a larger context"
                )
            seq_id = self._free_seq()
            self._claimed.add(seq_id)  # no other resume takes it while this one waits
            try:
                # asks _make_room for the cells its replay needs
                report = session.resume(seq_id=seq_id)
                self._sessions[session_id] = session
            finally:
                self._claimed.discard(seq_id)
        except BaseException:
            self._sessions.pop(session_id, None)
            session.discard()  # no half-rebuilt cells left under a "free" seq id
            raise
        self.resumes[report.source] = self.resumes.get(report.source, 0) + 1
        self.last_resume = report
        return session, report

    def _open(self, session_id: str) -> Session:
        """The session with its journal open and its checkpointer, not resident yet."""
        journal = self.journals.open(session_id)  # a shared store: takes the lease
        if self.chunks.shared:
            try:
                self.chunks.refresh_session(session_id)  # another node may have written it
            except BaseException:
                journal.close()
                raise
        checkpointer = ChunkCheckpointer(
            self.chunks,
            session_id,
            scratch_seq=self.scratch_seq,
            writer=self.writer,
            policy=self.policy,
        )
        try:
            return Session(
                self.ctx,
                -1,
                session_id,
                journal,
                checkpointer,
                make_room=self._make_room,
                overflow=self.overflow,
            )
        except BaseException:
            journal.close()
            raise

    def resident(self) -> list[Session]:
        """The resident sessions, least recently used first (not those whose journal closed
        itself: another node took them over, or a write failed; :meth:`get` drops them)."""
        return [s for s in self._sessions.values() if not s.journal.closed]

    def peek(self, session_id: str) -> Session | None:
        """The session if it is resident, without resuming or reordering anything (``None``
        for one whose journal closed itself: its KV may be stale, read the journal store)."""
        session = self._sessions.get(session_id)
        return None if session is None or session.journal.closed else session

    def known(self) -> list[str]:
        """Every session with a journal, resident or not, sorted."""
        return self.journals.sessions()

    def used_cells(self) -> int:
        """KV cells held by resident sessions."""
        return self._used_cells()

    def _used_cells(self, exclude: Session | None = None) -> int:
        # a reply being generated holds the cells it may still add
        return sum(s.n_tokens + s.in_flight for s in self._sessions.values() if s is not exclude)

    def _victim(self, session: Session | None, since: float) -> Session | None:
        """The least recently used resident session that may be suspended now (not
        ``session``, not in a turn), or ``None`` after a wait for a turn to end (the caller
        looks again). :class:`ContextFullError` once the caller has waited
        :data:`ROOM_WAIT_S` since ``since``: sessions that wait for room for each other
        would otherwise wait for ever."""
        others = [s for s in self._sessions.values() if s is not session]
        idle = next((s for s in others if not self._busy(s.session_id)), None)
        if idle is not None or not others or self._wait is None:
            return idle
        if time.monotonic() - since > ROOM_WAIT_S:
            raise ContextFullError(
                f"no room in the {self.ctx.n_ctx} KV cells after {ROOM_WAIT_S:.0f} s: every "
                "other session is in a turn; try again, or use a larger n_ctx"
            )
        self._wait()
        return None

    def _make_room(self, session: Session, n_tokens: int) -> None:
        """Suspend LRU sessions (never ``session``) until ``n_tokens`` more cells fit."""
        since = time.monotonic()
        while True:
            mine = session.n_tokens if session.resident else 0
            if self._used_cells(exclude=session) + mine + n_tokens <= self.ctx.n_ctx:
                return
            if not any(s is not session for s in self._sessions.values()):
                return  # alone and still too big: Session._reserve already refused that
            victim = self._victim(session, since)
            if victim is not None:
                self._evict(victim)

    def _free_seq(self) -> int:
        since = time.monotonic()
        while True:
            used = {s.seq_id for s in self._sessions.values()} | self._claimed
            free = [i for i in range(self.n_seq) if i not in used]
            if free:
                return free[0]
            if not self._sessions:  # every sequence is taken by a resume in progress
                if self._wait is None:
                    raise SessionError("every KV sequence is taken by a resume in progress")
                self._wait()
                continue
            victim = self._victim(None, since)
            if victim is not None:
                seq_id = victim.seq_id
                self._evict(victim)
                return seq_id

    def _evict(self, victim: Session) -> None:
        logger.info("suspending idle session %s (seq %d)", victim.session_id, victim.seq_id)
        del self._sessions[victim.session_id]
        try:
            victim.close()
        except Exception:
            # Its cells must be freed whatever happened: the next get() reopens it from disk.
            self.ctx.memory.seq_rm(victim.seq_id)
            raise

    def suspend(self, session_id: str) -> None:
        """Snapshot the session and free its KV cells and journal (no-op if not resident)."""
        session = self._sessions.get(session_id)
        if session is not None:
            self._evict(session)

    def delete(self, session_id: str) -> None:
        """Forget a session: its KV cells, journal and checkpoints. Long-term memory is
        separate (its items carry the session id)."""
        session = self._sessions.pop(validate_session_id(session_id), None)
        if self.writer is not None:
            self.writer.discard(session_id)
            self.writer.flush(session_id)
        if session is not None:
            session.discard()
        # The journal opened for writing guards the whole delete: with a shared store it holds
        # the session's lease, so nothing is deleted while another node serves the session
        # (SessionLeasedError first). Checkpoints go first: a journal left behind by a crash
        # in between still rebuilds the session.
        guard = self.journals.open(session_id)
        try:
            self.chunks.delete_session(session_id)
            self.journals.delete(session_id)
        finally:
            guard.close()

    def close(self) -> None:
        """Suspend every session, close journals, close the chunk store."""
        try:
            while self._sessions:
                _, session = self._sessions.popitem(last=False)
                try:
                    session.close()
                except Exception:  # keep closing the others; the journals hold the truth
                    logger.exception("closing session %s failed", session.session_id)
            if self.writer is not None:
                self.writer.flush()  # the final checkpoints, before the store lock goes
        finally:
            self.chunks.close()

    def __enter__(self) -> SessionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
