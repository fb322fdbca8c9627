"""The capture side of a chunk store: plan a checkpoint on the caller's thread (copy out only
the chunks not stored yet), commit it on any thread (compress, write the chunks, then switch
the manifest, then prune)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt

from runtime import snapshot as snapshot_mod
from runtime.chunks.index import ChunkIndex
from runtime.chunks.keys import Lineage, chunk_keys
from runtime.chunks.manifest import ChunkRef, Manifest
from runtime.chunks.pending import PendingCheckpoint, PendingChunk
from runtime.errors import ArgumentError, ChunkError
from runtime.layout import validate_session_id
from runtime.snapshot import Codec, layout

if TYPE_CHECKING:
    from llamaffi import Context
    from runtime.storage import BlobStore

logger = logging.getLogger(__name__)


class ChunkWriter:
    """Plans and commits checkpoints into ``blobs``, keeping ``index`` up to date.

    Args:
        blobs: where chunks and manifests go.
        index: the store's index (sizes, references, pins).
        chunk_tokens: positions per chunk.
        codec: the codec of chunk files.
        keep: manifests kept per session.
        dedup: ``"global"`` or ``"session"`` (the key scope).
        collect_garbage: called after each manifest switch.
    """

    def __init__(
        self,
        blobs: BlobStore,
        index: ChunkIndex,
        *,
        chunk_tokens: int,
        codec: Codec,
        keep: int,
        dedup: Literal["global", "session"],
        collect_garbage: Callable[[], object],
    ) -> None:
        self.blobs = blobs
        self.index = index
        self.chunk_tokens = chunk_tokens
        self.codec = codec
        self.keep = keep
        self.dedup = dedup
        self._collect_garbage = collect_garbage
        #: one commit (or session delete) at a time: generations are numbered in order
        self.commit_lock = threading.Lock()

    def scope(self, session_id: str) -> str:
        """The key scope of a session's chunks (empty: shared by every session)."""
        return f"session:{session_id}" if self.dedup == "session" else ""

    # -- caller thread --------------------------------------------------------------------------

    def plan(
        self,
        ctx: Context,
        seq_id: int,
        tokens: Sequence[int],
        *,
        scratch_seq: int,
        session_id: str,
        journal_seq: int,
        meta: dict[str, Any] | None = None,
        lineage: Lineage = (),
    ) -> PendingCheckpoint:
        """Copy out the chunks of ``seq_id`` that the store does not hold yet (see
        :meth:`runtime.chunks.ChunkStore.plan_capture`)."""
        validate_session_id(session_id)
        mem = ctx.memory
        if not ctx.kv_unified:
            raise ArgumentError("chunked checkpoints need a unified KV cache (kv_unified=True)")
        if scratch_seq == seq_id:
            raise ArgumentError("scratch_seq must differ from seq_id")
        if mem.pos_max(scratch_seq) != -1:
            raise ArgumentError(f"scratch seq {scratch_seq} is not empty")
        tok = tuple(int(t) for t in tokens)
        pos_min, pos_max = mem.pos_min(seq_id), mem.pos_max(seq_id)
        n = len(tok)
        if (pos_max - pos_min + 1 if pos_max >= 0 else 0) != n:
            raise ArgumentError(
                f"seq {seq_id} holds positions [{pos_min}, {pos_max}], not {n} tokens: pass "
                "the ids of its cells in position order"
            )
        pos_min = max(pos_min, 0)
        identity = snapshot_mod.identity_of(ctx)
        scope = self.scope(session_id)
        keys = chunk_keys(
            identity, tok, pos_min, chunk_tokens=self.chunk_tokens, lineage=lineage, scope=scope
        )
        pin, durable = self.index.pin(key for key, _, _ in keys)
        pending: list[PendingChunk] = []
        try:
            sliced = self._slice_new(ctx, seq_id, scratch_seq, keys, durable, pos_min, n)
            for key, start, end in keys:
                known = durable[key]
                p0 = pos_min + start
                if known is not None:
                    pending.append(PendingChunk(key, start, end, p0, None, *known))
                    continue
                raw: npt.NDArray[np.uint8] | layout.StateSlice
                if sliced is not None:
                    raw = sliced.pop(0)
                else:
                    mem.seq_cp(seq_id, scratch_seq, p0, pos_min + end)
                    try:
                        raw = ctx.seq_state_get(scratch_seq)
                    finally:
                        mem.seq_rm(scratch_seq, -1, -1)
                pending.append(PendingChunk(key, start, end, p0, raw, int(raw.size)))
        except BaseException:
            self.index.unpin(pin)
            raise
        return PendingCheckpoint(
            session_id=session_id,
            journal_seq=journal_seq,
            identity=identity,
            n_ctx=ctx.n_ctx,
            chunk_tokens=self.chunk_tokens,
            pos_min=pos_min,
            tokens=tok,
            chunks=pending,
            lineage=tuple(lineage),
            scope=scope,
            meta=dict(meta or {}),
            created_ns=time.time_ns(),
            pin_id=pin,
        )

    @staticmethod
    def _slice_new(
        ctx: Context,
        seq_id: int,
        scratch_seq: int,
        keys: Sequence[tuple[str, int, int]],
        durable: dict[str, tuple[int, int] | None],
        pos_min: int,
        n: int,
    ) -> list[layout.StateSlice] | None:
        """The new chunks cut from one ``seq_state_get`` of the whole sequence, each byte for
        byte what the scratch path gives (seq id ``scratch_seq`` included), copied out of it
        only when the commit encodes them; None to copy them one by one through the scratch
        sequence instead.

        One copy of the whole sequence costs less than one scratch round trip per chunk only
        when most of it is new (a first save, a restore's re-save, a shift near the start);
        a +64-token checkpoint copies just its tail through the scratch sequence, as before.
        """
        new = [(pos_min + s, pos_min + e) for key, s, e in keys if durable[key] is None]
        if len(new) < 2 or 2 * sum(e - s for s, e in new) < n:
            return None
        blob = ctx.seq_state_get(seq_id)
        try:
            lay = layout.parse(blob)
            if lay.n_cells != n:  # an SWA cache leaves masked cells out of a whole-seq state
                raise layout.LayoutError(f"{lay.n_cells} cells for {n} positions")
            return layout.slice_ranges(blob, lay, new, seq_id=scratch_seq)
        except layout.LayoutError as exc:
            logger.info("chunk capture through the scratch sequence: %s", exc)
            return None

    def discard(self, pending: PendingCheckpoint) -> None:
        """Drop a planned checkpoint without committing it (releases its pins and copies)."""
        self._release(pending)

    # -- any thread -----------------------------------------------------------------------------

    def commit(self, pending: PendingCheckpoint) -> Manifest:
        """Write the new chunks, then switch the manifest, then prune and collect garbage
        (see :meth:`runtime.chunks.ChunkStore.commit`)."""
        if pending.done:
            raise ArgumentError("this checkpoint was already committed or discarded")
        new = pending.new_chunks
        try:
            with self.commit_lock:
                return self._publish(pending, self._write_chunks(pending), new)
        finally:
            self._release(pending)

    def _release(self, pending: PendingCheckpoint) -> None:
        """Done with ``pending``: unpin its chunks and let go of its copies (a slice holds the
        whole sequence's state), whatever happened."""
        pending.done = True
        for chunk in pending.chunks:
            chunk.raw = None
        self.index.unpin(pending.pin_id)

    def _write_chunks(self, pending: PendingCheckpoint) -> list[ChunkRef]:
        """Every chunk of ``pending`` stored: the new ones encoded and written in one
        :meth:`BlobStore.put_all` (each encoded as its file is written, so one chunk's
        compressed bytes are in memory at a time), the known ones checked."""
        refs: dict[int, ChunkRef] = {}
        jobs: list[tuple[str, Callable[[BinaryIO], int]]] = []
        sizes = [c.raw.size for c in pending.chunks if isinstance(c.raw, layout.StateSlice)]
        scratch = np.empty(max(sizes, default=0), dtype=np.uint8)
        new: list[tuple[int, PendingChunk]] = []
        written: dict[str, int] = {}  #: file size of each chunk this commit wrote
        for i, chunk in enumerate(pending.chunks):
            known = self.index.sizes_of(chunk.key)
            if chunk.raw is None:
                if known is None or not self.blobs.has(chunk.key):
                    raise ChunkError(
                        chunk.key, "missing", "vanished before the checkpoint was committed"
                    )
                refs[i] = ChunkRef(chunk.key, chunk.start, chunk.end, *known)
                continue
            if known is not None and self.blobs.has(chunk.key):  # another checkpoint wrote it
                refs[i] = ChunkRef(chunk.key, chunk.start, chunk.end, *known)
                continue
            if known is None and self.blobs.has(chunk.key):
                # on disk but not in the index: it was unreadable when the store opened
                self.blobs.quarantine(chunk.key, "unreadable when the store opened; written again")
            jobs.append((chunk.key, self._encoder(pending, chunk, scratch, written)))
            new.append((i, chunk))
        try:
            stored = self.blobs.put_all(jobs)
        except BaseException:
            # what was stored before the failure is complete: index it, or the next commit
            # would take it for a chunk that was unreadable when the store opened
            for _, chunk in new:
                if chunk.key in written and self.blobs.has(chunk.key):
                    size = written[chunk.key]
                    self.index.add_chunk(chunk.key, chunk.raw_size, size, written=True)
            raise
        for (i, chunk), size in zip(new, stored, strict=True):
            # not in written when another writer stored the key first: the same content
            self.index.add_chunk(chunk.key, chunk.raw_size, size, written=chunk.key in written)
            chunk.raw = None  # the copy is durable now; let it go
            refs[i] = ChunkRef(chunk.key, chunk.start, chunk.end, chunk.raw_size, size)
        return [refs[i] for i in range(len(pending.chunks))]

    def _encoder(
        self,
        pending: PendingCheckpoint,
        chunk: PendingChunk,
        scratch: npt.NDArray[np.uint8],
        written: dict[str, int],
    ) -> Callable[[BinaryIO], int]:
        """``write(f)`` for :meth:`BlobStore.put_all`: encode the chunk (a slice is first
        copied into ``scratch``, one buffer for every chunk of the commit) and write its file
        (records its file size in ``written``)."""

        def write(f: BinaryIO) -> int:
            raw = chunk.raw
            if raw is None:
                raise ArgumentError(f"chunk {chunk.key} has no bytes to write")
            if isinstance(raw, layout.StateSlice):
                raw = raw.copy_into(scratch[: raw.size])
            n = chunk.end - chunk.start
            snap = snapshot_mod.encode(
                raw,
                identity=pending.identity,
                tokens=pending.tokens[chunk.start : chunk.end],
                seq_id=0,
                pos_min=chunk.pos0,
                pos_max=chunk.pos0 + n - 1,
                n_ctx=pending.n_ctx,
                snapshot_id=chunk.key,
                codec=self.codec,
            )
            size = snap.write_to(f)
            written[chunk.key] = size
            return size

        return write

    def _publish(self, pending: PendingCheckpoint, refs: list[ChunkRef], new: int) -> Manifest:
        session = pending.session_id
        generation = self.index.next_generation(session)
        tail = refs[-1] if refs and refs[-1].end - refs[-1].start < pending.chunk_tokens else None
        man = Manifest(
            session_id=session,
            generation=generation,
            journal_seq=pending.journal_seq,
            identity=pending.identity,
            chunk_tokens=pending.chunk_tokens,
            pos_min=pending.pos_min,
            tokens=pending.tokens,
            chunks=tuple(refs[:-1] if tail else refs),
            tail=tail,
            lineage=pending.lineage,
            scope=pending.scope,
            created_ns=pending.created_ns,
            meta=pending.meta,
        )
        data = man.to_bytes()
        # every chunk it names is durable (put_all returned): now the switch
        try:
            self.blobs.switch_manifest(session, generation, data)
        except BaseException:
            # the number may be taken (a shared store: another node's manifest); the next
            # checkpoint of the session takes the one after it
            self.index.add_manifest(session, generation, frozenset())
            raise
        self.index.add_manifest(session, generation, man.keys, len(data))
        logger.debug(
            "session %s: manifest %d, %d chunks (%d new)",
            session,
            generation,
            len(refs),
            new,
        )
        self._prune(session)
        self._collect_garbage()
        return man

    def _prune(self, session_id: str) -> None:
        """Delete the session's manifests beyond the newest ``keep``."""
        for generation in self.blobs.generations(session_id)[self.keep :]:
            self.blobs.delete_manifest(session_id, generation)
            self.index.forget_manifest(session_id, generation)
