"""llamaffi: a hand-written ctypes binding over a vendored llama.cpp.

Two layers: :mod:`llamaffi._capi` mirrors ``llama.h`` one module per section, and the safe
layer (:class:`Model`, :class:`Context`, :class:`Sampler`) owns lifetimes, validates arguments
before C sees them and raises typed errors from :mod:`llamaffi.errors`.

``import llamaffi`` does not load libllama; the first use of :class:`Model` (or
:func:`build_info`) does, so :mod:`llamaffi.testing` works without a built library.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaffi.errors import (
    ArgumentError,
    ArgumentTypeError,
    ClosedError,
    ContextError,
    DecodeError,
    LibraryNotFoundError,
    LlamaError,
    ModelLoadError,
    StateError,
    TemplateError,
    TokenizeError,
)

__version__ = "0.1.0"

# Library code never prints: llama.cpp's own log lines go to the "llamaffi.llama_cpp" logger,
# silent unless the application configures logging.
logging.getLogger("llamaffi").addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from llamaffi.chat import apply_template, builtin_templates
    from llamaffi.context import Context
    from llamaffi.memory import Memory
    from llamaffi.model import Model
    from llamaffi.sampler import Sampler

_LAZY = {
    "Model": "llamaffi.model",
    "Context": "llamaffi.context",
    "Memory": "llamaffi.memory",
    "Sampler": "llamaffi.sampler",
    "apply_template": "llamaffi.chat",
    "builtin_templates": "llamaffi.chat",
}

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ClosedError",
    "Context",
    "ContextError",
    "DecodeError",
    "LibraryNotFoundError",
    "LlamaError",
    "Memory",
    "Model",
    "ModelLoadError",
    "Sampler",
    "StateError",
    "TemplateError",
    "TokenizeError",
    "__version__",
    "apply_template",
    "build_info",
    "builtin_templates",
    "init_backend",
    "install_log_router",
    "library_path",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamaffi' has no attribute {name!r}")


def library_path() -> Path:
    """The libllama shared library llamaffi loads (its directory holds ggml's libraries)."""
    from llamaffi._lib import library_path as path

    return path()


def init_backend() -> None:
    """Load libllama, route llama.cpp's log into Python logging and call
    ``llama_backend_init``, once per process (every model load does it by itself)."""
    from llamaffi._backend import ensure_backend

    ensure_backend()


def install_log_router() -> None:
    """Route llama.cpp's log into Python logging again: another binding loaded into the same
    process (llama-cpp-python) replaces the callback with its own when it is imported."""
    from llamaffi._backend import install_log_router as install

    install()


def build_info() -> dict[str, Any]:
    """What this build is: llama.cpp build number and commit, the pin, library path, features.

    Loads libllama.
    """
    from llamaffi.info import collect

    return collect()
