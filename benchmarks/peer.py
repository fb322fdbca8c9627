"""The peer of the KV I/O benchmarks: llama-cpp-python 0.3.36's ``Llama.save_state/load_state``.

Two ways to get it, tried in order:

1. an installed ``llama_cpp`` package of the pinned version (``pip install
   llama-cpp-python==0.3.36``: it builds its own copy of llama.cpp, ~20 minutes on 2 cores);
2. the pure-Python ``llama_cpp/`` package from the pinned sdist that
   ``scripts/fetch_llama_cpp.py`` already downloaded and verified (sha256 checked again here),
   extracted once under ``$LLAMAFFI_CACHE/peer/`` and imported with ``LLAMA_CPP_LIB_PATH``
   pointing at our ``llamaffi/lib/``. That libllama is built from the very same sdist, so this
   is llama-cpp-python's own Python code over an identical C library.

``llama_cpp`` loads only ``libllama`` at import (``libggml`` and ``libmtmd`` are loaded by
modules imported lazily, ``_ggml`` and ``mtmd_cpp``, which the state API never touches). Its
Python dependencies (numpy, typing-extensions, diskcache, jinja2) are the ``bench`` extra.
Anything missing raises :class:`PeerUnavailable` with the reason, and the benchmarks skip.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PEER_VERSION = "0.3.36"
_PACKAGE = "llama_cpp"


class PeerUnavailable(RuntimeError):
    """The peer cannot be imported here; the message says why and what would fix it."""


@dataclass(frozen=True)
class Peer:
    """The imported ``llama_cpp`` package and how it was obtained."""

    module: ModuleType
    variant: str  #: "installed" or "sdist-python-over-llamaffi-lib"
    version: str
    library: str  #: the libllama it loaded


def _fetch_script() -> ModuleType:
    """``scripts/fetch_llama_cpp.py`` as a module (the pin, the cache dir, sha256_of)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("fetch_llama_cpp")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def _installed() -> Peer | None:
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    if version != PEER_VERSION:
        logger.warning("llama-cpp-python %s is installed, not %s: not used", version, PEER_VERSION)
        return None
    module = importlib.import_module(_PACKAGE)
    return Peer(module, "installed", version, str(Path(module.__file__ or "").parent))


def extract_sdist_package() -> Path:
    """Extract ``llama_cpp/`` from the verified pinned sdist; return the directory holding it.

    Idempotent: a stamp names the archive and its sha256, so a later call only checks it.
    """
    fetch = _fetch_script()
    pin = fetch.load_pin()
    if pin["version"] != PEER_VERSION:
        raise PeerUnavailable(f"the pinned sdist is {pin['version']}, the peer is {PEER_VERSION}")
    archive = fetch.cache_dir() / pin["filename"]
    if not archive.is_file():
        raise PeerUnavailable(
            f"the pinned sdist {archive} is not cached; `python scripts/fetch_llama_cpp.py` "
            "downloads it"
        )
    target = archive.parent.parent / "peer" / f"llama_cpp_python-{pin['version']}"
    stamp = target / ".stamp"
    want = f"{pin['filename']} {pin['sha256']}\n"
    if stamp.is_file() and stamp.read_text() == want and (target / _PACKAGE).is_dir():
        return target
    if fetch.sha256_of(archive) != pin["sha256"]:
        raise PeerUnavailable(f"{archive} does not match the pinned sha256 {pin['sha256']}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/{_PACKAGE}/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise PeerUnavailable(f"{archive.name} has no {_PACKAGE}/ package")
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tar.extractall(tmp, members=members, filter="data")
            Path(tmp, top, ".stamp").write_text(want)
            if target.exists():
                import shutil

                shutil.rmtree(target)
            os.replace(Path(tmp, top), target)
    return target


def _from_sdist() -> Peer:
    import llamaffi

    lib_dir = llamaffi.library_path().parent
    target = extract_sdist_package()
    for dep in ("numpy", "typing_extensions", "diskcache", "jinja2"):
        try:
            importlib.import_module(dep)
        except ImportError as exc:
            raise PeerUnavailable(
                f"llama-cpp-python needs {dep}: install the bench extra "
                "(`./dev bench` does, or pip install -e '.[bench]')"
            ) from exc
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    sys.path.insert(0, str(target))
    try:
        module = importlib.import_module(_PACKAGE)
    except Exception as exc:  # a symbol our build lacks, a Python incompatibility, ...
        raise PeerUnavailable(f"importing {target / _PACKAGE} failed: {exc!r}") from exc
    finally:
        sys.path.remove(str(target))
    return Peer(module, "sdist-python-over-llamaffi-lib", PEER_VERSION, str(lib_dir))


def _reinstall_llamaffi_log() -> None:
    """``llama_cpp`` replaces llama.cpp's log callback at import with its own; put ours back
    (llamaffi's router into Python logging), so llamaffi keeps logging as before."""
    with contextlib.suppress(Exception):
        import llamaffi

        llamaffi.install_log_router()


_cache: list[Peer] = []


def load_peer() -> Peer:
    """The peer (imported once per process); raises :class:`PeerUnavailable` with a reason."""
    if _cache:
        return _cache[0]
    import llamaffi

    llamaffi.init_backend()  # llamaffi loads libllama and its backend first
    peer = _installed() or _from_sdist()
    _reinstall_llamaffi_log()
    _cache.append(peer)
    return peer
