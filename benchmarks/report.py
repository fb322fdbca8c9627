"""Turn a pytest-benchmark JSON file into the README's benchmark tables and charts.

    python benchmarks/report.py .benchmarks/latest.json [--markdown OUT.md] [--charts DIR]
        [--sizes 1024,4096]

``./dev bench`` runs the suites with ``--benchmark-json=.benchmarks/latest.json`` and then
this script. Medians are reported, with min–max where the spread matters; the targets come
from the issues. ``--charts`` writes ``kvio-time.png`` and ``kvio-bytes.png`` (time and bytes
against tokens, one line per method, one panel per model) and needs matplotlib (the ``bench``
extra). ``--sizes`` picks the session lengths of the KV I/O headline table (default: all).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import kvio_report


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


def _with_prefix(benches: dict[str, dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [b for name, b in sorted(benches.items()) if name.startswith(prefix + "[")]


def _spread(p: dict[str, Any]) -> str:
    """``median (min–max)`` of a ``{p50_ms, min_ms, max_ms}`` dict, in ms."""
    return f"{p['p50_ms']:.1f} ({p['min_ms']:.1f}–{p['max_ms']:.1f})"


def runtime_table(benches: dict[str, dict[str, Any]]) -> list[str]:
    """The runtime's own cost per turn (``Reply.runtime_ms``) against the 20 ms target."""
    found = _with_prefix(benches, "test_runtime_cost_per_turn")
    if not found:
        return []
    rows = [
        "Runtime cost per short turn (`Reply.runtime_ms`: total minus resume, prefill and "
        "generation), long-term memory on, ms: median (min–max)",
        "",
        "| model | turns | runtime p50 (min–max) | p95 | target p50 ≤ 20 ms | retrieval p50 "
        "| render p50 | memory write p50 | whole turn p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bench in found:
        info = bench["extra_info"]
        cost = info["runtime_ms"]
        mark = "✓" if cost["p50_ms"] <= info.get("target_p50_ms", 20.0) else "✗"
        rows.append(
            f"| {info['model']} | {info['turns']} | {_spread(cost)} | {cost['p95_ms']:.1f} "
            f"| {mark} | {info.get('retrieval_p50_ms', 0):.1f} "
            f"| {info.get('render_p50_ms', 0):.1f} | {info.get('memory_write_p50_ms', 0):.1f} "
            f"| {info['total_ms']['p50_ms']:.1f} |"
        )
    return rows


def restart_table(benches: dict[str, dict[str, Any]]) -> list[str]:
    """Time to the first token after a restart: restore against re-prefill."""
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in _with_prefix(benches, "test_first_token_after_restart"):
        info = bench["extra_info"]
        by_model.setdefault(info["model"], {})[info["mode"]] = info
    if not by_model:
        return []
    rows = [
        "First token after a restart (runtime reopened, first `chat` to its first streamed "
        "piece), ms: median (min–max)",
        "",
        "| model | session tokens | restore | its resume | re-prefill | its resume "
        "| re-prefill / restore |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, modes in by_model.items():
        rest, pre = modes.get("restore"), modes.get("reprefill")
        tokens = (rest or pre or {}).get("session_tokens", "?")
        cells = []
        for info in (rest, pre):
            if info is None:
                cells += ["–", "–"]
            else:
                cells += [_spread(info["first_token_ms"]), _spread(info["resume_ms"])]
        ratio = "–"
        if rest and pre:
            ratio = f"{pre['first_token_ms']['p50_ms'] / rest['first_token_ms']['p50_ms']:.1f}×"
        rows.append(f"| {model} | {tokens:,} | " + " | ".join(cells) + f" | {ratio} |")
    return rows


def policy_table(benches: dict[str, dict[str, Any]]) -> list[str]:
    """Turn latency with a checkpoint every turn against the default policy."""
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in _with_prefix(benches, "test_turn_latency_by_policy"):
        info = bench["extra_info"]
        by_model.setdefault(info["model"], {})[info["policy"]] = info
    if not by_model:
        return []
    rows = [
        'Turn latency by checkpoint policy (`timings["total"]`, the same scripted short '
        "turns), ms: median (min–max)",
        "",
        "| model | default policy | checkpoints | every turn | checkpoints "
        "| every turn / default |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model, policies in by_model.items():
        base, every = policies.get("default"), policies.get("every_turn")
        cells = []
        for info in (base, every):
            if info is None:
                cells += ["–", "–"]
            else:
                cells += [_spread(info["total_ms"]), str(info.get("checkpoints_written", "?"))]
        ratio = "–"
        if base and every:
            ratio = f"{every['total_ms']['p50_ms'] / base['total_ms']['p50_ms']:.2f}×"
        rows.append(f"| {model} | " + " | ".join(cells) + f" | {ratio} |")
    return rows


def server_table(benches: dict[str, dict[str, Any]]) -> list[str]:
    """Requests/s and latency of short turns by concurrent sessions."""
    found = _with_prefix(benches, "test_server_short_turns")
    if not found:
        return []
    rows = [
        "Server: short turns (`max_tokens=8`, non-streamed), one client thread per session, "
        "uvicorn on loopback",
        "",
        "| model | sessions | max_resident | requests | requests/s | p50 | p99 "
        "| resumes from snapshot |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    found.sort(key=lambda b: (b["extra_info"]["model"], b["extra_info"]["sessions"]))
    for bench in found:
        info = bench["extra_info"]
        rows.append(
            f"| {info['model']} | {info['sessions']} | {info['max_resident']} "
            f"| {info['requests']} | {info['requests_per_s']:.2f} | {info['p50_ms']:.0f} ms "
            f"| {info['p99_ms']:.0f} ms | {info.get('resumes', {}).get('snapshot', 0)} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the tables for the JSON file named on the command line (and write the files)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    parser.add_argument("--charts", type=Path, help="write the PNG charts into this directory")
    parser.add_argument("--sizes", help="session lengths of the KV I/O headline table")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    data = json.loads(args.json.read_text())
    benches = _by_name(data)
    sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else None
    out: list[str] = kvio_report.machine_lines(data)
    tables = (
        *kvio_report.tables(data["benchmarks"], sizes),
        snapshot_table(benches),
        embed_table(benches),
        index_table(benches),
        runtime_table(benches),
        restart_table(benches),
        policy_table(benches),
        server_table(benches),
        kvio_report.other_table(data["benchmarks"]),
    )
    for table in tables:
        if table:
            out += ["", *table]
    text = "\n".join(out) + "\n"
    print(text, end="")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.charts:
        for path in kvio_report.charts(data["benchmarks"], args.charts):
            print(f"chart: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
