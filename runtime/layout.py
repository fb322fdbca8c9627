"""The data directory's layout: the names that become part of a path, and how they are checked."""

from __future__ import annotations

import re

from runtime.errors import InvalidNameError

#: Name of the directories that receive damaged files moved aside (never a session id).
QUARANTINE_DIR = "quarantine"

_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it is safe as a directory name, else raise InvalidNameError.

    Allowed: 1-128 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit, so no
    path separators, no ``..``, no hidden names and nothing the stores use themselves.
    """
    if not isinstance(session_id, str) or not _SESSION_RE.fullmatch(session_id):
        raise InvalidNameError(
            f"invalid session id {session_id!r}: use 1-128 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    if ".." in session_id or session_id == QUARANTINE_DIR:
        raise InvalidNameError(f"invalid session id {session_id!r}: reserved or path-like")
    return session_id
