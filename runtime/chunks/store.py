"""The chunk store: :class:`ChunkStore` opens a directory, plans and commits checkpoints,
collects garbage and deletes sessions; restore and verify come from its mixins
(:mod:`~runtime.chunks.restore`, :mod:`~runtime.chunks.verify`)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime import snapshot as snapshot_mod
from runtime.chunks.base import _ChunkStoreState
from runtime.chunks.keys import DEFAULT_CHUNK_TOKENS, Lineage, chunk_keys
from runtime.chunks.manifest import _GEN_RE, MANIFEST_SUFFIX, ChunkRef, Manifest
from runtime.chunks.pending import PendingCheckpoint, PendingChunk
from runtime.chunks.restore import _RestoreMixin
from runtime.chunks.verify import _VerifyMixin
from runtime.errors import (
    ArgumentError,
    ChunkStoreError,
    CorruptManifestError,
    MissingChunkError,
)
from runtime.fsutil import (
    DirLock,
    atomic_write_bytes,
    ensure_dir,
    fsync_dir,
    remove_stale_temps,
)
from runtime.layout import validate_session_id
from runtime.snapshot import Codec, CorruptSnapshot, Filter, UnsupportedVersion

if TYPE_CHECKING:
    from llamaffi import Context

logger = logging.getLogger(__name__)

#: The codec of chunk files unless the store is given another: zstd level -1, no filter, no
#: zstd content checksum (the chunk table's xxh3-128 still covers every stored byte and is
#: checked before a frame is decoded). It stores KV almost as is (0.98-0.99 of raw) and
#: restores at 0.9-1.4x llama.cpp's raw load, where level 1 with byte planes saves 20% of the
#: bytes for 3.5-4x; see docs/snapshot-format.md ("The codec of chunks").
CHUNK_CODEC = Codec(level=-1, filter=Filter.NONE, checksum=False)
#: Manifests kept per session: the newest, and one to fall back to if it is damaged.
DEFAULT_KEEP = 2


class ChunkStore(_RestoreMixin, _VerifyMixin, _ChunkStoreState):
    """Chunked, deduplicated, crash-safe KV checkpoints under ``root``.

    Args:
        root: the store directory (created with mode 0700).
        chunk_tokens: positions per chunk (the key depends on it).
        level: zstd level of chunk files, with the byte-plane filter (``Codec(level=level)``);
            ``None`` (default) means :data:`CHUNK_CODEC`.
        codec: the whole codec of chunk files (overrides ``level``).
        keep: manifests kept per session (at least 1; 2 lets a damaged newest fall back).
        dedup: ``"global"`` (default) shares chunks of equal prefixes across sessions;
            ``"session"`` keys chunks per session (see docs: "Dedup and bit-exactness").
        readonly: no lock, no writing, no quarantine, no temp-file cleanup.
        lock: take ``<root>/.lock`` (set False when the caller already holds a lock that
            covers this directory).
        threads: worker threads decoding chunks ahead of the caller during :meth:`restore`;
            1 decodes on the caller's thread, between the llama.cpp calls. 0 (default): one
            per CPU but one (kept for the caller's llama.cpp calls), at most 4; so 1 on a
            2-core machine, where the pipeline measured slower (docs: "The codec of chunks").

    Thread safety: :meth:`commit` may run on one writer thread while :meth:`plan_capture` and
    :meth:`restore` run on the caller's thread; the shared index is guarded by a lock, and
    chunks named by a planned but uncommitted checkpoint are pinned against garbage
    collection. Only one process may write a directory (the lock enforces it).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        level: int | None = None,
        codec: Codec | None = None,
        keep: int = DEFAULT_KEEP,
        dedup: Literal["global", "session"] = "global",
        readonly: bool = False,
        lock: bool = True,
        threads: int = 0,
    ) -> None:
        if chunk_tokens < 1:
            raise ArgumentError("chunk_tokens must be >= 1")
        if keep < 1:
            raise ArgumentError("keep must be at least 1")
        if dedup not in ("global", "session"):
            raise ArgumentError("dedup must be 'global' or 'session'")
        self.root = Path(root)
        self.chunk_tokens = chunk_tokens
        if codec is None:
            codec = CHUNK_CODEC if level is None else Codec(level=level)
        self.codec = codec
        self.keep = keep
        self.dedup = dedup
        self.readonly = readonly
        self.threads = threads if threads > 0 else max(1, min(4, (os.cpu_count() or 1) - 1))
        self._lock = threading.RLock()
        self._commit_lock = threading.Lock()
        self._dirlock = None
        self._closed = False
        #: key -> (raw_size, file_size) of every chunk file on disk
        self._chunks = {}
        #: session -> {generation: keys} of every manifest on disk
        self._refs = {}
        self._pins = {}
        self._next_pin = 1
        self._counters = {"written_bytes": 0, "written_files": 0, "gc_files": 0}
        self._pool = None
        if not readonly:
            ensure_dir(self.root)
            if lock:
                self._dirlock = DirLock(self.root).acquire()
            self._remove_temps()
        self._load_index()

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock; safe to call twice."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._dirlock is not None:
            self._dirlock.release()
            self._dirlock = None

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- index ------------------------------------------------------------------------------

    def _remove_temps(self) -> None:
        removed = 0
        for directory in (*self._chunk_subdirs(), *self._manifest_subdirs()):
            removed += remove_stale_temps(directory)
        if removed:
            logger.warning("removed %d temp file(s) left by an interrupted write", removed)

    def _load_index(self) -> None:
        """Scan chunk headers (sizes) and manifests (references) once, at open."""
        chunks: dict[str, tuple[int, int]] = {}
        for key, path in self._iter_chunk_files():
            try:
                header = snapshot_mod.inspect(path)
            except (CorruptSnapshot, UnsupportedVersion, OSError) as exc:
                logger.warning("chunk %s is unreadable (%s); it counts as absent", key, exc)
                continue
            chunks[key] = (header.raw_size, header.file_size)
        refs: dict[str, dict[int, frozenset[str]]] = {}
        for session in self.sessions():
            for generation, path in self._generations(session):
                try:
                    man = self._read_manifest(path)
                except (CorruptManifestError, OSError):
                    # keep its generation number reserved; its chunks cannot be known
                    refs.setdefault(session, {})[generation] = frozenset()
                    continue
                refs.setdefault(session, {})[generation] = man.keys
        with self._lock:
            self._chunks = chunks
            self._refs = refs

    # -- capture (caller thread) ------------------------------------------------------------

    def _scope(self, session_id: str) -> str:
        return f"session:{session_id}" if self.dedup == "session" else ""

    def plan_capture(
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
        """CALLER THREAD: copy out the chunks of ``seq_id`` that the store does not hold yet.

        ``tokens`` are the ids of the sequence's cells in position order (positions
        ``pos_min .. pos_min + len(tokens) - 1``); ``lineage`` describes window shifts
        (:func:`shift_lineage`). Only new chunks and the tail are copied, through
        ``scratch_seq`` (which must be empty and is left empty); nothing is compressed or
        written, and no file is touched. Pass the result to :meth:`commit` (any thread), or to
        :meth:`discard` if it will not be committed.
        """
        self._require_writable()
        validate_session_id(session_id)
        mem = ctx.memory
        if not ctx.kv_unified:
            raise ChunkStoreError("chunked checkpoints need a unified KV cache (kv_unified=True)")
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
        scope = self._scope(session_id)
        keys = chunk_keys(
            identity, tok, pos_min, chunk_tokens=self.chunk_tokens, lineage=lineage, scope=scope
        )
        with self._lock:
            durable = {key: self._chunks.get(key) for key, _, _ in keys}
            pin = self._next_pin
            self._next_pin += 1
            self._pins[pin] = frozenset(key for key, _, _ in keys)
        pending: list[PendingChunk] = []
        try:
            for key, start, end in keys:
                known = durable[key]
                p0 = pos_min + start
                if known is not None:
                    pending.append(PendingChunk(key, start, end, p0, None, *known))
                    continue
                mem.seq_cp(seq_id, scratch_seq, p0, pos_min + end)
                try:
                    raw = ctx.seq_state_get(scratch_seq)
                finally:
                    mem.seq_rm(scratch_seq, -1, -1)
                pending.append(PendingChunk(key, start, end, p0, raw, int(raw.size)))
        except BaseException:
            self._unpin(pin)
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

    def discard(self, pending: PendingCheckpoint) -> None:
        """Drop a planned checkpoint without committing it (releases its pins)."""
        pending.done = True
        self._unpin(pending.pin_id)

    def _unpin(self, pin: int) -> None:
        with self._lock:
            self._pins.pop(pin, None)

    # -- commit (any thread) ----------------------------------------------------------------

    def commit(self, pending: PendingCheckpoint) -> Manifest:
        """ANY THREAD: write the new chunks, then the manifest, then collect garbage.

        Each new chunk is compressed and published atomically (temp file, fsync, rename, fsync
        of the directory); the manifest is written the same way only after every chunk it
        names is durable; old manifests beyond ``keep`` and chunks no manifest references are
        deleted only after that. Never touches a llama.cpp context. On any error nothing that
        an existing manifest references is touched, and :class:`OSError` propagates.
        """
        self._require_writable()
        if pending.done:
            raise ChunkStoreError("this checkpoint was already committed or discarded")
        try:
            with self._commit_lock:
                refs = [self._write_chunk(pending, c) for c in pending.chunks]
                return self._publish(pending, refs)
        finally:
            pending.done = True
            self._unpin(pending.pin_id)

    def _write_chunk(self, pending: PendingCheckpoint, chunk: PendingChunk) -> ChunkRef:
        path = self.chunk_path(chunk.key)
        if chunk.raw is None:
            with self._lock:
                known = self._chunks.get(chunk.key)
            if known is None or not path.is_file():
                raise MissingChunkError(chunk.key, "vanished before the checkpoint was committed")
            return ChunkRef(chunk.key, chunk.start, chunk.end, *known)
        with self._lock:
            known = self._chunks.get(chunk.key)
        if known is not None and path.is_file():  # written by another checkpoint meanwhile
            return ChunkRef(chunk.key, chunk.start, chunk.end, *known)
        n = chunk.end - chunk.start
        snap = snapshot_mod.encode(
            chunk.raw,
            identity=pending.identity,
            tokens=pending.tokens[chunk.start : chunk.end],
            seq_id=0,
            pos_min=chunk.pos0,
            pos_max=chunk.pos0 + n - 1,
            n_ctx=pending.n_ctx,
            snapshot_id=chunk.key,
            codec=self.codec,
        )
        ensure_dir(path.parent)
        size = snapshot_mod.write(path, snap)
        with self._lock:
            self._chunks[chunk.key] = (snap.header.raw_size, size)
            self._counters["written_bytes"] += size
            self._counters["written_files"] += 1
        chunk.raw = None  # the copy is on disk now; let it go
        return ChunkRef(chunk.key, chunk.start, chunk.end, snap.header.raw_size, size)

    def _publish(self, pending: PendingCheckpoint, refs: list[ChunkRef]) -> Manifest:
        session = pending.session_id
        directory = ensure_dir(self._session_manifest_dir(session))
        with self._lock:
            gens = self._refs.get(session, {})
            generation = max(gens, default=0) + 1
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
        atomic_write_bytes(directory / f"{generation:012d}{MANIFEST_SUFFIX}", data)
        with self._lock:
            self._refs.setdefault(session, {})[generation] = man.keys
            self._counters["written_bytes"] += len(data)
            self._counters["written_files"] += 1
        logger.debug(
            "session %s: manifest %d, %d chunks (%d new)",
            session,
            generation,
            len(refs),
            pending.new_chunks,
        )
        self._prune_manifests(session)
        self.collect_garbage()
        return man

    def _prune_manifests(self, session_id: str) -> None:
        directory = self._session_manifest_dir(session_id)
        removed = False
        for generation, path in self._generations(session_id)[self.keep :]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
            with self._lock:
                self._refs.get(session_id, {}).pop(generation, None)
        if removed:
            fsync_dir(directory)

    def _live_keys(self) -> set[str]:
        live: set[str] = set()
        for gens in self._refs.values():
            for keys in gens.values():
                live |= keys
        for keys in self._pins.values():
            live |= keys
        return live

    def collect_garbage(self) -> list[str]:
        """Delete chunk files that no manifest on disk and no pending checkpoint references.

        Only ever called after a manifest switch is durable, so a crash at any point leaves
        every chunk a manifest names in place (at worst, orphans that the next call removes).
        """
        self._require_writable()
        removed: list[str] = []
        dirs: set[Path] = set()
        with self._lock:  # held across the unlinks: a plan must not see a chunk being deleted
            live = self._live_keys()
            for key in [k for k in self._chunks if k not in live]:
                path = self.chunk_path(key)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                dirs.add(path.parent)
                del self._chunks[key]
                removed.append(key)
            self._counters["gc_files"] += len(removed)
        for directory in dirs:
            fsync_dir(directory)
        return removed

    # -- reading ----------------------------------------------------------------------------

    def manifests(self, session_id: str) -> list[Manifest]:
        """The session's readable manifests, newest first (damaged ones are quarantined)."""
        out = []
        for _, path in self._generations(session_id):
            try:
                out.append(self._read_manifest(path))
            except CorruptManifestError as exc:
                logger.warning("skipping damaged manifest: %s", exc)
                if not self.readonly and not self._closed:
                    self._quarantine_manifest(path, f"{exc.field}: {exc}")
            except FileNotFoundError:
                continue
        return out

    def latest(self, session_id: str) -> Manifest | None:
        """The session's newest readable manifest (its chunks are checked at restore)."""
        found = self.manifests(session_id)
        return found[0] if found else None

    def _quarantine_manifest(self, path: Path, reason: str) -> None:
        qdir = ensure_dir(path.parent / "quarantine")
        target = qdir / f"{path.name}.{time.time_ns()}"
        os.replace(path, target)
        atomic_write_bytes(target.with_name(target.name + ".reason"), f"{reason}\n".encode())
        fsync_dir(path.parent)
        match = _GEN_RE.fullmatch(path.name)
        with self._lock:
            if match:
                # keep the generation number reserved so a new manifest never reuses it
                self._refs.setdefault(path.parent.name, {})[int(match.group(1))] = frozenset()

    def _quarantine_chunk(self, key: str, reason: str) -> None:
        if self.readonly or self._closed:
            return
        path = self.chunk_path(key)
        qdir = ensure_dir(self.root / "quarantine")
        with self._lock:
            self._chunks.pop(key, None)  # the next checkpoint copies it again
            try:
                os.replace(path, qdir / f"{path.name}.{time.time_ns()}")
            except FileNotFoundError:
                return
        atomic_write_bytes(qdir / f"{key}.reason", f"{reason}\n".encode())
        fsync_dir(path.parent)

    # -- maintenance ------------------------------------------------------------------------

    def delete_session(self, session_id: str) -> None:
        """Delete the session's manifests, then the chunks nothing else references."""
        self._require_writable()
        directory = self._session_manifest_dir(session_id)
        with self._commit_lock:
            if directory.is_dir():
                for path in sorted(directory.rglob("*"), reverse=True):
                    if path.is_dir():
                        path.rmdir()
                    else:
                        path.unlink()
                directory.rmdir()
                fsync_dir(self.manifest_dir)
            with self._lock:
                self._refs.pop(session_id, None)
            self.collect_garbage()
