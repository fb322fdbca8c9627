"""The data directory's layout, in one place, and the rule for the names in it.

A runtime's data directory holds::

    <root>/runtime.lock            the holder's pid (flock: one process at a time)
    <root>/stats.json              what the running runtime last published
    <root>/journals/<id>.log       each session's journal (the truth), with its sealed
                                   segments
    <root>/kv/                     chunked KV checkpoints (:mod:`runtime.chunks`)
    <root>/longterm/               long-term memory (:mod:`runtime.longterm`)
    <root>/longterm-shared/        with ``db=``: this node's replica of the shared memory
                                   (:mod:`runtime.longterm.replica`; derived, rebuilt if lost)

Every name a module uses for these comes from here, so that moving a directory is a change
of one line. Session ids become file and directory names under it, so each one is checked
by :func:`validate_session_id` before it touches the disk.

Tenants share one directory through their session ids: ``<tenant>~<id>`` is session ``<id>``
of tenant ``<tenant>`` (:func:`tenant_session`), and ``<tenant>~`` (:func:`tenant_root`) is
the tenant's own scope of long-term memory, the "global" memories of its sessions. An id
without ``~`` belongs to no tenant, as before, and its global memories are those stored
without a session. ``~`` appears nowhere else in a valid id, so a tenant's ids can never
name another tenant's.
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
    "SHARED_LONGTERM_DIR",
    "STATS_FILE",
    "TENANT_SEP",
    "ephemeral_id",
    "is_ephemeral",
    "journal_path",
    "local_id",
    "memory_scope",
    "tenant_of",
    "tenant_root",
    "tenant_session",
    "validate_session_id",
    "validate_tenant",
]

LOCK_NAME = "runtime.lock"
STATS_FILE = "stats.json"
JOURNAL_DIR = "journals"
CHUNK_DIR = "kv"
LONGTERM_DIR = "longterm"
SHARED_LONGTERM_DIR = "longterm-shared"
#: where damaged files are moved aside; never a session id
QUARANTINE_DIR = "quarantine"

_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Between a tenant's name and its session's id (``acme~alice``); in no other place of an id.
TENANT_SEP = "~"
#: The ids of ephemeral sessions (a stateless server request's, deleted after its reply and
#: at the server's start): ``_tmp-`` and 32 hex digits. A user's id starts with a letter or
#: digit, so none is one of these by accident (the server refuses the form from a client;
#: a library caller who passes one asks for an ephemeral session).
_EPHEMERAL_RE = re.compile(r"_tmp-[0-9a-f]{32}")


def ephemeral_id(tenant: str | None = None) -> str:
    """A fresh ephemeral session id (:func:`is_ephemeral`), of ``tenant`` when given."""
    import uuid

    local = f"_tmp-{uuid.uuid4().hex}"
    return local if tenant is None else tenant_session(tenant, local)


def is_ephemeral(session_id: str) -> bool:
    """Whether ``session_id`` names an ephemeral session (never a user's), a tenant's too."""
    tenant, sep, local = session_id.rpartition(TENANT_SEP)
    if sep and not _TENANT_RE.fullmatch(tenant):
        return False
    return bool(_EPHEMERAL_RE.fullmatch(local))


def validate_tenant(tenant: str) -> str:
    """Return ``tenant`` if it is a valid tenant name (1-64 characters from
    ``[A-Za-z0-9._-]``, starting with a letter or digit), else raise
    :class:`runtime.errors.InvalidNameError`."""
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant) or ".." in tenant:
        raise InvalidNameError(
            f"invalid tenant {tenant!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return tenant


def tenant_session(tenant: str | None, session_id: str) -> str:
    """The runtime's id of ``tenant``'s session ``session_id`` (itself when no tenant)."""
    if tenant is None:
        return session_id
    return f"{validate_tenant(tenant)}{TENANT_SEP}{session_id}"


def tenant_of(session_id: str) -> str | None:
    """The tenant a session id (or a tenant root) belongs to; ``None`` for none."""
    tenant, sep, _ = session_id.partition(TENANT_SEP)
    return tenant if sep else None


def local_id(session_id: str) -> str:
    """A session id as its tenant knows it (``acme~alice`` -> ``alice``; a tenant root
    ``acme~`` -> ``""``)."""
    tenant, sep, local = session_id.partition(TENANT_SEP)
    return local if sep else tenant


def memory_scope(session: str | None, tenant: str | None) -> str | None:
    """The ``session`` of a memory stored or searched for ``session`` and ``tenant``: the
    session (which must be the tenant's), the tenant's root, or ``None`` (global)."""
    if tenant is not None:
        validate_tenant(tenant)
    if session is None:
        return tenant_root(tenant) if tenant is not None else None
    validate_session_id(session)
    if tenant is not None and tenant_of(session) != tenant:
        raise InvalidNameError(f"session {session!r} is not a session of tenant {tenant!r}")
    return session


def tenant_root(tenant: str) -> str:
    """Where ``tenant``'s own long-term memories are kept (``acme~``): the memories every
    session of the tenant sees, and no other tenant's. Never a session."""
    return f"{validate_tenant(tenant)}{TENANT_SEP}"


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it is safe as a file or directory name, else raise
    :class:`runtime.errors.InvalidNameError`.

    Allowed: 1-128 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit, so no
    path separators, no ``..``, no hidden names and nothing the stores use themselves; the
    ephemeral ids (:func:`ephemeral_id`), which no user id can be; and either of those after
    a tenant's name and ``~`` (:func:`tenant_session`).
    """
    if isinstance(session_id, str) and is_ephemeral(session_id):
        return session_id
    if isinstance(session_id, str) and TENANT_SEP in session_id:
        tenant, _, local = session_id.partition(TENANT_SEP)
        try:
            validate_tenant(tenant)
            if TENANT_SEP in local:
                raise InvalidNameError("two tenants")
            validate_session_id(local)
        except InvalidNameError:
            raise InvalidNameError(
                f"invalid session id {session_id!r}: a tenant's session is <tenant>~<id>, "
                "both from [A-Za-z0-9._-] and starting with a letter or digit"
            ) from None
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
