"""Lifetimes: no leak over 1,000 contexts, and a silent interpreter shutdown with live objects."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llamaffi import Model


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status")


def test_one_thousand_contexts_keep_rss_flat(tiny_model_path: Path) -> None:
    with Model(tiny_model_path) as model:

        def cycle(n: int, closing: bool) -> None:
            for _ in range(n):
                ctx = model.context(n_ctx=64, n_batch=16, n_threads=1)
                ctx.decode([1, 2, 3])
                if closing:
                    ctx.close()
                del ctx  # the finalizer frees it when close() was not called

        cycle(50, True)  # warm-up: allocator pools, lazily loaded backends
        gc.collect()
        before = rss_kib()
        cycle(500, True)
        cycle(500, False)
        gc.collect()
        after = rss_kib()
    # One leaked context costs ~1 MiB (compute buffers + KV); 1,000 of them would be ~1 GiB.
    # 32 MiB of slack covers allocator noise without hiding a per-context leak.
    assert after - before < 32 * 1024, f"RSS grew by {(after - before) / 1024:.1f} MiB"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_shutdown_with_live_objects_prints_nothing(tiny_model_path: Path) -> None:
    result = run_python(
        f"""
        from llamaffi import Model, Sampler
        model = Model({str(tiny_model_path)!r})
        ctx = model.context(n_ctx=128, n_seq_max=2)
        ctx.decode(model.tokenize("left alive on purpose"))
        other = model.context(n_ctx=64)
        sampler = Sampler.greedy()
        cycle = [ctx, other]
        cycle.append(cycle)  # a reference cycle, collected only at shutdown
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""


def test_shutdown_after_close_prints_nothing(tiny_model_path: Path) -> None:
    result = run_python(
        f"""
        from llamaffi import Model
        with Model({str(tiny_model_path)!r}) as model, model.context(n_ctx=64) as ctx:
            ctx.decode([1, 2])
        model.close()
        """
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
