"""One batched decode step of several resident sessions, by attention kernel and KV layout.

The runtime keeps every resident session in one KV cache (``kv_unified``), so each token's
attention sees every session's cells, masked to its own. llama.cpp's plain CPU kernel
multiplies through the masked cells; its flash-attention kernel skips them. llama-server's
``-np S`` gives each slot a stream of its own (``kv_unified=False``), which is the third
layout measured, as the peer's.

``S`` sessions (``BENCH_ATTN_SESSIONS``, default 1,4,8) each hold ``CELLS`` (500) prefilled
cells of SmolLM2 (``BENCH_ATTN_MODEL``; ``tiny`` in CI mode); one round is one
``llama_decode`` of the next token of every session, as the runtime's batcher steps them.

    .venv/bin/python -m pytest benchmarks/test_bench_attention.py --benchmark-enable
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from conftest import CI, prompt_tokens, require_model, rounds

from llamaffi import Context
from runtime.models import load_model, resolve_model

MODEL = os.environ.get("BENCH_ATTN_MODEL", "tiny" if CI else "smollm2")
SESSIONS = tuple(int(n) for n in os.environ.get("BENCH_ATTN_SESSIONS", "1,4,8").split(","))
CELLS = 64 if CI else 500
#: layout -> context arguments
LAYOUTS: dict[str, dict[str, Any]] = {
    "plain-unified": {"flash_attn": False, "kv_unified": True},
    "flash-unified": {"flash_attn": True, "kv_unified": True},  # the runtime's default
    "flash-per-stream": {"flash_attn": True, "kv_unified": False},  # llama-server's -np S
}


@pytest.fixture(scope="module")
def model() -> Any:
    with load_model(resolve_model(require_model(MODEL))) as m:
        yield m


@pytest.mark.parametrize("sessions", SESSIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_attention_step(benchmark: Any, model: Any, layout: str, sessions: int) -> None:
    args = LAYOUTS[layout]
    # per stream, each sequence gets n_ctx / n_seq_max cells: room for the prefill and steps
    n_ctx = sessions * (CELLS + 256)
    with Context(model, n_ctx=n_ctx, n_batch=512, n_seq_max=sessions, **args) as ctx:
        tokens = prompt_tokens(model, CELLS)
        for seq in range(sessions):
            ctx.decode(tokens, seq_id=seq, pos=0, logits="none")
        state = {"pos": CELLS}

        def step() -> None:
            pos = state["pos"]
            ctx.decode_batch(
                list(range(sessions)), [tokens[pos % CELLS]] * sessions, [pos] * sessions
            )
            state["pos"] = pos + 1

        benchmark.pedantic(step, rounds=rounds(40), iterations=1, warmup_rounds=0 if CI else 3)
    benchmark.extra_info.update(
        {"model": MODEL, "layout": layout, "sessions": sessions, "cells_each": CELLS}
    )
