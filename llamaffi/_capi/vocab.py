"""Raw: vocabulary, tokenisation and detokenisation (llama.h, "Vocab" + "Tokenization")."""

from __future__ import annotations

from ctypes import POINTER, c_bool, c_char_p, c_int32

from llamaffi._capi._types import llama_token, llama_token_p, llama_vocab_p
from llamaffi._lib import c_function


# LLAMA_API int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
@c_function("llama_vocab_n_tokens", [llama_vocab_p], c_int32)
def llama_vocab_n_tokens(vocab: int) -> int:
    """Vocabulary size."""


# LLAMA_API const char * llama_vocab_get_text(const struct llama_vocab * vocab, llama_token token);
@c_function("llama_vocab_get_text", [llama_vocab_p, llama_token], c_char_p)
def llama_vocab_get_text(vocab: int, token: int) -> bytes:
    """The raw text of a token."""


# LLAMA_API bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
@c_function("llama_vocab_is_eog", [llama_vocab_p, llama_token], c_bool)
def llama_vocab_is_eog(vocab: int, token: int) -> bool:
    """Whether ``token`` ends generation (EOS, EOT, ...)."""


# LLAMA_API bool llama_vocab_is_control(const struct llama_vocab * vocab, llama_token token);
@c_function("llama_vocab_is_control", [llama_vocab_p, llama_token], c_bool)
def llama_vocab_is_control(vocab: int, token: int) -> bool:
    """Whether ``token`` is a control token."""


# LLAMA_API llama_token llama_vocab_bos(const struct llama_vocab * vocab);
@c_function("llama_vocab_bos", [llama_vocab_p], llama_token)
def llama_vocab_bos(vocab: int) -> int:
    """Beginning-of-sentence token (-1 if none)."""


# LLAMA_API llama_token llama_vocab_eos(const struct llama_vocab * vocab);
@c_function("llama_vocab_eos", [llama_vocab_p], llama_token)
def llama_vocab_eos(vocab: int) -> int:
    """End-of-sentence token (-1 if none)."""


# LLAMA_API llama_token llama_vocab_eot(const struct llama_vocab * vocab);
@c_function("llama_vocab_eot", [llama_vocab_p], llama_token)
def llama_vocab_eot(vocab: int) -> int:
    """End-of-turn token (-1 if none)."""


# LLAMA_API llama_token llama_vocab_nl(const struct llama_vocab * vocab);
@c_function("llama_vocab_nl", [llama_vocab_p], llama_token)
def llama_vocab_nl(vocab: int) -> int:
    """Newline token."""


# LLAMA_API bool llama_vocab_get_add_bos(const struct llama_vocab * vocab);
@c_function("llama_vocab_get_add_bos", [llama_vocab_p], c_bool)
def llama_vocab_get_add_bos(vocab: int) -> bool:
    """Whether tokenize(add_special=True) prepends BOS."""


# LLAMA_API bool llama_vocab_get_add_eos(const struct llama_vocab * vocab);
@c_function("llama_vocab_get_add_eos", [llama_vocab_p], c_bool)
def llama_vocab_get_add_eos(vocab: int) -> bool:
    """Whether tokenize(add_special=True) appends EOS."""


# LLAMA_API int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text,
#     int32_t text_len, llama_token * tokens, int32_t n_tokens_max, bool add_special,
#     bool parse_special);
@c_function(
    "llama_tokenize",
    [llama_vocab_p, c_char_p, c_int32, llama_token_p, c_int32, c_bool, c_bool],
    c_int32,
)
def llama_tokenize(
    vocab: int,
    text: bytes,
    text_len: int,
    tokens: object,
    n_tokens_max: int,
    add_special: bool,
    parse_special: bool,
) -> int:
    """Token count, or minus the count needed when ``tokens`` is too small."""


# LLAMA_API int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token,
#     char * buf, int32_t length, int32_t lstrip, bool special);
@c_function(
    "llama_token_to_piece",
    [llama_vocab_p, llama_token, c_char_p, c_int32, c_int32, c_bool],
    c_int32,
)
def llama_token_to_piece(
    vocab: int, token: int, buf: object, length: int, lstrip: int, special: bool
) -> int:
    """Bytes written, or minus the size needed (no NUL terminator)."""


# LLAMA_API int32_t llama_detokenize(const struct llama_vocab * vocab, const llama_token * tokens,
#     int32_t n_tokens, char * text, int32_t text_len_max, bool remove_special,
#     bool unparse_special);
@c_function(
    "llama_detokenize",
    [llama_vocab_p, POINTER(llama_token), c_int32, c_char_p, c_int32, c_bool, c_bool],
    c_int32,
)
def llama_detokenize(
    vocab: int,
    tokens: object,
    n_tokens: int,
    text: object,
    text_len_max: int,
    remove_special: bool,
    unparse_special: bool,
) -> int:
    """Bytes written, or minus the size needed."""
