"""``python -m runtime stats --dir D [--json]``: what a runtime holds, read-only.

Works while the runtime runs (it reads the ``stats.json`` the runtime publishes every few
seconds, and measures the files on disk itself).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``stats`` arguments."""
    parser.add_argument("--dir", required=True, help="the runtime's data directory")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def _on_off(value: object) -> str:
    """``on``/``off`` for a flag, ``-`` when the stats file has none (an older runtime's)."""
    return "-" if value is None else "on" if value else "off"


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}{unit}"
    if isinstance(value, int) and unit == " B":
        return f"{value:,} B"
    return f"{value}{unit}"


def run(args: argparse.Namespace) -> int:
    """Print the stats; returns the exit code."""
    from runtime.app import read_stats

    stats = read_stats(args.dir)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    s, kv, snaps = stats.get("sessions", {}), stats.get("kv", {}), stats.get("snapshots", {})
    res, mem, turns = stats.get("resumes", {}), stats.get("memory", {}), stats.get("turns", {})
    model = stats.get("model", {})
    lines = [
        f"data dir        {stats['data_dir']} ({'running' if stats['running'] else 'not running'})",
        f"model           {model.get('name', '-')} ({model.get('template', '-')}, "
        f"n_ctx {model.get('n_ctx', '-')}, kv {model.get('kv_type', '-')}, "
        f"flash attention {_on_off(model.get('flash_attn'))})",
        f"sessions        {s.get('known', 0)} known, {_fmt(s.get('resident'))} resident, "
        f"{_fmt(s.get('suspended'))} suspended",
        f"kv cells        {_fmt(kv.get('cells_used'))} of {_fmt(kv.get('n_ctx'))}",
        f"snapshots       {_fmt(snaps.get('bytes'), ' B')} on disk; last save "
        f"{_fmt(snaps.get('last_save_ms'), ' ms')}, last restore "
        f"{_fmt(snaps.get('last_restore_ms'), ' ms')}; failed {_fmt(snaps.get('failed'))}",
        f"resumes         {_fmt(res.get('snapshot', 0))} from a snapshot, "
        f"{_fmt(res.get('journal', 0))} from the journal",
        f"journal         {_fmt(stats.get('journal', {}).get('bytes'), ' B')}",
        f"memory items    {_fmt(mem.get('items'))}; retrieval p50 "
        f"{_fmt(mem.get('retrieval_p50_ms'), ' ms')}",
        f"turns           {_fmt(turns.get('count'))}; runtime cost p50 "
        f"{_fmt(turns.get('runtime_p50_ms'), ' ms')}",
    ]
    print("\n".join(lines))
    return 0
