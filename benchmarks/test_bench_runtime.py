"""The runtime facade: its own cost per turn, the first token after a restart, and what
checkpointing every turn costs a turn.

Fast mode (``tiny`` only)::

    .venv/bin/python -m pytest benchmarks/test_bench_runtime.py --benchmark-enable

SmolLM2 (and ``tiny``), as reported::

    BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/test_bench_runtime.py \
        --benchmark-enable --benchmark-json=.benchmarks/runtime.json

``BENCH_MODEL=smollm2`` (or a GGUF path, or a comma-separated list) picks the models.

1. ``test_runtime_cost_per_turn``: :attr:`runtime.app.Reply.runtime_ms`, a turn's time
   minus resume, prefill and generation (retrieval, prompt render, memory write and the rest;
   the journal append is timed with the prefill and the checkpoint hand-off with the
   generation, see ``Reply.timings``). The benchmarked quantity is one short turn
   (``max_tokens=8``), long-term memory on; ``extra_info`` holds the p50/p95 of
   ``runtime_ms`` against the 20 ms target (issue 13).
2. ``test_first_token_after_restart``: a 2,000-token session, built once per model, copied
   for each round; the runtime is reopened and the first ``chat`` timed to its first streamed
   piece. ``restore`` resumes from the session's snapshot; ``reprefill`` is the same
   directory without snapshots, so the resume decodes the journal again.
3. ``test_turn_latency_by_policy``: the same scripted turns with the default
   :class:`runtime.session.checkpointer.CheckpointPolicy` and with ``every_turn()``; p50 of
   ``timings["total"]``.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FULL, RUNTIME_MODELS, percentile, require_model

from runtime.app import Reply, Runtime
from runtime.layout import CHUNK_DIR
from runtime.session.checkpointer import CheckpointPolicy

#: Measured turns per benchmark (each a pedantic round of one turn).
TURN_ROUNDS = 30 if FULL else 8
#: Restarts per restore / re-prefill benchmark, and the warm-up restarts before them.
RESTART_ROUNDS = 5 if FULL else 2
RESTART_WARMUP = 1 if FULL else 0
#: The restart benchmark's session length, in tokens (issue 13).
SESSION_TOKENS = 2000
N_CTX = 4096
MAX_TOKENS = 8

_NAMES = ("Biscuit", "Miso", "Pepper", "Juniper", "Clementine", "Otis", "Hazel", "Rufus")
_PETS = ("dog", "cat", "parrot", "tortoise", "rabbit", "ferret", "goldfish", "hamster")
_PLACES = ("Lisbon", "Oslo", "Kyoto", "Quito", "Dakar", "Perth", "Tromsø", "Cusco")
_FOODS = ("figs", "rye bread", "lentil soup", "mangoes", "oat biscuits", "pickled plums")


def scripted_turn(i: int) -> str:
    """The ``i``-th user turn of the scripted conversation (each one distinct)."""
    return (
        f"Note {i}: my {_PETS[i % len(_PETS)]} {_NAMES[i % len(_NAMES)]} came with me to "
        f"{_PLACES[(i // 2) % len(_PLACES)]} and ate {_FOODS[i % len(_FOODS)]}."
    )


def long_turn(i: int) -> str:
    """A user turn of about 150 tokens, for building a long session quickly."""
    return " ".join(scripted_turn(i * 8 + k) for k in range(8))


def _p(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 3),
        "p95_ms": round(percentile(values, 95), 3),
        "min_ms": round(min(values), 3),
        "max_ms": round(max(values), 3),
    }


def _measured(values: list[Any], warmup: int) -> list[Any]:
    """``values`` less the warm-up rounds (``--benchmark-disable`` runs the target once)."""
    return values[warmup:] if len(values) > warmup else values


def _component_p50(replies: list[Reply]) -> dict[str, float]:
    keys = sorted({k for r in replies for k in r.timings})
    return {
        f"{k}_p50_ms": round(percentile([r.timings.get(k, 0.0) for r in replies], 50), 3)
        for k in keys
    }


@pytest.fixture(scope="module", params=RUNTIME_MODELS)
def model_name(request: pytest.FixtureRequest) -> str:
    """A model of ``BENCH_MODEL`` (skipped when it is not installed)."""
    return require_model(str(request.param))


# -- 1. the runtime's own cost per turn -------------------------------------------------------


@pytest.mark.benchmark(group="runtime-turn")
def test_runtime_cost_per_turn(
    benchmark: Any, model_name: str, bench_embedder: Any, tmp_path: Path
) -> None:
    """One short turn (``max_tokens=8``) with long-term memory; ``runtime_ms`` p50/p95."""
    replies: list[Reply] = []
    with Runtime.open(
        tmp_path / "data", model=model_name, n_ctx=N_CTX, max_resident=2, embedder=bench_embedder
    ) as rt:
        rt.chat("bench", "Hello! " + scripted_turn(0), max_tokens=MAX_TOKENS)  # system prompt
        counter = iter(range(1, 1_000_000))

        def turn() -> None:
            replies.append(rt.chat("bench", scripted_turn(next(counter)), max_tokens=MAX_TOKENS))

        benchmark.pedantic(turn, rounds=TURN_ROUNDS, warmup_rounds=1, iterations=1)
        window = rt.session_info("bench")["window_tokens"]
        items = rt.stats()["memory"]["items"]
    measured = _measured(replies, 1)  # the warm-up round is not in the stats either
    costs = [r.runtime_ms for r in measured]
    assert all(c >= 0 for c in costs)
    benchmark.extra_info.update(
        model=model_name,
        turns=len(measured),
        max_tokens=MAX_TOKENS,
        window_tokens_end=window,
        memory_items=items,
        memories_used_mean=round(sum(len(r.memories) for r in measured) / len(measured), 2),
        target_p50_ms=20.0,
        runtime_ms=_p(costs),
        total_ms=_p([r.timings["total"] for r in measured]),
        **_component_p50(measured),
    )


# -- 2. the first token after a restart -------------------------------------------------------


@dataclasses.dataclass
class LongSession:
    """A data directory holding one session of about :data:`SESSION_TOKENS` tokens."""

    model: str
    data: Path
    session_id: str
    n_tokens: int
    turns: int


@pytest.fixture(scope="module")
def long_session(model_name: str, tmp_path_factory: pytest.TempPathFactory) -> LongSession:
    """Build the session once per model by many ~150-token turns, then close (checkpoint)."""
    data = tmp_path_factory.mktemp(f"long-{Path(model_name).stem}") / "data"
    turns = 0
    with Runtime.open(data, model=model_name, n_ctx=N_CTX, embedder=False) as rt:
        n = 0
        while n < SESSION_TOKENS:
            rt.chat("long", long_turn(turns), max_tokens=MAX_TOKENS, remember=False)
            turns += 1
            n = int(rt.session_info("long")["window_tokens"])
        rt.checkpoint("long")
    return LongSession(model_name, data, "long", n, turns)


def _drop_snapshots(data: Path) -> list[str]:
    """Delete every checkpoint of ``data`` (the chunk store); the journal stays."""
    removed = []
    if (data / CHUNK_DIR).exists():
        shutil.rmtree(data / CHUNK_DIR)
        removed.append(CHUNK_DIR)
    return removed


@pytest.mark.benchmark(group="restart-first-token")
@pytest.mark.parametrize("mode", ["restore", "reprefill"])
def test_first_token_after_restart(
    benchmark: Any, long_session: LongSession, mode: str, tmp_path: Path
) -> None:
    """Reopen the runtime on a copy of the session; time ``chat`` to its first piece."""
    opened: list[Runtime] = []
    open_ms: list[float] = []
    first_ms: list[float] = []
    reports: list[Any] = []
    removed: list[str] = []
    rounds = iter(range(1_000_000))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        data = tmp_path / f"round-{next(rounds)}"
        shutil.copytree(long_session.data, data)
        if mode == "reprefill":
            removed[:] = _drop_snapshots(data)
        start = time.perf_counter()
        rt = Runtime.open(data, model=long_session.model, n_ctx=N_CTX, embedder=False)
        open_ms.append((time.perf_counter() - start) * 1000)
        opened.append(rt)
        return (rt,), {}

    def close(rt: Runtime) -> None:
        opened.remove(rt)
        rt.close()
        shutil.rmtree(rt.root, ignore_errors=True)  # copies of a SmolLM2 session are ~50 MB

    def first_token(rt: Runtime) -> None:
        seen: list[float] = []
        start = time.perf_counter()
        reply = rt.chat(
            long_session.session_id,
            "What was the first thing I told you?",
            max_tokens=1,
            remember=False,
            use_memory=False,
            on_token=lambda piece: seen.append(time.perf_counter()) if not seen else None,
        )
        first_ms.append(((seen[0] if seen else time.perf_counter()) - start) * 1000)
        reports.append(reply.resumed)

    try:
        benchmark.pedantic(
            first_token,
            setup=setup,
            teardown=close,
            rounds=RESTART_ROUNDS,
            warmup_rounds=RESTART_WARMUP,
        )
    finally:
        while opened:
            opened.pop().close()
    want = "snapshot" if mode == "restore" else "journal"
    assert all(r is not None and r.source == want for r in reports), [
        r and r.source for r in reports
    ]
    measured, resumes = _measured(first_ms, RESTART_WARMUP), _measured(reports, RESTART_WARMUP)
    benchmark.extra_info.update(
        model=long_session.model,
        mode=mode,
        session_tokens=long_session.n_tokens,
        build_turns=long_session.turns,
        removed=removed,
        first_token_ms=_p(measured),
        resume_ms=_p([r.seconds * 1000 for r in resumes]),
        restored_tokens=resumes[-1].restored_tokens,
        replayed_tokens=resumes[-1].replayed_tokens,
        open_ms=_p(_measured(open_ms, RESTART_WARMUP)),
    )


# -- 3. checkpoint every turn against the default policy --------------------------------------


POLICIES = {"default": CheckpointPolicy(), "every_turn": CheckpointPolicy.every_turn()}


@pytest.mark.benchmark(group="turn-by-policy")
@pytest.mark.parametrize("policy", list(POLICIES))
def test_turn_latency_by_policy(
    benchmark: Any, model_name: str, policy: str, tmp_path: Path
) -> None:
    """The scripted turns (no long-term memory); p50 of ``timings["total"]``."""
    replies: list[Reply] = []
    with Runtime.open(
        tmp_path / "data",
        model=model_name,
        n_ctx=N_CTX,
        embedder=False,
        checkpoint=POLICIES[policy],
    ) as rt:
        counter = iter(range(1_000_000))

        def turn() -> None:
            replies.append(rt.chat("bench", scripted_turn(next(counter)), max_tokens=MAX_TOKENS))

        benchmark.pedantic(turn, rounds=TURN_ROUNDS, warmup_rounds=2, iterations=1)
        stats = rt.stats()
    measured = _measured(replies, 2)
    benchmark.extra_info.update(
        model=model_name,
        policy=policy,
        turns=len(measured),
        max_tokens=MAX_TOKENS,
        total_ms=_p([r.timings["total"] for r in measured]),
        runtime_ms=_p([r.runtime_ms for r in measured]),
        checkpoints_written=stats["snapshots"]["written"],
        checkpoints_replaced=stats["snapshots"]["replaced"],
        **_component_p50(measured),
    )
