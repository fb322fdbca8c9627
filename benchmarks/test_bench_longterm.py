"""Long-term memory on long conversations (benchmarks/longmem.py), and the query cost at size.

    ./dev bench -k longterm -s                   # LoCoMo from LOCOMO_DIR + synthetic set
    .venv/bin/python benchmarks/longmem.py --ablation     # the same, with the ablation table

``test_locomo`` imports each LoCoMo conversation through ``Runtime.import_history`` with its
original timestamps and prints found@5/found@10 per category (skipped when the data path is
absent; CI mode skips it: it takes minutes). ``test_synthetic`` runs the generated set of
updates, numbers and names. ``test_query_at_size`` measures one ``MemoryStore.search`` (query
embedding included) in a session of 5,000 items (500 in CI mode) of Zipf-distributed words
from MiniLM's vocabulary.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import longmem
import pytest
from conftest import CI, rounds

ITEMS = 500 if CI else 5000


@pytest.fixture(scope="module")
def embedder() -> Any:
    from runtime.embed import Embedder

    return Embedder.default()


def _vocabulary() -> list[str]:
    """Whole English words of MiniLM's own vocabulary (no word list ships with the project)."""
    from tokenizers import Tokenizer

    from runtime.embed import export_minilm

    vocab = Tokenizer.from_file(str(export_minilm() / "tokenizer.json")).get_vocab()
    by_id = sorted((i, w) for w, i in vocab.items() if w.isalpha() and w.islower() and len(w) > 3)
    return [w for _, w in by_id][:8000]


def _report(benchmark: Any, report: dict[str, Any]) -> None:
    for name, part in report.items():
        result = part["result"]
        benchmark.extra_info[f"{name}_found10"] = result["found10"]
        benchmark.extra_info[f"{name}_found5"] = result["found5"]
        benchmark.extra_info[f"{name}_query_p50_ms"] = result["query_p50_ms"]
        benchmark.extra_info[f"{name}_extra"] = result["extra"]
    print("\n" + longmem.markdown(report))


def test_synthetic(benchmark: Any) -> None:
    report: dict[str, Any] = {}

    def run() -> None:
        report.update(longmem.run(None, do_ablation=False))

    benchmark.pedantic(run, rounds=1, iterations=1)
    _report(benchmark, report)
    result = report["synthetic"]["result"]
    assert result["counts"]["all"] == 130
    assert result["extra"]["updates"]["questions"] == 20


def test_locomo(benchmark: Any) -> None:
    path = longmem.locomo_dir()
    if CI or not any(Path(path).glob("*.json")):
        pytest.skip(f"LoCoMo not at {path} (set LOCOMO_DIR), or CI mode")
    report: dict[str, Any] = {}

    def run() -> None:
        report.update(longmem.run(path, do_ablation=True))

    benchmark.pedantic(run, rounds=1, iterations=1)
    _report(benchmark, report)


def test_query_at_size(benchmark: Any, embedder: Any, tmp_path: Path) -> None:
    from runtime.longterm import MemoryStore
    from runtime.longterm.db import NewItem

    rng = random.Random(0)
    words = _vocabulary()
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf, like natural text
    with MemoryStore(tmp_path / "mem", embedder) as store:
        items = [
            NewItem(
                f"{' '.join(rng.choices(words, weights, k=12))} {rng.randrange(10**4)}",
                kind="turn",
                session="big",
                speaker=rng.choice(["Ana", "Ben"]),
                sources=(i,),
            )
            for i in range(ITEMS)
        ]
        for i in range(0, ITEMS, 256):
            store.put(items[i : i + 256], merge=False)
        queries = [
            f"what did Ana say about the {' '.join(rng.choices(words, weights, k=2))}?"
            for _ in range(64)
        ]
        store.search(queries[0], 10, session="big", touch=False)  # warm the session's scan
        state = {"i": 0}

        def one() -> None:
            state["i"] += 1
            store.search(queries[state["i"] % len(queries)], 10, session="big", touch=False)

        benchmark.pedantic(one, rounds=rounds(50), iterations=1)
        benchmark.extra_info["items"] = ITEMS
