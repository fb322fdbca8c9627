"""The KV I/O suite's part of the report: tables, ratios, scaling fits, charts, machine header.

Used by ``report.py``; everything is read from the benchmarks' ``extra_info`` (``method``,
``stage``, ``model``, ``kv_type``, ``n_tokens``, ``bytes``), so a new method or model shows up
without a change here. Times are medians with min–max in brackets.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

#: Methods of the headline table and the charts, in display order: (method, kind).
SAVE_METHODS = (
    "raw save + fsync",
    "raw save (no fsync)",
    "ours save",
    "ours checkpoint +64",
    "peer save",
)
RESTORE_METHODS = ("raw load", "ours restore", "ours chunked restore", "peer load", "re-prefill")
METHODS = SAVE_METHODS + RESTORE_METHODS
SAVE_STAGES = ("get", "filter", "compress", "digest", "write", "fsync")
RESTORE_STAGES = ("read", "verify", "decompress", "unfilter", "set")
#: A fit is flagged non-linear when a point is this far (relative) from the line...
NONLINEAR_REL = 0.25
#: ... and further than this many ms.
NONLINEAR_ABS_MS = 2.0
#: Modules whose benchmarks have their own tables (the rest go to :func:`other_table`).
KNOWN_MODULES = (
    "test_bench_kvio",
    "test_bench_snapshot",
    "test_bench_chunks",
    "test_bench_embed",
    "test_bench_index",
    "test_bench_runtime",
    "test_bench_server",
)


def _stats_ms(bench: dict[str, Any]) -> tuple[float, float, float]:
    st = bench["stats"]
    return float(st["median"]) * 1e3, float(st["min"]) * 1e3, float(st["max"]) * 1e3


def _fmt_ms(ms: float) -> str:
    if ms >= 10000:
        return f"{ms / 1000:,.1f} s"
    if ms >= 100:
        return f"{ms:,.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def _cell(bench: dict[str, Any] | None) -> str:
    if bench is None:
        return "–"
    med, lo, hi = _stats_ms(bench)
    rounds = bench["stats"].get("rounds", 1)
    if rounds <= 1:
        return f"{_fmt_ms(med)} (1 round)"
    return f"{_fmt_ms(med)} ({_fmt_ms(lo)}–{_fmt_ms(hi)})"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def _kvio(benches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in benches if "test_bench_kvio" in b.get("fullname", "") and b["extra_info"]]


def _index(benches: list[dict[str, Any]]) -> dict[tuple[str, str, int, str, str], dict[str, Any]]:
    """(model, kv_type, n_tokens, method, stage) -> benchmark, for the non-codec methods."""
    out = {}
    for b in _kvio(benches):
        e = b["extra_info"]
        if e["method"].startswith("codec"):
            continue
        out[(e["model"], e["kv_type"], int(e["n_tokens"]), e["method"], e.get("stage", ""))] = b
    return out


def _models(idx: dict[tuple[str, str, int, str, str], Any]) -> list[str]:
    return list(dict.fromkeys(k[0] for k in idx))


def _sizes(idx: dict[tuple[str, str, int, str, str], Any], model: str, kv_type: str) -> list[int]:
    return sorted({k[2] for k in idx if k[0] == model and k[1] == kv_type})


def _geometry(idx: dict[tuple[str, str, int, str, str], Any], model: str) -> str:
    for k, b in idx.items():
        if k[0] == model:
            e = b["extra_info"]
            return (
                f"{e['n_layer']} layers, {e['n_head_kv']} KV heads, n_embd {e['n_embd']}, "
                f"vocab {e['n_vocab']:,}, file {e['model_file']}"
            )
    return "?"


def _synth(idx: dict[tuple[str, str, int, str, str], Any], model: str, n: int) -> bool:
    return any(
        b["extra_info"].get("synthesized") for k, b in idx.items() if k[:3] == (model, "f16", n)
    )


def _label(idx: dict[tuple[str, str, int, str, str], Any], model: str, n: int) -> str:
    return f"{n:,}†" if _synth(idx, model, n) else f"{n:,}"


SYNTH_NOTE = (
    "† not prefilled (it would take over half an hour here): the state is the 4,096-token "
    "state tiled at shifted positions, in a flash-attention context (V stored row per cell, "
    "so no repeat falls inside one 1 MiB zstd frame). Real bytes and layout, no re-prefill."
)


def headline_table(
    idx: dict[tuple[str, str, int, str, str], Any], model: str, sizes: list[int]
) -> list[str]:
    """Every save/restore method at each size: median (min–max), and bytes written/read."""
    rows = [
        f"**{model}** ({_geometry(idx, model)}), f16 KV: time, median (min–max); bytes on disk",
        "",
        "| method | " + " | ".join(f"{_label(idx, model, n)} tokens | bytes" for n in sizes) + " |",
        "|---|" + "---:|---:|" * len(sizes),
    ]
    for method in METHODS:
        cells, found = [], False
        for n in sizes:
            b = idx.get((model, "f16", n, method, ""))
            found = found or b is not None
            size = b["extra_info"].get("bytes") if b else None
            cells += [_cell(b), _mb(size) if size else "–"]
        if found:
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
    if any(_synth(idx, model, n) for n in sizes):
        rows += ["", SYNTH_NOTE]
    return rows


def _med(
    idx: dict[tuple[str, str, int, str, str], Any], model: str, n: int, method: str, kv: str = "f16"
) -> float | None:
    b = idx.get((model, kv, n, method, ""))
    return _stats_ms(b)[0] if b else None


def _fastest(
    idx: dict[tuple[str, str, int, str, str], Any], model: str, n: int, method: str
) -> float | None:
    b = idx.get((model, "f16", n, method, ""))
    return _stats_ms(b)[1] if b else None


def _bytes(
    idx: dict[tuple[str, str, int, str, str], Any], model: str, n: int, method: str
) -> float | None:
    b = idx.get((model, "f16", n, method, ""))
    return float(b["extra_info"]["bytes"]) if b and b["extra_info"].get("bytes") else None


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{digits}f}×"


def ratio_table(
    idx: dict[tuple[str, str, int, str, str], Any], model: str, sizes: list[int]
) -> list[str]:
    """The headline ratios (medians): against raw, the peer and re-prefill; sizes."""
    rows = [
        f"**{model}**: headline ratios (medians; < 1× means ours is faster or smaller)",
        "",
        "| ratio | " + " | ".join(f"{_label(idx, model, n)} tokens" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    specs = (
        ("ours save / raw save + fsync", "ours save", "raw save + fsync", "t"),
        ("ours restore / raw load", "ours restore", "raw load", "t"),
        ("peer save / ours save (how much slower the peer is)", "peer save", "ours save", "t"),
        ("peer load / ours restore", "peer load", "ours restore", "t"),
        ("checkpoint +64 / ours full save", "ours checkpoint +64", "ours save", "t"),
        ("re-prefill / ours restore (resume speed-up)", "re-prefill", "ours restore", "t"),
        ("re-prefill / ours chunked restore", "re-prefill", "ours chunked restore", "t"),
        ("ours file / raw file", "ours save", "raw save + fsync", "b"),
        ("peer file / ours file", "peer save", "ours save", "b"),
        ("checkpoint +64 bytes / ours file", "ours checkpoint +64", "ours save", "b"),
    )
    for label, a, b, kind in specs:
        get = _med if kind == "t" else _bytes
        cells = [
            _ratio(get(idx, model, n, a), get(idx, model, n, b), 3 if kind == "b" else 2)
            for n in sizes
        ]
        if any(c != "–" for c in cells):
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def stage_table(
    idx: dict[tuple[str, str, int, str, str], Any],
    model: str,
    sizes: list[int],
    kv_type: str = "f16",
) -> list[str]:
    """Where a save and a restore spend their time, stage by stage, against the whole."""
    rows = [
        f"**{model}**, {kv_type} KV: save and restore by stage, median ms "
        "(each stage timed on its own; the sum omits hand-offs and allocation)",
        "",
        "| stage | " + " | ".join(_label(idx, model, n) for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    found = False
    for method, stages in (("ours save", SAVE_STAGES), ("ours restore", RESTORE_STAGES)):
        sums = [0.0] * len(sizes)
        for stage in stages:
            cells = []
            for i, n in enumerate(sizes):
                b = idx.get((model, kv_type, n, method, stage))
                if b is None:
                    cells.append("–")
                    continue
                found = True
                med = _stats_ms(b)[0]
                sums[i] += med
                cells.append(f"{med:.2f}")
            rows.append(f"| {method.split()[1]}: {stage} | " + " | ".join(cells) + " |")
        rows.append(
            f"| **{method.split()[1]}: sum of stages** | "
            + " | ".join(f"**{v:.2f}**" for v in sums)
            + " |"
        )
        whole = [_med(idx, model, n, method, kv_type) for n in sizes]
        rows.append(
            f"| **{method}, whole** | "
            + " | ".join(f"**{v:.2f}**" if v is not None else "–" for v in whole)
            + " |"
        )
    return rows if found else []


def codec_table(benches: list[dict[str, Any]], model: str) -> list[str]:
    """zstd level x plane filter x threads: encode and decode time, file size, ratio."""
    grid: dict[tuple[int, str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    n_tokens = raw = None
    for b in _kvio(benches):
        e = b["extra_info"]
        if e["model"] != model or not e["method"].startswith("codec"):
            continue
        grid[(int(e["level"]), e["filter"], int(e["threads"]))][e["method"].split()[1]] = b
        n_tokens, raw = e["n_tokens"], e["raw_bytes"]
    if not grid:
        return []
    rows = [
        f"**{model}**: codec choices at {n_tokens:,} tokens (raw file {_mb(raw or 0)}), "
        "median (min–max)",
        "",
        "| zstd level | plane filter | threads | encode | decode | file | ratio (raw/file) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (level, filt, threads), parts in sorted(grid.items()):
        enc, dec = parts.get("encode"), parts.get("decode")
        e = (enc or dec or {}).get("extra_info", {})
        rows.append(
            f"| {level} | {'on' if filt == 'planes' else 'off'} | {threads} | {_cell(enc)} "
            f"| {_cell(dec)} | {_mb(e.get('bytes', 0))} | {e.get('ratio', 0):.3f} |"
        )
    return rows


def kvtype_table(idx: dict[tuple[str, str, int, str, str], Any], model: str) -> list[str]:
    """f16 against q8_0 KV at the size the q8_0 case ran."""
    q8_sizes = _sizes(idx, model, "q8_0")
    if not q8_sizes:
        return []
    n = q8_sizes[0]
    rows = [
        f"**{model}**: KV type at {n:,} tokens (q8_0 needs flash attention, so its V is not "
        "transposed), median (min–max)",
        "",
        "| method | f16 | bytes | q8_0 | bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in ("raw save + fsync", "raw load", "ours save", "ours restore"):
        cells = []
        for kv in ("f16", "q8_0"):
            b = idx.get((model, kv, n, method, ""))
            cells += [_cell(b), _mb(b["extra_info"]["bytes"]) if b else "–"]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return rows


def fit(points: list[tuple[int, float]]) -> tuple[float, float, float, bool] | None:
    """Least squares ``ms = intercept + slope * tokens``: (slope per 1k tokens, intercept,
    worst relative residual, non-linear?) for 2+ sizes; None for fewer."""
    if len(points) < 2:
        return None
    xs = [p[0] / 1000.0 for p in points]
    ys = [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    worst, flagged = 0.0, False
    for x, y in zip(xs, ys, strict=True):
        resid = abs(y - (intercept + slope * x))
        rel = resid / max(abs(y), 1e-9)
        worst = max(worst, rel)
        flagged = flagged or (rel > NONLINEAR_REL and resid > NONLINEAR_ABS_MS)
    return slope, intercept, worst, flagged and len(points) > 2


def scaling_table(idx: dict[tuple[str, str, int, str, str], Any], model: str) -> list[str]:
    """A line through each method's fastest rounds against tokens (prefilled sizes only);
    flags what a line does not fit, and compares tiled († sizes) against the line."""
    all_sizes = _sizes(idx, model, "f16")
    sizes = [n for n in all_sizes if not _synth(idx, model, n)]
    extra = [n for n in all_sizes if _synth(idx, model, n)]
    if len(sizes) < 2:
        return []
    rows = [
        f"**{model}**: scaling, least-squares line through the fastest round at "
        f"{', '.join(f'{n:,}' for n in sizes)} tokens"
        + (
            f" ({', '.join(_label(idx, model, n) for n in extra)}: measured / line)"
            if extra
            else ""
        ),
        "",
        "| method | ms per 1k tokens | intercept | worst residual | linear? | bytes per token | "
        + "".join(f"{_label(idx, model, n)} | " for n in extra),
        "|---|---:|---:|---:|---|---:|" + "---:|" * len(extra),
    ]
    for method in METHODS:
        # the fastest round: the least disturbed by other jobs on a shared machine
        pts = [(n, m) for n in sizes if (m := _fastest(idx, model, n, method)) is not None]
        result = fit(pts)
        if result is None:
            continue
        slope, intercept, worst, nonlinear = result
        bpts = [(n, b) for n in sizes if (b := _bytes(idx, model, n, method)) is not None]
        bfit = fit([(n, b / 1000.0) for n, b in bpts])  # kB vs k-tokens = bytes per token
        per_tok = f"{bfit[0]:,.0f}" if bfit else "–"
        verdict = "– (2 sizes)" if len(pts) < 3 else ("**no**" if nonlinear else "yes")
        cells = []
        for n in extra:
            got = _fastest(idx, model, n, method)
            line = intercept + slope * n / 1000.0
            cells.append(f"{got / line:.2f}×" if got is not None and line > 0 else "–")
        rows.append(
            f"| {method} | {slope:,.2f} | {intercept:,.2f} ms | {worst * 100:.0f} % "
            f"| {verdict} | {per_tok} | " + "".join(f"{c} | " for c in cells)
        )
    rows.append("")
    rows.append(
        f"A method is flagged non-linear when a point lies more than {NONLINEAR_REL:.0%} "
        f"and {NONLINEAR_ABS_MS:g} ms off its line. † sizes are tiled states in a "
        "flash-attention layout, so they are compared with the line, not fitted."
    )
    return rows


def tables(benches: list[dict[str, Any]], sizes: list[int] | None = None) -> list[list[str]]:
    """Every KV I/O table, model by model."""
    idx = _index(benches)
    out: list[list[str]] = []
    for model in _models(idx):
        shown = [n for n in _sizes(idx, model, "f16") if sizes is None or n in sizes]
        if not shown:
            continue
        out += [
            headline_table(idx, model, shown),
            ratio_table(idx, model, shown),
            stage_table(idx, model, shown),
            kvtype_table(idx, model),
            codec_table(benches, model),
            scaling_table(idx, model),
        ]
    return [t for t in out if t]


def other_table(benches: list[dict[str, Any]]) -> list[str]:
    """Benchmarks of modules without their own table (e.g. test_bench_kvquant): name, median
    (min–max) and whatever scalar ``extra_info`` they recorded."""
    rows = [
        "Other benchmarks: median (min–max) and their recorded `extra_info`",
        "",
        "| benchmark | time | extra_info |",
        "|---|---:|---|",
    ]
    found = False
    for b in benches:
        module = b.get("fullname", "").split("::")[0]
        if any(known in module for known in KNOWN_MODULES):
            continue
        found = True
        info = ", ".join(
            f"{k}={_scalar(v)}" for k, v in b.get("extra_info", {}).items() if _is_scalar(v)
        )
        rows.append(f"| `{b['name']}` | {_cell(b)} | {info} |")
    return rows if found else []


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def machine_lines(data: dict[str, Any]) -> list[str]:
    """The run's header: date, CPU, cores, flags, thread environment, load, llama.cpp build."""
    mi = data.get("machine_info", {})
    ours = mi.get("llamaffi", {})
    cpu = ours.get("cpu_detail", {})
    build = ours.get("llama_cpp_build", {})
    brand = mi.get("cpu", {}).get("brand_raw") or cpu.get("model", "?")
    lines = [
        f"Run {ours.get('date_utc', data.get('datetime', '?'))} ({ours.get('bench_mode', '?')} "
        f"mode) on {brand}, {cpu.get('usable_cores', '?')} usable cores "
        f"(SIMD: {', '.join(cpu.get('simd_flags', [])) or '?'}); "
        + ", ".join(f"{k}={v}" for k, v in ours.get("env", {}).items()),
    ]
    start, end = ours.get("load_average_at_start"), ours.get("load_average_at_end")
    if start:
        lines.append(
            f"Load average (1/5/15 min) at start {'/'.join(f'{v:.1f}' for v in start)}"
            + (f", at end {'/'.join(f'{v:.1f}' for v in end)}" if end else "")
            + " — the machine is shared, so read the figures as upper bounds."
        )
    if build:
        lines.append(
            f"llama.cpp build {build.get('build_number', '?')} "
            f"({str(build.get('commit', '?'))[:12]}, GGML_NATIVE={build.get('ggml_native', '?')}, "
            f"{build.get('compiler', '?')})."
        )
    peers = {
        b["extra_info"].get("peer_variant")
        for b in _kvio(data.get("benchmarks", []))
        if b["extra_info"].get("peer_variant")
    }
    if peers:
        lines.append(f"Peer: llama-cpp-python 0.3.36, variant {', '.join(sorted(peers))}.")
    return lines


