"""Fixtures shared by the long-term memory tests: the real MiniLM embedder and a store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.longterm import MemoryStore


@pytest.fixture(scope="session")
def minilm() -> object:
    """all-MiniLM-L6-v2 (ONNX), loaded once."""
    from runtime.embed import Embedder

    return Embedder.default()


@pytest.fixture
def memstore(tmp_path: Path, minilm: object) -> Iterator[MemoryStore]:
    """A new long-term store under ``tmp_path`` with :func:`minilm`."""
    with MemoryStore(tmp_path / "mem", minilm) as s:  # type: ignore[arg-type]
        yield s
