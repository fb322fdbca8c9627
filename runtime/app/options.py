"""What a runtime is opened with and what a turn returns: names on disk, defaults,
argument checks, :class:`Sampling`, :class:`Reply` and the state its parts share."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.checkpoint import CheckpointPolicy, CheckpointWriter
from runtime.chunks import ChunkStore
from runtime.errors import RuntimeArgumentError
from runtime.session import ResumeReport, Session, SessionPool
from runtime.template import ChatFormat

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from llamaffi import Context, Model
    from runtime.embed import TextEmbedder
    from runtime.longterm import MemoryStore

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
        #: the inner embedder's stats for the last call (None when every text was cached,
        #: so nothing new was truncated), read by the store's truncation warning
        self.last_stats: object | None = None

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def max_length(self) -> int | None:
        """The inner embedder's token limit, if it has one (for truncation warnings)."""
        return getattr(self.inner, "max_length", None)

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        import numpy as np

        with self._lock:  # one embed at a time: the cache cannot change under a call
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
            fresh: dict[str, Any] = {}
            self.last_stats = None
            if missing:
                fresh = dict(zip(missing, self.inner.embed(missing), strict=True))
                self.last_stats = getattr(self.inner, "last_stats", None)
            rows = [fresh[t] if t in fresh else self._cache[t] for t in texts]
            for text, vec in fresh.items():
                self._cache[text] = vec
            for t in texts:
                self._cache.move_to_end(t)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return np.stack(rows).astype(np.float32, copy=False)


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


class _RuntimeState:
    """The state :class:`Runtime` keeps, shared by its parts (turns, long-term memory, stats),
    and the steps of the facade they call."""

    root: Path
    model: Model
    model_name: str
    ctx: Context
    format: ChatFormat
    pool: SessionPool
    chunks: ChunkStore | None
    memory: MemoryStore | None
    policy: CheckpointPolicy
    sampling: Sampling
    system_prompt: str | None
    memory_k: int
    min_similarity: float
    dedup_similarity: float
    journal_retention: str
    journal_bytes_compacted: int
    scratch_seq: int
    _lock: threading.RLock
    _writer: CheckpointWriter | None
    _embedder: _CachedEmbedder | None
    _retrieval_ms: deque[float]
    _turn_ms: deque[float]
    _turns: int
    _checked: set[str]
    _marks: dict[str, int]
    _written_marks: dict[str, int]
    _ingest_failures: int
    _stats_key: tuple[int, ...]
    _opened: float
    _last_stats_write: float

    def _require_open(self) -> None:
        raise NotImplementedError

    def _session(self, session_id: str) -> tuple[Session, ResumeReport | None]:
        raise NotImplementedError

    def _retrieve(self, session: Session, text: str) -> list[MemoryUsed]:
        raise NotImplementedError

    def _safe_ingest(self, session: Session) -> None:
        raise NotImplementedError
