"""Small helpers shared by llamaffi and the runtime built on it (defined here once).

``llamaffi`` knows nothing of the runtime, so the helpers both need live at this end of the
dependency; :mod:`runtime.fsutil` re-exports them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: Read size for hashing: large enough that a multi-GB GGUF costs few system calls.
HASH_BLOCK = 1 << 22


def cache_root() -> Path:
    """``$LLAMAFFI_CACHE``, else ``$XDG_CACHE_HOME/llamaffi``, else ``~/.cache/llamaffi``.

    An empty variable counts as unset. Fingerprints of model files, exported embedders and
    generated test models all live under it.
    """
    override = os.environ.get("LLAMAFFI_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "llamaffi"


def sha256_fd(fd: int, size: int | None = None, *, block: int = HASH_BLOCK) -> bytes:
    """sha256 digest of the first ``size`` bytes of an open file (all of it when ``None``).

    Reads with ``os.pread``, so the descriptor's offset does not move, and hashing the
    descriptor that is then used means the file cannot be swapped between check and use.
    A file shorter than ``size`` is hashed up to its end.
    """
    h = hashlib.sha256()
    offset = 0
    while size is None or offset < size:
        want = block if size is None else min(block, size - offset)
        chunk = os.pread(fd, want, offset)
        if not chunk:
            break
        h.update(chunk)
        offset += len(chunk)
    return h.digest()


def sha256_file(path: str | os.PathLike[str], chunk: int = HASH_BLOCK) -> str:
    """Hex sha256 of the whole file at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sha256_fd(fd, block=chunk).hex()
    finally:
        os.close(fd)
