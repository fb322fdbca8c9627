"""Shared benchmark fixtures: cached random-weight models and a prefilled context.

By default the benchmarks use the small ``tiny`` model and a short prompt, so that
``pytest benchmarks --benchmark-disable`` stays quick. ``BENCH_FULL=1`` switches to the
``tinyllama-geometry`` model (22 layers, 2048 wide, 4 KV heads) and a 1024-token prompt: the
configuration the README reports. ``BENCH_CI=1`` is the CI mode: the ``tiny`` model, small
sizes and one round of everything, only to prove that every benchmark runs. Models are cached
under ``$LLAMAFFI_BENCH_MODELS`` (default ``~/.cache/llamaffi/bench-models``).

The KV I/O suite (``test_bench_kvio.py``) runs over ``BENCH_MODEL`` (comma-separated model
names or GGUF paths; default ``tinyllama-geometry,smollm2`` with ``BENCH_FULL=1``, else
``tiny``) and ``BENCH_SIZES`` (comma-separated token counts; default ``256,1024,4096,16384``;
sessions above ``BENCH_PREFILL_MAX``, default 4096, are tiled from that state, not prefilled).

Every run records the machine (``pytest_benchmark_update_machine_info``): CPU model, cores,
flags, ``OPENBLAS_CORETYPE``/``OMP_*`` state, load average, the llama.cpp build and the date.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FULL = os.environ.get("BENCH_FULL") == "1"
#: CI mode: tiny model, smallest sizes, one round of every benchmark.
CI = os.environ.get("BENCH_CI") == "1"


def rounds(full: int) -> int:
    """Rounds of a ``benchmark.pedantic`` call: ``full``, or 1 in CI mode."""
    return 1 if CI else full


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


def _env_list(name: str, default: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in os.environ.get(name, default).split(",") if v.strip())


#: Models of the KV I/O suite: names for :func:`runtime.models.resolve_model` or GGUF paths.
KV_MODELS = _env_list(
    "BENCH_MODEL", "tiny" if CI else ("tinyllama-geometry,smollm2" if FULL else "tiny")
)
#: Session lengths (tokens) of the KV I/O suite's size sweep.
KV_SIZES = tuple(
    int(v) for v in _env_list("BENCH_SIZES", "256,512" if CI else "256,1024,4096,16384")
)


# -- what every run records --------------------------------------------------------------------

_CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "neon",
    "asimd",
)


def _cpuinfo() -> dict[str, Any]:
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model == "?":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "simd_flags": [f for f in _CPU_FLAGS if f in flags],
    }


#: Taken when pytest loads this conftest, i.e. when the run starts (the machine-info hook
#: itself runs when the JSON is written, at the end).
_START = (
    datetime.datetime.now(datetime.UTC),
    list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
)


def machine_metadata() -> dict[str, Any]:
    """What this run ran on: CPU, the thread-pool environment, load, llama.cpp build, date."""
    import platform

    info: dict[str, Any] = {
        "date_utc": _START[0].strftime("%Y-%m-%dT%H:%M:%SZ"),
        "end_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_detail": _cpuinfo(),
        "env": {
            name: os.environ.get(name, "(unset)")
            for name in ("OPENBLAS_CORETYPE", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")
        },
        "load_average_at_start": _START[1],
        "kernel": platform.release(),
        "bench_mode": "ci" if CI else ("full" if FULL else "default"),
        "kv_models": list(KV_MODELS),
        "kv_sizes": list(KV_SIZES),
    }
    try:
        import llamaffi

        build = llamaffi.build_info()
        info["llama_cpp_build"] = {
            k: build.get(k)
            for k in ("build_number", "commit", "pin", "ggml_native", "compiler", "system_info")
        }
    except Exception as exc:  # the machine info must not fail the run
        info["llama_cpp_build"] = {"error": repr(exc)}
    return info


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict[str, Any]) -> None:
    """pytest-benchmark hook: add :func:`machine_metadata` to the JSON's ``machine_info``."""
    machine_info["llamaffi"] = machine_metadata()


def pytest_benchmark_update_json(config: Any, benchmarks: Any, output_json: dict[str, Any]) -> None:
    """pytest-benchmark hook: the load average when the run ended (how shared the CPU was)."""
    if hasattr(os, "getloadavg"):
        output_json.setdefault("machine_info", {}).setdefault("llamaffi", {})[
            "load_average_at_end"
        ] = list(os.getloadavg())


@pytest.fixture(scope="session")
def bench_embedder() -> Any:
    """all-MiniLM-L6-v2 (onnxruntime), loaded once for every runtime that uses long-term memory."""
    from runtime.embed import Embedder

    return Embedder.default()
