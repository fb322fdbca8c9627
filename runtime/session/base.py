"""What every part of a session shares: names on disk, the resume report, and the state the
parts (turns, resume, capture) work on (the session errors are in :mod:`runtime.errors`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime.checkpoint import CheckpointPolicy, CheckpointWriter
from runtime.chunks import ChunkStore, Manifest
from runtime.errors import SessionError
from runtime.journal import Journal
from runtime.store import SnapshotStore

if TYPE_CHECKING:
    from llamaffi import Context
    from runtime.session.window import _Window


logger = logging.getLogger(__name__)


JOURNAL_DIR = "journals"
#: Session snapshots are named ``j<journal seq>-<random>``: the journal entry they follow.
SNAPSHOT_ID_PREFIX = "j"
#: Journal role of a context-window shift: ``meta["drop"] = [a, b)``, window token offsets.
WINDOW_ROLE = "window"


def _journal_seq_of(snapshot_id: str) -> int | None:
    """The journal seq a session snapshot id names (``j<seq>-<random>``), if it names one."""
    head, sep, _ = snapshot_id.rpartition("-")  # the random tail has no "-"; the seq may
    if sep and head.startswith(SNAPSHOT_ID_PREFIX):
        number = head[len(SNAPSHOT_ID_PREFIX) :]
        if number.lstrip("-").isdigit():
            return int(number)
    return None


@dataclass
class ResumeReport:
    """How :meth:`Session.resume` rebuilt the KV sequence.

    Attributes:
        source: ``snapshot`` (restored, plus journal replay of any newer turns), ``journal``
            (full re-prefill) or ``empty`` (a new session).
        n_tokens: tokens in the sequence afterwards (== the session's window).
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


class _SessionCore:
    """The state :class:`runtime.session.Session` keeps, shared by its parts (resume,
    capture, turns), and the few low-level steps they all use."""

    ctx: Context
    seq_id: int
    session_id: str
    store: SnapshotStore
    journal: Journal
    policy: CheckpointPolicy | None
    snapshot_every: int
    snapshot_failures: int
    last_active: float
    _writer: CheckpointWriter | None
    _chunks: ChunkStore | None
    _scratch: int
    _window: _Window
    _make_room: Callable[[Any, int], None] | None
    _manifests: list[Manifest] | None
    _resident: bool
    _since_snapshot: int
    _new_tokens: int
    _last_checkpoint: float
    _shift_pending: bool
    _last_snapshot_id: str

    @property
    def resident(self) -> bool:
        """Whether the session's tokens are in the KV cache now."""
        return self._resident

    def _apply_drop(self, a: int, b: int) -> None:
        memory = self.ctx.memory
        if not memory.seq_rm(self.seq_id, a, b):
            self._drop_kv()
            raise SessionError(f"llama.cpp could not remove positions [{a}, {b})")
        memory.seq_add(self.seq_id, b, -1, -(b - a))
        # llama.cpp rotates the shifted keys only at the next llama_decode: a state copied
        # before that holds unrotated K and would restore wrong, so no checkpoint until then.
        self._shift_pending = True

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

    def _drop_kv(self) -> None:
        self.ctx.memory.seq_rm(self.seq_id)
        self._resident = False
