"""The chunk store: :class:`ChunkStore`, one object composed of narrow parts.

* a :class:`runtime.storage.BlobStore` (today :class:`runtime.storage.LocalBlobStore`) holds
  the files and states what is durable when;
* :class:`~runtime.chunks.index.ChunkIndex` is what the store knows without reading a file;
* :class:`~runtime.chunks.capture.ChunkWriter` plans and commits checkpoints;
* :class:`~runtime.chunks.restore.ChunkReader` restores them;
* :func:`~runtime.chunks.verify.verify_store` checks everything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime import snapshot as snapshot_mod
from runtime.chunks.capture import ChunkWriter
from runtime.chunks.index import ChunkIndex
from runtime.chunks.keys import DEFAULT_CHUNK_TOKENS, Lineage
from runtime.chunks.manifest import MANIFEST_HEADER_LEN, MAX_MANIFEST_BODY, Manifest
from runtime.chunks.pending import PendingCheckpoint, VerifyReport
from runtime.chunks.restore import ChunkReader
from runtime.chunks.verify import verify_store
from runtime.errors import (
    ArgumentError,
    ChunkError,
    ClosedError,
    CorruptSnapshotError,
    PersistError,
    ReadOnlyError,
    UnsupportedVersionError,
)
from runtime.layout import validate_session_id
from runtime.snapshot import Codec, CodecId, Filter
from runtime.storage import BlobStore, LocalBlobStore

if TYPE_CHECKING:
    from llamaffi import Context

logger = logging.getLogger(__name__)

#: The codec of chunk files unless the store is given another: the state's bytes stored as
#: they are, each 1 MiB segment with its xxh3-128 in the chunk table, checked before a byte
#: reaches llama.cpp. zstd -1 kept 0.98-0.99 of KV's bytes for a pass to write and one to
#: read; a stored chunk is handed to llama.cpp straight from its mapped file. Level 1 with
#: byte planes saves 20% of the bytes for 3.5-4x the restore time; see
#: docs/snapshot-format.md ("The codec of chunks").
CHUNK_CODEC = Codec(level=0, filter=Filter.NONE, checksum=False, codec_id=CodecId.STORED)
#: Manifests kept per session: the newest, and one to fall back to if it is damaged.
DEFAULT_KEEP = 2


class ChunkStore:
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
        threads: worker threads decoding chunks ahead of the caller during :meth:`restore`
            (each holds one chunk buffer). 0 (default): one per CPU but one (kept for the
            caller's llama.cpp calls), at least 1 and at most 4; so 1 on a 2-core machine,
            where two workers measured no faster (docs/snapshot-format.md, "The codec of
            chunks").
        blobs: where the files go (default: a :class:`runtime.storage.LocalBlobStore` at
            ``root``); any :class:`runtime.storage.BlobStore` keeps the same guarantees.

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
        blobs: BlobStore | None = None,
        shared: bool = False,
    ) -> None:
        if chunk_tokens < 1:
            raise ArgumentError("chunk_tokens must be >= 1")
        if keep < 1:
            raise ArgumentError("keep must be at least 1")
        if dedup not in ("global", "session"):
            raise ArgumentError("dedup must be 'global' or 'session'")
        self.root = Path(root)
        self.chunk_tokens = chunk_tokens
        self.codec = (
            codec if codec is not None else (CHUNK_CODEC if level is None else Codec(level=level))
        )
        self.keep = keep
        self.dedup = dedup
        self.readonly = readonly
        #: other nodes write this store's sessions too (:meth:`refresh_session` on takeover)
        self.shared = shared
        self.threads = threads if threads > 0 else max(1, min(4, (os.cpu_count() or 1) - 1))
        self.blobs: BlobStore = (
            blobs if blobs is not None else LocalBlobStore(self.root, readonly=readonly, lock=lock)
        )
        self._closed = False
        self.index = ChunkIndex(shared=shared)
        self._writer = ChunkWriter(
            self.blobs,
            self.index,
            chunk_tokens=chunk_tokens,
            codec=self.codec,
            keep=keep,
            dedup=dedup,
            collect_garbage=self.collect_garbage,
        )
        # a store with a round trip per read gets that many reads in flight (they wait on
        # the network, not on a core)
        readers = max(self.threads, self.blobs.fetch_ahead)
        self._reader = ChunkReader(self.blobs, threads=readers, quarantine=self._quarantine)
        try:
            self.reload()
        except BaseException:
            self.blobs.close()
            raise

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the decode workers and release the lock; safe to call twice."""
        self._closed = True
        self._reader.close()
        self.blobs.close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"chunk store {self.root} was opened read-only")
        if self._closed:
            raise ClosedError(f"chunk store {self.root} is closed")

    # -- layout (the local store's) ---------------------------------------------------------------

    def _local(self) -> LocalBlobStore:
        if not isinstance(self.blobs, LocalBlobStore):
            raise ArgumentError("this chunk store does not keep its files in a local directory")
        return self.blobs

    @property
    def chunk_dir(self) -> Path:
        """``<root>/chunks``."""
        return self._local().chunk_dir

    @property
    def manifest_dir(self) -> Path:
        """``<root>/manifests``."""
        return self._local().manifest_dir

    def chunk_path(self, key: str) -> Path:
        """Where chunk ``key`` lives."""
        return self._local().path(key)

    def sessions(self) -> list[str]:
        """Session ids that have manifests, sorted."""
        return self.blobs.sessions()

    # -- index ----------------------------------------------------------------------------------

    def reload(self) -> None:
        """Scan the store again: chunk headers (sizes) and manifests (references).

        The store does this once, at open; a caller that changed files behind its back (a
        benchmark removing its newest manifest to repeat a checkpoint) calls it after.

        A store other nodes write too (``shared``) knows only the chunks its manifests name,
        with the sizes the manifests record: nothing is downloaded but the manifests, and a
        chunk another node has put for a manifest it has not switched yet is never taken for
        garbage here.
        """
        sizes: dict[str, tuple[int, int]] = {}
        for key in () if self.shared else self.blobs.list_keys():
            try:
                header = snapshot_mod.header_from_buffer(
                    self.blobs.get(key), source=self.blobs.describe(key)
                )
            except (CorruptSnapshotError, UnsupportedVersionError, OSError) as exc:
                logger.warning("chunk %s is unreadable (%s); it counts as absent", key, exc)
                continue
            sizes[key] = (header.raw_size, header.file_size)
        refs: dict[str, dict[int, frozenset[str]]] = {}
        for session in self.sessions():
            for generation in self.blobs.generations(session):
                try:
                    man = self.read_manifest(session, generation)
                except (CorruptSnapshotError, OSError):
                    refs.setdefault(session, {})[generation] = frozenset()  # number reserved
                    continue
                refs.setdefault(session, {})[generation] = man.keys
                if self.shared:
                    for ref in man.refs:
                        sizes.setdefault(ref.key, (ref.raw_size, ref.file_size))
        self.index.replace(sizes, refs)

    def refresh_session(self, session_id: str) -> None:
        """Read the session's manifests again, for a store other nodes write too: before a
        node serves a session it took over, its index must name every chunk the session's
        live manifests reference, or its garbage collection could delete one."""
        refs: dict[int, frozenset[str]] = {}
        sizes: dict[str, tuple[int, int]] = {}
        for generation in self.blobs.generations(validate_session_id(session_id)):
            try:
                man = self.read_manifest(session_id, generation)
            except (CorruptSnapshotError, OSError):
                refs[generation] = frozenset()  # its generation stays reserved
                continue
            refs[generation] = man.keys
            for ref in man.refs:  # stored by the other node: no need to put them again
                sizes.setdefault(ref.key, (ref.raw_size, ref.file_size))
        self.index.replace_session(session_id, refs, sizes)

    def read_manifest(self, session_id: str, generation: int) -> Manifest:
        """Read and check one manifest (:class:`CorruptSnapshotError`, ``what="manifest"``)."""
        source = self.blobs.describe_manifest(session_id, generation)
        try:
            data = self.blobs.get_manifest(
                session_id, generation, MANIFEST_HEADER_LEN + MAX_MANIFEST_BODY
            )
        except ValueError as exc:
            raise CorruptSnapshotError(
                "file_size", str(exc), source=source, what="manifest"
            ) from None
        man = Manifest.from_bytes(data, source=source)
        if man.generation != generation:
            raise CorruptSnapshotError(
                "generation", "file name and body disagree", source=source, what="manifest"
            )
        if man.session_id != session_id:
            raise CorruptSnapshotError(
                "session_id", "directory and body disagree", source=source, what="manifest"
            )
        return man

    # -- capture (caller thread) and commit (any thread) ------------------------------------------

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
        ``scratch_seq`` (which must be empty and is left empty); when most of the sequence is
        new (a first save), one ``seq_state_get`` of it is kept instead and the commit cuts
        the chunks out of it (:class:`runtime.snapshot.layout.StateSlice`). Nothing is
        compressed or written, and no file is touched. Pass the result to :meth:`commit` (any
        thread), or to :meth:`discard` if it will not be committed.
        """
        self._require_writable()
        return self._writer.plan(
            ctx,
            seq_id,
            tokens,
            scratch_seq=scratch_seq,
            session_id=session_id,
            journal_seq=journal_seq,
            meta=meta,
            lineage=lineage,
        )

    def discard(self, pending: PendingCheckpoint) -> None:
        """Drop a planned checkpoint without committing it (releases its pins)."""
        self._writer.discard(pending)

    def commit(self, pending: PendingCheckpoint) -> Manifest:
        """ANY THREAD: write the new chunks, then the manifest, then collect garbage.

        The new chunks are encoded and stored in one :meth:`BlobStore.put_all` (the local
        store fsyncs one chunk file while it writes the next); the manifest is switched only
        after every chunk it names is durable; old manifests beyond ``keep`` and chunks no
        manifest references are deleted only after that. Never touches a llama.cpp context. On any
        error nothing that an existing manifest references is touched, and :class:`OSError`
        propagates.
        """
        self._require_writable()
        return self._writer.commit(pending)

    def collect_garbage(self) -> list[str]:
        """Delete chunks that no manifest and no pending checkpoint references.

        Only ever called after a manifest switch is durable, so a crash at any point leaves
        every chunk a manifest names in place (at worst, orphans that the next call removes).
        """
        self._require_writable()
        with self.index.lock:  # held across the deletes: a plan must not see a chunk going
            removed = self.index.garbage()
            for key in removed:
                self.blobs.delete(key)
            self.index.collected(removed)
        self.blobs.sync_deletes(removed)
        return removed

    # -- reading ----------------------------------------------------------------------------------

    def manifests(self, session_id: str, *, strict: bool = False) -> list[Manifest]:
        """The session's readable manifests, newest first (damaged ones are quarantined).

        A manifest the store cannot reach now is skipped (a resume replays the journal
        instead), unless ``strict``: then its :class:`runtime.errors.PersistError` is raised
        (a caller with nothing else to rebuild from says "retry", not "lost")."""
        out = []
        for generation in self.blobs.generations(validate_session_id(session_id)):
            try:
                out.append(self.read_manifest(session_id, generation))
            except CorruptSnapshotError as exc:
                logger.warning("skipping damaged manifest: %s", exc)
                if not self.readonly and not self._closed:
                    self.blobs.quarantine_manifest(session_id, generation, f"{exc.field}: {exc}")
                    # keep the generation number reserved so a new manifest never reuses it
                    self.index.add_manifest(session_id, generation, frozenset())
            except FileNotFoundError as exc:
                if strict and isinstance(exc.__cause__, PersistError):
                    raise exc.__cause__ from exc
                continue
        return out

    def latest(self, session_id: str) -> Manifest | None:
        """The session's newest readable manifest (its chunks are checked at restore)."""
        found = self.manifests(session_id)
        return found[0] if found else None

    def _quarantine(self, key: str, reason: str) -> None:
        if self.readonly or self._closed:
            return
        self.index.forget_chunk(key)  # the next checkpoint copies it again
        self.blobs.quarantine(key, reason)

    def load_chunk(self, manifest: Manifest, ref: Any) -> Any:
        """Read, verify and decode one chunk of ``manifest`` (a profiler's stage of
        :meth:`restore`; never touches a context)."""
        return self._reader.load_chunk(manifest, ref)

    def restore(
        self,
        ctx: Context,
        manifest: Manifest,
        seq_id: int,
        *,
        scratch_seq: int,
        allow_build_mismatch: bool = False,
    ) -> list[int]:
        """CALLER THREAD: rebuild ``seq_id`` from ``manifest``; return its token ids (see
        :meth:`runtime.chunks.restore.ChunkReader.restore`)."""
        return self._reader.restore(
            ctx,
            manifest,
            seq_id,
            scratch_seq=scratch_seq,
            allow_build_mismatch=allow_build_mismatch,
        )

    def restore_latest(
        self,
        ctx: Context,
        session_id: str,
        seq_id: int,
        *,
        scratch_seq: int,
        allow_build_mismatch: bool = False,
    ) -> Manifest | None:
        """Restore the newest manifest that restores, falling back to older ones on a
        missing or damaged chunk; None (``seq_id`` empty) when none does."""
        for man in self.manifests(session_id):
            try:
                self.restore(
                    ctx,
                    man,
                    seq_id,
                    scratch_seq=scratch_seq,
                    allow_build_mismatch=allow_build_mismatch,
                )
            except ChunkError as exc:
                logger.warning(
                    "session %s: manifest %d does not restore (%s); trying an older one",
                    session_id,
                    man.generation,
                    exc,
                )
                continue
            return man
        return None

    # -- maintenance ------------------------------------------------------------------------------

    def delete_session(self, session_id: str) -> None:
        """Delete the session's manifests, then the chunks nothing else references.

        Nothing is followed: a symlink in place of the session's directory is removed itself,
        and a link inside it is unlinked, never entered.
        """
        self._require_writable()
        validate_session_id(session_id)
        with self._writer.commit_lock:
            self.blobs.delete_session(session_id)
            self.index.forget_session(session_id)
            self.collect_garbage()

    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check every manifest, every chunk and every reference (works read-only).

        ``deep`` also decodes every chunk (zstd's checks; a stored chunk has only its
        digests), rather than checking headers and digests only.
        Orphans (chunks no manifest names) are listed, not treated as damage.
        """
        return verify_store(self.blobs, self.read_manifest, deep=deep)

    def stats(self) -> dict[str, int]:
        """Bytes on disk, logical bytes of every session's newest manifest, dedup savings.

        ``chunk_bytes``: chunk files on disk; ``logical_bytes``: the sum over sessions of
        their newest manifest's chunk file sizes (what separate snapshots would store);
        ``dedup_saved_bytes``: the newest manifests' bytes that shared chunks save;
        ``written_bytes``/``written_files``/``gc_files``: counters since open.
        """
        return self.index.stats()
