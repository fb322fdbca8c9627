"""The ONNX MiniLM embedder: parity with sentence-transformers, padding, cache, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.embed import (
    CACHE_CONFIG,
    MAX_TEXTS_PER_CALL,
    MODEL_FILE,
    Embedder,
    EmbedderError,
    export_minilm,
    read_safetensors,
)

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "tests" / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_minilm(cache_dir=tmp_path_factory.mktemp("embedders") / "minilm")


@pytest.fixture(scope="module")
def embedder(export_dir: Path) -> Embedder:
    return Embedder.from_dir(export_dir, threads=1)


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], np.ndarray, np.ndarray]:
    data = np.load(REFERENCE)
    return [str(s) for s in data["sentences"]], data["vectors"], data["n_tokens"]


def test_reference_set_is_varied(reference: tuple[list[str], np.ndarray, np.ndarray]) -> None:
    sentences, vectors, n_tokens = reference
    assert len(sentences) >= 30 and vectors.shape == (len(sentences), 384)
    assert "" in sentences
    assert any(n > 256 for n in n_tokens)  # over-long
    assert any(ord(c) > 0x1F000 for s in sentences for c in s)  # emoji


def test_parity_with_sentence_transformers(
    embedder: Embedder, reference: tuple[list[str], np.ndarray, np.ndarray]
) -> None:
    sentences, expected, n_tokens = reference
    got = embedder.embed(sentences)
    assert got.shape == expected.shape and got.dtype == np.float32
    cosines = (got * expected).sum(axis=1)
    worst = int(np.argmin(cosines))
    assert cosines.min() >= 0.9999, (sentences[worst][:60], float(cosines[worst]))
    assert embedder.last_stats.truncated == int((n_tokens > 256).sum())


def test_api_properties(embedder: Embedder) -> None:
    assert embedder.dim == 384
    assert embedder.max_length == 256
    assert embedder.model_id == "all-MiniLM-L6-v2"


def test_output_is_unit_norm_and_order_is_kept(embedder: Embedder) -> None:
    texts = ["short", "a much longer sentence " * 20, "", "medium length text here"]
    batch = embedder.embed(texts)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    for i, text in enumerate(texts):
        single = embedder.embed([text])[0]
        assert float(single @ batch[i]) >= 0.9999


def test_chunking_matches_one_batch(export_dir: Path) -> None:
    texts = [f"sentence number {i} " * (i % 7 + 1) for i in range(20)]
    small = Embedder.from_dir(export_dir, batch_size=3).embed(texts)
    big = Embedder.from_dir(export_dir, batch_size=64).embed(texts)
    assert ((small * big).sum(axis=1) >= 0.9999).all()


def test_fixed_padding_gives_the_same_vectors(export_dir: Path, embedder: Embedder) -> None:
    texts = ["hello there", "the attention mask must hide the padding", ""]
    fixed = Embedder.from_dir(export_dir, pad_to=256)
    a, b = embedder.embed(texts), fixed.embed(texts)
    assert ((a * b).sum(axis=1) >= 0.9999).all()
    assert fixed.last_stats.padded_tokens == 3 * 256
    assert embedder.last_stats.padded_tokens < 3 * 256


def test_empty_and_bad_input(embedder: Embedder) -> None:
    empty = embedder.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    with pytest.raises(TypeError):
        embedder.embed(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        embedder.embed("a string")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        embedder.embed(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        embedder.embed(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        embedder.embed([""] * (MAX_TEXTS_PER_CALL + 1))


def test_huge_text_is_truncated_without_tokenising_it_all(embedder: Embedder) -> None:
    text = "memory " * 200_000
    v = embedder.embed([text])
    assert embedder.last_stats.truncated == 1
    w = embedder.embed(["memory " * 400])
    assert float(v[0] @ w[0]) >= 0.9999


def test_from_dir_loads_a_plain_hf_style_directory(
    export_dir: Path, tmp_path: Path, embedder: Embedder
) -> None:
    plain = tmp_path / "hf" / "onnx"
    plain.mkdir(parents=True)
    shutil.copy(export_dir / MODEL_FILE, plain / MODEL_FILE)
    for name in ("tokenizer.json", "config.json", "sentence_bert_config.json"):
        shutil.copy(export_dir / name, tmp_path / "hf" / name)
    other = Embedder.from_dir(tmp_path / "hf")
    assert other.max_length == 256 and other.dim == 384 and other.model_id == "hf"
    texts = ["bring your own model"]
    assert float(other.embed(texts)[0] @ embedder.embed(texts)[0]) >= 0.9999
    with pytest.raises(EmbedderError):
        Embedder.from_dir(tmp_path / "missing")


def test_cache_is_reused_and_damage_re_exports(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    assert export_minilm(cache_dir=target) == target
    model = target / MODEL_FILE
    first = model.stat().st_ino
    export_minilm(cache_dir=target)
    assert model.stat().st_ino == first  # reused
    cfg = json.loads((target / CACHE_CONFIG).read_text())
    cfg["source_sha256"] = "0" * 64
    (target / CACHE_CONFIG).write_text(json.dumps(cfg))
    export_minilm(cache_dir=target)
    assert model.stat().st_ino != first  # the mismatch re-exported
    second = model.stat().st_ino
    with open(model, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 16)
    export_minilm(cache_dir=target)
    assert model.stat().st_ino != second  # a damaged graph re-exported
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_default_cache_location_honours_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAFFI_CACHE", str(tmp_path))
    e = Embedder.default()
    (d,) = [p for p in (tmp_path / "embedders").iterdir() if not p.name.startswith(".")]
    assert d.name.startswith("all-MiniLM-L6-v2-") and e.model_path.parent == d


def test_concurrent_first_use_does_not_corrupt_the_cache(tmp_path: Path) -> None:
    target = tmp_path / "shared"
    code = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from runtime.embed import export_minilm, Embedder\n"
        "d = export_minilm(cache_dir=sys.argv[1])\n"
        "print(Embedder.from_dir(d).embed(['x']).shape)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target), str(ROOT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "(1, 384)" in out
    assert export_minilm(cache_dir=target) == target
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_read_safetensors_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 4)
    with pytest.raises(EmbedderError):
        read_safetensors(bad)
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(EmbedderError):
        read_safetensors(bad)
    header = json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 16)
    with pytest.raises(EmbedderError):
        read_safetensors(bad)


def test_int8_variant_agrees_with_fp32(
    export_dir: Path, embedder: Embedder, reference: tuple[list[str], np.ndarray, np.ndarray]
) -> None:
    from runtime.embed import quantize_int8

    q = Embedder.from_dir(export_dir, onnx_file=quantize_int8(export_dir).name)
    sentences = reference[0]
    cosines = (q.embed(sentences) * embedder.embed(sentences)).sum(axis=1)
    # measured: min 0.974, mean 0.990 on the reference sentences (per-channel int8)
    assert cosines.min() >= 0.95 and cosines.mean() >= 0.98


def test_reference_file_matches_the_installed_weights() -> None:
    from runtime.embed import default_source_dir, sha256_file

    info = json.loads(str(np.load(REFERENCE)["info"]))
    assert info["torch"].startswith("2.13.0") and info["max_seq_length"] == 256
    assert info["weights_sha256"] == sha256_file(default_source_dir() / "model.safetensors")


def test_memory_store_warns_when_the_real_embedder_truncates(
    embedder: Embedder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from runtime.longterm import MemoryStore

    long_text = "the quick brown fox jumps over the lazy dog " * 80  # ~720 tokens
    with (
        MemoryStore(tmp_path, embedder) as store,
        caplog.at_level(logging.WARNING, logger="runtime.embed.embedder"),
    ):
        store.add_many(["a short note", long_text])
    (record,) = [r for r in caplog.records if r.name == "runtime.embed.embedder"]
    assert record.levelno == logging.WARNING
    assert "1 of 2 texts" in record.getMessage() and "256 tokens" in record.getMessage()
