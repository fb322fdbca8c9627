"""llamaffi.testing: the deterministic random-weight GGUF writer.

Everything here reads the files back with gguf's own reader; whether llama.cpp loads them is
checked where the binding is tested.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from llamaffi import testing
from llamaffi.testing import CHAT_TEMPLATE, PRESETS, VOCAB_ENV, find_vocab, make_model

# Small enough that a write takes well under a second (the 32000 x 64 embedding dominates).
SMALL: dict[str, Any] = {"n_layer": 1, "n_embd": 64, "n_head": 2, "n_head_kv": 1, "n_ff": 128}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kv(reader: GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def shapes(reader: GGUFReader) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in ggml order (ne[0] first), as llama.cpp checks them."""
    return {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}


def tensor(reader: GGUFReader, name: str) -> np.ndarray[Any, Any]:
    return next(t.data for t in reader.tensors if t.name == name)


def expected_shapes(
    n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int = 32000
) -> dict[str, tuple[int, ...]]:
    """The shapes src/models/llama.cpp asks for, written out independently of the module."""
    n_kv = n_embd // n_head * n_head_kv
    out: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_embd, n_vocab),
        "output_norm.weight": (n_embd,),
        "output.weight": (n_embd, n_vocab),
    }
    for i in range(n_layer):
        out |= {
            f"blk.{i}.attn_norm.weight": (n_embd,),
            f"blk.{i}.attn_q.weight": (n_embd, n_embd),
            f"blk.{i}.attn_k.weight": (n_embd, n_kv),
            f"blk.{i}.attn_v.weight": (n_embd, n_kv),
            f"blk.{i}.attn_output.weight": (n_embd, n_embd),
            f"blk.{i}.ffn_norm.weight": (n_embd,),
            f"blk.{i}.ffn_gate.weight": (n_embd, n_ff),
            f"blk.{i}.ffn_down.weight": (n_ff, n_embd),
            f"blk.{i}.ffn_up.weight": (n_embd, n_ff),
        }
    return out


