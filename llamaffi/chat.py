"""Chat templates, formatted by llama.cpp itself (no Jinja).

``llama_chat_apply_template`` does not run the template's Jinja: it recognises the family
from the template text (``"<|im_start|>"`` means ChatML, ``"<start_of_turn>"`` Gemma, ...; see
``llm_chat_detect_template`` in ``src/llama-chat.cpp``), or takes a built-in name such as
``"chatml"`` or ``"llama3"`` (:func:`builtin_templates`), and formats with that family's
hard-coded formatter. A template it does not recognise raises :class:`TemplateError`.

Importing this module loads libllama.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from llamaffi._capi import _types
from llamaffi._capi import chat as cchat
from llamaffi.errors import ArgumentError, ArgumentTypeError, TemplateError

__all__ = ["apply_template", "builtin_templates"]

_INT32_MAX = 2**31 - 1


def _c_string(what: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{what} must be str, not {type(value).__name__}")
    if "\0" in value:
        # C would silently cut the string at the NUL.
        raise ArgumentError(f"{what} contains a NUL character")
    return value.encode("utf-8")


def _messages_array(
    messages: Sequence[tuple[str, str]],
) -> tuple[ctypes.Array[_types.llama_chat_message], int]:
    """The C array of ``messages`` and the total bytes of their text."""
    encoded: list[tuple[bytes, bytes]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, tuple) or len(message) != 2:
            raise ArgumentTypeError(
                f"messages[{i}] must be a (role, content) tuple, not {message!r}"
            )
        role, content = message
        encoded.append(
            (_c_string(f"messages[{i}] role", role), _c_string(f"messages[{i}] content", content))
        )
    array = (_types.llama_chat_message * max(1, len(encoded)))()
    # The array holds pointers into these bytes objects; ``encoded`` keeps them alive for the
    # caller's frame (the array's c_char_p fields also keep their own references).
    for slot, (role_b, content_b) in zip(array, encoded, strict=False):
        slot.role = role_b
        slot.content = content_b
    total = sum(len(r) + len(c) for r, c in encoded)
    return array, total


def apply_template(template: str, messages: Sequence[tuple[str, str]], add_assistant: bool) -> str:
    """Format ``messages`` (``(role, content)`` pairs) with ``template``.

    Args:
        template: A chat template's Jinja text (its family is recognised by llama.cpp) or a
            built-in name from :func:`builtin_templates`.
        messages: The conversation, oldest first; roles are usually ``"system"``, ``"user"``
            and ``"assistant"``.
        add_assistant: End with the text that opens the assistant's turn.

    Raises:
        TemplateError: llama.cpp does not recognise ``template`` (code -1) or refused the
            messages.
        ArgumentError: a role, content or the template contains a NUL character.
        TypeError: a message is not a pair of strings.
    """
    tmpl_b = _c_string("template", template)
    array, total = _messages_array(messages)
    n_msg = len(messages)
    # llama.h recommends 2 x the message text; the template's own markers need a bit more.
    size = min(_INT32_MAX, 2 * total + 256)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = cchat.llama_chat_apply_template(tmpl_b, array, n_msg, add_assistant, buf, size)
        if n < 0:
            head = template if len(template) <= 60 else template[:57] + "..."
            raise TemplateError(
                f"llama.cpp does not know the chat template {head!r}",
                function="llama_chat_apply_template",
                code=n,
            )
        if n <= size:
            # strncpy: no terminator when the text fills the buffer exactly.
            return buf.raw[:n].decode("utf-8", "replace")
        if n >= _INT32_MAX:
            break
        size = n + 1  # C told us the size it needs
    raise TemplateError(
        "buffer size negotiation failed", function="llama_chat_apply_template", code=n
    )


def builtin_templates() -> list[str]:
    """The names llama.cpp accepts as a template (``"chatml"``, ``"llama3"``, ...), sorted."""
    count = cchat.llama_chat_builtin_templates(None, 0)
    if count <= 0:
        return []
    names = (ctypes.c_char_p * count)()
    filled = cchat.llama_chat_builtin_templates(names, count)
    return [name.decode("utf-8") for name in names[: min(count, filled)] if name is not None]
