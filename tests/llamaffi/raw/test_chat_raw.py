"""Raw chat-template calls: the C contract the safe layer in llamaffi.chat relies on."""

from __future__ import annotations

import ctypes

import pytest

from llamaffi.errors import LibraryNotFoundError

try:
    from llamaffi._capi import _types
    from llamaffi._capi import chat as cchat
except LibraryNotFoundError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"libllama is not built: {exc}", allow_module_level=True)


def _one_message() -> ctypes.Array[_types.llama_chat_message]:
    array = (_types.llama_chat_message * 1)()
    array[0].role = b"user"
    array[0].content = b"hello"
    return array


def test_apply_template_reports_the_full_length_when_the_buffer_is_small() -> None:
    expected = b"<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    small = ctypes.create_string_buffer(8)
    n = cchat.llama_chat_apply_template(b"chatml", _one_message(), 1, True, small, 8)
    assert n == len(expected)
    assert small.raw == expected[:8]  # strncpy: truncated, no terminator
    big = ctypes.create_string_buffer(n)
    assert cchat.llama_chat_apply_template(b"chatml", _one_message(), 1, True, big, n) == n
    assert big.raw == expected


def test_apply_template_returns_minus_one_for_an_unknown_template() -> None:
    buf = ctypes.create_string_buffer(64)
    assert cchat.llama_chat_apply_template(b"no such", _one_message(), 1, True, buf, 64) == -1


def test_builtin_templates_count_without_a_buffer() -> None:
    count = cchat.llama_chat_builtin_templates(None, 0)
    assert count > 10
    names = (ctypes.c_char_p * 2)()
    assert cchat.llama_chat_builtin_templates(names, 2) == count  # total, not the filled part
    assert all(isinstance(name, bytes) and name for name in names)