def assert_llama_geometry(reader: GGUFReader, geometry: dict[str, int], file_type: int) -> None:
    assert kv(reader, "general.architecture") == "llama"
    assert kv(reader, "general.file_type") == file_type
    assert kv(reader, "llama.block_count") == geometry["n_layer"]
    assert kv(reader, "llama.embedding_length") == geometry["n_embd"]
    assert kv(reader, "llama.attention.head_count") == geometry["n_head"]
    assert kv(reader, "llama.attention.head_count_kv") == geometry["n_head_kv"]
    assert kv(reader, "llama.feed_forward_length") == geometry["n_ff"]
    assert kv(reader, "llama.rope.dimension_count") == geometry["n_embd"] // geometry["n_head"]
    assert kv(reader, "llama.context_length") == 2048
    assert kv(reader, "llama.vocab_size") == 32000
    assert kv(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert shapes(reader) == expected_shapes(**geometry)


@pytest.fixture(scope="module")
def tiny(tiny_model_path: Path) -> GGUFReader:
    """The tiny preset read back once (parsing 32000 tokens takes about a second)."""
    return GGUFReader(tiny_model_path)


# --- determinism -------------------------------------------------------------------------


def test_same_arguments_give_a_byte_identical_file(tiny_model_path: Path, tmp_path: Path) -> None:
    again = make_model(tmp_path / "again.gguf", preset="tiny", seed=0)
    assert sha256(again) == sha256(tiny_model_path)


def test_another_seed_gives_other_weights(
    tiny_model_path: Path, other_model_path: Path, tiny: GGUFReader
) -> None:
    assert sha256(tiny_model_path) != sha256(other_model_path)
    a, b = tiny, GGUFReader(other_model_path)
    assert kv(a, "general.name") == "llamaffi-tiny-seed0"
    assert kv(b, "general.name") == "llamaffi-tiny-seed1"
    assert shapes(a) == shapes(b)
    for name in ("token_embd.weight", "blk.1.ffn_down.weight"):
        assert not np.array_equal(tensor(a, name), tensor(b, name))
    np.testing.assert_array_equal(tensor(a, "output_norm.weight"), tensor(b, "output_norm.weight"))


def test_each_tensor_has_its_own_stream(tmp_path: Path) -> None:
    """Tensor i depends on (seed, i) only, so adding a layer leaves earlier tensors alone."""
    one = GGUFReader(make_model(tmp_path / "one.gguf", **SMALL))
    two = GGUFReader(make_model(tmp_path / "two.gguf", **(SMALL | {"n_layer": 2})))
    for name in ("token_embd.weight", "output.weight", "blk.0.attn_q.weight"):
        np.testing.assert_array_equal(tensor(one, name), tensor(two, name))
    assert not np.array_equal(
        tensor(two, "blk.0.attn_q.weight"), tensor(two, "blk.1.attn_q.weight")
    )
    assert not np.array_equal(
        tensor(one, "blk.0.attn_k.weight"), tensor(one, "blk.0.attn_v.weight")
    )


# --- geometry and contents ---------------------------------------------------------------


def test_tiny_preset_geometry(tiny: GGUFReader) -> None:
    reader = tiny
    assert PRESETS["tiny"]["n_head_kv"] < PRESETS["tiny"]["n_head"]  # GQA is exercised
    assert_llama_geometry(reader, PRESETS["tiny"], file_type=1)


def test_tiny_preset_size(tiny_model_path: Path) -> None:
    assert 30e6 < tiny_model_path.stat().st_size < 40e6


def test_tinyllama_geometry_with_fewer_layers(tmp_path: Path) -> None:
    path = make_model(tmp_path / "tl.gguf", preset="tinyllama-geometry", n_layer=1)
    geometry = PRESETS["tinyllama-geometry"] | {"n_layer": 1}
    assert PRESETS["tinyllama-geometry"] == {
        "n_layer": 22,
        "n_embd": 2048,
        "n_head": 32,
        "n_head_kv": 4,
        "n_ff": 5632,
    }
    assert_llama_geometry(GGUFReader(path), geometry, file_type=1)


def test_explicit_arguments_override_the_preset(tmp_path: Path) -> None:
    reader = GGUFReader(
        make_model(tmp_path / "m.gguf", preset="tiny", n_layer=1, n_ff=96, n_ctx_train=512)
    )
    assert kv(reader, "llama.block_count") == 1
    assert kv(reader, "llama.feed_forward_length") == 96
    assert kv(reader, "llama.embedding_length") == PRESETS["tiny"]["n_embd"]
    assert kv(reader, "llama.context_length") == 512


def test_weights_are_small_and_norms_are_one(tiny: GGUFReader) -> None:
    for t in tiny.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        assert np.isfinite(data).all(), t.name
        if t.name.endswith("norm.weight"):
            assert t.tensor_type.name == "F32"
            np.testing.assert_array_equal(data, 1.0)
        else:
            assert t.tensor_type.name == "F16"
            assert abs(float(data.mean())) < 2e-3, t.name
            assert float(data.std()) == pytest.approx(0.02, rel=0.05), t.name


def test_f32_weights(tmp_path: Path) -> None:
    reader = GGUFReader(make_model(tmp_path / "f32.gguf", wtype="f32", **SMALL))
    assert kv(reader, "general.file_type") == 0
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    assert shapes(reader) == expected_shapes(**SMALL)


def test_tokenizer_is_copied_from_the_vocab(tiny: GGUFReader) -> None:
    source, model = GGUFReader(find_vocab()), tiny

    def tokenizer_keys(reader: GGUFReader) -> list[str]:
        return [k for k in reader.fields if k.startswith("tokenizer.ggml.")]

    keys = tokenizer_keys(source)
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id"} <= set(
        keys
    )
    assert tokenizer_keys(model) == keys
    for key in keys:
        assert model.fields[key].types == source.fields[key].types, key
        assert kv(model, key) == kv(source, key), key
    assert kv(model, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert "<|im_start|>" in CHAT_TEMPLATE  # what llama_chat_apply_template detects as chatml
    assert model.fields["llama.vocab_size"].types == [GGUFValueType.UINT32]


# --- atomic writes -----------------------------------------------------------------------


def test_failure_mid_write_leaves_no_temp_file_and_keeps_the_old_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous model")
    real = testing._tensor_data
    calls = 0

    def failing(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(testing, "_tensor_data", failing)
    with pytest.raises(OSError, match="simulated"):
        make_model(target, **SMALL)
    assert calls == 4
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes() == b"previous model"


def test_success_replaces_the_old_model_and_leaves_only_it(tmp_path: Path) -> None:
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous model")
    assert make_model(target, **SMALL) == target
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes()[:4] == b"GGUF"


# --- vocabulary lookup and validation ----------------------------------------------------


def test_vocab_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "vocab.gguf"
    shutil.copyfile(find_vocab(), copy)
    monkeypatch.setenv(VOCAB_ENV, str(copy))
    assert find_vocab() == copy
    explicit = tmp_path / "explicit.gguf"
    shutil.copyfile(copy, explicit)
    assert find_vocab(explicit) == explicit  # the argument wins over the environment
    with pytest.raises(FileNotFoundError, match="vocab argument"):
        find_vocab(tmp_path / "missing.gguf")


def test_missing_vocab_names_the_path_and_the_fetch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.gguf"
    monkeypatch.setenv(VOCAB_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=r"python scripts/fetch_llama_cpp\.py") as info:
        make_model(tmp_path / "m.gguf", **SMALL)
    assert str(missing) in str(info.value)
    assert VOCAB_ENV in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"preset": "huge"}, ValueError, "unknown preset"),
        ({"n_layer": 1, "n_embd": 64}, TypeError, "n_head, n_head_kv, n_ff"),
        (SMALL | {"n_embd": 65}, ValueError, "head size"),
        (SMALL | {"n_embd": 6, "n_head": 2}, ValueError, "even head size"),
        (SMALL | {"n_head": 4, "n_head_kv": 3}, ValueError, "multiple of n_head_kv"),
        (SMALL | {"n_layer": 0}, ValueError, "n_layer must be a positive int"),
        (SMALL | {"wtype": "q4_0"}, ValueError, "wtype"),
        (SMALL | {"seed": -1}, ValueError, "seed"),
    ],
)
def test_invalid_arguments(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make_model(tmp_path / "m.gguf", **kwargs)
    assert list(tmp_path.iterdir()) == []


# --- command line ------------------------------------------------------------------------


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cli.gguf"
    args = [str(path), "--preset", "tiny", "--seed", "3", "--n-layer", "1", "--n-ff", "64"]
    assert testing.main(args) == 0
    assert str(path) in capsys.readouterr().out
    reader = GGUFReader(path)
    assert kv(reader, "general.name") == "llamaffi-tiny-seed3"
    assert kv(reader, "llama.feed_forward_length") == 64
    assert testing.main([str(tmp_path / "bad.gguf"), "--n-embd", "250"]) == 1
    assert "error:" in capsys.readouterr().err


def test_python_dash_m(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    args = ["--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--n-head-kv", "1"]
    subprocess.run(
        [sys.executable, "-m", "llamaffi.testing", str(path), *args], check=True, timeout=120
    )
    assert path.stat().st_size > 8_000_000
