"""Process-wide setup: route llama.cpp's log callback to :mod:`logging`, init the backend once."""

from __future__ import annotations

import logging
import threading
import weakref

from llamaffi._capi import _types, backend

logger = logging.getLogger("llamaffi.llama_cpp")

_LEVELS = {
    _types.ggml_log_level.DEBUG: logging.DEBUG,
    _types.ggml_log_level.INFO: logging.DEBUG,  # llama.cpp's INFO is chatty load-time detail
    _types.ggml_log_level.WARN: logging.WARNING,
    _types.ggml_log_level.ERROR: logging.ERROR,
}


class _LogRouter:
    """Joins llama.cpp's line fragments (``GGML_LOG_LEVEL_CONT``) and logs whole lines."""

    def __init__(self) -> None:
        self._pending = ""
        self._level = logging.DEBUG
        self._lock = threading.Lock()

    def __call__(self, level: int, text: bytes | None, user_data: int | None) -> None:
        if not text:
            return
        chunk = text.decode("utf-8", "replace")
        with self._lock:
            if level != _types.ggml_log_level.CONT:
                self._level = _LEVELS.get(_types.ggml_log_level(level), logging.DEBUG)
            self._pending += chunk
            if "\n" not in self._pending:
                return
            *lines, self._pending = self._pending.split("\n")
            log_level = self._level
        for line in lines:
            if line.strip():
                logger.log(log_level, "%s", line)


_router = _LogRouter()
# The CFUNCTYPE object must outlive every call from C: it is held here for the process' life.
_c_log_callback = _types.ggml_log_callback(_router)
_init_lock = threading.Lock()
_initialised = False


class _ExitSentinel:
    """Lives for the process; its finalizer runs at interpreter exit (see ensure_backend)."""


_exit_sentinel = _ExitSentinel()


def ensure_backend() -> None:
    """Install the log router and call ``llama_backend_init`` once per process."""
    global _initialised
    if _initialised:
        return
    with _init_lock:
        if _initialised:
            return
        backend.llama_log_set(_c_log_callback, None)
        # At interpreter exit, hand llama.cpp's log back to its own (stderr) logger: a line
        # logged from a C++ destructor after Python is finalized must not call into the
        # interpreter. weakref.finalize runs exit-time finalizers newest first, and this one
        # is older than every model and context, so their frees still log through Python.
        weakref.finalize(_exit_sentinel, backend.llama_log_set, _types.ggml_log_callback(), None)
        backend.llama_backend_init()
        _initialised = True


def install_log_router() -> None:
    """(Re)install the router of llama.cpp's log into the ``llamaffi.llama_cpp`` logger."""
    ensure_backend()
    backend.llama_log_set(_c_log_callback, None)
