"""The HTTP server: requests/s and p50/p99 latency of short turns, 1, 4 and 16 sessions.

Each concurrent client is a thread with its own ``httpx.Client`` and its own session
(``X-Session-Id``), sending short non-streamed turns (``max_tokens=8``, only the new user
message) one after another to a real uvicorn server on loopback, in a thread of this process.
``max_resident`` is below the session count (1 for 1, 2 for 4, 4 for 16), so sessions are
suspended and resumed from their snapshots as the turns rotate. Long-term memory is on
(all-MiniLM-L6-v2), as ``python -m runtime serve`` runs by default.

A pedantic round is one burst: every client sends its turns; the benchmarked quantity is the
burst's wall time. ``extra_info`` has the requests/s over all rounds, the client-side p50/p99
latency of every request, and the resumes by source (evidence of eviction).

    .venv/bin/python -m pytest benchmarks/test_bench_server.py --benchmark-enable
    BENCH_MODEL=smollm2 .venv/bin/python -m pytest benchmarks/test_bench_server.py \
        --benchmark-enable
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FULL, RUNTIME_MODELS, percentile, require_model

from runtime.app import Runtime
from runtime.server import create_app

#: Concurrent sessions -> max_resident (below the session count where it can be).
RESIDENT = {1: 1, 4: 2, 16: 4}
#: Turns each client sends per round (16 requests a round at every concurrency in full mode).
TURNS = {1: 16, 4: 4, 16: 1} if FULL else {1: 8, 4: 2, 16: 1}
#: Measured bursts (after one warm-up burst that opens every session).
ROUNDS = 5 if FULL else 1
MAX_TOKENS = 8
N_CTX = 8192


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ThreadServer:
    """uvicorn serving ``app`` on a free loopback port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.base = f"http://127.0.0.1:{_free_port()}"
        port = int(self.base.rsplit(":", 1)[1])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.base} did not become healthy")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclasses.dataclass
class Served:
    """A runtime behind a server, for one model and one concurrency."""

    model: str
    sessions: int
    rt: Runtime
    base: str


@pytest.fixture(scope="module", params=RUNTIME_MODELS)
def server_model(request: pytest.FixtureRequest) -> str:
    """A model of ``BENCH_MODEL`` (skipped when it is not installed)."""
    return require_model(str(request.param))


@pytest.fixture(params=list(RESIDENT), ids=[f"{n}sessions" for n in RESIDENT])
def served(
    request: pytest.FixtureRequest,
    server_model: str,
    bench_embedder: Any,
    tmp_path: Path,
) -> Iterator[Served]:
    n = int(request.param)
    with (
        Runtime.open(
            tmp_path / "data",
            model=server_model,
            n_ctx=N_CTX,
            max_resident=RESIDENT[n],
            embedder=bench_embedder,
        ) as rt,
        _ThreadServer(create_app(rt, max_queue=64)) as server,
    ):
        yield Served(server_model, n, rt, server.base)


def _client(base: str, sid: str, turns: int, start: threading.Barrier, out: list[float]) -> None:
    """Send ``turns`` short turns in session ``sid``; append each latency (ms) to ``out``."""
    with httpx.Client(base_url=base, headers={"X-Session-Id": sid}, timeout=300) as http:
        start.wait()
        for _ in range(turns):
            n = len(out)
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": f"Short question {n} from {sid}?"}],
                "max_tokens": MAX_TOKENS,
            }
            t0 = time.perf_counter()
            r = http.post("/v1/chat/completions", json=body)
            out.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()


@pytest.mark.benchmark(group="server")
def test_server_short_turns(benchmark: Any, served: Served) -> None:
    """One burst: every session's client sends its turns concurrently."""
    n, turns = served.sessions, TURNS[served.sessions]
    latencies: list[float] = []
    walls: list[float] = []
    errors: list[BaseException] = []

    def burst() -> None:
        start = threading.Barrier(n + 1)
        per_client: list[list[float]] = [[] for _ in range(n)]

        def run(i: int) -> None:
            try:
                _client(served.base, f"bench-{i}", turns, start, per_client[i])
            except BaseException as exc:  # re-raised on the benchmark's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        walls.append(time.perf_counter() - t0)
        if errors:
            raise errors[0]
        for values in per_client:
            latencies.extend(values)

    # the warm-up round opens every session (system prompt) and fills the resident set
    benchmark.pedantic(burst, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    stats = served.rt.stats()
    measured_walls = walls[1:] if len(walls) > 1 else walls
    per_round = n * turns
    measured = latencies[per_round:] if len(latencies) > per_round else latencies
    resumes = dict(stats["resumes"])
    # eviction really happened: sessions were suspended (and, after the first burst, resumed)
    assert stats["sessions"]["resident"] <= RESIDENT[n]
    if n > RESIDENT[n]:
        assert stats["sessions"]["suspended"] > 0, stats["sessions"]
        if len(walls) > 1:
            assert resumes.get("snapshot", 0) > 0, resumes
    benchmark.extra_info.update(
        model=served.model,
        sessions=n,
        max_resident=RESIDENT[n],
        turns_per_session_per_round=turns,
        requests=len(measured),
        max_tokens=MAX_TOKENS,
        requests_per_s=round(len(measured) / sum(measured_walls), 3),
        p50_ms=round(percentile(measured, 50), 3),
        p99_ms=round(percentile(measured, 99), 3),
        min_ms=round(min(measured), 3),
        max_ms=round(max(measured), 3),
        resumes=resumes,
        runtime_p50_ms=stats["turns"]["runtime_p50_ms"],
    )
