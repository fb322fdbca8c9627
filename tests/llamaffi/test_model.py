"""Model: loading errors, metadata, fingerprint, tokenizer round trips on the real vocab."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import llamaffi
from llamaffi import Model
from llamaffi.errors import ClosedError, ModelLoadError, TokenizeError


def test_version_is_exposed() -> None:
    assert llamaffi.__version__.count(".") == 2


def test_build_info_names_pin_and_build() -> None:
    info = llamaffi.build_info()
    assert info["build_number"] == 11312
    assert info["pin"]["sha256"].startswith("832db069")
    assert Path(info["library"]).is_file()
    assert "CPU" in info["backends"]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match=r"nope\.gguf"):
        Model(missing)


def test_non_gguf_file_is_refused_before_c(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Model(bogus)


def test_truncated_gguf_is_a_clean_error(tmp_path: Path, tiny_model_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model_path.read_bytes()[:4096])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf"):
        Model(cut)


def test_load_error_is_also_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Model(tmp_path / "x.gguf")


def test_metadata(model: Model) -> None:
    assert model.n_layer >= 1
    assert model.n_head % model.n_head_kv == 0
    assert model.n_head_kv < model.n_head  # the tiny preset exercises GQA
    assert model.n_vocab == 32000
    assert model.n_params > 0 and model.size > 0
    assert model.desc.startswith("llama")
    assert model.meta_val_str("general.architecture") == "llama"
    assert model.meta_val_str("no.such.key") is None
    assert "general.architecture" in model.metadata()
    assert model.chat_template() is not None


def test_fingerprint_is_sha256_of_file(model: Model, tiny_model_path: Path) -> None:
    expected = hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    assert model.fingerprint == expected
    assert model.fingerprint == expected  # second call comes from the cache


def test_fingerprint_refuses_a_file_replaced_after_load(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    copy = tmp_path / "copy.gguf"
    data = bytearray(tiny_model_path.read_bytes())
    copy.write_bytes(data)
    with Model(copy) as m:
        first = m.fingerprint
        data[-1] ^= 0xFF  # the last tensor byte: still a loadable file
        replacement = tmp_path / "new.gguf"
        replacement.write_bytes(data)
        os.replace(replacement, copy)  # an upgrade dropped in while the process runs
        with pytest.raises(ModelLoadError, match="replaced or modified"):
            _ = m.fingerprint
    with Model(copy) as reloaded:  # a fresh load fingerprints the new file, not the cache
        assert reloaded.fingerprint != first
        assert reloaded.fingerprint == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "  leading and trailing spaces  ",
        "numbers 1234567890 and punctuation !?;:",
        "naïve café — ünïcödé",
        "日本語のテキスト",
        "emoji 🙂🚀",
        "line one\nline two\ttab",
    ],
)
def test_tokenize_detokenize_round_trip(model: Model, text: str) -> None:
    tokens = model.tokenize(text, add_special=False)
    assert tokens, text
    assert all(0 <= t < model.n_vocab for t in tokens)
    # SPM adds a leading space marker; llama.cpp strips it back on detokenize.
    assert model.detokenize(tokens) == text


def test_tokenize_adds_bos(model: Model) -> None:
    with_bos = model.tokenize("hi", add_special=True)
    assert with_bos[0] == model.bos
    assert model.tokenize("hi", add_special=False) == with_bos[1:]


def test_long_text_grows_the_buffer(model: Model) -> None:
    text = "🙂" * 3000  # byte-fallback tokens: more tokens than bytes/1
    tokens = model.tokenize(text, add_special=False)
    assert len(tokens) > 3000
    assert model.detokenize(tokens) == text


def test_token_to_piece(model: Model) -> None:
    tokens = model.tokenize("Hello", add_special=False)
    assert b"".join(model.token_to_piece(t) for t in tokens).strip() == b"Hello"


def test_bad_token_ids_are_refused(model: Model) -> None:
    with pytest.raises(TokenizeError):
        model.token_to_piece(-1)
    with pytest.raises(TokenizeError):
        model.detokenize([1, model.n_vocab])
    with pytest.raises(TypeError):
        model.tokenize(b"bytes")  # type: ignore[arg-type]


def test_use_after_close_raises(tiny_model_path: Path) -> None:
    m = Model(tiny_model_path)
    m.close()
    m.close()  # idempotent
    with pytest.raises(ClosedError):
        m.tokenize("x")
    with pytest.raises(ClosedError):
        _ = m.n_layer
    with pytest.raises(ClosedError):
        m.context()


def test_vocab_only_model_tokenizes_but_has_no_context(tiny_model_path: Path) -> None:
    with Model(tiny_model_path, vocab_only=True) as m:
        assert m.tokenize("Hello", add_special=False)
        with pytest.raises(llamaffi.ContextError):
            m.context()
