"""Shared benchmark fixtures: cached random-weight models and a prefilled context.

By default the benchmarks use the small ``tiny`` model and a short prompt, so that
``pytest benchmarks --benchmark-disable`` stays quick. ``BENCH_FULL=1`` switches to the
``tinyllama-geometry`` model (22 layers, 2048 wide, 4 KV heads) and a 1024-token prompt: the
configuration the README reports. Models are cached under ``$LLAMAFFI_BENCH_MODELS``
(default ``~/.cache/llamaffi/bench-models``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FULL = os.environ.get("BENCH_FULL") == "1"

#: (model preset, prompt tokens, n_ctx) for the default and the full configuration; n_ctx
#: holds the prompt twice (seq 0 is the source, seq 1 the restore target).
CONFIG = ("tinyllama-geometry", 1024, 2304) if FULL else ("tiny", 256, 768)


@dataclasses.dataclass
class BenchConfig:
    """The benchmark configuration, recorded in every benchmark's ``extra_info``."""

    preset: str
    n_tokens: int
    n_ctx: int

    def as_info(self) -> dict[str, Any]:
        """A dict for ``benchmark.extra_info``."""
        return dataclasses.asdict(self)


@pytest.fixture(scope="session")
def bench_config() -> BenchConfig:
    """What this run measures (``BENCH_FULL=1`` for the reported configuration)."""
    return BenchConfig(*CONFIG)


@pytest.fixture(scope="session")
def bench_models_dir() -> Path:
    """Where generated benchmark models are cached between runs."""
    root = os.environ.get("LLAMAFFI_BENCH_MODELS")
    path = Path(root) if root else Path.home() / ".cache" / "llamaffi" / "bench-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def bench_model_path(bench_models_dir: Path, bench_config: BenchConfig) -> Path:
    """The benchmark GGUF (built once with ``llamaffi.testing.make_model``, then reused)."""
    from llamaffi.testing import make_model

    path = bench_models_dir / f"{bench_config.preset}-seed0.gguf"
    if not path.exists():
        make_model(path, preset=bench_config.preset, seed=0)
    return path


@pytest.fixture(scope="session")
def bench_model(bench_model_path: Path) -> Iterator[Any]:
    """The loaded benchmark model."""
    import llamaffi

    with llamaffi.Model(bench_model_path) as model:
        yield model


def prompt_tokens(model: Any, n: int) -> list[int]:
    """``n`` token ids of English-looking text (repeated as needed)."""
    text = (
        "Short-term memory for a language model is its KV cache: every token it has read "
        "leaves keys and values behind, one row per layer, and a snapshot keeps them. "
    )
    tokens: list[int] = []
    while len(tokens) < n:
        tokens += list(model.tokenize(text, add_special=not tokens))
    return tokens[:n]


@dataclasses.dataclass
class Prefilled:
    """A context with ``tokens`` decoded into sequence 0."""

    ctx: Any
    tokens: list[int]


@pytest.fixture(scope="session")
def prefilled(bench_model: Any, bench_config: BenchConfig) -> Iterator[Prefilled]:
    """Prefill once per session (17 s at 1024 tokens on 2 cores) and share the context."""
    tokens = prompt_tokens(bench_model, bench_config.n_tokens)
    with bench_model.context(
        n_ctx=bench_config.n_ctx, n_batch=512, n_seq_max=2, type_k="f16", type_v="f16"
    ) as ctx:
        ctx.decode(tokens, seq_id=0, logits="none")
        yield Prefilled(ctx, tokens)


# -- the runtime and server benchmarks -------------------------------------------------------

#: Models of ``test_bench_runtime`` and ``test_bench_server``: ``BENCH_MODEL`` is a
#: comma-separated list of :func:`runtime.models.resolve_model` names (``tiny``, ``smollm2``)
#: or GGUF paths. Default ``tiny`` (the fast mode); ``tiny,smollm2`` with ``BENCH_FULL=1``.
RUNTIME_MODELS = tuple(
    name.strip()
    for name in os.environ.get("BENCH_MODEL", "tiny,smollm2" if FULL else "tiny").split(",")
    if name.strip()
)


def require_model(name: str) -> str:
    """``name`` if :func:`runtime.models.resolve_model` finds it; otherwise skip the test."""
    from runtime.errors import ModelNotFoundError
    from runtime.models import resolve_model

    try:
        resolve_model(name)
    except ModelNotFoundError as exc:
        pytest.skip(f"model {name!r} is not available: {exc}")
    return name


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@pytest.fixture(scope="session")
def bench_embedder() -> Any:
    """all-MiniLM-L6-v2 (onnxruntime), loaded once for every runtime that uses long-term memory."""
    from runtime.embed import Embedder

    return Embedder.default()
