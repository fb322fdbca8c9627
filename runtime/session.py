"""A conversation's short-term memory: journal (truth) + KV sequence (cache) + snapshots.

The order of a user turn is: tokenize, **append to the journal (fsynced)**, decode into the
session's KV sequence, then (every ``snapshot_every`` turns) capture a snapshot into the
store; a reply is generated first and journalled once complete. A context-window shift is a
journal entry too, written before it is applied. A crash at any point therefore loses nothing
that was acknowledged: on :meth:`Session.resume`, the newest valid snapshot whose tokens are
the window after some journal entry is restored, and the later entries are repeated on top
(decodes and shifts). With no usable snapshot the whole journal is repeated: slower, never
wrong.

:class:`SessionPool` shares one context's ``n_ctx`` cells and ``n_seq_max`` sequences among
the resident sessions and suspends the least recently used ones (snapshot, free their KV
cells, close their journal) to make room, so idle sessions hold no KV memory and no files.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from runtime import snapshot as snapshot_mod
from runtime.checkpoint import CheckpointPolicy, CheckpointWriter
from runtime.chunks import (
    ChunkError,
    ChunkStore,
    Lineage,
    Manifest,
    PendingCheckpoint,
    shift_lineage,
)
from runtime.errors import MemoryRuntimeError
from runtime.fsutil import atomic_write_bytes
from runtime.journal import (
    DEFAULT_SEGMENT_ENTRIES,
    Entry,
    Journal,
    JournalError,
    journal_sessions,
)
from runtime.store import SnapshotStore, validate_session_id

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from llamaffi import Context, Sampler
    from runtime.memory import MemoryStore

logger = logging.getLogger(__name__)

JOURNAL_DIR = "journals"
#: Session snapshots are named ``j<journal seq>-<random>``: the journal entry they follow.
SNAPSHOT_ID_PREFIX = "j"
#: Journal role of a context-window shift: ``meta["drop"] = [a, b)``, window token offsets.
WINDOW_ROLE = "window"


@dataclass
class _Span:
    """One journal entry's tokens inside the window: positions [start, start + length).

    ``role`` and ``content`` are what a chat template renders for the entry (``content`` is the
    text the model saw, e.g. a user turn with its retrieved memories; ``meta["content"]`` in
    the journal when it differs from the entry's text). ``seq`` is the journal entry.
    """

    start: int
    length: int
    role: str = ""
    content: str = ""
    seq: int = -1


class _Window:
    """The tokens in a session's KV sequence: the journal's, minus the ranges shifted out.

    Positions stay contiguous: a token's index in :attr:`tokens` is its KV position.
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.spans: list[_Span] = []
        #: the window shifts so far, as chunk keys need them (runtime.chunks.shift_lineage)
        self.lineage: Lineage = ()

    def apply(self, entry: Entry) -> None:
        """Advance the window by one journal entry."""
        if entry.role == WINDOW_ROLE:
            a, b = (int(x) for x in entry.meta["drop"])
            self.drop(a, b)
        elif entry.tokens:
            content = str(entry.meta.get("content", entry.text))
            span = _Span(len(self.tokens), len(entry.tokens), entry.role, content, entry.seq)
            self.spans.append(span)
            self.tokens.extend(entry.tokens)

    def drop(self, a: int, b: int) -> None:
        """Remove positions [a, b) and close the gap.

        A span cut by ``a`` keeps its head (a re-render that rewrote the tail of the window);
        spans wholly inside [a, b) go.
        """
        self.lineage = shift_lineage(self.lineage, a, self.tokens[a:b])
        del self.tokens[a:b]
        kept = []
        for span in self.spans:
            if span.start >= b:
                kept.append(
                    _Span(span.start - (b - a), span.length, span.role, span.content, span.seq)
                )
            elif span.start + span.length <= a:
                kept.append(span)
            elif span.start < a:
                kept.append(_Span(span.start, a - span.start, span.role, span.content, span.seq))
        self.spans = kept


class SessionError(MemoryRuntimeError):
    """A session operation failed."""


def _journal_seq_of(snapshot_id: str) -> int | None:
    """The journal seq a session snapshot id names (``j<seq>-<random>``), if it names one."""
    head, sep, _ = snapshot_id.rpartition("-")  # the random tail has no "-"; the seq may
    if sep and head.startswith(SNAPSHOT_ID_PREFIX):
        number = head[len(SNAPSHOT_ID_PREFIX) :]
        if number.lstrip("-").isdigit():
            return int(number)
    return None


class ContextFullError(SessionError):
    """The turn does not fit the context window; nothing was journalled or decoded.

    There is no automatic window policy yet: start a new session, raise ``n_ctx``, or
    summarise into long-term memory and continue in a fresh session.
    """


@dataclass
class ResumeReport:
    """How :meth:`Session.resume` rebuilt the KV sequence.

    Attributes:
        source: ``snapshot`` (restored, plus journal replay of any newer turns), ``journal``
            (full re-prefill) or ``empty`` (a new session).
        n_tokens: tokens in the sequence afterwards (== the journal's).
        restored_tokens: tokens that came from the snapshot.
        replayed_tokens: tokens decoded from the journal.
        seconds: wall time of the whole resume.
        snapshot: the file restored, if any.
        skipped: why newer snapshots were not used.
    """

    source: Literal["snapshot", "journal", "empty"]
    n_tokens: int
    restored_tokens: int
    replayed_tokens: int
    seconds: float
    snapshot: Path | None = None
    skipped: list[str] = field(default_factory=list)


class Session:
    """One conversation bound to sequence ``seq_id`` of ``ctx``.

    Args:
        ctx: the context holding the KV cache.
        seq_id: the sequence this session uses.
        session_id: a validated id (letters, digits, ``._-``; no path tricks).
        root: the runtime's data directory; the journal is ``root/journals/<id>.log``.
        store: where snapshots go (its writer lock is held by the caller).
        snapshot_every: capture a snapshot after this many turns (0: only on suspend/close).
        journal_fsync: fsync each journal append (leave on outside tests).
        make_room: called with ``(session, n_tokens)`` before tokens are added, so that a pool
            can suspend other sessions until the shared KV cache has the cells.
        policy: when to checkpoint (tokens/seconds since the last one); ``None`` keeps the
            turn count ``snapshot_every``.
        writer: the background writer that encodes and writes checkpoints (only the state copy
            stays on the calling thread); ``None`` writes inline.
        chunks: checkpoint into this chunk store (only the chunks not stored yet are copied and
            written: a checkpoint costs what was added) instead of whole-sequence snapshots in
            ``store``; resume reads its manifests first, then ``store``'s snapshots.
        scratch_seq: the empty sequence the chunk store copies ranges through.
        journal_segment_entries: the journal seals a segment every this many entries
            (:class:`runtime.journal.Journal`).
        window: what to do when a turn does not fit ``n_ctx``: ``"shift"`` (default) drops
            the oldest whole turns after the first one (kept: it is usually the system prompt)
            from the KV sequence, shifting the rest down (llama.cpp's context shift); the drop
            is journalled first, so a resume repeats it exactly. ``"refuse"`` raises
            :class:`ContextFullError` instead. Dropped turns stay in the journal (and in
            long-term memory, via :func:`sync_longterm`).

    A Session (like the Context under it) is not thread-safe: use it from one thread.
    """

    def __init__(
        self,
        ctx: Context,
        seq_id: int,
        session_id: str,
        root: str | Path,
        store: SnapshotStore,
        *,
        snapshot_every: int = 1,
        journal_fsync: bool = True,
        make_room: Callable[[Session, int], None] | None = None,
        window: Literal["shift", "refuse"] = "shift",
        policy: CheckpointPolicy | None = None,
        writer: CheckpointWriter | None = None,
        chunks: ChunkStore | None = None,
        scratch_seq: int = -1,
        journal_segment_entries: int = DEFAULT_SEGMENT_ENTRIES,
    ) -> None:
        if window not in ("shift", "refuse"):
            raise ValueError(f"window must be 'shift' or 'refuse', not {window!r}")
        if chunks is not None and not 0 <= scratch_seq < ctx.n_seq_max:
            raise ValueError("chunked checkpoints need a scratch sequence of the context")
        self.policy = policy
        self._writer = writer
        self._chunks = chunks
        self._scratch = scratch_seq
        self.ctx = ctx
        self.window = window
        self.seq_id = seq_id
        self.session_id = validate_session_id(session_id)
        self.store = store
        self.snapshot_every = snapshot_every
        self.journal = Journal(
            Path(root) / JOURNAL_DIR / f"{self.session_id}.log",
            fsync=journal_fsync,
            segment_entries=journal_segment_entries,
        )
        self._make_room = make_room
        #: readable manifests, newest first, read once for the window and the next resume
        self._manifests: list[Manifest] | None = None
        self._window = self._initial_window()
        self._resident = False
        self._since_snapshot = 0
        self._new_tokens = 0  # tokens added since the last checkpoint
        self._last_checkpoint = time.monotonic()
        #: monotonic time of the last turn (for the idle sweeper)
        self.last_active = time.monotonic()
        self._shift_pending = False  # a window shift not yet applied by a decode
        self._last_snapshot_id = ""
        #: Snapshots that could not be written (the turn itself was safe in the journal).
        self.snapshot_failures = 0

    @property
    def n_tokens(self) -> int:
        """Tokens in the session's window (== its KV sequence when resident)."""
        return len(self._window.tokens)

    def tokens(self) -> list[int]:
        """The window's tokens, position by position (a copy)."""
        return list(self._window.tokens)

    def _reserve(self, n: int) -> None:
        """Make room for ``n`` more tokens (shifting the window if allowed), or refuse."""
        limit = self.ctx.n_ctx
        if self.n_tokens + n > limit:
            if self.window != "shift" or n > limit:
                raise ContextFullError(
                    f"session {self.session_id!r} holds {self.n_tokens} tokens; {n} more "
                    f"would exceed n_ctx={limit}"
                )
            self._shift(n)
        if self._make_room is not None:
            self._make_room(self, n)

    def _shift(self, n: int) -> None:
        """Drop the oldest whole turns after the first until ``n`` more tokens fit, with a
        quarter of the context free afterwards so that shifts stay rare."""
        limit = self.ctx.n_ctx
        goal = min(limit - n, (3 * limit) // 4)
        spans = self._window.spans
        if not self.ctx.memory.can_shift() or len(spans) < 2:
            raise ContextFullError(
                f"session {self.session_id!r}: {n} more tokens do not fit n_ctx={limit} and "
                "the window cannot shift"
            )
        a = b = spans[1].start
        for span in spans[1:]:
            # stop before a user turn (or an untyped one), never before a reply: the window
            # must read as a conversation after the drop
            if self.n_tokens - (b - a) <= goal and span.role != "assistant":
                break
            b = span.start + span.length
        if self.n_tokens - (b - a) + n > limit:
            raise ContextFullError(
                f"session {self.session_id!r}: even after dropping old turns, {n} more tokens "
                f"do not fit n_ctx={limit}"
            )
        # Journal first: a crash after this line replays the same shift on resume.
        entry = self.journal.append(WINDOW_ROLE, "", (), {"drop": [a, b]})
        self._window.apply(entry)
        if self._resident:
            self._apply_drop(a, b)
        logger.info(
            "session %s: shifted the window, dropped positions [%d, %d)", self.session_id, a, b
        )

    def _apply_drop(self, a: int, b: int) -> None:
        memory = self.ctx.memory
        if not memory.seq_rm(self.seq_id, a, b):
            self._drop_kv()
            raise SessionError(f"llama.cpp could not remove positions [{a}, {b})")
        memory.seq_add(self.seq_id, b, -1, -(b - a))
        # llama.cpp rotates the shifted keys only at the next llama_decode: a state copied
        # before that holds unrotated K and would restore wrong, so no checkpoint until then.
        self._shift_pending = True

    # -- the window, from a checkpoint instead of the whole journal ---------------------------

    def _chunk_manifests(self) -> list[Manifest]:
        if self._chunks is None:
            return []
        if self._manifests is None:
            self._manifests = self._chunks.manifests(self.session_id)
        return self._manifests

    def _initial_window(self) -> _Window:
        """The window now: the newest checkpoint's window plus the entries after it, so that
        opening a session costs what was said since its last checkpoint, not its age. With no
        checkpoint that records its window (or none that checks out), the whole journal."""
        for man in self._chunk_manifests():
            base = self._window_of(man)
            if base is not None:
                for entry in self.journal.iter_from(man.journal_seq + 1):
                    base.apply(entry)
                return base
        window = _Window()
        for entry in self.journal:
            window.apply(entry)
        return window

    def _window_of(self, man: Manifest) -> _Window | None:
        """The window after entry ``man.journal_seq`` as the manifest records it
        (``meta["window"]["spans"]``: ``[start, length, seq]`` per span), checked against the
        journal: the spans must tile the manifest's tokens, and each must be the head of its
        entry's tokens. None if it is missing or does not check out.

        What the check cannot see without reading the whole journal is an entry *between*
        spans that a shift dropped; the manifest body is checksummed, and the runtime only
        ever writes the window it holds.
        """
        record = man.meta.get("window")
        spans = record.get("spans") if isinstance(record, dict) else None
        if not isinstance(spans, list) or not -1 <= man.journal_seq < len(self.journal):
            return None
        window = _Window()
        window.tokens = list(man.tokens)
        window.lineage = man.lineage
        pos = 0
        try:
            for start, length, seq in spans:
                if start != pos or length <= 0 or not 0 <= seq <= man.journal_seq:
                    return None
                entry = self.journal[seq]
                if list(entry.tokens[:length]) != window.tokens[start : start + length]:
                    return None
                content = str(entry.meta.get("content", entry.text))
                window.spans.append(_Span(start, length, entry.role, content, seq))
                pos = start + length
        except (TypeError, ValueError, LookupError, JournalError):
            return None
        return window if pos == len(window.tokens) else None

    def _window_after(self, seq: int) -> _Window:
        """The window after entry ``seq``, walking the journal from its start (the slow way,
        for checkpoints that do not record their window)."""
        window = _Window()
        for entry in self.journal:
            if entry.seq > seq:
                break
            window.apply(entry)
        return window

    @staticmethod
    def _copy_window(window: _Window) -> _Window:
        out = _Window()
        out.tokens = list(window.tokens)
        out.spans = list(window.spans)
        out.lineage = window.lineage
        return out

    # -- resume -------------------------------------------------------------------------------

    @property
    def resident(self) -> bool:
        """Whether the session's tokens are in the KV cache now."""
        return self._resident

    def resume(self, *, allow_build_mismatch: bool = False) -> ResumeReport:
        """Rebuild the KV sequence from the newest valid snapshot plus the journal."""
        start = time.perf_counter()
        truth = self._window.tokens
        if len(truth) > self.ctx.n_ctx:
            raise ContextFullError(
                f"session {self.session_id!r} holds {len(truth)} tokens, more than "
                f"n_ctx={self.ctx.n_ctx}: open it with a larger context"
            )
        self.ctx.memory.seq_rm(self.seq_id)
        skipped: list[str] = []
        after, restored, path, base = self._restore_best(skipped, allow_build_mismatch)
        self._manifests = None  # read again at the next resume: the store moves on
        replayed = self._replay(after, base)
        self._resident = True
        self._since_snapshot = 1 if replayed else 0
        self._new_tokens = replayed
        self._last_checkpoint = time.monotonic()
        source: Literal["snapshot", "journal", "empty"]
        source = "snapshot" if path else ("journal" if truth else "empty")
        report = ResumeReport(
            source=source,
            n_tokens=len(truth),
            restored_tokens=restored,
            replayed_tokens=replayed,
            seconds=time.perf_counter() - start,
            snapshot=path,
            skipped=skipped,
        )
        logger.info(
            "session %s resumed from %s: %d restored + %d replayed tokens in %.3f s",
            self.session_id,
            source,
            restored,
            replayed,
            report.seconds,
        )
        return report

    def _replay(self, after: int, base: _Window) -> int:
        """Repeat the journal's entries after entry ``after`` on the KV, one entry per call;
        ``base`` is the window after entry ``after`` (it is not changed).

        This repeats exactly what :meth:`append` (and window shifts) first did, so user turns
        come back bit for bit; a reply, first decoded token by token, comes back equal up to
        float rounding (batched vs incremental evaluation).
        """
        window = self._copy_window(base)
        replayed = 0
        for entry in self.journal.iter_from(after + 1):
            window.apply(entry)
            if entry.role == WINDOW_ROLE:
                a, b = (int(x) for x in entry.meta["drop"])
                self._apply_drop(a, b)
            elif entry.tokens:
                self._decode(entry.tokens, pos=len(window.tokens) - len(entry.tokens))
                replayed += len(entry.tokens)
        return replayed

    def _entry_of(self, tokens: list[int], claimed: int | None) -> int | None:
        """The journal entry after which the window held exactly ``tokens``, or None.

        ``claimed`` is the entry the snapshot says it follows (from its id); it is checked,
        never trusted. Without one (a snapshot made elsewhere), the last matching entry is
        taken: with repeated identical turns around a shift that guess can be wrong.
        """
        window = _Window()
        found = -1 if not tokens and claimed in (None, -1) else None
        for entry in self.journal:
            window.apply(entry)
            if claimed is not None and entry.seq != claimed:
                continue
            if len(window.tokens) == len(tokens) and window.tokens == tokens:
                found = entry.seq
        return found

    def _restore_best(
        self, skipped: list[str], allow_build_mismatch: bool
    ) -> tuple[int, int, Path | None, _Window]:
        """Restore the newest usable checkpoint; return (its journal entry, tokens, file, the
        window after that entry)."""
        if self._chunks is not None:
            found = self._restore_chunks(skipped, allow_build_mismatch)
            if found is not None:
                return found
        # Each failed candidate is quarantined, so latest_valid moves on to an older one;
        # the number of files bounds the attempts.
        for _attempt in range(len(self.store.generations(self.session_id))):
            stored = self.store.latest_valid(self.session_id)
            if stored is None:
                break
            snap = stored.snapshot
            tokens = list(snap.tokens)
            try:
                owner = snap.header.session_id
                if owner and owner != self.session_id:
                    raise snapshot_mod.SnapshotError(f"it belongs to session {owner!r}")
                after = self._entry_of(tokens, _journal_seq_of(snap.header.snapshot_id))
                if after is None:
                    raise snapshot_mod.SnapshotError(
                        "its tokens are not a prefix of the journal (at any entry)"
                    )
                base = self._window_after(after)
                self._room_for_replay(after, base)
                snapshot_mod.restore(
                    self.ctx, snap, self.seq_id, allow_build_mismatch=allow_build_mismatch
                )
            except (snapshot_mod.IncompatibleSnapshot, snapshot_mod.RestoreError) as exc:
                # Another model or cache layout, or llama.cpp could not take it now (e.g. the
                # cache is short of cells): the file may be fine, so it stays; the journal
                # rebuilds the sequence instead.
                skipped.append(f"{stored.path.name}: {exc}")
                break
            except snapshot_mod.SnapshotError as exc:
                skipped.append(f"{stored.path.name}: {exc}")
                if self.store.readonly:
                    break
                self.store.quarantine(stored.path, str(exc))
                continue
            self._last_snapshot_id = snap.header.snapshot_id
            return after, len(tokens), stored.path, base
        # resume() emptied the sequence, and a failed restore clears it again
        empty = _Window()
        self._room_for_replay(-1, empty)
        return -1, 0, None, empty

    def _restore_chunks(
        self, skipped: list[str], allow_build_mismatch: bool
    ) -> tuple[int, int, Path | None, _Window] | None:
        """Restore the newest chunked manifest that matches the journal and restores."""
        assert self._chunks is not None
        for man in self._chunk_manifests():
            name = f"manifest {man.generation}"
            tokens = list(man.tokens)
            base = self._window_of(man)
            if base is not None:
                after: int | None = man.journal_seq
            else:  # a manifest that does not record its window: check it the slow way
                after = self._entry_of(tokens, man.journal_seq)
                base = self._window_after(after) if after is not None else None
            if after is None or base is None or man.lineage != base.lineage:
                skipped.append(
                    f"{name}: its tokens are not the window after journal entry {man.journal_seq}"
                )
                continue
            self._room_for_replay(after, base)
            try:
                self._chunks.restore(
                    self.ctx,
                    man,
                    self.seq_id,
                    scratch_seq=self._scratch,
                    allow_build_mismatch=allow_build_mismatch,
                )
            except ChunkError as exc:  # missing or damaged chunk (quarantined): an older one
                skipped.append(f"{name}: {exc}")
                continue
            except (snapshot_mod.IncompatibleSnapshot, snapshot_mod.RestoreError) as exc:
                skipped.append(f"{name}: {exc}")
                return None
            self._last_snapshot_id = f"{SNAPSHOT_ID_PREFIX}{man.journal_seq}"
            return after, len(tokens), self._chunks.manifest_dir / self.session_id, base
        return None

    def _room_for_replay(self, after: int, base: _Window) -> None:
        """Ask the pool for the most cells the replay after entry ``after`` will hold
        (``base`` is the window after entry ``after``).

        Before a journalled window shift the sequence was longer than it ends up, so the peak,
        not the final window, must fit while the shift is repeated.
        """
        if self._make_room is None:
            return
        window = self._copy_window(base)
        peak = len(window.tokens)
        for entry in self.journal.iter_from(after + 1):
            window.apply(entry)
            peak = max(peak, len(window.tokens))
        self._make_room(self, peak)

    # -- turns --------------------------------------------------------------------------------

    def _require_resident(self) -> None:
        if self.journal.closed:
            raise SessionError(
                f"session {self.session_id!r} is closed (suspended by its pool to free memory, "
                "or its journal failed): get it again with pool.get()"
            )
        if not self._resident:
            raise SessionError(f"session {self.session_id!r} is not resident: call resume()")

    def _decode(self, tokens: Sequence[int], pos: int | None = None) -> None:
        self.ctx.decode(tokens, seq_id=self.seq_id, pos=pos)
        self._shift_pending = False

    def append(self, role: str, text: str, *, meta: dict[str, object] | None = None) -> Entry:
        """Journal one turn (durable on return), then decode it into the KV sequence."""
        self._require_resident()
        model = self.ctx.model
        tokens = model.tokenize(self.format_turn(role, text), add_special=len(self.journal) == 0)
        self._reserve(len(tokens))
        entry = self.journal.append(role, text, tokens, dict(meta or {}))
        self._window.apply(entry)
        try:
            self._decode(tokens)
        except BaseException:
            # The turn is journalled but the KV is behind the journal now: force a resume
            # (which replays it) before the next use.
            self._drop_kv()
            raise
        self._after_turn(len(tokens))
        return entry

    def reply(self, n_predict: int = 64, sampler: Sampler | None = None) -> Entry:
        """Generate the assistant's next turn, journal it, and keep it in the KV sequence."""
        self._require_resident()
        model = self.ctx.model
        prefix = model.tokenize("assistant:", add_special=False)
        newline = model.tokenize("\n", add_special=False)
        fixed = len(prefix) + len(newline)
        if self.window == "shift":
            # the window makes room by shifting (never the first turn); a reply may take up to
            # half the context
            first = self._window.spans[0].length if self._window.spans else 0
            room = min(self.ctx.n_ctx // 2, self.ctx.n_ctx - first - 1) - fixed
        else:
            room = self.ctx.n_ctx - self.n_tokens - fixed
        if room < 1:
            raise ContextFullError(
                f"session {self.session_id!r} has no room left for a reply "
                f"({self.n_tokens} of n_ctx={self.ctx.n_ctx} tokens used)"
            )
        n_predict = min(n_predict, room)
        self._reserve(fixed + n_predict)
        start = self.ctx.memory.pos_max(self.seq_id) + 1
        try:
            out = self.ctx.generate(prefix, n_predict, sampler, seq_id=self.seq_id)
            kept = [t for t in out if not model.is_eog(t)]  # an EOG is sampled, not decoded
            self._decode(newline)
            # The journal holds exactly the tokens now in the KV sequence, so replay is exact.
            # A crash before this append loses only a reply nobody was told about.
            tokens = prefix + kept + newline
            entry = self.journal.append("assistant", model.detokenize(kept), tokens)
            self._window.apply(entry)
        except BaseException:
            # Put the KV back in step with the journal; if that is impossible, drop it and
            # let the next resume() rebuild it.
            if not self.ctx.memory.seq_rm(self.seq_id, start, -1):
                self._drop_kv()
            raise
        self._after_turn(len(tokens))
        return entry

    # -- template-driven turns (what runtime.Runtime uses) ------------------------------------

    def messages(self) -> list[tuple[str, str]]:
        """The window's turns as ``(role, content)``, oldest first: what a chat template
        renders for the KV sequence as it is now."""
        return [(span.role, span.content) for span in self._window.spans if span.role]

    def window_seqs(self) -> set[int]:
        """Journal entries whose tokens are (at least partly) in the window now."""
        return {span.seq for span in self._window.spans}

    @property
    def first_turn(self) -> bool:
        """Whether nothing has been journalled yet (the next tokens start the sequence)."""
        return len(self.journal) == 0

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` more tokens now: shift the window (journalled) if
        allowed, and let the pool free shared cells. Raises :class:`ContextFullError`."""
        self._require_resident()
        self._reserve(n_tokens)

    def rewind(self, keep: int) -> None:
        """Cut the window back to its first ``keep`` tokens (journalled first, like a shift).

        For a chat template that does not render N+1 messages as an extension of N: the
        caller re-renders, keeps the common token prefix and decodes the rest.
        """
        self._require_resident()
        n = self.n_tokens
        if not 0 <= keep <= n:
            raise SessionError(f"rewind({keep}) outside the window of {n} tokens")
        if keep == n:
            return
        entry = self.journal.append(WINDOW_ROLE, "", (), {"drop": [keep, n]})
        self._window.apply(entry)
        if not self.ctx.memory.seq_rm(self.seq_id, keep, -1):
            self._drop_kv()
            raise SessionError(f"llama.cpp could not remove positions [{keep}, {n})")

    def append_tokens(
        self,
        role: str,
        text: str,
        tokens: Sequence[int],
        *,
        meta: dict[str, object] | None = None,
        checkpoint: bool = True,
    ) -> Entry:
        """Journal a turn whose tokens the caller rendered (durable on return), then decode it.

        Room must have been made with :meth:`reserve`. ``meta["content"]`` records what the
        model saw when it differs from ``text`` (a user turn with retrieved memories).
        ``checkpoint=False`` counts the tokens toward the policy but leaves the checkpoint to
        the end of the reply (so a prompt is never delayed by a state copy).
        """
        self._require_resident()
        tokens = list(tokens)
        if not tokens:
            raise SessionError("a turn needs at least one token")
        if self.n_tokens + len(tokens) > self.ctx.n_ctx:
            raise ContextFullError(
                f"session {self.session_id!r}: {len(tokens)} more tokens exceed "
                f"n_ctx={self.ctx.n_ctx}; reserve() first"
            )
        entry = self.journal.append(role, text, tokens, dict(meta or {}))
        self._window.apply(entry)
        try:
            self._decode(tokens)
        except BaseException:
            self._drop_kv()  # journalled but not in the KV: the next resume replays it
            raise
        if checkpoint:
            self._after_turn(len(tokens))
        else:
            self._since_snapshot += 1
            self._new_tokens += len(tokens)
        return entry

    def generate(
        self,
        n_predict: int,
        sampler: Sampler,
        *,
        close: Callable[[str], Sequence[int]],
        stop: Sequence[str] = (),
        clean: Callable[[str], str] | None = None,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        meta: dict[str, object] | None = None,
    ) -> tuple[Entry, str]:
        """Generate the assistant's turn after the decoded prompt, journal it; return
        ``(entry, finish_reason)`` with ``finish_reason`` ``"stop"``, ``"length"`` or
        ``"cancelled"``.

        Stops at an end-of-generation token (sampled, never decoded), at the first of the
        ``stop`` strings (cut from the text), after ``n_predict`` tokens, or when
        ``cancelled()`` turns true (the reply so far is kept and journalled, so the KV and the
        journal stay equal). ``close(text)`` gives the tokens that end the turn in the
        template (``<|im_end|>\\n`` in ChatML); they are decoded so the next turn extends
        the sequence. ``on_text`` receives the reply's text as it grows, never a piece of a
        stop string. The journal entry holds exactly the tokens decoded.
        """
        self._require_resident()
        model, memory = self.ctx.model, self.ctx.memory
        start = memory.pos_max(self.seq_id) + 1
        holdback = max((len(x) for x in stop), default=1) - 1
        decoded: list[int] = []
        raw = b""
        text = ""
        emitted = 0
        finish = "length"
        try:
            for _ in range(n_predict):
                if cancelled is not None and cancelled():
                    finish = "cancelled"
                    break
                token = sampler.sample(self.ctx, -1)
                if model.is_eog(token):
                    finish = "stop"
                    break
                raw += model.token_to_piece(token)
                text = raw.decode("utf-8", "ignore")
                cut = min((i for i in (text.find(x) for x in stop if x) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    finish = "stop"
                    break
                self._decode([token])
                decoded.append(token)
                if on_text is not None:
                    safe = len(text) - holdback
                    if safe > emitted:
                        on_text(text[emitted:safe])
                        emitted = safe
            reply = clean(text) if clean is not None else text.strip()
            if on_text is not None and len(text.rstrip()) > emitted:
                on_text(text.rstrip()[emitted:])
            tail = list(close(reply))
            if tail:
                self._decode(tail)
            tokens = decoded + tail
            entry_meta = dict(meta or {})
            entry_meta["finish"] = finish
            entry_meta["generated"] = len(decoded)
            entry = self.journal.append("assistant", reply, tokens, entry_meta)
            self._window.apply(entry)
        except BaseException:
            # Put the KV back in step with the journal (nothing of this reply is journalled);
            # if that is impossible, drop it and let the next resume() rebuild it.
            if not memory.seq_rm(self.seq_id, start, -1):
                self._drop_kv()
            raise
        self._after_turn(len(tokens))
        return entry, finish

    @staticmethod
    def format_turn(role: str, text: str) -> str:
        """How a turn is rendered into the sequence (one line per turn)."""
        return f"{role}: {text}\n"

    def _after_turn(self, n_tokens: int = 0) -> None:
        self._since_snapshot += 1
        self._new_tokens += n_tokens
        self.last_active = time.monotonic()
        if self.policy is not None:
            due = self.policy.due(self._new_tokens, time.monotonic() - self._last_checkpoint)
        else:
            due = bool(self.snapshot_every and self._since_snapshot >= self.snapshot_every)
        if due:
            self._try_checkpoint()

    def checkpoint_if_idle(self, idle_seconds: float) -> bool:
        """Checkpoint (never failing) if tokens are unsaved and the session has been idle for
        ``idle_seconds``; True if one was taken."""
        if not self._resident or self.journal.closed or not self._since_snapshot:
            return False
        if time.monotonic() - self.last_active < idle_seconds:
            return False
        self._try_checkpoint()
        return True

    @property
    def shift_pending(self) -> bool:
        """Whether a window shift waits for the next decode (no checkpoint until then)."""
        return self._shift_pending

    @property
    def pending_tokens(self) -> int:
        """Tokens added since the last checkpoint (what a crash now would replay)."""
        return self._new_tokens

    def _try_checkpoint(self) -> None:
        """Snapshot now, but never fail a turn that is already safe in the journal.

        With a background writer only the state copy happens here; the rest is queued.
        """
        if self._shift_pending:
            logger.debug("session %s: shift not applied yet; checkpoint deferred", self.session_id)
            return
        try:
            if self._writer is not None and not self._writer.closed:
                self._writer.submit(self.session_id, self._capture_job())
                self._since_snapshot = 0
                self._new_tokens = 0
                self._last_checkpoint = time.monotonic()
            else:
                self.checkpoint()
        except Exception as exc:
            # The snapshot is only a cache of the journal: a failure (e.g. ENOSPC) costs a
            # slower resume, not data. It is retried after the next turn.
            self.snapshot_failures += 1
            logger.warning("session %s: snapshot failed (%s); will retry", self.session_id, exc)

    # -- snapshots and residency ---------------------------------------------------------------

    def _capture_job(self) -> Callable[[], object]:
        """Copy the sequence's state out now (caller thread); return the job that encodes and
        writes it (any thread: it never touches the context)."""
        self._require_resident()
        if self._shift_pending:
            raise SessionError(
                f"session {self.session_id!r}: a window shift is not applied until the next "
                "decode; checkpoint after it"
            )
        ctx, seq_id = self.ctx, self.seq_id
        last = self.journal[-1].seq if len(self.journal) else -1
        if self._chunks is not None:
            pending = self._chunks.plan_capture(
                ctx,
                seq_id,
                self._window.tokens,
                scratch_seq=self._scratch,
                session_id=self.session_id,
                journal_seq=last,
                lineage=self._window.lineage,
                meta={
                    "window": {"spans": [[p.start, p.length, p.seq] for p in self._window.spans]}
                },
            )
            self._last_snapshot_id = f"{SNAPSHOT_ID_PREFIX}{last}"
            return _ChunkJob(self._chunks, pending)
        identity = snapshot_mod.CacheIdentity.from_context(ctx)
        pos_min, pos_max = ctx.memory.pos_min(seq_id), ctx.memory.pos_max(seq_id)
        if pos_min < 0 or pos_max < 0:
            pos_min = pos_max = -1
        raw: npt.NDArray[np.uint8] = ctx.seq_state_get(seq_id)
        tokens = tuple(self._window.tokens)
        snapshot_id = f"{SNAPSHOT_ID_PREFIX}{last}-{secrets.token_hex(6)}"
        parent_id, n_ctx = self._last_snapshot_id, ctx.n_ctx
        session_id, store = self.session_id, self.store
        self._last_snapshot_id = snapshot_id

        def job() -> Path:
            snap = snapshot_mod.encode(
                raw,
                identity=identity,
                tokens=tokens,
                seq_id=seq_id,
                pos_min=pos_min,
                pos_max=pos_max,
                n_ctx=n_ctx,
                session_id=session_id,
                parent_id=parent_id,
                snapshot_id=snapshot_id,
            )
            return store.save(session_id, snap)

        return job

    def checkpoint(self) -> object:
        """Capture the KV sequence into the store now and wait for it; returns the file.

        With a background writer the write still happens there (one writer per store), and
        this waits for it.
        """
        self._require_resident()
        if self._shift_pending:
            raise SessionError(
                f"session {self.session_id!r}: a window shift is not applied until the next "
                "decode; checkpoint after it"
            )
        if self._writer is not None and not self._writer.closed:
            job = self._capture_job()
            self._writer.discard(self.session_id)
            self._writer.flush(self.session_id)
            path = job()
            self._since_snapshot = 0
            self._new_tokens = 0
            self._last_checkpoint = time.monotonic()
            return path
        if self._chunks is not None:
            path = self._capture_job()()
            self._since_snapshot = 0
            self._new_tokens = 0
            self._last_checkpoint = time.monotonic()
            return path
        last = self.journal[-1].seq if len(self.journal) else -1
        snap = snapshot_mod.capture(
            self.ctx,
            self.seq_id,
            self._window.tokens,
            session_id=self.session_id,
            parent_id=self._last_snapshot_id,
            snapshot_id=f"{SNAPSHOT_ID_PREFIX}{last}-{secrets.token_hex(6)}",
        )
        path = self.store.save(self.session_id, snap)
        self._last_snapshot_id = snap.header.snapshot_id
        self._since_snapshot = 0
        self._new_tokens = 0
        self._last_checkpoint = time.monotonic()
        return path

    def _drop_kv(self) -> None:
        self.ctx.memory.seq_rm(self.seq_id)
        self._resident = False

    def discard(self) -> None:
        """Free the KV cells and close the journal without a checkpoint (the session is being
        deleted)."""
        if not self.ctx.closed and self.seq_id >= 0:
            self._drop_kv()
        self.journal.close()

    def suspend(self) -> None:
        """Snapshot if anything is new, then free the sequence's KV cells."""
        if not self._resident:
            return
        if self._since_snapshot:
            self._try_checkpoint()
        self._drop_kv()

    def close(self) -> None:
        """Suspend (if the context is still open) and close the journal."""
        try:
            if not self.ctx.closed:
                self.suspend()
        finally:
            self.journal.close()


class _ChunkJob:
    """A planned chunked checkpoint: run it to commit, cancel it to release its pins."""

    def __init__(self, store: ChunkStore, pending: PendingCheckpoint) -> None:
        self.store = store
        self.pending = pending

    def __call__(self) -> object:
        return self.store.commit(self.pending)

    def cancel(self) -> None:
        self.store.discard(self.pending)


class SessionPool:
    """Resident sessions over one context; the least recently used ones are suspended.

    A session is resident while its tokens are in the KV cache. All resident sessions share
    the context's ``n_ctx`` cells and ``n_seq_max`` sequences: before a session is resumed or
    grows, the least recently used others are suspended (snapshot, then their cells freed, their
    journal closed) until it fits. Idle sessions thus hold no KV memory and no open files.

    Args:
        ctx: the shared context.
        root: data directory (journals under ``root/journals``, snapshots under
            ``root/snapshots``).
        keep: snapshots kept per session.
        snapshot_every, window: see :class:`Session`.
    """

    def __init__(
        self,
        ctx: Context,
        root: str | Path,
        *,
        keep: int = 3,
        snapshot_every: int = 1,
        window: Literal["shift", "refuse"] = "shift",
        n_seq: int | None = None,
        policy: CheckpointPolicy | None = None,
        writer: CheckpointWriter | None = None,
        journal_fsync: bool = True,
        chunks: ChunkStore | None = None,
        scratch_seq: int = -1,
        journal_segment_entries: int = DEFAULT_SEGMENT_ENTRIES,
    ) -> None:
        self.ctx = ctx
        self.journal_segment_entries = journal_segment_entries
        self.chunks = chunks
        self.scratch_seq = scratch_seq
        self.root = Path(root)
        self.snapshot_every = snapshot_every
        self.window = window
        #: sequence ids 0 .. n_seq-1 are the pool's; the rest are left to the caller (scratch)
        self.n_seq = ctx.n_seq_max if n_seq is None else n_seq
        if not 1 <= self.n_seq <= ctx.n_seq_max:
            raise SessionError(f"n_seq must be in [1, {ctx.n_seq_max}], got {self.n_seq}")
        self.policy = policy
        self.writer = writer
        self.journal_fsync = journal_fsync
        #: how the sessions resumed so far came back: source -> count
        self.resumes: dict[str, int] = {"snapshot": 0, "journal": 0, "empty": 0}
        self.last_resume: ResumeReport | None = None
        # Hash the GGUF now (cached on disk by file identity), not inside the first turn.
        self.model_fingerprint = ctx.model.fingerprint
        self.store = SnapshotStore(self.root / "snapshots", keep=keep)
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # resident only, LRU first

    def get(self, session_id: str) -> tuple[Session, ResumeReport | None]:
        """The session, resumed if it was not resident; the report says how, if it was."""
        session = self._sessions.get(session_id)
        if session is not None and (session.journal.closed or not session.resident):
            # Its journal closed itself (a failed append on a full disk), or a failed decode
            # dropped its KV: the KV is not the journal's any more. Forget it here; it is
            # reopened and resumed from disk below.
            logger.warning("session %s: KV or journal was dropped; resuming it", session_id)
            del self._sessions[session_id]
            self.ctx.memory.seq_rm(session.seq_id)
            session.journal.close()
            session = None
        if session is not None:
            self._sessions.move_to_end(session_id)
            return session, None
        if self.writer is not None:
            # A checkpoint still in the writer's queue is this session's newest state.
            self.writer.flush(validate_session_id(session_id))
        session = Session(
            self.ctx,
            -1,
            session_id,
            self.root,
            self.store,
            snapshot_every=self.snapshot_every,
            journal_fsync=self.journal_fsync,
            make_room=self._make_room,
            window=self.window,
            policy=self.policy,
            writer=self.writer,
            chunks=self.chunks,
            scratch_seq=self.scratch_seq,
            journal_segment_entries=self.journal_segment_entries,
        )
        try:
            if session.n_tokens > self.ctx.n_ctx:
                raise ContextFullError(
                    f"session {session_id!r} holds {session.n_tokens} tokens, more than "
                    f"n_ctx={self.ctx.n_ctx}: open it with a larger context"
                )
            session.seq_id = self._free_seq()
            report = session.resume()  # asks _make_room for the cells its replay needs
        except BaseException:
            if session.seq_id >= 0:  # no half-rebuilt cells left under a "free" seq id
                self.ctx.memory.seq_rm(session.seq_id)
            session.journal.close()
            raise
        self._sessions[session_id] = session
        self.resumes[report.source] = self.resumes.get(report.source, 0) + 1
        self.last_resume = report
        return session, report

    def resident(self) -> list[Session]:
        """The resident sessions, least recently used first."""
        return list(self._sessions.values())

    def peek(self, session_id: str) -> Session | None:
        """The session if it is resident, without resuming or reordering anything."""
        return self._sessions.get(session_id)

    def known(self) -> list[str]:
        """Every session with a journal on disk, resident or not, sorted."""
        directory = self.root / JOURNAL_DIR
        if not directory.is_dir():
            return []
        return journal_sessions(directory)

    def used_cells(self) -> int:
        """KV cells held by resident sessions."""
        return self._used_cells()

    def _used_cells(self, exclude: Session | None = None) -> int:
        return sum(s.n_tokens for s in self._sessions.values() if s is not exclude)

    def _make_room(self, session: Session, n_tokens: int) -> None:
        """Suspend LRU sessions (never ``session``) until ``n_tokens`` more cells fit."""
        mine = session.n_tokens if session.resident else 0
        while self._used_cells(exclude=session) + mine + n_tokens > self.ctx.n_ctx:
            victim = next((s for s in self._sessions.values() if s is not session), None)
            if victim is None:
                break  # alone and still too big: Session._reserve already refused that
            self._evict(victim)

    def _free_seq(self) -> int:
        used = {s.seq_id for s in self._sessions.values()}
        free = [i for i in range(self.n_seq) if i not in used]
        if free:
            return free[0]
        victim = next(iter(self._sessions.values()))
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
        """Forget a session: its KV cells, journal and snapshots. Long-term memory is separate
        (its items carry the session id)."""
        session = self._sessions.pop(validate_session_id(session_id), None)
        if self.writer is not None:
            self.writer.discard(session_id)
            self.writer.flush(session_id)
        if session is not None:
            session.discard()
        journal = self.root / JOURNAL_DIR / f"{session_id}.log"
        Journal.remove_files(journal)  # the active file, its segments and rescue files
        with contextlib.suppress(FileNotFoundError):
            journal.with_suffix(".ingested").unlink()
        self.store.delete_session(session_id)
        if self.chunks is not None:
            self.chunks.delete_session(session_id)

    def close(self) -> None:
        """Suspend every session, close journals, release the store lock."""
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
            self.store.close()
            if self.chunks is not None:
                self.chunks.close()

    def __enter__(self) -> SessionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sync_longterm(
    session: Session,
    memory: MemoryStore,
    *,
    roles: Sequence[str] = ("user",),
    importance: float = 0.5,
) -> int:
    """Add the session's journal entries that long-term memory does not have yet.

    The journal is the truth for both memories: a crash between a journal append and the
    matching :meth:`MemoryStore.add` is repaired here. A watermark file
    (``journals/<id>.ingested``, the last journal seq ingested) keeps this cheap; the one entry
    that may have been added just before a crash is looked up exactly (by its ``journal_seq``
    meta) instead of being added twice. An entry's ``meta["importance"]`` overrides ``importance``.
    Returns how many entries were added.
    """
    mark_path = session.journal.path.with_suffix(".ingested")
    try:
        mark = int(mark_path.read_text())
    except (OSError, ValueError):
        mark = -1
    added = 0
    first = True
    for entry in session.journal:
        if entry.seq <= mark:
            continue
        wanted = entry.role in roles and entry.text.strip()
        # Only the first entry past the mark can already be in the store (a crash between
        # its add and the mark update); every later one is known to be missing.
        uncertain, first = first, False
        if wanted and not (uncertain and _already_ingested(memory, session.session_id, entry)):
            memory.add(
                entry.text,
                kind="turn",
                session=session.session_id,
                importance=float(entry.meta.get("importance", importance)),
                meta={"journal_seq": entry.seq, "role": entry.role},
                now=entry.created,
            )
            added += 1
        atomic_write_bytes(mark_path, f"{entry.seq}\n".encode())
        mark = entry.seq
    return added


def _already_ingested(memory: MemoryStore, session_id: str, entry: Entry) -> bool:
    return bool(memory.find(session=session_id, meta_key="journal_seq", value=entry.seq))
