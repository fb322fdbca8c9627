"""Where a :class:`runtime.Runtime`'s parts are built: the model and its context, then every
part, each from the :class:`~runtime.app.options.RuntimeConfig` fields it needs and the other
parts it is given (never the runtime itself). One place, so a reader sees what each part may
touch; the exit stack closes them in reverse order."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.app.batching import Batcher, RuntimeLock
from runtime.app.conversation import Conversation
from runtime.app.housekeeper import Housekeeper, Retention
from runtime.app.options import RuntimeConfig
from runtime.app.recall import Recall
from runtime.app.sessions import Sessions
from runtime.app.stats import Stats
from runtime.app.turn import TurnEngine
from runtime.arguments import Sampling
from runtime.chunks import ChunkStore
from runtime.fsutil import DirLock, warn_if_exposed
from runtime.layout import CHUNK_DIR, LOCK_NAME, LONGTERM_DIR, SHARED_LONGTERM_DIR
from runtime.session import SessionPool
from runtime.session.checkpointer import CheckpointWriter
from runtime.storage import LocalJournals
from runtime.template import ChatFormat

if TYPE_CHECKING:
    from llamaffi import Context, Model
    from runtime.storage import BlobStore, JournalStore, MemoryLog
    from runtime.storage.leases import Leases

__all__ = ["Parts", "open_parts"]

#: Tokens the model may answer a distiller's question with (facts as JSON, a summary).
ASK_MAX_TOKENS = 192


@dataclass(frozen=True)
class Parts:
    """A runtime's parts; ``stack`` closes them, the model and the directory lock."""

    stack: contextlib.ExitStack
    leases: Leases | None  # with a shared database: this node's session leases
    model: Model
    ctx: Context
    model_name: str
    sampling: Sampling  # the default, checked against the context
    scratch_seq: int  # the sequence the pool never uses: probes and stateless work
    chunks: ChunkStore
    pool: SessionPool
    recall: Recall
    turns: TurnEngine
    retention: Retention
    stats: Stats
    sessions: Sessions
    housekeeper: Housekeeper
    batcher: Batcher
    conversation: Conversation


def open_parts(
    cfg: RuntimeConfig, root: Path, *, lock: RuntimeLock, say: Callable[[str], None]
) -> Parts:
    """Lock the data directory ``root`` (:class:`~runtime.errors.LockedError` when another
    process has it), then load the model and build every part; on a failure, whatever was
    opened is closed again."""
    created = not root.exists()
    dir_lock = DirLock(root, LOCK_NAME).acquire()  # makes the directory (0700) if needed
    warn_if_exposed(root)
    stack = contextlib.ExitStack()
    stack.callback(dir_lock.release)
    failed = False

    def remove_if_new() -> None:
        # a failed open leaves no directory it made (a bad model, say), if it holds nothing
        # but the lock; done before the lock is released (another process may take it then),
        # and never instead of the error that failed the open. Only the leaf goes.
        if failed and created:
            with contextlib.suppress(OSError):
                if {p.name for p in root.iterdir()} <= {LOCK_NAME}:
                    (root / LOCK_NAME).unlink()
                    root.rmdir()

    stack.callback(remove_if_new)  # runs before the release (last in, first out)
    try:
        model, ctx, model_name, chat_format = open_model(cfg, stack, say)
        sampling = cfg.sampling.check(ctx.n_ctx)
        return build_parts(
            cfg, root, model, model_name, ctx, chat_format, sampling, lock=lock, stack=stack,
            say=say,
        )  # fmt: skip
    except BaseException:
        failed = True
        stack.close()
        raise


def open_model(
    cfg: RuntimeConfig, stack: contextlib.ExitStack, say: Callable[[str], None]
) -> tuple[Model, Context, str, ChatFormat]:
    """The model (checked against its pin), its context and chat format; closed by ``stack``."""
    from llamaffi import Model
    from runtime.models import resolve_model, verify_pinned

    spec = resolve_model(cfg.model)
    say(f"loading model {spec.name} ({spec.path})")
    start = time.perf_counter()
    model = stack.enter_context(Model(spec.path))
    verify_pinned(spec, model)
    chat_format = ChatFormat.for_model(model)
    ctx = stack.enter_context(
        model.context(
            n_ctx=cfg.n_ctx,
            n_batch=cfg.n_batch,
            n_seq_max=cfg.max_resident + 1,  # one more: the scratch sequence
            n_threads=cfg.n_threads,
            type_k=cfg.kv_type,
            type_v=cfg.kv_type,
            flash_attn=cfg.flash_attn,
        )
    )
    say(
        f"model loaded in {time.perf_counter() - start:.1f} s: {model.desc}, "
        f"chat template {chat_format.name}, n_ctx={ctx.n_ctx}"
    )
    return model, ctx, spec.name, chat_format


@dataclass(frozen=True)
class Storage:
    """Where the journals and the KV checkpoints live (the data directory, or the servers of
    ``db=`` and ``kv=``)."""

    journals: JournalStore
    blobs: BlobStore | None  # None: the local chunk directory
    leases: Leases | None
    shared_kv: bool  # blobs other nodes use too
    memory_log: MemoryLog | None = None  # the long-term memory every node replicates


