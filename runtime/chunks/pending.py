"""Plain data passed between the parts of a checkpoint: what a capture copied out of the
context (made on the caller's thread, committed on the writer's), and what a verify found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.chunks.keys import Lineage
from runtime.snapshot import CacheIdentity
from runtime.snapshot.layout import StateSlice


@dataclass
class PendingChunk:
    """One chunk of a planned checkpoint; ``raw`` is None when the chunk is already durable,
    else its state (a copy, or a slice of the sequence's one state, copied when encoded)."""

    key: str
    start: int
    end: int
    pos0: int  #: first position
    raw: npt.NDArray[np.uint8] | StateSlice | None
    raw_size: int = 0  #: its state's size (durable chunks: from the store's index)
    file_size: int = 0


@dataclass
class PendingCheckpoint:
    """What :meth:`ChunkStore.plan_capture` copied out of the context; plain data only."""

    session_id: str
    journal_seq: int
    identity: CacheIdentity
    n_ctx: int
    chunk_tokens: int
    pos_min: int
    tokens: tuple[int, ...]
    chunks: list[PendingChunk]  #: every full chunk and the tail (last), in order
    lineage: Lineage
    scope: str
    meta: dict[str, Any]
    created_ns: int
    pin_id: int = 0
    done: bool = False

    @property
    def copied_bytes(self) -> int:
        """llama.cpp state bytes copied out of the context for this checkpoint."""
        return sum(c.raw.size for c in self.chunks if c.raw is not None)

    @property
    def new_chunks(self) -> int:
        """Chunks (tail included) that this checkpoint will write."""
        return sum(1 for c in self.chunks if c.raw is not None)


@dataclass
class VerifyReport:
    """What :meth:`ChunkStore.verify` found; ``ok`` when nothing is damaged or missing."""

    manifests: int = 0
    chunks: int = 0
    damaged_manifests: list[tuple[str, str]] = field(default_factory=list)  #: (path, why)
    damaged_chunks: list[tuple[str, str]] = field(default_factory=list)  #: (key, why)
    missing: list[tuple[str, str]] = field(default_factory=list)  #: (manifest path, key)
    orphans: list[str] = field(default_factory=list)  #: keys no manifest references

    @property
    def ok(self) -> bool:
        """No damaged manifest or chunk and no missing chunk (orphans are harmless)."""
        return not (self.damaged_manifests or self.damaged_chunks or self.missing)
