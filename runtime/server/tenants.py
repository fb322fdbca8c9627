"""API keys and the tenants they name: who a request is, and the ids it may reach.

A keys file (``runtime serve --api-keys FILE``) holds one key per line::

    # tenant   key (or sha256:<64 hex digits> of the key)
    acme       sk-acme-7f3e...
    acme       sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    globex     sk-globex-01b2...

A tenant may have several keys (to rotate them). A request's key names its tenant, and the
tenant scopes everything the request reaches: its session ids are the tenant's
(``acme~alice`` in the data directory, ``alice`` on the wire; :mod:`runtime.layout`), its
memories without a session are the tenant's own, and listings and searches see only the
tenant's. With a single key (``--api-key-file``) or none, there is one tenant, ``None``,
whose ids are the data directory's own: everything is as without tenants.

Keys are kept as SHA-256 digests only, and a presented key is looked up by its digest, so
the comparison takes the same time whichever key (or none) it matches.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path

from runtime.errors import ArgumentError, InvalidNameError
from runtime.layout import (
    TENANT_SEP,
    local_id,
    tenant_of,
    tenant_root,
    tenant_session,
    validate_tenant,
)
from runtime.server.api_errors import bad_request

__all__ = ["NO_TENANT", "Keys", "inner", "outer", "read_keys"]

_HASHED = re.compile(r"(?i:sha256):([0-9a-fA-F]{64})")
#: The shortest key a keys file may hold (a hashed one is checked by whoever made it).
MIN_KEY_CHARS = 16

#: The tenant of a server with one key or none: the data directory's own ids.
NO_TENANT: str | None = None


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class Keys:
    """The accepted keys and their tenants (by SHA-256 digest)."""

    def __init__(self, pairs: Iterable[tuple[str | None, bytes]]) -> None:
        """``pairs``: (tenant, SHA-256 digest of the key)."""
        self._by_digest: dict[bytes, str | None] = {}
        for tenant, digest in pairs:
            if len(digest) != 32:
                raise ArgumentError("a key digest is 32 bytes (SHA-256)")
            if digest in self._by_digest:
                raise ArgumentError("the same key is given twice")
            self._by_digest[digest] = tenant
        if not self._by_digest:
            raise ArgumentError("no API keys: give at least one")

    @classmethod
    def single(cls, key: str) -> Keys:
        """One key, of no tenant (``--api-key-file``)."""
        if not key.strip():
            raise ArgumentError("api_key is empty: pass a key, or None for no authentication")
        return cls([(NO_TENANT, _digest(key.encode()))])

    @property
    def tenants(self) -> set[str | None]:
        """The tenants the keys name."""
        return set(self._by_digest.values())

    def tenant(self, given: bytes) -> tuple[bool, str | None]:
        """``(True, tenant)`` for an accepted key, ``(False, None)`` for any other."""
        digest = _digest(given)
        for known, tenant in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return True, tenant
        return False, None


def read_keys(path: str | Path) -> Keys:
    """The keys file at ``path`` (see the module's documentation); an :class:`ArgumentError`
    naming the file and line for anything it cannot read."""
    pairs: list[tuple[str | None, bytes]] = []
    names: dict[str, str] = {}  # lower-cased tenant -> as written
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM is not part of a name
    except (OSError, UnicodeDecodeError) as exc:
        raise ArgumentError(f"cannot read the API keys file {path}: {exc}") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ArgumentError(f"{path}:{n}: expected 'tenant key', got {len(fields)} fields")
        tenant, key = fields
        try:
            validate_tenant(tenant)
        except InvalidNameError as exc:
            raise ArgumentError(f"{path}:{n}: {exc}") from None
        # tenants differing in case only would share files on a case-insensitive disk
        if names.setdefault(tenant.lower(), tenant) != tenant:
            raise ArgumentError(
                f"{path}:{n}: tenant {tenant!r} differs from {names[tenant.lower()]!r} only in case"
            )
        hashed = _HASHED.fullmatch(key)
        if key.lower().startswith("sha256:") and hashed is None:
            raise ArgumentError(f"{path}:{n}: a hashed key is sha256: and 64 hex digits")
        if hashed is None and len(key) < MIN_KEY_CHARS:
            raise ArgumentError(f"{path}:{n}: a key has {MIN_KEY_CHARS} characters or more")
        digest = bytes.fromhex(hashed.group(1)) if hashed else _digest(key.encode())
        pairs.append((tenant, digest))
    try:
        return Keys(pairs)
    except ArgumentError as exc:
        raise ArgumentError(f"{path}: {exc}") from None


# -- ids on the wire and in the runtime ----------------------------------------------------------


def inner(tenant: str | None, session_id: str, param: str) -> str:
    """The runtime's id of the tenant's session ``session_id`` (a checked wire id); a 400
    naming ``param`` for an id that names a tenant itself (``~``), when tenants are on."""
    if tenant is not None and TENANT_SEP in session_id:
        raise bad_request(param, f"a session id has no {TENANT_SEP!r} (it names a tenant)")
    return tenant_session(tenant, session_id)


def outer(tenant: str | None, session_id: str | None) -> str | None:
    """A runtime id as the tenant knows it: ``acme~alice`` -> ``alice``; the tenant's own
    memories (``acme~``) -> ``None``, as global ones are."""
    if session_id is None or tenant is None:
        return session_id
    if session_id == tenant_root(tenant):
        return None
    if tenant_of(session_id) != tenant:  # never returned by a scoped call; refuse loudly
        raise ArgumentError(f"{session_id!r} is not one of tenant {tenant!r}'s")
    return local_id(session_id)
