"""Catching long-term memory up with a session's journal (the function form; the runtime
keeps its own watermark)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from runtime.fsutil import atomic_write_bytes
from runtime.journal import Entry

if TYPE_CHECKING:
    from runtime.longterm import MemoryStore


from runtime.session.session import Session

logger = logging.getLogger(__name__)


def sync_longterm(
    session: Session,
    memory: MemoryStore,
    *,
    roles: Sequence[str] = ("user",),
    importance: float = 0.5,
) -> int:
    """Add the session's journal entries that long-term memory does not have yet.

    The journal is the truth for both memories: a crash between a journal append and the
    matching :meth:`MemoryStore.add` is repaired here. A watermark file
    (``journals/<id>.ingested``, the last journal seq ingested) keeps this cheap; the one entry
    that may have been added just before a crash is looked up exactly (by its ``journal_seq``
    meta) instead of being added twice. An entry's ``meta["importance"]`` overrides ``importance``.
    Returns how many entries were added.
    """
    mark_path = session.journal.path.with_suffix(".ingested")
    try:
        mark = int(mark_path.read_text())
    except (OSError, ValueError):
        mark = -1
    added = 0
    first = True
    for entry in session.journal:
        if entry.seq <= mark:
            continue
        wanted = entry.role in roles and entry.text.strip()
        # Only the first entry past the mark can already be in the store (a crash between
        # its add and the mark update); every later one is known to be missing.
        uncertain, first = first, False
        if wanted and not (uncertain and _already_ingested(memory, session.session_id, entry)):
            memory.add(
                entry.text,
                kind="turn",
                session=session.session_id,
                importance=float(entry.meta.get("importance", importance)),
                meta={"journal_seq": entry.seq, "role": entry.role},
                now=entry.created,
            )
            added += 1
        atomic_write_bytes(mark_path, f"{entry.seq}\n".encode())
        mark = entry.seq
    return added


def _already_ingested(memory: MemoryStore, session_id: str, entry: Entry) -> bool:
    return bool(memory.find(session=session_id, meta_key="journal_seq", value=entry.seq))
