"""llamaffi.chat: llama.cpp's chat-template formatter through the safe layer."""

from __future__ import annotations

import pytest

import llamaffi
from llamaffi.chat import apply_template, builtin_templates
from llamaffi.errors import ArgumentError, LlamaError, TemplateError
from llamaffi.testing import CHAT_TEMPLATE


def test_chatml_by_name_and_by_jinja_text_agree() -> None:
    messages = [("system", "Be brief."), ("user", "Hi")]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert apply_template("chatml", messages, True) == expected
    assert apply_template(CHAT_TEMPLATE, messages, True) == expected
    assert apply_template(CHAT_TEMPLATE, messages, False) == expected.removesuffix(
        "<|im_start|>assistant\n"
    )


def test_output_larger_than_the_first_buffer_is_retried() -> None:
    # 100 empty user turns: 400 bytes of text, 5100 bytes of llama3 markers.
    messages = [("user", "")] * 100
    text = apply_template("llama3", messages, False)
    turn = "<|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
    assert text == turn * 100


def test_unicode_round_trips() -> None:
    text = apply_template("chatml", [("user", "naïve café ☕ 日本")], False)
    assert "naïve café ☕ 日本" in text


def test_no_messages() -> None:
    assert apply_template("chatml", [], True) == "<|im_start|>assistant\n"
    assert apply_template("chatml", [], False) == ""


def test_unknown_template_is_a_typed_error() -> None:
    with pytest.raises(TemplateError) as info:
        apply_template("{{ messages | tojson }}", [("user", "x")], True)
    err = info.value
    assert isinstance(err, LlamaError) and isinstance(err, ValueError)
    assert err.function == "llama_chat_apply_template"
    assert err.code == -1
    assert "tojson" in str(err)


def test_nul_characters_are_refused_before_c() -> None:
    with pytest.raises(ArgumentError, match="content contains a NUL"):
        apply_template("chatml", [("user", "a\0b")], True)
    with pytest.raises(ArgumentError, match="template contains a NUL"):
        apply_template("chat\0ml", [("user", "x")], True)


def test_malformed_messages_are_type_errors() -> None:
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        apply_template("chatml", [("user",)], True)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="must be str"):
        apply_template("chatml", [("user", 3)], True)  # type: ignore[list-item]


def test_builtin_templates_lists_the_known_families() -> None:
    names = builtin_templates()
    assert {"chatml", "llama3", "gemma", "mistral-v1", "llama2"} <= set(names)
    assert names == sorted(names)
    for name in ("chatml", "llama3", "gemma"):
        assert apply_template(name, [("user", "x")], True)


def test_exported_from_the_package() -> None:
    assert llamaffi.apply_template is apply_template
    assert llamaffi.builtin_templates is builtin_templates
    assert llamaffi.TemplateError is TemplateError
