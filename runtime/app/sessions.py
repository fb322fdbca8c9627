"""The sessions of one data directory: :class:`Sessions`, over the session pool.

It resumes a session (and lets long-term memory catch up with it), reads journals without
resuming, reports a session's state and checkpoints, suspends, checkpoints and deletes, and
appends an imported history to a journal without decoding it. It never touches the turn's
rendering or sampling; the runtime calls it under its lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from runtime.app.housekeeper import Retention
from runtime.app.recall import Recall
from runtime.app.turn import ImportedTurn
from runtime.arguments import check_created, check_int, check_text
from runtime.chunks import ChunkStore
from runtime.errors import (
    ContextFullError,
    JournalCompactedError,
    RuntimeArgumentError,
    SessionLeasedError,
    SessionLimitError,
    SessionNotFoundError,
)
from runtime.layout import is_ephemeral, local_id, tenant_of
from runtime.session import (
    IMPORTED,
    MODEL_TAG,
    WINDOW_ROLE,
    ResumeReport,
    Session,
    SessionPool,
    Span,
    Window,
)
from runtime.session.checkpointer import CheckpointWriter

if TYPE_CHECKING:
    from runtime.storage import JournalBackend, JournalStore
    from runtime.storage.leases import Leases

__all__ = ["ImportMessage", "Sessions", "check_messages"]

logger = logging.getLogger(__name__)

#: roles an imported history may hold (``developer`` is OpenAI's newer ``system``)
IMPORT_ROLES = ("system", "developer", "user", "assistant")
MAX_IMPORT_MESSAGES = 10_000
#: the fields an imported message may have
MESSAGE_FIELDS = frozenset({"role", "content", "name", "created_at"})
#: fields of an OpenAI response's message, taken (and ignored) when empty or null
OPENAI_EXTRAS = frozenset({"refusal", "tool_calls", "annotations", "audio", "function_call"})
#: Sessions one expiry sweep deletes at most (the sweep holds the runtime's lock).
EXPIRE_PER_SWEEP = 64

#: ``(role, text, meta, created)`` of one checked message of an imported history
ImportMessage = tuple[str, str, dict[str, object], float | None]


class Sessions:
    """Session-level operations over the pool.

    Args:
        journals: every session's journal.
        pool: the resident sessions.
        chunks: the chunk store (checkpoints).
        writer: the background checkpoint writer, if checkpoints are written in the background.
        recall: long-term memory (caught up when a session resumes; told about deletions).
        retention: journal retention (told about deletions).
        max_sessions: sessions kept at most per tenant (0: no cap; ephemeral ones are not
            counted).
        leases: with a shared database, this node's session leases (shown in :meth:`info`).
        say: progress lines for long steps.
    """

    def __init__(
        self,
        journals: JournalStore,
        pool: SessionPool,
        chunks: ChunkStore,
        writer: CheckpointWriter | None,
        recall: Recall,
        retention: Retention,
        *,
        max_sessions: int = 0,
        leases: Leases | None = None,
        say: Callable[[str], None],
    ) -> None:
        self._journals = journals
        self._leases = leases
        self._max_sessions = max_sessions
        #: wall-clock time each session was last used in this process (expiry counts from it,
        #: from the journal's last write, or from when this process opened, the latest of
        #: them: a restart after a long stop does not expire everything at once)
        self._opened = time.time()
        self._used: dict[str, float] = {}
        self._pool = pool
        self._chunks = chunks
        self._writer = writer
        self._recall = recall
        self._retention = retention
        self._say = say

    def get(self, session_id: str) -> tuple[Session, ResumeReport | None]:
        """The resident session (resumed if needed); long-term memory caught up on resume.
        :class:`SessionLimitError` (nothing written) for a new session past the cap."""
        self._used[session_id] = time.time()
        if self._pool.peek(session_id) is None:
            self.admit(session_id)
            size = self._journals.usage([session_id]).get(session_id, (0, 0.0))[0]
            if size > 1 << 20:
                self._say(f"resuming session {session_id} ({size:,} B journal)")
        session, report = self._pool.get(session_id)
        if report is not None:
            if report.replayed_tokens > 256:
                self._say(
                    f"session {session_id}: re-prefilled {report.replayed_tokens} tokens from "
                    f"the journal in {report.seconds:.2f} s"
                )
            self._recall.catch_up(session)
        return session, report

    def open_journal(self, session_id: str) -> JournalBackend:
        """The session's journal, opened apart from its resident session (to read what an
        import appended to a suspended session without resuming it); close it after use."""
        return self._journals.open(session_id)

    def peek(self, session_id: str) -> Session | None:
        """The session if it is resident (nothing resumed)."""
        return self._pool.peek(session_id)

    def known(self) -> list[str]:
        """Every session with a journal, sorted."""
        return self._pool.known()

    def history(self, session_id: str) -> list[dict[str, Any]]:
        """The session's turns from its journal (no KV is touched)."""
        self._used[session_id] = time.time()  # read to answer it: not idle
        resident = self._pool.peek(session_id)
        if resident is not None:
            entries = list(resident.journal)
        else:
            if not self._journals.exists(session_id):
                return []
            with self._journals.open(session_id, readonly=True) as journal:
                entries = list(journal)
        turns = []
        for e in entries:
            if e.role not in ("system", "user", "assistant"):
                continue
            turn: dict[str, Any] = {"seq": e.seq, "role": e.role, "text": e.text}
            turn["created"] = e.created
            if isinstance(e.meta.get("name"), str):
                turn["name"] = e.meta["name"]
            if e.role == "assistant" and isinstance(e.meta.get("finish"), str):
                turn["finish"] = e.meta["finish"]  # "cancelled": cut short (a disconnect)
            turns.append(turn)
        return turns

    def unanswered(self, session_id: str) -> str | None:
        """The text of the session's last turn when it is a user turn no reply followed;
        else None. Reads the journal's tail only (a suspended session is not resumed)."""
        self._used[session_id] = time.time()  # read to answer it: not idle
        resident = self._pool.peek(session_id)
        if resident is not None:
            entry = resident.unanswered()
            return entry.text if entry is not None else None
        if not self._journals.exists(session_id):
            return None
        with self._journals.open(session_id, readonly=True) as journal:
            for seq in range(len(journal) - 1, -1, -1):
                try:
                    entry = journal[seq]
                except JournalCompactedError:
                    return None
                if entry.role in ("user", "assistant"):
                    return entry.text if entry.role == "user" else None
        return None

    def info(self, session_id: str) -> dict[str, Any]:
        """A session's state (see :meth:`runtime.Runtime.session_info`)."""
        return self._info(session_id, self._journals.usage([session_id]).get(session_id))

    def page(
        self, limit: int, after: str | None, tenant: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """The states of at most ``limit`` sessions after ``after`` (by id; ``None``: from
        the first), ephemeral ones left out (``tenant``: only its sessions), and whether
        more follow. One listing of the journals directory for the whole page."""
        ids = [
            s
            for s in self.known()
            if not is_ephemeral(s)
            and (after is None or s > after)
            and (tenant is None or tenant_of(s) == tenant)
        ]
        page = ids[:limit]
        usage = self._journals.usage(page)
        infos = [self._info(s, usage.get(s)) for s in page]
        return infos, len(ids) > limit

    def _info(self, session_id: str, usage: tuple[int, float] | None) -> dict[str, Any]:
        session = self._pool.peek(session_id)
        manifest = self._chunks.latest(session_id)
        return {
            "id": session_id,
            "exists": usage is not None,
            "resident": session is not None,
            "window_tokens": session.n_tokens if session is not None else None,
            "kv_cells": session.kv.next_pos() if session is not None and session.resident else 0,
            "pending_tokens": session.pending_tokens if session is not None else None,
            "journal_bytes": usage[0] if usage is not None else 0,
            # the chunks its newest checkpoint names (shared ones count for each session)
            "snapshot_bytes": manifest.file_size if manifest is not None else 0,
            # with a shared database: which node serves it (owner, address, token, expiry)
            "lease": self._leases.info(session_id) if self._leases is not None else None,
        }

    def node(self) -> dict[str, Any] | None:
        """This node in a shared database: its id, advertised address, lease TTL and the
        leases it holds; ``None`` with local storage."""
        if self._leases is None:
            return None
        return {
            "node_id": self._leases.node_id,
            "address": self._leases.address,
            "lease_ttl_s": self._leases.ttl_s,
            "leases_held": len(self._leases.held()),
        }

    def window_seqs(self, session_id: str) -> list[int]:
        """Journal entries in the session's KV window now (empty when not resident)."""
        session = self._pool.peek(session_id)
        return sorted(session.window_seqs()) if session is not None else []

    def checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        """The session's kept checkpoints, newest first."""
        return [
            {
                "generation": m.generation,
                "journal_seq": m.journal_seq,
                "tokens": m.n_tokens,
                "bytes": m.file_size,
                # paths in the data directory, or URLs with kv=s3://
                "files": [self._chunks.blobs.describe(ref.key) for ref in m.refs],
            }
            for m in self._chunks.manifests(session_id)
        ]

    def suspend(self, session_id: str) -> None:
        """Checkpoint the session, free its cells, and wait until the checkpoint is on disk."""
        self._pool.suspend(session_id)
        if self._writer is not None:
            self._writer.flush(session_id)  # "suspended" means on disk

    def checkpoint(
        self, session_id: str | None, skip: Callable[[str], bool] = lambda _sid: False
    ) -> int:
        """Checkpoint one resident session (or all but those ``skip`` names) now; how many
        were."""
        targets = (
            [s for s in self._pool.resident() if not skip(s.session_id)]
            if session_id is None
            else [s for s in [self._pool.peek(session_id)] if s]
        )
        done = 0
        for s in targets:
            if not s.resident or not s.n_tokens or s.shift_pending:
                continue
            try:
                s.checkpoint()
                done += 1
            except SessionLeasedError:
                if session_id is not None:
                    raise
                logger.warning("session %s moved to another node: not checkpointed", s.session_id)
        return done

    def delete(self, session_id: str, *, memories: bool) -> None:
        """Forget a session (:class:`SessionNotFoundError` if there is none). A session with
        no journal but memories (``remember(..., session=)`` before its first turn) is
        deleted with them."""
        if not self.exists(session_id):
            if memories and self._recall.forget_session(session_id, memories=True):
                return
            raise SessionNotFoundError(f"no session {session_id!r}")
        self._used.pop(session_id, None)
        self._pool.delete(session_id)
        self._retention.forget(session_id)
        self._recall.forget_session(session_id, memories=memories)

    def admit(self, session_id: str) -> None:
        """:class:`SessionLimitError` when ``session_id`` would be a new session past
        ``max_sessions`` of its tenant (an existing or ephemeral one always passes; the
        sessions of no tenant count as one tenant)."""
        if not self._max_sessions or is_ephemeral(session_id) or self.exists(session_id):
            return
        tenant = tenant_of(session_id)
        kept = sum(1 for s in self.known() if not is_ephemeral(s) and tenant_of(s) == tenant)
        if kept >= self._max_sessions:
            # the id as its tenant knows it: the message reaches the tenant's client
            raise SessionLimitError(
                f"no new session {local_id(session_id)!r}: {kept} sessions are kept, the most "
                f"allowed (max_sessions={self._max_sessions}); delete one first"
            )

    def expire(self, ttl_s: float, skip: Callable[[str], bool]) -> list[str]:
        """Delete, with their long-term memories, at most :data:`EXPIRE_PER_SWEEP` sessions
        idle ``ttl_s`` seconds or more (since their journal's last write, their last use in
        this process, or this process's start, the latest), but those ``skip`` names (in a
        turn); their ids. One listing of the journals directory; a session that cannot be
        checked or deleted is logged and left for the next sweep."""
        now = time.time()
        usage = self._journals.usage(self.known())
        gone: list[str] = []
        for sid in sorted(usage):
            last = usage[sid][1]
            if len(gone) >= EXPIRE_PER_SWEEP:
                break
            if skip(sid):
                continue
            try:
                idle = now - max(last, self._opened, self._used.get(sid, 0.0))
                if idle >= ttl_s:
                    logger.info("session %s idle %.0f s: expired (ttl %.0f s)", sid, idle, ttl_s)
                    self.delete(sid, memories=True)
                    gone.append(sid)
            except SessionNotFoundError:  # deleted meanwhile
                continue
            except Exception as exc:  # the next sweep tries again; the others go on
                logger.warning("session %s: expiry failed: %s", sid, exc)
        return gone

    def exists(self, session_id: str) -> bool:
        """Whether the session is resident or has a journal (a resident one is asked no
        storage)."""
        return self._pool.peek(session_id) is not None or self._journals.exists(session_id)

    def append_history(
        self, session_id: str, plan: Sequence[ImportedTurn], n_messages: int, n_ctx: int
    ) -> list[int]:
        """Journal ``plan`` after the session's window without decoding it; the seq of each
        of the ``n_messages`` messages it came from.

        A history longer than the context is journalled with the window shifts a chat of it
        would have made (the oldest turns after the first shift out, into long-term memory
        only), all marked ``imported``: the next resume decodes only the final window. A
        resident session is checkpointed and suspended first, so its KV is on disk as it was.
        Raises :class:`ContextFullError` (nothing journalled) for a message that alone does not
        fit.
        """
        sid = session_id
        session = self._pool.peek(sid)
        if session is None:
            self.admit(sid)
        window = session.window.copy() if session is not None else Window()
        shifts = plan_shifts(window, plan, n_ctx)  # checks everything before any write
        if session is not None:
            self.suspend(sid)
        seqs = [-1] * n_messages
        tag = self._pool.model_tag  # the vocabulary the plan was tokenized with
        journal = self._journals.open(sid)
        try:
            for turn, drop in zip(plan, shifts, strict=True):
                if drop is not None:
                    journal.append(WINDOW_ROLE, "", (), {"drop": list(drop), IMPORTED: True})
                meta = {**turn.meta, IMPORTED: True, MODEL_TAG: tag}
                entry = journal.append(
                    turn.role, turn.text, turn.tokens, meta, created=turn.created
                )
                for i in turn.sources:
                    seqs[i] = entry.seq
        finally:
            journal.close()
        return seqs


def plan_shifts(
    window: Window, plan: Sequence[ImportedTurn], n_ctx: int
) -> list[tuple[int, int] | None]:
    """For each imported turn, the window shift to journal before it (or None), so that the
    window never holds more than ``n_ctx`` less a reply's room; ``window`` (a copy) is
    advanced through the plan. Raises :class:`ContextFullError` for a turn that does not fit
    even after the shift."""
    limit = n_ctx - max(16, n_ctx // 8)
    goal = (3 * n_ctx) // 4
    shifts: list[tuple[int, int] | None] = []
    for i, turn in enumerate(plan):
        drop = None
        if len(window.tokens) + len(turn.tokens) > limit:
            drop = window.shift_range(goal - len(turn.tokens))
            if drop is not None:
                window.drop(*drop)
            if len(window.tokens) + len(turn.tokens) > limit:
                raise ContextFullError(
                    f"imported message {i} ({len(turn.tokens)} tokens) does not fit the "
                    f"context ({n_ctx}) beside the turns it must keep"
                )
        shifts.append(drop)
        span = Span(len(window.tokens), len(turn.tokens), turn.role, turn.text, -1)
        window.spans.append(span)
        window.tokens.extend(turn.tokens)
    return shifts


def check_messages(messages: Sequence[Mapping[str, Any]], *, remember: bool) -> list[ImportMessage]:
    """Each message of an imported history, checked: ``(role, text, meta, created)``.

    ``meta`` holds the speaker (``name``) and, with ``remember=False``, keeps user turns out
    of long-term memory. Raises :class:`RuntimeArgumentError` naming ``messages[i]``.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise RuntimeArgumentError("messages", "must be a list of messages")
    check_int("messages", len(messages), 1, MAX_IMPORT_MESSAGES)
    items: list[ImportMessage] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RuntimeArgumentError(f"messages[{i}]", "must be an object")
        for key, value in message.items():
            # a typo ("contnt") is not dropped silently; OpenAI's empty extras may pass
            if key not in MESSAGE_FIELDS and not (key in OPENAI_EXTRAS and not value):
                raise RuntimeArgumentError(f"messages[{i}].{key}", "unknown field")
        role = message.get("role")
        if role not in IMPORT_ROLES:
            raise RuntimeArgumentError(
                f"messages[{i}].role", f"must be one of {', '.join(IMPORT_ROLES)}, got {role!r}"
            )
        text = check_text(message.get("content"), f"messages[{i}].content")
        meta: dict[str, object] = {}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str) or not 1 <= len(name) <= 64:
                raise RuntimeArgumentError(f"messages[{i}].name", "must be 1-64 characters")
            meta["name"] = check_text(name, f"messages[{i}].name")  # no NUL, valid Unicode
        if role == "user" and not remember:
            meta["remember"] = False
        created = check_created(message.get("created_at"), f"messages[{i}].created_at")
        items.append(("system" if role == "developer" else role, text, meta, created))
    return items