def open_storage(cfg: RuntimeConfig, root: Path, stack: contextlib.ExitStack) -> Storage:
    """The journal store and blob store ``cfg`` names (closed by ``stack``): PostgreSQL for
    ``db`` (journals, leases, manifest pointers), S3 for ``kv``, else the data directory."""
    if cfg.db is None:
        journals: JournalStore = LocalJournals(
            root, fsync=cfg.journal_fsync, segment_entries=cfg.journal_segment_entries
        )
        leases = None
        memory_log: MemoryLog | None = None
    else:
        from runtime.storage.leases import Leases, default_node_id
        from runtime.storage.pgdb import PgDatabase
        from runtime.storage.postgres import PgJournals

        db = PgDatabase(cfg.db)
        stack.callback(db.close)
        node = cfg.node_id or default_node_id()
        leases = Leases(db, node, address=cfg.advertise_url, ttl_s=cfg.lease_ttl_s)
        stack.callback(leases.close)
        journals = PgJournals(db, leases, segment_entries=cfg.journal_segment_entries)
        from runtime.storage.pgmemory import PgMemoryLog

        memory_log = PgMemoryLog(db, node, leases)
    blobs: BlobStore | None = None
    if cfg.kv is not None:
        from runtime.storage.s3 import S3BlobStore

        blobs = S3BlobStore(cfg.kv)
        if leases is not None:
            from runtime.storage.leases import PointerBlobs

            blobs = PointerBlobs(blobs, leases.db, leases)
    return Storage(journals, blobs, leases, shared_kv=blobs is not None, memory_log=memory_log)


def build_parts(
    cfg: RuntimeConfig,
    root: Path,
    model: Model,
    model_name: str,
    ctx: Context,
    chat_format: ChatFormat,
    sampling: Sampling,
    *,
    lock: RuntimeLock,
    stack: contextlib.ExitStack,
    say: Callable[[str], None],
) -> Parts:
    """Every part, each given what it needs; ``stack`` closes them in reverse order (memory,
    then the pool's final checkpoints, then the writer that writes them)."""
    scratch_seq = cfg.max_resident
    batcher = Batcher(ctx, lock)
    storage = open_storage(cfg, root, stack)
    journals = storage.journals
    writer = CheckpointWriter() if cfg.checkpoint.background else None
    if writer is not None:
        stack.callback(writer.close)
    # the runtime's directory lock covers the chunk store too
    chunks = ChunkStore(
        root / CHUNK_DIR,
        chunk_tokens=cfg.chunk_tokens,
        keep=cfg.keep_snapshots,
        lock=False,
        blobs=storage.blobs,
        # shared by nodes: a session's chunks are its own, so only its lease holder's
        # garbage collection can ever drop them
        dedup="session" if storage.shared_kv else "global",
        shared=storage.shared_kv,
    )
    pool = SessionPool(
        ctx,
        journals,
        n_seq=cfg.max_resident,
        policy=cfg.checkpoint,
        writer=writer,
        chunks=chunks,
        scratch_seq=scratch_seq,
        busy=batcher.is_busy,
        wait=batcher.wait,
    )
    stack.callback(pool.close)
    turns = TurnEngine(model, ctx.n_ctx, chat_format, cfg.system_prompt, batcher)

    def ask(instructions: str, text: str) -> str:  # on the scratch sequence, under the lock
        return turns.ask(ctx, scratch_seq, instructions, text, max_tokens=ASK_MAX_TOKENS)

    recall = Recall.open(
        root / (LONGTERM_DIR if storage.memory_log is None else SHARED_LONGTERM_DIR),
        cfg.embedder,
        say=say,
        memory_k=cfg.memory_k,
        min_similarity=cfg.min_similarity,
        dedup_similarity=cfg.dedup_similarity,
        max_items=cfg.max_items,
        ask_facts=ask if cfg.extract == "llm" else None,
        ask_summary=ask if cfg.summarize == "llm" else None,
        shared=storage.memory_log,
    )
    stack.callback(recall.close)
    retention = Retention(cfg.journal_retention, recall)
    sessions = Sessions(
        journals,
        pool,
        chunks,
        writer,
        recall,
        retention,
        max_sessions=cfg.max_sessions,
        leases=storage.leases,
        say=say,
    )
    conversation = Conversation(sessions, recall, turns, batcher)
    stats = Stats(
        root,
        journals=journals,
        model_name=model_name,
        model=model,
        template=chat_format.name,
        ctx=ctx,
        pool=pool,
        writer=writer,
        chunks=chunks,
        recall=recall,
        retention=retention,
        batcher=batcher,
        conversation=conversation,
    )
    ttl = cfg.session_ttl_s
    housekeeper = Housekeeper(
        lock,
        pool,
        retention,
        stats.publish,
        consolidate=recall.consolidate,
        idle_checkpoint_s=cfg.checkpoint.idle_seconds,
        idle_suspend_s=cfg.idle_suspend_s,
        busy=batcher.is_busy,
        expire=(lambda: sessions.expire(ttl, batcher.is_busy)) if ttl else None,
        expire_every_s=min(60.0, ttl / 4) if ttl else 60.0,
    )
    return Parts(
        stack=stack,
        leases=storage.leases,
        model=model,
        ctx=ctx,
        model_name=model_name,
        sampling=sampling,
        scratch_seq=scratch_seq,
        chunks=chunks,
        pool=pool,
        recall=recall,
        turns=turns,
        retention=retention,
        stats=stats,
        sessions=sessions,
        housekeeper=housekeeper,
        batcher=batcher,
        conversation=conversation,
    )
