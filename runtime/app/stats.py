"""What a runtime reports: :class:`Stats` (:meth:`Runtime.stats` and the
``stats.json`` it publishes), and :func:`read_stats` for another process."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.app.housekeeper import Retention
from runtime.app.recall import Recall
from runtime.chunks import ChunkStore
from runtime.fsutil import atomic_write_bytes
from runtime.journal import journal_sessions
from runtime.layout import CHUNK_DIR, JOURNAL_DIR, LOCK_NAME, STATS_FILE
from runtime.session import SessionPool
from runtime.session.checkpointer import CheckpointWriter

if TYPE_CHECKING:
    from llamaffi import Context, Model
    from runtime.app.batching import Batcher
    from runtime.app.conversation import Conversation
    from runtime.storage import JournalStore

__all__ = ["Stats", "read_stats"]

logger = logging.getLogger(__name__)


class Stats:
    """The runtime's figures: a read of every part for :meth:`report`, never a part of the
    turn (each part counts its own work; this reads the counts).

    Built with the parts it reads (never changes): the model and its context, the pool, the
    checkpoint writer and chunk store, long-term memory, retention, the batcher and the
    conversation (turns and their times).
    """

    def __init__(
        self,
        root: Path,
        *,
        journals: JournalStore,
        model_name: str,
        model: Model,
        template: str,
        ctx: Context,
        pool: SessionPool,
        writer: CheckpointWriter | None,
        chunks: ChunkStore,
        recall: Recall,
        retention: Retention,
        batcher: Batcher,
        conversation: Conversation,
    ) -> None:
        self._root = root
        self._journals = journals
        self._batcher = batcher
        self._model_name = model_name
        self._model = model
        self._template = template
        self._ctx = ctx
        self._pool = pool
        self._writer = writer
        self._chunks = chunks
        self._recall = recall
        self._retention = retention
        self._conversation = conversation
        self._key: tuple[int, ...] = ()
        self._opened = time.time()
        self._last_write = 0.0

    def report(self) -> dict[str, Any]:
        """Sessions, KV cells, checkpoint and journal bytes, resumes, memory items, latencies."""
        known = self._pool.known()
        resident = self._pool.resident()
        writer = self._writer.stats if self._writer is not None else None
        last = self._pool.last_resume
        chunk_stats = self._chunks.stats()
        return {
            "pid": os.getpid(),
            "updated": time.time(),
            "uptime_s": time.time() - self._opened,
            "model": {
                "name": self._model_name,
                "path": str(self._model.path),
                "template": self._template,
                "n_ctx": self._ctx.n_ctx,
                "kv_type": self._ctx.type_k,
                "flash_attn": self._ctx.flash_attn,
            },
            "sessions": {
                "known": len(known),
                "resident": len(resident),
                "suspended": len(known) - len(resident),
                "max_resident": self._pool.n_seq,
            },
            "kv": {"cells_used": self._pool.used_cells(), "n_ctx": self._ctx.n_ctx},
            # decode steps shared by the sessions generating together, and their widest
            "batching": self._batcher.stats(),
            "snapshots": {
                # a shared (S3) store: the chunks this node's index knows
                "bytes": (
                    chunk_stats["chunk_bytes"]
                    if self._chunks.shared
                    else _du(self._root / CHUNK_DIR)
                ),
                "shared": self._chunks.shared,
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
            "resumes": dict(self._pool.resumes),
            "journal": {
                "where": self._journals.describe(),
                "bytes": self._journals.total_bytes(),
                "retention": self._retention.mode,
                "compacted_bytes": self._retention.bytes_compacted,
            },
            "memory": {
                "items": self._recall.items(),
                "retrieval_p50_ms": _p50(self._recall.retrieval_ms),
            },
            "turns": {
                "count": self._conversation.turns,
                "runtime_p50_ms": _p50(self._conversation.runtime_ms),
            },
        }

    def publish(self, force: bool = False) -> None:
        """Write :meth:`report` to ``stats.json`` (for ``python -m runtime stats``), at most
        every 5 s and only when something changed. Advisory: never fails anything."""
        now = time.monotonic()
        if not force and now - self._last_write < 5.0:
            return
        writer = self._writer.stats if self._writer is not None else None
        key = (
            self._conversation.turns,
            writer.written if writer else 0,
            len(self._pool.resident()),
            sum(self._pool.resumes.values()),
        )
        if not force and key == self._key:
            return  # nothing new: no directory walk, no write
        self._key = key
        self._last_write = now
        try:
            data = json.dumps(self.report(), indent=1, sort_keys=True).encode()
            atomic_write_bytes(self._root / STATS_FILE, data)
        except Exception as exc:  # stats are advisory
            logger.debug("could not write %s: %s", STATS_FILE, exc)


# -- helpers ----------------------------------------------------------------------------------


def _du(path: Path) -> int:
    total = 0
    if not path.is_dir():
        return 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _p50(values: Iterable[float]) -> float | None:
    items = list(values)
    return round(statistics.median(items), 3) if items else None


def read_stats(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``python -m runtime stats`` shows, read-only (works while the runtime runs).

    The running runtime publishes ``stats.json`` every few seconds; sizes on disk are read
    fresh (with ``db=``/``kv=`` the published figures of the database and the bucket are
    kept). ``running`` says whether a process holds the directory's lock now.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    try:
        published: dict[str, Any] = json.loads((root / STATS_FILE).read_text())
    except (OSError, ValueError):
        published = {}
    journals = root / JOURNAL_DIR
    journal = published.setdefault("journal", {})
    where = journal.get("where")
    if where is None or Path(where).resolve() == journals.resolve():  # else: the database's
        published.setdefault("sessions", {})["known"] = len(journal_sessions(journals))
        journal["bytes"] = _du(journals)
    snapshots = published.setdefault("snapshots", {})
    if not snapshots.get("shared"):
        snapshots["bytes"] = _du(root / CHUNK_DIR)
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
