"""Find and load libllama (one place, one environment override) and declare C functions.

``LLAMAFFI_LIB`` names a libllama shared library to use instead of the one built into the
package (``llamaffi/lib/``). Its ``libggml*`` siblings are found through its RPATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from llamaffi.errors import LibraryNotFoundError

ENV_LIB = "LLAMAFFI_LIB"
LIB_DIR = Path(__file__).resolve().parent / "lib"
_SUFFIX = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")


def library_path() -> Path:
    """The libllama file that will be (or was) loaded."""
    override = os.environ.get(ENV_LIB)
    if override:
        path = Path(override)
        if not path.is_file():
            raise LibraryNotFoundError(f"{ENV_LIB}={override} does not name a file")
        return path
    path = LIB_DIR / f"libllama{_SUFFIX}"
    if not path.is_file():
        raise LibraryNotFoundError(
            f"libllama is not built: {path} is missing. Build it with `pip install -e .` "
            f"(or `./dev test`), or point {ENV_LIB} at an existing libllama{_SUFFIX}."
        )
    return path


def _load(name: str) -> ctypes.CDLL:
    path = library_path().parent / f"{name}{_SUFFIX}"
    # RTLD_LOCAL (the default): the ggml libraries are shared through libllama's own
    # DT_NEEDED entries; nothing of theirs needs to be global.
    return ctypes.CDLL(str(path))


def _preload_libstdcxx() -> None:
    """Put the system libstdc++ in the global scope first, as a C++ executable would have it.

    A CUDA build's libggml-cuda exports its own instances of libstdc++ templates; loaded
    from Python (a C program), libllama's lookups found those before libstdc++'s and crashed
    in ``llama_model::print_info`` (seen on an H200 with GGML_CUDA=on; LD_PRELOAD of
    libstdc++ fixed it, and so does this).
    """
    if sys.platform.startswith("linux"):
        name = ctypes.util.find_library("stdc++") or "libstdc++.so.6"
        with contextlib.suppress(OSError):  # no libstdc++: nothing to interpose on
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


def build_info() -> dict[str, Any]:
    """What CMake recorded about this build (build number, commit, options), if present."""
    info_file = library_path().parent / "build_info.json"
    try:
        data: dict[str, Any] = json.loads(info_file.read_text())
    except (OSError, ValueError):
        data = {}
    return data


# ggml's CPU backend runs on OpenMP: one parallel region per graph, a barrier per node. With
# OMP_WAIT_POLICY=ACTIVE its waiting threads spin without end, which cost 2x on a 2,000-token
# prefill on a busy 2-core machine (36-40 s against 19.3 s passive) and burns a core when
# idle. PASSIVE alone sleeps at every barrier: generation took 17.5-20.9 ms/token against
# 11.9-14.5 with a short spin first (GOMP_SPINCOUNT=300000, libgomp's default when no policy
# is set), while a 2,000-token prefill beside a busy Python thread took 24.6 s either way and
# an idle process spins for nothing (0.01 CPU-s in 3 s). So: PASSIVE plus that short spin,
# unless you set OMP_WAIT_POLICY yourself (then neither is touched). They must be set before
# libgomp is loaded.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "300000")
_preload_libstdcxx()
libllama = _load("libllama")
libggml_base = _load("libggml-base")
libggml = _load("libggml")
# ggml-cpu may be absent from a user-supplied build that uses dynamic backend loading.
try:
    libggml_cpu: ctypes.CDLL | None = _load("libggml-cpu")
except OSError:
    libggml_cpu = None


@dataclass(frozen=True)
class Declaration:
    """One declared C function: the library it lives in, its argument and result types."""

    library: str
    name: str
    argtypes: tuple[Any, ...]
    restype: Any


#: Every function declared through :func:`c_function`, by C name (the ABI drift test reads it).
DECLARED: dict[str, Declaration] = {}

F = TypeVar("F", bound=Callable[..., Any])


def c_function(
    name: str, argtypes: Sequence[Any], restype: Any, *, lib: ctypes.CDLL = libllama
) -> Callable[[F], F]:
    """Declare the C function ``name`` once; the decorated stub carries its docstring.

    The stub's body is never run: the module-level name is bound to the ctypes function
    itself, so calls cost no extra Python frame.
    """

    def decorator(stub: F) -> F:
        fn = getattr(lib, name)
        fn.argtypes = list(argtypes)
        fn.restype = restype
        fn.__doc__ = stub.__doc__
        lib_name = Path(lib._name).name if lib._name else "?"
        DECLARED[name] = Declaration(lib_name, name, tuple(argtypes), restype)
        return fn  # type: ignore[no-any-return]

    return decorator
