"""The :class:`Runtime` facade: one door, one lock, a few composed parts.

``Runtime`` is built from one :class:`~runtime.app.options.RuntimeConfig`; its parts are
built in one place, :mod:`runtime.app.parts`: the session pool, the sessions part, the turn
engine, long-term memory (:class:`~runtime.app.recall.Recall`), retention and the
housekeeping thread, and the stats.

A part never calls back into the runtime. Every public method takes the runtime's lock, so
a check and the act it guards happen inside one call.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.app.options import (
    RuntimeConfig,
    Sampling,
    check_created,
    check_int,
    check_number,
    check_stop,
    check_text,
)
from runtime.app.parts import build_parts, open_model
from runtime.app.reply import Reply
from runtime.app.sessions import check_messages
from runtime.app.turn import make_reply
from runtime.errors import ClosedError, RuntimeArgumentError, SessionNotFoundError
from runtime.fsutil import DirLock, ensure_dir, warn_if_exposed
from runtime.layout import (
    LOCK_NAME,
    validate_session_id,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from runtime.app.reply import MemoryUsed
    from runtime.app.turn import Prompt
    from runtime.longterm import Hit, MemoryItem
    from runtime.session import ResumeReport, Session

__all__ = ["Runtime"]

logger = logging.getLogger(__name__)


class Runtime:
    """The LLM with memory: one model, one context, many sessions, one data directory.

    ``Runtime(data_dir, model=..., **options)`` opens it (``Runtime.open`` is the same call;
    the options are the fields of :class:`~runtime.app.options.RuntimeConfig`, or pass
    ``config=``). Use it as a context manager or call :meth:`close`. It is thread-safe: every
    public method holds the runtime's lock (a llama.cpp context is not thread-safe).

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
        self._lock = threading.RLock()
        self.root = ensure_dir(Path(data_dir))
        warn_if_exposed(self.root)
        dir_lock = DirLock(self.root, LOCK_NAME).acquire()
        self._stack = contextlib.ExitStack()
        self._stack.callback(dir_lock.release)
        try:
            self.model, self.ctx, self.model_name, chat_format = open_model(
                cfg, self._stack, self._say
            )
            #: the default sampling of :meth:`chat` (checked against this context)
            self.sampling: Sampling = cfg.sampling.check(self.ctx.n_ctx)
            parts = build_parts(
                cfg,
                self.root,
                self.model,
                self.model_name,
                self.ctx,
                chat_format,
                lock=self._lock,
                stack=self._stack,
                say=self._say,
            )
        except BaseException:
            self._stack.close()
            raise
        self._scratch_seq = parts.scratch_seq
        self._chunks = parts.chunks
        self._pool = parts.pool
        self._recall = parts.recall
        self._turns = parts.turns
        self._retention = parts.retention
        self._stats = parts.stats
        self._sessions = parts.sessions
        self._housekeeper = parts.housekeeper
        self._closed = False
        self._stats.publish(force=True)
        self._housekeeper.start()
        self._close_at_exit()

    def _close_at_exit(self) -> None:
        # A runtime left open at interpreter exit is closed before llamaffi's finalizers free
        # the context (atexit runs LIFO, and they registered first): its housekeeping thread
        # would otherwise wake up on a freed context. Also writes the final checkpoints.
        # A strong reference: a runtime dropped without close() is not freed anyway (its
        # housekeeping and writer threads hold its parts), and with a weak one it was not
        # closed either, so its housekeeper segfaulted on the freed context after the exit
        # finalizers (llama_memory_seq_pos_max, tests/runtime/test_exit.py).
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
        """Stop the housekeeping thread, checkpoint every resident session, write what is
        pending, release everything.

        Idempotent. The journal already holds every turn, so a close that is cut short (a
        second Ctrl-C) loses nothing either.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self._atexit)
            self._housekeeper.stop()
        self._housekeeper.close()  # joined without the lock: a waiting tick sees the stop
        with self._lock:
            try:
                self._recall.flush_marks()
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
        created_at: float | str | None = None,
    ) -> Reply:
        """One user turn and the assistant's reply, in session ``session_id``.

        Sampling arguments left ``None`` take the runtime's :class:`Sampling` defaults.
        ``on_token`` receives the reply's text as it is generated; ``cancelled`` is polled
        between tokens (a cancelled reply is kept, shortened, with ``finish_reason``
        ``"cancelled"``). ``remember=False`` keeps this turn out of long-term memory;
        ``use_memory=False`` skips retrieval. ``created_at`` (UNIX seconds or ISO-8601;
        default now) is the user turn's time in the journal and in long-term memory. Bad
        arguments raise :class:`RuntimeArgumentError` before anything is written. The steps
        of a turn, in order, are in :mod:`runtime.app`.
        """
        validate_session_id(session_id)
        text = check_text(text)
        params = self._sampling(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed)
        stops = check_stop(stop)
        check_number("importance", importance, 0.0, 1.0)
        created = check_created(created_at)
        with self._lock:
            self._require_open()
            marks = [time.perf_counter()]
            new = not self._sessions.exists(session_id)
            session, report = self._sessions.get(session_id)
            marks.append(time.perf_counter())
            meta: dict[str, object] = {"importance": importance}
            if not remember:
                meta["remember"] = False
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

    def _sampling(
        self,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        min_p: float | None,
        repeat_penalty: float | None,
        seed: int | None,
    ) -> Sampling:
        """The runtime's sampling defaults with a turn's overrides, checked for the context."""
        return self.sampling.with_overrides(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
        ).check(self.ctx.n_ctx)

    def _discard_refused(self, session_id: str) -> None:
        """Delete the journal and KV of a session whose first turn was refused; its
        long-term memories stay (``remember(..., session=)`` may have put some there before
        it had a journal). Never raises: the refusal is the error the caller sees."""
        try:
            self._sessions.delete(session_id, memories=False)
        except Exception:
            logger.exception("session %s: could not remove it after its refused turn", session_id)

    def answer(
        self,
        session_id: str,
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
        params = self._sampling(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed)
        stops = check_stop(stop)
        with self._lock:
            self._require_open()
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
        self._stats.record_turn(reply)
        return reply

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
        with self._lock:
            self._require_open()
            # a new session has no window to render after: nothing is opened for it until
            # the history is known to import
            session = None
            if self._sessions.exists(session_id):
                session, _report = self._sessions.get(session_id)
            plan = self._turns.render_history(session, items)
            seqs = self._sessions.append_history(session_id, plan, len(items), self.ctx.n_ctx)
            # into long-term memory now, at the time each message was said (the import is
            # durable in the journal already: a failure here catches up on the next turn);
            # the session stays suspended, so the journal is read apart from it
            with self._sessions.open_journal(session_id) as journal:
                self._recall.catch_up_journal(session_id, journal)
            return seqs

    # -- sessions -----------------------------------------------------------------------------

    def sessions(self) -> list[str]:
        """Every session in the data directory (with a journal), sorted."""
        with self._lock:
            self._require_open()
            return self._sessions.known()

    def unanswered(self, session_id: str) -> str | None:
        """The text of the session's last turn when it is a user turn that no reply
        followed (a process killed mid-reply leaves one; :meth:`answer` replies to it), else
        None. Reads the journal's tail; a suspended session stays suspended."""
        validate_session_id(session_id)
        with self._lock:
            self._require_open()
            return self._sessions.unanswered(session_id)

    def session_page(
        self, limit: int = 100, after: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """The :meth:`session_info` of at most ``limit`` (1-1000) sessions whose ids sort
        after ``after`` (``None``: from the first), and whether more follow: a listing in
        pages, each costing one read of the journals directory however many sessions there
        are. The server's ephemeral sessions are left out."""
        check_int("limit", limit, 1, 1000)
        if after is not None:
            validate_session_id(after)
        with self._lock:
            self._require_open()
            return self._sessions.page(limit, after)

    def history(self, session_id: str) -> list[dict[str, Any]]:
        """The session's turns from its journal: ``role``, ``text``, ``seq``, ``created``
        (and ``name`` where an imported message had one, ``finish`` on a reply: ``"stop"``,
        ``"length"`` or ``"cancelled"``).

        Reads the journal file without resuming the session (no KV is touched).
        """
        validate_session_id(session_id)
        with self._lock:
            self._require_open()
            return self._sessions.history(session_id)

    def session_info(self, session_id: str) -> dict[str, Any]:
        """A session's state: ``exists``, ``resident``, ``window_tokens`` (tokens in its
        window, ``None`` when not resident), ``kv_cells`` (KV cells it holds now: 0 once
        suspended), ``pending_tokens`` (not checkpointed yet), ``journal_bytes`` and
        ``snapshot_bytes`` (its newest checkpoint's chunks)."""
        validate_session_id(session_id)
        with self._lock:
            self._require_open()
            return self._sessions.info(session_id)

    def window_seqs(self, session_id: str) -> list[int]:
        """The journal entries whose tokens are in the session's KV window now, sorted
        (empty when the session is not resident)."""
        validate_session_id(session_id)
        with self._lock:
            self._require_open()
            return self._sessions.window_seqs(session_id)

    def checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        """The session's kept checkpoints, newest first: ``generation``, ``journal_seq``,
        ``tokens``, ``bytes`` and ``files`` (its chunk files, in position order, the partial
        tail last)."""
        validate_session_id(session_id)
        with self._lock:
            self._require_open()
            return self._sessions.checkpoints(session_id)

    def time_reprefill(self, session_id: str, n_tokens: int | None = None) -> float:
        """Seconds a from-scratch prefill of the session's first ``n_tokens`` window tokens
        takes (all by default), on the runtime's scratch sequence: what a resume from a
        checkpoint saves. The session must be resident (:class:`SessionNotFoundError`)."""
        validate_session_id(session_id)
        with self._lock:
            self._require_open()
            session = self._sessions.peek(session_id)
            if session is None:
                raise SessionNotFoundError(f"session {session_id!r} is not resident")
            tokens = session.tokens()[:n_tokens]
            if not tokens:
                return 0.0
            start = time.perf_counter()
            try:
                self.ctx.decode(tokens, seq_id=self._scratch_seq)
                return time.perf_counter() - start
            finally:
                self.ctx.memory.seq_rm(self._scratch_seq)

    def suspend(self, session_id: str) -> None:
        """Checkpoint the session and free its KV cells now (it resumes on its next turn)."""
        validate_session_id(session_id)
        with self._lock:
            self._require_open()
            self._sessions.suspend(session_id)

    def checkpoint(self, session_id: str | None = None) -> int:
        """Checkpoint one resident session (or all) now and wait for the files; returns how
        many sessions were checkpointed (a suspended session is on disk already)."""
        if session_id is not None:
            validate_session_id(session_id)
        with self._lock:
            self._require_open()
            return self._sessions.checkpoint(session_id)

    def delete_session(self, session_id: str, *, memories: bool = True) -> None:
        """Forget a session: KV, journal, checkpoints and (by default) its long-term memories.

        Raises :class:`~runtime.errors.SessionNotFoundError` if there is no such session.
        """
        validate_session_id(session_id)
        with self._lock:
            self._require_open()
            self._sessions.delete(session_id, memories=memories)

    def consolidate(self, session_id: str) -> dict[str, int]:
        """Run long-term memory's background work on one session now (the housekeeping
        thread does it by itself): distil facts from its new turns, summarise what has left
        its KV window, archive past ``max_items``. Returns how many facts, summaries and
        archived turns it made. With ``extract="llm"`` or ``summarize="llm"`` one call asks
        the model about at most 8 user turns and one summary; the rest waits for the next
        call (or the housekeeping thread's next tick)."""
        validate_session_id(session_id)
        with self._lock:
            self._require_open()
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

    def compact_journals(self) -> int:
        """Apply ``journal_retention="window"`` now to every resident session (the
        housekeeping thread does it by itself); returns the bytes freed. A no-op under the
        default ``"all"``."""
        with self._lock:
            self._require_open()
            self._recall.settle(self._pool.resident())  # memory covers what may be dropped
            return sum(self._retention.compact(s, force=True) for s in self._pool.resident())

    def stats(self) -> dict[str, Any]:
        """Sessions, KV cells, checkpoint and journal bytes, resumes, memory items, latencies."""
        with self._lock:
            self._require_open()
            return self._stats.report()

    def publish_stats(self) -> None:
        """Write ``stats.json`` now (the housekeeping thread does it every few seconds)."""
        with self._lock:
            self._require_open()
            self._stats.publish(force=True)

    # -- long-term memory ---------------------------------------------------------------------

    @property
    def memory_enabled(self) -> bool:
        """Whether long-term memory is on (``embedder=False`` turns it off)."""
        return self._recall.enabled

    def remember(
        self,
        text: str,
        *,
        session: str | None = None,
        kind: str = "fact",
        importance: float = 0.5,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Store a long-term memory directly (``session=None``: global, seen by every session)."""
        with self._lock:
            self._require_open()
            return self._recall.remember(
                text, session=session, kind=kind, importance=importance, meta=meta
            )

    def search(
        self, query: str, k: int = 5, *, session: str | None = None, now: float | None = None
    ) -> list[Hit]:
        """Search long-term memory: all sessions, or one (with the global memories). Periods
        the query names ("last week") are read relative to ``now`` (default: the time)."""
        with self._lock:
            self._require_open()
            return self._recall.search(query, k, session=session, now=now)

    def memory_history(self, item_id: str) -> list[MemoryItem]:
        """The history behind a memory: every fact about the same subject and attribute,
        newest first: the current value, then the ones it superseded (kept, linked by
        ``superseded_by``). Empty when the item states no single-valued attribute."""
        with self._lock:
            self._require_open()
            return self._recall.lineage(item_id)

    def forget(self, item_id: str) -> bool:
        """Delete one long-term memory; False if there was none with this id."""
        with self._lock:
            self._require_open()
            return self._recall.forget(item_id)

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts with the runtime's embedder (L2-normalised rows)."""
        with self._lock:
            self._require_open()
            return self._recall.embed(texts)

    def embedder_info(self) -> tuple[str, int] | None:
        """``(model id, dimensions)`` of the embedder; ``None`` when memory is off."""
        return self._recall.embedder_info()
