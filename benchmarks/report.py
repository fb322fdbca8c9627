"""Turn a pytest-benchmark JSON file into the README's benchmark tables.

    python benchmarks/report.py .benchmarks/latest.json

``./dev bench`` runs the suites with ``--benchmark-json=.benchmarks/latest.json`` and then
this script. Medians are reported; the targets come from the issues.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in data["benchmarks"]}


def _ms(bench: dict[str, Any]) -> float:
    return float(bench["stats"]["median"]) * 1000.0


def snapshot_table(benches: dict[str, dict[str, Any]]) -> list[str]:
    """Save / restore / size of our snapshots against llama.cpp's sequence files."""
    names = (
        "test_save_snapshot",
        "test_save_llama_file",
        "test_restore_snapshot",
        "test_restore_llama_file",
    )
    if not all(n in benches for n in names):
        return []
    save, save_raw, rest, rest_raw = (benches[n] for n in names)
    info = save["extra_info"]
    rows = [
        f"KV snapshots: `{info.get('preset', '?')}` model, {info.get('n_tokens', '?')} tokens, "
        "f16 KV, medians",
        "",
        "| | ours | llama.cpp `state_seq_*_file` | ratio | target |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, ours, raw, target in (
        ("save (capture + compress + write + fsync)", save, save_raw, 2.0),
        ("restore (read + verify + decompress + set)", rest, rest_raw, 1.5),
    ):
        ratio = _ms(ours) / _ms(raw)
        mark = "✓" if ratio <= target else "✗"
        rows.append(
            f"| {label} | {_ms(ours):.1f} ms | {_ms(raw):.1f} ms | {ratio:.2f}× "
            f"| ≤ {target}× {mark} |"
        )
    ours_b, raw_b = info["ours_bytes"], info["raw_bytes"]
    ratio = ours_b / raw_b
    rows.append(
        f"| file size | {ours_b:,} B | {raw_b:,} B | {ratio:.3f}× | ≤ 0.85× "
        f"{'✓' if ratio <= 0.85 else '✗'} |"
    )
    return rows


def embed_table(benches: dict[str, dict[str, Any]]) -> list[str]:
    """Sentences per second of the embedder variants."""
    rows = [
        "Embedder (all-MiniLM-L6-v2, onnxruntime, 2 threads), sentences/s",
        "",
        "| texts | batch | dynamic padding (ours) | fixed pad to 256 | int8 |",
        "|---|---:|---:|---:|---:|",
    ]
    found = False
    for length in ("short", "long"):
        for batch in (1, 64):
            cells = []
            for variant in ("dynamic", "fixed256", "int8"):
                bench = benches.get(f"test_embed_throughput[{length}-{batch}-{variant}]")
                if bench is None:
                    cells.append("–")
                    continue
                found = True
                cells.append(f"{batch / float(bench['stats']['median']):.0f}")
            rows.append(f"| {length} | {batch} | " + " | ".join(cells) + " |")
    return rows if found else []


def index_table(benches: dict[str, dict[str, Any]]) -> list[str]:
    """Query latency and recall of the hnswlib index."""
    rows = [
        "hnswlib index (M=32, ef_construction=200), one query at a time",
        "",
        "| data | N | ef | p50 | p99 | recall@10 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    found = False
    for name in sorted(benches, key=lambda n: (n.split("[")[-1].split("-")[0], _ef(n))):
        if not name.startswith("test_query_latency_and_recall["):
            continue
        info = benches[name]["extra_info"]
        found = True
        rows.append(
            f"| {info.get('data', '?')} | {info.get('n', '?'):,} | {info.get('ef', '?')} "
            f"| {info.get('p50_ms', 0):.2f} ms | {info.get('p99_ms', 0):.2f} ms "
            f"| {info.get('recall_at_10', 0):.3f} |"
        )
    return rows if found else []


def _ef(name: str) -> int:
    tail = name.rstrip("]").split("-")[-1]
    return int(tail) if tail.isdigit() else 0


def main(argv: list[str] | None = None) -> int:
    """Print the tables for the JSON file named on the command line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    data = json.loads(Path(args[0]).read_text())
    benches = _by_name(data)
    machine = data.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('node', '')}")
    for table in (snapshot_table(benches), embed_table(benches), index_table(benches)):
        if table:
            print()
            print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
