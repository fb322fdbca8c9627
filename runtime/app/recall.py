"""Long-term memory inside the runtime: retrieval for a prompt, ingestion of the journal
behind a watermark, and the remember/search/forget/embed API."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.fsutil import (
    atomic_write_bytes,
)
from runtime.journal import (
    JournalCompacted,
)
from runtime.layout import validate_session_id
from runtime.session import JOURNAL_DIR, Session

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from runtime.longterm import Hit

from runtime.app.options import (
    MARK_EVERY,
    MAX_EMBED_TEXTS,
    MemoryUsed,
    _check_text,
    _int_field,
    _RuntimeState,
)
from runtime.errors import RuntimeArgumentError

logger = logging.getLogger(__name__)


class _RecallMixin(_RuntimeState):
    """Long-term memory (part of :class:`Runtime`)."""

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
