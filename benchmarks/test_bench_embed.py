"""Embedder throughput: dynamic padding vs fixed pad-to-256 (Chroma's way), fp32 vs int8.

    .venv/bin/pytest benchmarks/test_bench_embed.py --benchmark-enable -s

Each case embeds ``batch`` texts per round; sentences/s = batch / mean round time (printed
with ``-s`` and stored in ``extra_info``). Short texts are 10-30 tokens, long ones ~200.
Under ``--benchmark-disable`` every case runs once, as a smoke test.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest

from runtime.embed import Embedder, export_minilm, quantize_int8

WORDS = [
    "memory",
    "store",
    "index",
    "vector",
    "query",
    "user",
    "assistant",
    "session",
    "meeting",
    "coffee",
    "berlin",
    "project",
    "deadline",
    "report",
    "summary",
    "model",
    "weights",
    "token",
    "batch",
    "latency",
    "throughput",
    "recall",
    "cosine",
    "friday",
    "monday",
    "birthday",
    "daughter",
    "server",
    "port",
    "deploy",
    "rollback",
    "plan",
    "note",
    "fact",
    "turn",
]


def make_texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


SHORT = make_texts(64, 12, 1)  # ~14 tokens each
LONG = make_texts(64, 190, 2)  # ~200 tokens each


@pytest.fixture(scope="module")
def embedders() -> dict[str, Embedder]:
    d = export_minilm()
    return {
        "dynamic": Embedder.from_dir(d),
        "fixed256": Embedder.from_dir(d, pad_to=256),
        "int8": Embedder.from_dir(d, onnx_file=quantize_int8(d).name, model_id="minilm-int8"),
    }


def _report(benchmark: Callable[..., object], name: str, batch: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    rate = batch / stats.stats.mean
    benchmark.extra_info["sentences_per_s"] = round(rate, 1)  # type: ignore[attr-defined]
    print(f"\n{name}: {rate:.1f} sentences/s")


@pytest.mark.parametrize("variant", ["dynamic", "fixed256", "int8"])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("length", ["short", "long"])
def test_embed_throughput(
    benchmark: object, embedders: dict[str, Embedder], variant: str, batch: int, length: str
) -> None:
    embedder = embedders[variant]
    texts = (SHORT if length == "short" else LONG)[:batch]
    embedder.embed(texts)  # warm-up: session creation and first-run allocations
    out = benchmark(embedder.embed, texts)  # type: ignore[operator]
    assert out.shape == (batch, 384)
    if length == "short":
        assert embedder.last_stats.tokens <= 32 * batch
    _report(benchmark, f"{variant} {length} batch={batch}", batch)  # type: ignore[arg-type]


def test_int8_agreement_with_fp32(benchmark: object, embedders: dict[str, Embedder]) -> None:
    texts = SHORT + LONG
    fp32 = embedders["dynamic"].embed(texts)
    int8 = benchmark(embedders["int8"].embed, texts)  # type: ignore[operator]
    cosines = (fp32 * int8).sum(axis=1)
    benchmark.extra_info["cosine_min"] = float(cosines.min())  # type: ignore[attr-defined]
    benchmark.extra_info["cosine_mean"] = float(cosines.mean())  # type: ignore[attr-defined]
    print(f"\nint8 vs fp32 cosine: min {cosines.min():.4f} mean {cosines.mean():.4f}")
    assert float(np.min(cosines)) >= 0.95
