"""What the chunk store knows without reading a file: every chunk's sizes, every manifest's
references, and the pins of planned checkpoints. One lock guards it, so that a plan on the
caller's thread and a commit on the writer's see one state."""

from __future__ import annotations

import threading
from collections.abc import Iterable


class ChunkIndex:
    """The chunk store's in-memory index (thread-safe).

    ``sizes``: key -> ``(raw_size, file_size)`` of every chunk stored. References:
    session -> {generation: keys} of every manifest stored (an unreadable manifest keeps its
    generation with no keys, so that a new one never reuses the number). Pins: the keys of
    planned, uncommitted checkpoints, which garbage collection must keep.
    """

    def __init__(self, *, shared: bool = False) -> None:
        #: held across a garbage collection's unlinks: a plan must not see a chunk going
        self.lock = threading.RLock()
        #: other nodes write the store too: only chunks that lost their last reference here
        #: (a manifest this node pruned or deleted) are garbage; a chunk never named here may
        #: be another node's, put for a manifest it has not switched yet
        self.shared = shared
        self._released: set[str] = set()
        self._sizes: dict[str, tuple[int, int]] = {}
        self._refs: dict[str, dict[int, frozenset[str]]] = {}
        self._pins: dict[int, frozenset[str]] = {}
        self._next_pin = 1
        self.counters = {"written_bytes": 0, "written_files": 0, "gc_files": 0}

    def replace(
        self, sizes: dict[str, tuple[int, int]], refs: dict[str, dict[int, frozenset[str]]]
    ) -> None:
        """Take a fresh scan of the directory (pins are kept)."""
        with self.lock:
            self._sizes = sizes
            self._refs = refs

    def replace_session(
        self,
        session_id: str,
        refs: dict[int, frozenset[str]],
        sizes: dict[str, tuple[int, int]],
    ) -> None:
        """Take a fresh read of one session's manifests and the sizes of the chunks they
        name (another node wrote them), in one step: a collection never sees the chunks
        without their references."""
        with self.lock:
            for key, size in sizes.items():
                self._sizes.setdefault(key, size)
            if refs:
                self._refs[session_id] = refs
            else:
                self._refs.pop(session_id, None)

    # -- chunks ---------------------------------------------------------------------------------

    def sizes_of(self, key: str) -> tuple[int, int] | None:
        """``(raw_size, file_size)`` of a stored chunk, or None."""
        with self.lock:
            return self._sizes.get(key)

    def add_chunk(self, key: str, raw_size: int, file_size: int, *, written: bool) -> None:
        """Record a stored chunk (``written``: by this process, counted)."""
        with self.lock:
            self._sizes[key] = (raw_size, file_size)
            if written:
                self.counters["written_bytes"] += file_size
                self.counters["written_files"] += 1

    def forget_chunk(self, key: str) -> None:
        """A chunk is gone (quarantined): the next checkpoint copies it again."""
        with self.lock:
            self._sizes.pop(key, None)

    def garbage(self) -> list[str]:
        """Stored chunks that no manifest and no pin references (call with :attr:`lock` held
        until they are deleted)."""
        live: set[str] = set()
        for gens in self._refs.values():
            for keys in gens.values():
                live |= keys
        for keys in self._pins.values():
            live |= keys
        candidates = self._released if self.shared else self._sizes
        return [k for k in candidates if k not in live]

    def collected(self, keys: Iterable[str]) -> None:
        """Garbage chunks were deleted."""
        n = 0
        with self.lock:
            for key in keys:
                self._sizes.pop(key, None)
                self._released.discard(key)
                n += 1
            self.counters["gc_files"] += n

    # -- manifests ------------------------------------------------------------------------------

    def next_generation(self, session_id: str) -> int:
        """The generation number a new manifest of the session gets."""
        with self.lock:
            return max(self._refs.get(session_id, {}), default=0) + 1

    def add_manifest(
        self, session_id: str, generation: int, keys: frozenset[str], size: int = 0
    ) -> None:
        """Record a manifest (``size``: bytes written by this process, counted)."""
        with self.lock:
            self._refs.setdefault(session_id, {})[generation] = keys
            if size:
                self.counters["written_bytes"] += size
                self.counters["written_files"] += 1

    def forget_manifest(self, session_id: str, generation: int) -> None:
        """A manifest was deleted."""
        with self.lock:
            keys = self._refs.get(session_id, {}).pop(generation, None)
            if self.shared and keys:
                self._released |= keys

    def forget_session(self, session_id: str) -> None:
        """Every manifest of the session was deleted."""
        with self.lock:
            gens = self._refs.pop(session_id, None)
            if self.shared and gens:
                for keys in gens.values():
                    self._released |= keys

    # -- pins -----------------------------------------------------------------------------------

    def pin(self, keys: Iterable[str]) -> tuple[int, dict[str, tuple[int, int] | None]]:
        """Pin ``keys`` against collection; return the pin and the sizes of those stored."""
        with self.lock:
            wanted = frozenset(keys)
            pin = self._next_pin
            self._next_pin += 1
            self._pins[pin] = wanted
            return pin, {key: self._sizes.get(key) for key in wanted}

    def unpin(self, pin: int) -> None:
        """Release a pin (idempotent)."""
        with self.lock:
            self._pins.pop(pin, None)

    # -- figures --------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Bytes on disk, logical bytes of every session's newest manifest, dedup savings,
        and the write counters (see :meth:`runtime.chunks.ChunkStore.stats`)."""
        with self.lock:
            chunk_bytes = sum(size for _, size in self._sizes.values())
            sizes = {k: size for k, (_, size) in self._sizes.items()}
            newest = [gens[max(gens)] for gens in self._refs.values() if gens]
            counters = dict(self.counters)
            n_chunks = len(self._sizes)
        logical = sum(sizes.get(k, 0) for keys in newest for k in keys)
        unique = set().union(*newest) if newest else set()
        unique_bytes = sum(sizes.get(k, 0) for k in unique)
        return {
            "chunks": n_chunks,
            "chunk_bytes": chunk_bytes,
            "sessions": len(newest),
            "logical_bytes": logical,
            "dedup_saved_bytes": logical - unique_bytes,
            **counters,
        }
