"""The :class:`Runtime` facade: one door, one lock, a few composed parts (built in one place
from one :class:`~runtime.app.options.RuntimeConfig`, :mod:`runtime.app.parts`). A part never
calls back into the runtime. Every public method takes the runtime's lock, so a check and the
act it guards happen inside one call; a generating turn leaves it free between decode steps
(:mod:`runtime.app.batching`), as does a call waiting for a turn to end.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from runtime.app.batching import RuntimeLock
from runtime.app.options import RuntimeConfig
from runtime.app.parts import open_parts
from runtime.app.sessions import check_messages
from runtime.app.turn import Reply
from runtime.arguments import (
    Sampling,
    check_created,
    check_int,
    check_number,
    check_stop,
    check_text,
    check_user,
)
from runtime.errors import ClosedError, SessionNotFoundError
from runtime.layout import validate_session_id, validate_tenant

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from runtime.arguments import SamplingOverrides
    from runtime.embed import Embeddings
    from runtime.longterm import Hit, MemoryItem

__all__ = ["Runtime"]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _door(method: Callable[Concatenate[Runtime, _P], _R]) -> Callable[Concatenate[Runtime, _P], _R]:
    """A public method of :class:`Runtime`: run under its lock, refused once it is closed."""

    @functools.wraps(method)
    def locked(self: Runtime, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            self._require_open()
            return method(self, *args, **kwargs)

    return locked


class Runtime:
    """The LLM with memory: one model, one context, many sessions, one data directory.

    ``Runtime(data_dir, model=..., **options)`` opens it (``Runtime.open`` is the same call;
    the options are the fields of :class:`~runtime.app.options.RuntimeConfig`, or pass
    ``config=``). Use it as a context manager or call :meth:`close`. It is thread-safe: every
    public method takes the runtime's lock (a llama.cpp context is not thread-safe); turns
    of different sessions run at once, sharing each decode step.

    Raises:
        runtime.errors.LockedError: another process has the directory open; the message
            names its pid.
        runtime.errors.RuntimeArgumentError: an option is out of range or unknown.
    """

    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        model: str | os.PathLike[str] = "smollm2",
        **overrides: Any,
    ) -> Runtime:
        """Open (creating if needed) the runtime: the same as ``Runtime(data_dir, model, ...)``."""
        return cls(data_dir, model, **overrides)

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        model: str | os.PathLike[str] | None = None,
        *,
        config: RuntimeConfig | None = None,
        **overrides: Any,
    ) -> None:
        if model is not None:
            overrides["model"] = model
        cfg = self.config = RuntimeConfig.of(config, **overrides).check()
        self._closed = True  # until everything is open
        self._atexit: Callable[[], None] = lambda: None
        self._lock = RuntimeLock()
        self.root = Path(data_dir)  # made by open_parts, removed again if it fails
        parts = open_parts(cfg, self.root, lock=self._lock, say=self._say)
        self._stack, self.model, self.ctx, self.model_name = (
            parts.stack, parts.model, parts.ctx, parts.model_name
        )  # fmt: skip
        #: the default sampling of :meth:`chat` (checked against this context)
        self.sampling: Sampling = parts.sampling
        self._scratch_seq, self._chunks, self._pool = parts.scratch_seq, parts.chunks, parts.pool
        self._recall, self._turns, self._stats = parts.recall, parts.turns, parts.stats
        self._retention, self._sessions = parts.retention, parts.sessions
        self._housekeeper = parts.housekeeper
        self._batcher = parts.batcher
        self._conversation = parts.conversation
        self._closed = False
        self._stats.publish(force=True)
        self._housekeeper.start()
        self._close_at_exit()

    def _close_at_exit(self) -> None:
        # A runtime left open at exit is closed (final checkpoints written) before llamaffi's
        # finalizers free the context (atexit is LIFO), or its housekeeper would wake on a
        # freed context. A strong reference: with a weak one it segfaulted (test_exit.py).
        rt = self

        def close_at_exit() -> None:
            if not rt._closed:
                try:
                    rt.close()
                except Exception:  # at exit: log, never raise
                    logger.exception("closing the runtime at exit failed")

        self._atexit = close_at_exit
        atexit.register(close_at_exit)

    def _say(self, line: str) -> None:
        logger.info("%s", line)
        if self.config.progress is not None:
            self.config.progress(line)

    # -- lifetime -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    @property
    def n_ctx(self) -> int:
        """The context's KV cells."""
        return self.ctx.n_ctx

    def close(self) -> None:
        """Refuse new calls, finish the replies being generated (each journalled) and wait
        for the turns in progress, stop the housekeeping thread, checkpoint every resident
        session, write what is pending, release everything.

        Idempotent. The journal already holds every turn, so a close that is cut short (a
        second Ctrl-C) loses nothing either.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no new call; the turns in progress end first
            atexit.unregister(self._atexit)
            self._batcher.close()
            self._housekeeper.stop()
        self._housekeeper.close()  # joined without the lock: a waiting tick sees the stop
        with self._lock:
            try:
                self._stats.publish(force=True)
            finally:
                self._stack.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise ClosedError("the runtime is closed")

    def _wait_for(self, session_id: str) -> None:
        """Wait (the lock released) for the session's turn to end; close() may run meanwhile."""
        self._batcher.wait_idle(session_id)
        self._require_open()

    # -- the turn -----------------------------------------------------------------------------

    @_door
    def chat(
        self,
        session_id: str,
        text: str,
        *,
        stop: Sequence[str] | None = None,
        on_token: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        remember: bool = True,
        importance: float = 0.5,
        use_memory: bool = True,
        created_at: float | str | None = None,
        user: str | None = None,
        **sampling: Unpack[SamplingOverrides],
    ) -> Reply:
        """One user turn and the assistant's reply, in session ``session_id``.

        Sampling arguments left out (:class:`SamplingOverrides`: ``max_tokens``, ``seed``...)
        take the runtime's :class:`Sampling` defaults. ``on_token`` receives the
        reply's text as it is generated; ``cancelled`` is polled between tokens (a cancelled
        reply is kept, shortened, with ``finish_reason`` ``"cancelled"``). ``remember=False``
        keeps this turn out of long-term memory; ``use_memory=False`` skips retrieval.
        ``created_at`` (UNIX seconds or ISO-8601; default now) is the user turn's time in the
        journal and in long-term memory; ``user`` (an end-user id, OpenAI's ``user``) goes
        into its journal meta. Bad arguments raise :class:`RuntimeArgumentError` before
        anything is written. The steps of a turn, in order, are in :mod:`runtime.app`.
        """
        validate_session_id(session_id)
        text = check_text(text)
        params = self.sampling.for_turn(sampling, self.ctx.n_ctx)
        stops = check_stop(stop)
        check_number("importance", importance, 0.0, 1.0)
        created = check_created(created_at)
        return self._conversation.chat(
            session_id, text, params, stops, on_token, cancelled, remember=remember,
            importance=importance, use_memory=use_memory, created=created, user=check_user(user),
        )  # fmt: skip

    @_door
    def answer(
        self,
        session_id: str,
        *,
        stop: Sequence[str] | None = None,
        on_token: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        **sampling: Unpack[SamplingOverrides],
    ) -> Reply:
        """Reply to the session's last user turn, which no reply followed: a process killed
        mid-reply leaves one, and a client's retry of that turn should get its answer, not
        a second copy of the turn. The turn is neither journalled nor decoded again (its
        memories are the ones it was asked with); the reply is journalled as :meth:`chat`'s.

        Raises :class:`RuntimeArgumentError` (``session_id``) when the session's last turn
        has its reply, or left the window; :class:`SessionNotFoundError` when there is no
        such session.
        """
        validate_session_id(session_id)
        params = self.sampling.for_turn(sampling, self.ctx.n_ctx)
        stops = check_stop(stop)
        return self._conversation.answer(session_id, params, stops, on_token, cancelled)

    @_door
    def import_history(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        remember: bool = True,
    ) -> list[int]:
        """Append a conversation held elsewhere to the session's journal; returns the journal
        seq of each message, in order.

        ``messages`` are OpenAI-shaped: ``role`` (``system``/``developer`` only first, in a new
        session; ``user``; ``assistant``), ``content`` (a string), optional ``name`` (the
        speaker, kept in the entry's ``meta["name"]``) and optional ``created_at`` (UNIX
        seconds or ISO-8601; default now). Each is rendered as :meth:`chat` renders its turns,
        so a later chat continues the same KV, and journalled (fsynced) with its own time.
        Nothing is decoded now: the window is decoded when the session is next used. A new
        session without a system message starts with the runtime's system prompt, as in
        :meth:`chat`. The user turns go into long-term memory before this returns, each at
        the time it was said and with its speaker; ``remember=False`` keeps them out.

        Raises :class:`RuntimeArgumentError` naming ``messages[i]`` for a bad message or a
        history this template cannot extend turn by turn, and
        :class:`~runtime.errors.ContextFullError` for one that does not fit the context;
        nothing is journalled then.
        """
        validate_session_id(session_id)
        items = check_messages(messages, remember=remember)
        return self._conversation.import_history(session_id, items, self.ctx.n_ctx)

    # -- sessions -----------------------------------------------------------------------------

    @_door
    def sessions(self) -> list[str]:
        """Every session in the data directory (with a journal), sorted."""
        return self._sessions.known()

    @_door
    def admit(self, session_id: str) -> None:
        """:class:`SessionLimitError` if a turn in ``session_id`` would start a session past
        ``max_sessions`` (the server asks before it starts a stream); else nothing."""
        validate_session_id(session_id)
        self._sessions.admit(session_id)

    @_door
    def unanswered(self, session_id: str) -> str | None:
        """The text of the session's last turn when it is a user turn that no reply
        followed (a process killed mid-reply leaves one; :meth:`answer` replies to it), else
        None. Reads the journal's tail; a suspended session stays suspended."""
        validate_session_id(session_id)
        return self._sessions.unanswered(session_id)

    @_door
    def session_page(
        self, limit: int = 100, after: str | None = None, *, tenant: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """The :meth:`session_info` of at most ``limit`` (1-1000) sessions whose ids sort
        after ``after`` (``None``: from the first), and whether more follow: a listing in
        pages, each costing one read of the journals directory however many sessions there
        are. The server's ephemeral sessions are left out; ``tenant``: only its sessions."""
        check_int("limit", limit, 1, 1000)
        if after is not None:
            validate_session_id(after)
        if tenant is not None:
            validate_tenant(tenant)
        return self._sessions.page(limit, after, tenant)

    @_door
    def history(self, session_id: str) -> list[dict[str, Any]]:
        """The session's turns from its journal: ``role``, ``text``, ``seq``, ``created``
        (and ``name`` where an imported message had one, ``finish`` on a reply: ``"stop"``,
        ``"length"`` or ``"cancelled"``).

        Reads the journal file without resuming the session (no KV is touched).
        """
        validate_session_id(session_id)
        return self._sessions.history(session_id)

    @_door
    def session_info(self, session_id: str) -> dict[str, Any]:
        """A session's state: ``exists``, ``resident``, ``window_tokens`` (tokens in its
        window, ``None`` when not resident), ``kv_cells`` (KV cells it holds now: 0 once
        suspended), ``pending_tokens`` (not checkpointed yet), ``journal_bytes``,
        ``snapshot_bytes`` (its newest checkpoint's chunks) and, with ``db=``, ``lease``
        (``owner``, ``address``, ``token``, ``expires``, ``live``; ``None`` locally)."""
        validate_session_id(session_id)
        return self._sessions.info(session_id)

    @_door
    def node_info(self) -> dict[str, Any] | None:
        """With ``db=``: this node's ``node_id``, ``address``, ``lease_ttl_s`` and
        ``leases_held``; ``None`` with local storage."""
        return self._sessions.node()

    @_door
    def window_seqs(self, session_id: str) -> list[int]:
        """The journal entries whose tokens are in the session's KV window now, sorted
        (empty when the session is not resident)."""
        validate_session_id(session_id)
        return self._sessions.window_seqs(session_id)

    @_door
    def checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        """The session's kept checkpoints, newest first: ``generation``, ``journal_seq``,
        ``tokens``, ``bytes`` and ``files`` (its chunk files' paths, or URLs with ``kv=``, in
        position order, the partial tail last)."""
        validate_session_id(session_id)
        return self._sessions.checkpoints(session_id)

    @_door
    def time_reprefill(self, session_id: str, n_tokens: int | None = None) -> float:
        """Seconds a from-scratch prefill of the session's first ``n_tokens`` window tokens
        takes (all by default), on the runtime's scratch sequence: what a resume from a
        checkpoint saves. The session must be resident (:class:`SessionNotFoundError`)."""
        validate_session_id(session_id)
        session = self._sessions.peek(session_id)
        if session is None:
            raise SessionNotFoundError(f"session {session_id!r} is not resident")
        tokens = session.tokens()[:n_tokens]
        return self._turns.time_prefill(self.ctx, self._scratch_seq, tokens)

    @_door
    def suspend(self, session_id: str) -> None:
        """Checkpoint the session and free its KV cells now (it resumes on its next turn)."""
        validate_session_id(session_id)
        self._wait_for(session_id)
        self._sessions.suspend(session_id)

    @_door
    def checkpoint(self, session_id: str | None = None) -> int:
        """Checkpoint one resident session (or all) now and wait for the files; returns how
        many sessions were checkpointed (a suspended session is on disk already). One session
        in a turn is waited for; with no session given, sessions in a turn are skipped."""
        if session_id is not None:
            validate_session_id(session_id)
        if session_id is not None:  # a reply being generated is not journalled yet
            self._wait_for(session_id)
        # every session: those in a turn now are left to their turn's policy (their journal
        # holds everything they acknowledged)
        return self._sessions.checkpoint(session_id, skip=self._batcher.is_busy)

    @_door
    def delete_session(self, session_id: str, *, memories: bool = True) -> None:
        """Forget a session: KV, journal, checkpoints and (by default) its long-term memories,
        those ``remember(..., session=)`` stored before its first turn too. Raises
        :class:`~runtime.errors.SessionNotFoundError` if there is no such session."""
        validate_session_id(session_id)
        self._wait_for(session_id)
        self._sessions.delete(session_id, memories=memories)

    @_door
    def consolidate(self, session_id: str) -> dict[str, int]:
        """Run long-term memory's background work on one session now (the housekeeping
        thread does it by itself): distil facts from its new turns, summarise what has left
        its KV window, archive past ``max_items``. Returns how many facts, summaries and
        archived turns it made. With ``extract="llm"`` or ``summarize="llm"`` one call asks
        the model about at most 8 user turns and one summary; the rest waits for the next
        call (or the housekeeping thread's next tick)."""
        validate_session_id(session_id)
        self._wait_for(session_id)
        return self._conversation.consolidate(session_id)

    @_door
    def compact_journals(self) -> int:
        """Apply ``journal_retention="window"`` now to every resident session not in a turn
        (the housekeeping thread does it by itself); returns the bytes freed. A no-op under the
        default ``"all"``."""
        idle = [s for s in self._pool.resident() if not self._batcher.is_busy(s.session_id)]
        self._recall.settle(idle)  # memory covers what may be dropped
        return sum(self._retention.compact(s, force=True) for s in idle)

    @_door
    def stats(self) -> dict[str, Any]:
        """Sessions, KV cells, checkpoint and journal bytes, resumes, memory items, latencies."""
        return self._stats.report()

    @_door
    def publish_stats(self) -> None:
        """Write ``stats.json`` now (the housekeeping thread does it every few seconds)."""
        self._stats.publish(force=True)

    # -- long-term memory ---------------------------------------------------------------------

    @property
    def memory_enabled(self) -> bool:
        """Whether long-term memory is on (``embedder=False`` turns it off)."""
        return self._recall.enabled

    @_door
    def remember(
        self,
        text: str,
        *,
        session: str | None = None,
        kind: str = "fact",
        importance: float = 0.5,
        meta: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> str:
        """Store a long-term memory directly. ``session=None``: global, seen by every session
        of no tenant; with ``tenant``, the tenant's own, seen by each of its sessions
        (:mod:`runtime.layout`). A ``session`` must then be one of the tenant's."""
        return self._recall.remember(
            text, session=session, kind=kind, importance=importance, meta=meta, tenant=tenant
        )

    @_door
    def search(
        self,
        query: str,
        k: int = 5,
        *,
        session: str | None = None,
        now: float | None = None,
        tenant: str | None = None,
    ) -> list[Hit]:
        """Search long-term memory: all sessions, or one (with its global memories: its
        tenant's own for a tenant's session). ``tenant`` keeps the search inside that
        tenant. Periods the query names ("last week") are read relative to ``now``."""
        return self._recall.search(query, k, session=session, now=now, tenant=tenant)

    @_door
    def memory_history(self, item_id: str, *, tenant: str | None = None) -> list[MemoryItem]:
        """The history behind a memory: every fact about the same subject and attribute,
        newest first: the current value, then the ones it superseded (kept, linked by
        ``superseded_by``). Empty when the item states no single-valued attribute, or
        (``tenant``) is not that tenant's."""
        return self._recall.lineage(item_id, tenant)

    @_door
    def forget(self, item_id: str, *, tenant: str | None = None) -> bool:
        """Delete one long-term memory; False if there was none with this id (``tenant``:
        none of that tenant's)."""
        return self._recall.forget(item_id, tenant)

    @_door
    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts with the runtime's embedder: unit rows and the tokens it read."""
        return self._recall.embed(texts)

    @_door
    def embedder_info(self) -> tuple[str, int] | None:
        """``(model id, dimensions)`` of the embedder; ``None`` when memory is off."""
        return self._recall.embedder_info()
