"""Shared fixtures: tiny random-weight GGUF models built on the fly (cached per session)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from llamaffi import Model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's generated models live (``$LLAMAFFI_TEST_MODELS`` to reuse them)."""
    override = os.environ.get("LLAMAFFI_TEST_MODELS")
    if override:
        path = Path(override)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("models")


def _make(model_dir: Path, name: str, **kwargs: object) -> Path:
    from llamaffi.testing import make_model

    path = model_dir / f"{name}.gguf"
    if not path.exists():
        make_model(path, **kwargs)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="session")
def tiny_model_path(model_dir: Path) -> Path:
    """The ``tiny`` preset, seed 0."""
    return _make(model_dir, "tiny-seed0", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def other_model_path(model_dir: Path) -> Path:
    """Same geometry as :func:`tiny_model_path`, another seed: a different model."""
    return _make(model_dir, "tiny-seed1", preset="tiny", seed=1)


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Iterator[Model]:
    """The tiny model loaded once per test module (closed after it)."""
    from llamaffi import Model

    with Model(tiny_model_path) as m:
        yield m
