"""Exceptions raised by llamaffi.

Every error derives from :class:`LlamaError`, and also from the builtin that fits, so that
``except ValueError`` or ``except OSError`` keeps working. Errors from a C call carry the C
function's name and its return code.
"""

from __future__ import annotations


class LlamaError(Exception):
    """Base class of every llamaffi error."""

    def __init__(self, message: str, *, function: str | None = None, code: int | None = None):
        detail = message
        if function is not None:
            detail = f"{function}: {message}" + (f" (code {code})" if code is not None else "")
        super().__init__(detail)
        self.function = function
        self.code = code


class LibraryNotFoundError(LlamaError, OSError):
    """libllama is not built or not where ``LLAMAFFI_LIB`` says."""


class ModelLoadError(LlamaError, OSError):
    """A model file is missing, unreadable, not GGUF, or rejected by llama.cpp."""


class ContextError(LlamaError, RuntimeError):
    """llama.cpp could not create a context with the requested parameters."""


class DecodeError(LlamaError, RuntimeError):
    """``llama_decode``/``llama_encode`` failed; ``code`` is llama.cpp's return value."""


class StateError(LlamaError, ValueError):
    """A state buffer was rejected or could not be produced."""


class TokenizeError(LlamaError, ValueError):
    """Tokenisation or detokenisation failed."""


class ArgumentError(LlamaError, ValueError):
    """An argument was refused before anything was done with it (before C was called, or
    before anything was read or written): a seq id, a position, a token id, a count, a
    setting out of range. :mod:`runtime` raises this same class (``runtime.errors``
    re-exports it), so one ``except`` covers a bad argument wherever it was refused."""


class ArgumentTypeError(LlamaError, TypeError):
    """An argument has the wrong type, refused before it was used (shared with
    :mod:`runtime`, like :class:`ArgumentError`)."""


class ClosedError(LlamaError, ValueError):
    """The object was closed (or its parent was): a model, a context, or one of
    :mod:`runtime`'s stores, writers or the runtime itself (which raise this same class).
    Using a closed llama.cpp handle would be a use-after-free; this error is raised instead."""


class TemplateError(LlamaError, ValueError):
    """llama.cpp does not know a chat template (or refused the messages given to it)."""