# -- charts ----------------------------------------------------------------------------------------


def charts(benches: list[dict[str, Any]], directory: Path) -> list[Path]:
    """``kvio-time.png`` and ``kvio-bytes.png``: against tokens, one line per method, one panel
    per model (log-log). Returns the paths written; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("charts: matplotlib is not installed (the bench extra); no charts written")
        return []
    idx = _index(benches)
    models = [m for m in _models(idx) if len(_sizes(idx, m, "f16")) >= 1]
    if not models:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in ("time", "bytes"):
        fig, axes = plt.subplots(
            1, len(models), figsize=(max(8.0, 6.4 * len(models)), 5.6), squeeze=False
        )
        ncol = 5 if len(models) >= 2 else 3
        for ax, model in zip(axes[0], models, strict=True):
            sizes = _sizes(idx, model, "f16")
            methods = (
                METHODS
                if kind == "time"
                else (
                    "raw save + fsync",
                    "ours save",
                    "ours checkpoint +64",
                    "peer save",
                )
            )
            for method in methods:
                xs, ys, lo, hi = [], [], [], []
                for n in sizes:
                    b = idx.get((model, "f16", n, method, ""))
                    if b is None:
                        continue
                    if kind == "time":
                        med, mn, mx = _stats_ms(b)
                        xs.append(n)
                        ys.append(med)
                        lo.append(med - mn)
                        hi.append(mx - med)
                    elif b["extra_info"].get("bytes"):
                        xs.append(n)
                        ys.append(b["extra_info"]["bytes"] / 1e6)
                if not xs:
                    continue
                label = (
                    "raw llama.cpp file" if kind == "bytes" and method.startswith("raw") else method
                )
                style = "--" if method.startswith(("raw", "peer")) else "-"
                if kind == "time":
                    ax.errorbar(
                        xs, ys, yerr=[lo, hi], marker="o", linestyle=style, label=label, capsize=3
                    )
                else:
                    ax.plot(xs, ys, marker="o", linestyle=style, label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes, [_label(idx, model, n) for n in sizes])
            ax.set_xlabel("session length (tokens)")
            ax.set_ylabel("median ms (bars: min–max)" if kind == "time" else "MB on disk")
            ax.set_title(f"{model}, f16 KV")
            ax.grid(True, which="both", alpha=0.3)
        handles: dict[str, Any] = {}
        for ax in axes[0]:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=8)
        fig.suptitle(
            "KV save/restore time against session length"
            if kind == "time"
            else "Bytes written per save against session length"
        )
        fig.tight_layout(rect=(0, 0.13 if ncol == 5 else 0.18, 1, 1))
        path = directory / f"kvio-{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
