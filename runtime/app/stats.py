"""What a runtime reports: :meth:`Runtime.stats`, the ``stats.json`` it publishes, and
:func:`read_stats` for another process."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.fsutil import (
    atomic_write_bytes,
)
from runtime.journal import (
    journal_sessions,
)
from runtime.session import JOURNAL_DIR

if TYPE_CHECKING:
    pass

from runtime.app.options import (
    CHUNK_DIR,
    LOCK_NAME,
    SNAPSHOT_DIR,
    STATS_FILE,
    _RuntimeState,
)

logger = logging.getLogger(__name__)


class _StatsMixin(_RuntimeState):
    """Stats (part of :class:`Runtime`)."""

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
