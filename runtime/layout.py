"""The data directory's layout, in one place, and the rule for the names in it.

A runtime's data directory holds::

    <root>/runtime.lock            the holder's pid (flock: one process at a time)
    <root>/stats.json              what the running runtime last published
    <root>/journals/<id>.log       each session's journal (the truth), with its sealed
                                   segments and ``<id>.ingested`` (the long-term watermark)
    <root>/kv/                     chunked KV checkpoints (:mod:`runtime.chunks`)
    <root>/longterm/               long-term memory (:mod:`runtime.longterm`)

Every name a module uses for these comes from here, so that moving a directory is a change
of one line. Session ids become file and directory names under it, so each one is checked
by :func:`validate_session_id` before it touches the disk.
"""

from __future__ import annotations

import re
from pathlib import Path

from runtime.errors import InvalidNameError

__all__ = [
    "CHUNK_DIR",
    "JOURNAL_DIR",
    "LOCK_NAME",
    "LONGTERM_DIR",
    "QUARANTINE_DIR",
    "STATS_FILE",
    "ephemeral_id",
    "is_ephemeral",
    "journal_path",
    "validate_session_id",
    "watermark_path",
]

LOCK_NAME = "runtime.lock"
STATS_FILE = "stats.json"
JOURNAL_DIR = "journals"
CHUNK_DIR = "kv"
LONGTERM_DIR = "longterm"
#: where damaged files are moved aside; never a session id
QUARANTINE_DIR = "quarantine"

_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: The ids of ephemeral sessions (a stateless server request's, deleted after its reply and
#: at the server's start): ``_tmp-`` and 32 hex digits. A user's id starts with a letter or
#: digit, so none is one of these by accident (the server refuses the form from a client;
#: a library caller who passes one asks for an ephemeral session).
_EPHEMERAL_RE = re.compile(r"_tmp-[0-9a-f]{32}")


def ephemeral_id() -> str:
    """A fresh ephemeral session id (:func:`is_ephemeral`)."""
    import uuid

    return f"_tmp-{uuid.uuid4().hex}"


def is_ephemeral(session_id: str) -> bool:
    """Whether ``session_id`` names an ephemeral session (never a user's)."""
    return bool(_EPHEMERAL_RE.fullmatch(session_id))


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it is safe as a file or directory name, else raise
    :class:`runtime.errors.InvalidNameError`.

    Allowed: 1-128 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit, so no
    path separators, no ``..``, no hidden names and nothing the stores use themselves; and
    the ephemeral ids (:func:`ephemeral_id`), which no user id can be.
    """
    if isinstance(session_id, str) and is_ephemeral(session_id):
        return session_id
    if not isinstance(session_id, str) or not _SESSION_RE.fullmatch(session_id):
        raise InvalidNameError(
            f"invalid session id {session_id!r}: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    if ".." in session_id or session_id == QUARANTINE_DIR:
        raise InvalidNameError(f"invalid session id {session_id!r}: reserved or path-like")
    return session_id


def journal_path(root: str | Path, session_id: str) -> Path:
    """The active file of a session's journal (``journals/<id>.log``)."""
    return Path(root) / JOURNAL_DIR / f"{validate_session_id(session_id)}.log"


def watermark_path(journal: str | Path) -> Path:
    """The long-term ingestion watermark beside a journal (``journals/<id>.ingested``)."""
    return Path(journal).with_suffix(".ingested")
