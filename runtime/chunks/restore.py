"""Restoring a sequence from a manifest: chunks are read (mapped, not copied, from the local
store), verified and decoded on worker threads ahead of the caller, while the caller hands each
chunk to llama.cpp: a stored chunk (:attr:`runtime.snapshot.CodecId.STORED`) straight from its
verified file bytes, a compressed one from one of a few reused buffers."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from runtime import snapshot as snapshot_mod
from runtime.chunks.manifest import ChunkRef, Manifest
from runtime.errors import (
    ArgumentError,
    ChunkError,
    CorruptSnapshotError,
    MemoryRuntimeError,
    UnsupportedVersionError,
)
from runtime.snapshot import Snapshot

if TYPE_CHECKING:
    from llamaffi import Context
    from runtime.storage import BlobStore

logger = logging.getLogger(__name__)


class ChunkReader:
    """The restore side of a chunk store: reads, verifies and decodes chunks from ``blobs``
    and hands them to llama.cpp, decoding ahead of the caller on ``threads`` workers (at
    least one).

    ``quarantine(key, reason)`` is called for a damaged chunk once the sequences are empty.
    """

    def __init__(
        self,
        blobs: BlobStore,
        *,
        threads: int,
        quarantine: Callable[[str, str], None],
    ) -> None:
        self.blobs = blobs
        self.threads = threads
        self._quarantine_chunk = quarantine
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the decode workers (idempotent)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def load_chunk(self, manifest: Manifest, ref: ChunkRef) -> npt.NDArray[np.uint8]:
        """Read, verify and decode one chunk (on a worker thread; never touches a context):
        for a stored chunk, a read-only array over its mapped file.

        A public stage of :meth:`restore`, for profilers: what one chunk costs without
        llama.cpp."""
        return self._decode(manifest, ref, None)

    def _decode(
        self,
        manifest: Manifest,
        ref: ChunkRef,
        buffer: Callable[[], npt.NDArray[np.uint8]] | None,
    ) -> npt.NDArray[np.uint8]:
        """Chunk ``ref`` read and checked: a stored chunk's verified bytes as they are mapped
        (no copy), a compressed one decoded into the start of ``buffer()`` (None: a new
        array, allocated once the header is checked)."""
        snap, view, source = self._open_chunk(manifest, ref)
        size = snap.header.raw_size
        try:
            stored = snapshot_mod.stored_payload(snap, view, source)
            if stored is not None:
                return stored
            out = np.empty(size, dtype=np.uint8) if buffer is None else buffer()[:size]
            snapshot_mod.decode_into(snap, out, threads=1, source=source)
        except CorruptSnapshotError as exc:
            raise ChunkError(ref.key, exc.field, str(exc)) from None
        return out

    def _open_chunk(self, manifest: Manifest, ref: ChunkRef) -> tuple[Snapshot, memoryview, str]:
        """The chunk's file, its header checked against the manifest (digests deferred to
        the decode, frame by frame)."""
        source = self.blobs.describe(ref.key)
        try:
            # a stored chunk's array keeps this map alive until llama.cpp has read it
            view = self.blobs.get(ref.key)
        except FileNotFoundError:
            raise ChunkError(ref.key, "missing", f"{source} does not exist") from None
        try:
            snap = Snapshot.from_buffer(view, source=source, defer_digests=True)
        except CorruptSnapshotError as exc:
            raise ChunkError(ref.key, exc.field, str(exc)) from None
        except UnsupportedVersionError as exc:
            raise ChunkError(ref.key, "version", str(exc)) from None
        h = snap.header
        n = ref.end - ref.start
        expect_pos = (manifest.pos_min + ref.start, manifest.pos_min + ref.end - 1)
        if h.snapshot_id != ref.key:
            raise ChunkError(ref.key, "snapshot_id", f"file holds chunk {h.snapshot_id!r}")
        if h.identity != manifest.identity:
            raise ChunkError(ref.key, "identity", "cache identity differs from the manifest")
        if (h.pos_min, h.pos_max) != expect_pos or h.n_tokens != n:
            raise ChunkError(
                ref.key, "pos_range", f"holds {(h.pos_min, h.pos_max)}, expected {expect_pos}"
            )
        if h.tokens != manifest.tokens[ref.start : ref.end]:
            raise ChunkError(ref.key, "tokens", "token ids differ from the manifest's")
        if h.raw_size != ref.raw_size:
            raise ChunkError(ref.key, "raw_size", f"{h.raw_size} != {ref.raw_size}")
        return snap, view, source

    def restore(
        self,
        ctx: Context,
        manifest: Manifest,
        seq_id: int,
        *,
        scratch_seq: int,
        allow_build_mismatch: bool = False,
    ) -> list[int]:
        """CALLER THREAD: rebuild ``seq_id`` from ``manifest``; return its token ids.

        ``seq_id`` is emptied first. Chunks are read through a memory map and checked on
        ``threads`` workers, up to ``threads`` chunks ahead of the caller: identity, positions
        and token ids against the manifest, then every segment's xxh3-128. A stored chunk
        (:data:`runtime.chunks.CHUNK_CODEC`) is then handed over as its verified mapped bytes;
        a zstd chunk of an older store is decoded into one of ``threads + 1`` reused buffers.
        The caller sets the first chunk straight into ``seq_id`` and each later one through the
        scratch sequence (``seq_state_set(chunk, scratch)``, ``seq_cp(scratch, seq_id)``; the
        scratch sequence is emptied by the next set, and after the last chunk), so checking
        overlaps llama.cpp's copies. No byte reaches
        llama.cpp before it is verified. The store's files are trusted not to change in place
        between that check and llama.cpp's read (they are only ever replaced by rename), as
        with any mapped file; a process that could write them could write this one's memory.

        Raises :class:`snapshot.IncompatibleSnapshotError` (nothing touched) for another model or
        cache layout; :class:`ChunkError` (a missing chunk, a damaged one, which is
        quarantined, or a manifest entry larger than this context's states) or
        :class:`snapshot.RestoreError` otherwise, with ``seq_id`` and ``scratch_seq`` left
        empty. The caller then tries an older manifest or the journal.
        """
        mem = ctx.memory
        if scratch_seq == seq_id:
            raise ArgumentError("scratch_seq must differ from seq_id")
        if not ctx.kv_unified:
            raise ArgumentError("chunked checkpoints need a unified KV cache (kv_unified=True)")
        target = snapshot_mod.identity_of(ctx)
        diffs = manifest.identity.differences(target, allow_build_mismatch=allow_build_mismatch)
        if diffs:
            raise snapshot_mod.IncompatibleSnapshotError(diffs)
        if mem.pos_max(scratch_seq) != -1:
            raise ArgumentError(f"scratch seq {scratch_seq} is not empty")
        mem.seq_rm(seq_id, -1, -1)
        refs = manifest.refs
        bound = snapshot_mod.max_state_size(ctx)
        for ref in refs:  # before any buffer is allocated; the manifest is wrong, not the chunk
            if not 0 < ref.raw_size <= bound:
                raise ChunkError(
                    ref.key,
                    "manifest_raw_size",
                    f"the manifest says {ref.raw_size} bytes; this context's states are at "
                    f"most {bound} (not quarantined: the chunk may be fine)",
                )
        try:
            self._restore_refs(ctx, manifest, refs, seq_id, scratch_seq)
            got = (mem.pos_min(seq_id), mem.pos_max(seq_id))
            expect = (-1, -1)
            if refs:
                expect = (manifest.pos_min, manifest.pos_min + manifest.n_tokens - 1)
            if got != expect:
                raise snapshot_mod.RestoreError(
                    f"restored seq {seq_id} holds positions {got}, manifest says {expect}"
                )
        except BaseException as exc:
            # llama.cpp #27068: a failed restore can leave cells behind; empty both seqs.
            for seq in (scratch_seq, seq_id):
                with contextlib.suppress(Exception):
                    mem.seq_rm(seq, -1, -1)
            # a chunk of a newer format may be fine (another node wrote it): never moved aside
            if isinstance(exc, ChunkError) and not exc.missing and exc.field != "version":
                self._quarantine_chunk(exc.key, str(exc))
            if isinstance(exc, Exception) and not isinstance(exc, MemoryRuntimeError):
                raise snapshot_mod.RestoreError(f"llama.cpp refused a chunk: {exc}") from exc
            raise
        logger.debug(
            "restored session %s manifest %d into seq %d (%d chunks)",
            manifest.session_id,
            manifest.generation,
            seq_id,
            len(refs),
        )
        return list(manifest.tokens)

    def _restore_refs(
        self,
        ctx: Context,
        manifest: Manifest,
        refs: Sequence[ChunkRef],
        seq_id: int,
        scratch_seq: int,
    ) -> None:
        if not refs:
            return
        depth = max(1, self.threads)
        size = max(ref.raw_size for ref in refs)
        # allocated when a compressed chunk first needs one (stored chunks need none)
        buffers: list[npt.NDArray[np.uint8] | None] = [None] * (depth + 1)
        pool = self._workers(depth)

        def decode(i: int) -> npt.NDArray[np.uint8]:
            # chunk i's buffer is free: chunk i - depth - 1 was set before i was submitted
            slot = i % len(buffers)

            def buffer() -> npt.NDArray[np.uint8]:
                got = buffers[slot]
                if got is None:
                    got = buffers[slot] = np.empty(size, dtype=np.uint8)
                return got

            return self._decode(manifest, refs[i], buffer)

        ahead = collections.deque(pool.submit(decode, i) for i in range(min(depth, len(refs))))
        try:
            for i in range(len(refs)):
                raw = ahead.popleft().result()
                if i + depth < len(refs):
                    ahead.append(pool.submit(decode, i + depth))
                if i == 0:
                    ctx.seq_state_set(raw, seq_id)
                else:
                    self._set_chunk(ctx, raw, seq_id, scratch_seq)
            ctx.memory.seq_rm(scratch_seq, -1, -1)  # the last chunk's cells are seq_id's only
        finally:
            for pending in ahead:
                if not pending.cancel():
                    with contextlib.suppress(Exception):
                        pending.result()

    def _workers(self, n: int) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(n, "kvchunk")
            return self._pool

    @staticmethod
    def _set_chunk(ctx: Context, raw: npt.NDArray[np.uint8], seq_id: int, scratch: int) -> None:
        """Chunk ``raw`` appended to ``seq_id`` through ``scratch``. The scratch sequence is
        not emptied after the copy: ``seq_state_set`` starts by removing the sequence it sets,
        so the next chunk's set frees it from these cells (which ``seq_id`` keeps), and the
        caller empties it once after the last chunk. One walk over the cells fewer per chunk:
        4-8% of a 4k-16k restore."""
        ctx.seq_state_set(raw, scratch)
        ctx.memory.seq_cp(scratch, seq_id, -1, -1)
