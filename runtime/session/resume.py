"""Rebuilding a session's KV sequence: the newest checkpoint that checks out against the
journal, then the journal's later entries. Its cost follows what it replays."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from runtime.chunks import ChunkError, Manifest
from runtime.errors import IncompatibleSnapshotError, JournalError, RestoreError, SessionError
from runtime.session.checkpointer import Checkpointer
from runtime.session.window import (
    IMPORTED,
    MODEL_TAG,
    WINDOW_ROLE,
    SequenceKV,
    Window,
    window_after,
    window_from_manifest,
)
from runtime.storage import JournalBackend

logger = logging.getLogger(__name__)


@dataclass
class ResumeReport:
    """How :meth:`Session.resume` rebuilt the KV sequence.

    Attributes:
        source: ``snapshot`` (restored from a checkpoint, plus journal replay of any newer
            turns), ``journal`` (re-prefilled) or ``empty`` (a new session).
        n_tokens: tokens in the sequence afterwards (== the session's window).
        restored_tokens: tokens that came from the checkpoint.
        replayed_tokens: tokens decoded from the journal.
        seconds: wall time of the whole resume.
        snapshot: where the checkpoint restored lives, if one was.
        skipped: why newer checkpoints were not used.
    """

    source: Literal["snapshot", "journal", "empty"]
    n_tokens: int
    restored_tokens: int
    replayed_tokens: int
    seconds: float
    snapshot: str | None = None
    skipped: list[str] = field(default_factory=list)


#: (the journal entry the KV follows, tokens restored, the checkpoint used, the window then)
_Start = tuple[int, int, str | None, Window]


class Rebuild:
    """Rebuilds one session's KV from its checkpoints and its journal.

    Args:
        session_id: the session (for messages).
        journal: its journal (the truth).
        kv: its KV sequence.
        checkpointer: its checkpoints.
        make_room: called with the most cells a replay will hold, before it starts, so that a
            pool can suspend other sessions.
        model_tag: this model's vocabulary (:func:`~runtime.session.window.model_tag`): an
            entry of another is refused.
    """

    def __init__(
        self,
        session_id: str,
        journal: JournalBackend,
        kv: SequenceKV,
        checkpointer: Checkpointer,
        make_room: Callable[[int], None] | None = None,
        *,
        model_tag: str,
    ) -> None:
        self.session_id = session_id
        self.journal = journal
        self.kv = kv
        self.checkpointer = checkpointer
        self.make_room = make_room
        self.model_tag = model_tag

    def open_window(self) -> Window:
        """The window now: the newest checkpoint's window plus the entries after it, so that
        opening a session costs what was said since its last checkpoint, not its age. With no
        checkpoint that records its window (or none that checks out), the whole journal."""
        for man in self.checkpointer.manifests():
            base = window_from_manifest(self.journal, man)
            if base is not None:
                for entry in self.journal.iter_from(man.journal_seq + 1):
                    base.apply(entry)
                return base
        if self.journal.compacted:
            # retention removed old entries: the window is only known from a checkpoint
            self.checkpointer.require_reachable()  # unreachable now: retry, not lost
            raise SessionError(
                f"session {self.session_id!r}: journal retention removed old entries and no "
                "checkpoint's window checks out against the rest"
            )
        window = Window()
        for entry in self.journal:
            window.apply(entry)
        return window

    def run(self, truth: Window, *, allow_build_mismatch: bool) -> tuple[ResumeReport, Window]:
        """Rebuild the (emptied) KV sequence into ``truth``, the session's window; return the
        report and the window as it is now (a re-prefill may change its lineage)."""
        start = time.perf_counter()
        self.kv.ctx.memory.seq_rm(self.kv.seq_id)
        skipped: list[str] = []
        after, restored, path, base = self._restore_best(skipped, allow_build_mismatch)
        window = truth
        if path is None and after >= 0:  # re-prefilled from a window record: a new lineage
            window = base.copy()
            for entry in self.journal.iter_from(after + 1):
                window.apply(entry)
        self.checkpointer.forget()  # read again at the next resume: the store moves on
        replayed = self._replay(after, base)
        if path is None and after >= 0:  # re-prefilled from a window record: not a checkpoint
            replayed += len(base.tokens)
        self.kv.resident = True
        self.checkpointer.reset(replayed)
        source: Literal["snapshot", "journal", "empty"]
        source = "snapshot" if path else ("journal" if truth.tokens else "empty")
        report = ResumeReport(
            source=source,
            n_tokens=len(truth.tokens),
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
        return report, window

    def _replay(self, after: int, base: Window) -> int:
        """Repeat the journal's entries after entry ``after`` on the KV, one entry per call;
        ``base`` is the window after entry ``after`` (it is not changed).

        This repeats exactly what the turns (and window shifts) first did, so user turns come
        back bit for bit; a reply, first decoded token by token, comes back equal up to float
        rounding (batched vs incremental evaluation).
        """
        window = base.copy()
        replayed = 0
        before_import: Window | None = None  # the KV's window before a run of imported entries
        for entry in self.journal.iter_from(after + 1):
            if entry.tokens:
                self._own_tokens(entry.meta.get(MODEL_TAG), entry.tokens)
            if entry.meta.get(IMPORTED):
                before_import = before_import or window.copy()
                window.apply(entry)
                continue
            if before_import is not None:
                replayed += self._decode_import(before_import, window)
                before_import = None
            window.apply(entry)
            if entry.role == WINDOW_ROLE:
                a, b = (int(x) for x in entry.meta["drop"])
                self.kv.drop(a, b)
            elif entry.tokens:
                self.kv.decode(entry.tokens, pos=len(window.tokens) - len(entry.tokens))
                replayed += len(entry.tokens)
        if before_import is not None:
            replayed += self._decode_import(before_import, window)
        return replayed

    def _own_tokens(self, tag: object, tokens: Sequence[int]) -> None:
        """Refuse token ids another model journalled (:data:`MODEL_TAG`), or ids this model
        does not have (an entry journalled before entries were tagged): decoded here, they
        would mean other tokens, and the session would go on from nonsense."""
        mine = self.model_tag
        if isinstance(tag, str) and tag != mine:
            raise SessionError(self._foreign(f"model {tag}", mine))
        if tokens and max(tokens) >= self.kv.ctx.n_vocab:
            raise SessionError(self._foreign("another model", mine))

    def _check_checkpoint_model(self, man: Manifest) -> None:
        """Refuse the journal behind a checkpoint another model file wrote when its entries
        do not say their vocabulary (journalled before entries were tagged): their ids are
        that model's, and its vocabulary cannot be compared without the file. Tagged entries
        are checked as they are replayed; another file of the same vocabulary reads them."""
        theirs = man.identity.model_fingerprint
        if theirs == self.kv.ctx.model.fingerprint:
            return
        try:
            tag = self.journal[man.journal_seq].meta.get(MODEL_TAG)
        except (IndexError, JournalError):
            tag = None
        if isinstance(tag, str):
            self._own_tokens(tag, ())
        else:
            raise SessionError(self._foreign(f"model {theirs[:16]}", self.model_tag))

    def _foreign(self, theirs: str, mine: str) -> str:
        return (
            f"session {self.session_id!r} was journalled with {theirs}, not this runtime's "
            f"model {mine}, and its token ids are that model's: open the data directory with "
            "that model to go on with the session, or carry its history into a new session "
            "(import_history(new_id, [{'role': t['role'], 'content': t['text']} for t in "
            "history(old_id)]); on the server, GET /v1/sessions/{id}, then POST "
            "/v1/sessions/{new_id}/import). The session's files are as they were."
        )

    def _decode_import(self, before: Window, after: Window) -> int:
        """Bring the KV from ``before`` to ``after`` across a run of imported entries (and the
        window shifts journalled with them): keep the turns both windows share at the front,
        decode the rest of ``after`` in one go. An imported history was never decoded, so
        only its final window is: an import of a conversation longer than the context costs
        one prefill of the window, not of the history. Returns the tokens decoded."""
        keep = 0
        for old, new in zip(before.spans, after.spans, strict=False):
            if (old.start, old.length, old.seq) != (new.start, new.length, new.seq):
                break
            keep = new.start + new.length
        if keep < len(before.tokens) and not self.kv.cut(keep):
            self.kv.ctx.memory.seq_rm(self.kv.seq_id)  # a cache that cannot cut: from scratch
            keep = 0
        if len(after.tokens) > keep:
            self.kv.decode(after.tokens[keep:], pos=keep)
        return len(after.tokens) - keep

    def _entry_of(self, tokens: list[int], claimed: int) -> int | None:
        """The journal entry ``claimed`` if the window held exactly ``tokens`` after it, else
        None (for a checkpoint that does not record its window: walks the journal)."""
        window = Window()
        found = -1 if not tokens and claimed == -1 else None
        for entry in self.journal:
            window.apply(entry)
            if entry.seq == claimed and window.tokens == tokens:
                found = entry.seq
        return found

    def _restore_best(self, skipped: list[str], allow_build_mismatch: bool) -> _Start:
        """Restore the newest usable checkpoint; else re-prefill the checkpointed window when
        retention cut the journal; else start from the empty sequence (a full replay)."""
        found = self._restore_checkpoint(skipped, allow_build_mismatch)
        if found is not None:
            return found
        if self.journal.compacted:
            return self._reprefill_window(skipped)
        empty = Window()
        self._room_for_replay(-1, empty)
        return -1, 0, None, empty

    def _restore_checkpoint(self, skipped: list[str], allow_build_mismatch: bool) -> _Start | None:
        """Restore the newest manifest that matches the journal and restores."""
        for man in self.checkpointer.manifests():
            name = f"manifest {man.generation}"
            tokens = list(man.tokens)
            base = window_from_manifest(self.journal, man)
            after: int | None = man.journal_seq
            if base is None:  # a manifest that does not record its window: the slow way
                after = self._entry_of(tokens, man.journal_seq)
                base = window_after(self.journal, after) if after is not None else None
            if after is None or base is None or man.lineage != base.lineage:
                skipped.append(
                    f"{name}: its tokens are not the window after journal entry {man.journal_seq}"
                )
                continue
            self._room_for_replay(after, base)
            try:
                self.checkpointer.restore(
                    self.kv.ctx, man, self.kv.seq_id, allow_build_mismatch=allow_build_mismatch
                )
            except ChunkError as exc:  # missing or damaged chunk (quarantined): an older one
                skipped.append(f"{name}: {exc}")
                continue
            except (IncompatibleSnapshotError, RestoreError) as exc:
                # Another model or cache layout, or llama.cpp could not take it now (e.g. the
                # cache is short of cells): the files may be fine, so they stay; the journal
                # rebuilds the sequence instead, unless the checkpoint says another model
                # journalled its tokens (entries from before they were tagged).
                if isinstance(exc, IncompatibleSnapshotError):
                    self._check_checkpoint_model(man)
                skipped.append(f"{name}: {exc}")
                return None
            return after, len(tokens), self.checkpointer.describe(man.generation), base
        return None

    def _reprefill_window(self, skipped: list[str]) -> _Start:
        """No checkpoint restores, and journal retention removed the entries a full replay
        would need: decode the newest checkpointed window's tokens afresh (its record checks
        out against the journal even when its KV chunks are gone), then replay what followed.

        The KV differs from the lost one only in what the shifted-out turns contributed; it is
        a fresh prefill, so its lineage is empty (chunk keys then equal any fresh prefill's).
        """
        for man in self.checkpointer.manifests():
            base = window_from_manifest(self.journal, man)
            if base is None:
                continue
            base.lineage = ()
            self._check_checkpoint_model(man)
            self._room_for_replay(man.journal_seq, base)
            if base.tokens:
                self.kv.decode(base.tokens, pos=0)
            skipped.append(
                "old journal entries were removed by retention: re-prefilled the "
                f"{len(base.tokens)}-token window of manifest {man.generation}"
            )
            logger.warning("session %s: %s", self.session_id, skipped[-1])
            return man.journal_seq, 0, None, base
        self.checkpointer.require_reachable()  # unreachable now: retry, not lost
        raise SessionError(
            f"session {self.session_id!r} cannot be rebuilt: journal retention removed old "
            "entries and no checkpoint of its window is readable (its long-term memories "
            "remain)"
        )

    def _room_for_replay(self, after: int, base: Window) -> None:
        """Ask the pool for the most cells the replay after entry ``after`` will hold
        (``base`` is the window after entry ``after``).

        Before a journalled window shift the sequence was longer than it ends up, so the peak,
        not the final window, must fit while the shift is repeated.
        """
        if self.make_room is None:
            return
        window = base.copy()
        peak = len(window.tokens)
        for entry in self.journal.iter_from(after + 1):
            window.apply(entry)
            peak = max(peak, len(window.tokens))
        self.make_room(peak)
