"""Raw: chat templates (llama.h, "Chat templates").

llama.cpp does not run Jinja: ``llama_chat_apply_template`` recognises a template's family
from its text (or takes a built-in name such as ``"chatml"``) and formats with a hard-coded
C++ formatter per family (``src/llama-chat.cpp``).
"""

from __future__ import annotations

from ctypes import POINTER, c_bool, c_char_p, c_int32, c_size_t

from llamaffi._capi._types import llama_chat_message
from llamaffi._lib import c_function

llama_chat_message_p = POINTER(llama_chat_message)


# LLAMA_API int32_t llama_chat_apply_template(const char * tmpl,
#                                             const struct llama_chat_message * chat,
#                                             size_t n_msg, bool add_ass, char * buf,
#                                             int32_t length);
@c_function(
    "llama_chat_apply_template",
    [c_char_p, llama_chat_message_p, c_size_t, c_bool, c_char_p, c_int32],
    c_int32,
)
def llama_chat_apply_template(
    tmpl: bytes | None, chat: object, n_msg: int, add_ass: bool, buf: object, length: int
) -> int:
    """Format ``chat`` with the template ``tmpl`` (NULL: chatml) into ``buf``.

    Returns the formatted length in bytes (copy with ``strncpy``: no terminator when it fills
    the buffer; larger than ``length``: grow the buffer and call again), or -1 if the
    template is not one llama.cpp knows.
    """


# LLAMA_API int32_t llama_chat_builtin_templates(const char ** output, size_t len);
@c_function("llama_chat_builtin_templates", [POINTER(c_char_p), c_size_t], c_int32)
def llama_chat_builtin_templates(output: object, len: int) -> int:
    """Fill ``output`` with up to ``len`` built-in template names; returns how many exist."""
