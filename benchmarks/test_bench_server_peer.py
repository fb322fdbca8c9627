"""Our server against llama.cpp's own ``llama-server``, side by side in one run, same model.

Both run as their users run them: ``python -m runtime serve`` and ``llama-server``, each a
subprocess on loopback with as many threads as this process has CPUs, and the same OpenMP
environment (llamaffi's defaults unless ``OMP_WAIT_POLICY`` is set). The same client code
drives both: S concurrent sessions (threads, one ``httpx.Client`` each) send T turns one
after another, OpenAI-style, each request carrying the whole conversation so far (what a
stateless client sends; our server matches it to the session's journal, llama-server to
its slot's prompt cache), at temperature 0 and ``max_tokens`` 32. Reported per server and
concurrency: completion tokens per second over the burst, and the p50/p99 latency of a turn;
the comparison repeats ``BENCH_SERVER_ROUNDS`` times (default 3), both servers started fresh
each round, and reports the medians and every round's ratio.

``test_server_turn_against_in_process`` needs no llama-server: it runs the same one-session
turns through ``runtime serve`` and through ``Runtime.chat`` in this process, session by
session in turn, and reports the server's turn against the in-process one (p50 and mean).

llama-server comes from ``$LLAMA_SERVER``, then ``PATH``, then the build this module makes
from the pinned source (``vendor/llama.cpp``) when ``BENCH_BUILD_LLAMA_SERVER=1`` (about 12
minutes on 2 cores, cached under ``~/.cache/llamaffi/llama-server``); otherwise the test
skips, saying so.

    BENCH_BUILD_LLAMA_SERVER=1 .venv/bin/python -m pytest benchmarks/test_bench_server_peer.py \
        --benchmark-enable -s
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import percentile, require_model

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLAMAFFI_CACHE", Path.home() / ".cache" / "llamaffi"))
BUILD_DIR = CACHE / "llama-server"
CONCURRENCY = tuple(int(n) for n in os.environ.get("BENCH_SERVER_SESSIONS", "1,4,8").split(","))
TURNS = 4
MAX_TOKENS = 32
N_CTX = 8192
#: both servers use every CPU this process may run on (ours does by default)
THREADS = len(os.sched_getaffinity(0))
QUESTIONS = (
    "Tell me about the weather in Paris in spring.",
    "What about London?",
    "And Berlin in winter?",
    "Which of them is best for a holiday, and why?",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_llama_server() -> Path | None:
    """The llama-server binary to compare with, building it from the pin when asked."""
    given = os.environ.get("LLAMA_SERVER")
    if given:
        return Path(given)
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    built = BUILD_DIR / "bin" / "llama-server"
    if built.exists():
        return built
    if os.environ.get("BENCH_BUILD_LLAMA_SERVER") != "1":
        return None
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    source = ROOT / "vendor" / "llama.cpp"
    configure = [
        "cmake", str(source), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    ]  # fmt: skip
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    build = ["cmake", "--build", str(BUILD_DIR), "--target", "llama-server", "-j", str(THREADS)]
    subprocess.run(build, check=True, stdout=subprocess.DEVNULL)
    return built


def _env() -> dict[str, str]:
    """The environment both servers get: llamaffi's OpenMP defaults (``llamaffi._lib``) where
    the caller set none, so llama-server waits the way ours does."""
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env.setdefault("GOMP_SPINCOUNT", "300000")
    return env


@dataclass
class Server:
    """A server subprocess on loopback."""

    name: str
    base: str
    proc: subprocess.Popen[bytes]
    headers_for: Any  # session id -> extra request headers

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _wait_healthy(server: Server, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}")
        try:
            if httpx.get(f"{server.base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{server.name} did not become healthy")


def start_ours(model: str, data: Path, sessions: int) -> Server:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "runtime", "serve", "--dir", str(data), "--model", model,
        "--port", str(port), "--n-ctx", str(N_CTX), "--max-resident", str(max(sessions, 1)),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = Server(
        "runtime serve", f"http://127.0.0.1:{port}", proc, lambda sid: {"X-Session-Id": sid}
    )
    _wait_healthy(server)
    return server


def start_peer(binary: Path, gguf: Path, sessions: int) -> Server:
    port = _free_port()
    cmd = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(THREADS), "-np", str(sessions), "-c", str(N_CTX), "--no-webui",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server("llama-server", f"http://127.0.0.1:{port}", proc, lambda sid: {})
    _wait_healthy(server)
    return server


@dataclass
class Burst:
    """What one burst measured."""

    wall_s: float
    tokens: int
    latencies_ms: list[float]

    def row(self) -> dict[str, float]:
        return {
            "tok_per_s": round(self.tokens / self.wall_s, 2),
            "p50_ms": round(percentile(self.latencies_ms, 50), 1),
            "p99_ms": round(percentile(self.latencies_ms, 99), 1),
            "turns": len(self.latencies_ms),
        }


def _turns(tag: str, i: int) -> tuple[str, list[str]]:
    """Client ``i``'s session id and its ``TURNS`` user messages (the same on every side)."""
    return f"{tag}-{i}", [f"{q} (client {i})" for q in QUESTIONS[:TURNS]]


def drive(server: Server, sessions: int, tag: str) -> Burst:
    """``sessions`` clients, each ``TURNS`` turns with its whole conversation each time."""
    start = threading.Barrier(sessions + 1)
    latencies: list[float] = []
    tokens = [0]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        sid, texts = _turns(tag, i)
        history: list[dict[str, str]] = []
        try:
            with httpx.Client(base_url=server.base, timeout=600) as http:
                start.wait()
                for text in texts:
                    history.append({"role": "user", "content": text})
                    body = {
                        "model": "bench",
                        "messages": history,
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                    }
                    t0 = time.perf_counter()
                    r = http.post(
                        "/v1/chat/completions", json=body, headers=server.headers_for(sid)
                    )
                    ms = (time.perf_counter() - t0) * 1000
                    r.raise_for_status()
                    out = r.json()
                    history.append(
                        {"role": "assistant", "content": out["choices"][0]["message"]["content"]}
                    )
                    with lock:
                        latencies.append(ms)
                        tokens[0] += int(out["usage"]["completion_tokens"])
        except BaseException as exc:  # re-raised on the driver's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return Burst(wall, tokens[0], latencies)


@pytest.fixture(scope="module")
def llama_server() -> Path:
    binary = find_llama_server()
    if binary is None:
        pytest.skip(
            "no llama-server: set LLAMA_SERVER, put it on PATH, or BENCH_BUILD_LLAMA_SERVER=1 "
            "to build it from vendor/llama.cpp"
        )
    return binary


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[str, Path]]:
    from runtime.models import resolve_model

    name = require_model("smollm2")
    yield name, Path(resolve_model(name).path)


#: rounds of the comparison: each starts both servers in turn, fresh, and measures one burst
#: on each; the table reports the medians, so that one noisy burst does not decide a ratio
ROUNDS = max(1, int(os.environ.get("BENCH_SERVER_ROUNDS", "3")))


def _median(values: list[float]) -> float:
    return round(percentile(values, 50), 3)


def _measure(server: Server, sessions: int) -> dict[str, float]:
    """A warm-up burst, then the measured one, of ``sessions`` clients; stops the server."""
    try:
        drive(server, sessions, "warm")
        return drive(server, sessions, "bench").row()
    finally:
        server.stop()


@pytest.mark.benchmark(group="server-vs-llama-server")
@pytest.mark.parametrize("sessions", CONCURRENCY, ids=[f"{n}sessions" for n in CONCURRENCY])
def test_server_against_llama_server(
    benchmark: Any, llama_server: Path, smollm2: tuple[str, Path], sessions: int
) -> None:
    """``ROUNDS`` rounds at this concurrency; in each, both servers start fresh, one after
    the other (which goes first alternates), and each runs a warm-up burst and then the
    measured one. Reported: each
    server's median tok/s and p50 over the rounds, and the median of the rounds' ratios."""
    name, gguf = smollm2
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(ROUNDS):
            rows: dict[str, dict[str, float]] = {}
            for which in ("ours", "peer") if k % 2 == 0 else ("peer", "ours"):  # first in turn
                server = (
                    start_ours(name, Path(tmp) / f"data{k}", sessions)
                    if which == "ours"
                    else start_peer(llama_server, gguf, sessions)
                )
                rows[server.name] = _measure(server, sessions)
            rounds.append(rows)
            print(f"\n{sessions} sessions, round {k + 1}: {rows}")

    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    ours = {m: _median([r["runtime serve"][m] for r in rounds]) for m in ("tok_per_s", "p50_ms")}
    peer = {m: _median([r["llama-server"][m] for r in rounds]) for m in ("tok_per_s", "p50_ms")}
    tok = [r["runtime serve"]["tok_per_s"] / r["llama-server"]["tok_per_s"] for r in rounds]
    p50 = [r["runtime serve"]["p50_ms"] / r["llama-server"]["p50_ms"] for r in rounds]
    benchmark.extra_info.update(
        model=name,
        sessions=sessions,
        turns_per_session=TURNS,
        max_tokens=MAX_TOKENS,
        rounds=rounds,
        ours=ours,
        llama_server=peer,
        tok_per_s_ratio=_median(tok),
        tok_per_s_ratios=[round(x, 3) for x in tok],
        p50_ratio=_median(p50),
        p50_ratios=[round(x, 3) for x in p50],
    )
    print(
        f"\n{sessions} sessions, medians of {ROUNDS}: ours {ours}  llama-server {peer}  "
        f"tok/s ratio {_median(tok)} {[round(x, 3) for x in tok]}  "
        f"p50 ratio {_median(p50)} {[round(x, 3) for x in p50]}"
    )


# -- a server turn against the same turn in process -------------------------------------------

#: sessions of ``TURNS`` turns each side measures (after one warm-up session each)
INPROC_SESSIONS = 3


def _in_process_turns(rt: Any, tag: str) -> list[float]:
    """One session's ``TURNS`` turns through ``Runtime.chat``: the milliseconds of each."""
    out = []
    sid, texts = _turns(tag, 0)
    for text in texts:
        t0 = time.perf_counter()
        rt.chat(sid, text, max_tokens=MAX_TOKENS, temperature=0)
        out.append((time.perf_counter() - t0) * 1000)
    return out


@pytest.mark.benchmark(group="server-vs-in-process")
def test_server_turn_against_in_process(benchmark: Any, smollm2: tuple[str, Path]) -> None:
    """The same one-session turns through ``runtime serve`` (the client sends the whole
    conversation each time, as the llama-server comparison does) and through
    ``Runtime.chat`` in this process (only the new message), each on its own data directory
    with the same settings, session by session in turn so that both see the same machine:
    the server's own cost per turn (target: at most 1.1x the in-process turn)."""
    from runtime import Runtime

    name, _gguf = smollm2
    inproc: list[float] = []
    served: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_ours(name, Path(tmp) / "served", 1)
        try:
            with Runtime.open(Path(tmp) / "inproc", name, n_ctx=N_CTX, max_resident=1) as rt:
                _in_process_turns(rt, "warm")
                drive(server, 1, "warm")
                for k in range(INPROC_SESSIONS):
                    inproc += _in_process_turns(rt, f"bench{k}")
                    served += drive(server, 1, f"bench{k}").latencies_ms
        finally:
            server.stop()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    row = {
        "in_process_p50_ms": round(percentile(inproc, 50), 1),
        "server_p50_ms": round(percentile(served, 50), 1),
        "in_process_mean_ms": round(sum(inproc) / len(inproc), 1),
        "server_mean_ms": round(sum(served) / len(served), 1),
    }
    row["p50_ratio"] = round(row["server_p50_ms"] / row["in_process_p50_ms"], 3)
    row["mean_ratio"] = round(row["server_mean_ms"] / row["in_process_mean_ms"], 3)
    benchmark.extra_info.update(model=name, turns=len(served), max_tokens=MAX_TOKENS, **row)
    print(f"\nserver turn against the in-process turn, {len(served)} turns each: {row}")


# -- time to first token after kill -9 --------------------------------------------------------

#: turns of the conversation that is killed and resumed (about 2,250 tokens on SmolLM2)
KILL_TURNS = 50
KILL_LINE = (
    "Note {i}: the blue notebook on the second shelf holds the receipts from March, and the "
    "red one the letters from the bank."
)


def _conversation() -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for i in range(KILL_TURNS):
        turns.append({"role": "user", "content": KILL_LINE.format(i=i)})
        turns.append({"role": "assistant", "content": f"Noted ({i})."})
    return turns


def _first_token_s(server: Server, sid: str, messages: list[dict[str, str]]) -> float:
    """Seconds from sending a streamed request to its first content chunk."""
    body = {"model": "bench", "messages": messages, "max_tokens": 8, "temperature": 0,
            "stream": True}  # fmt: skip
    t0 = time.perf_counter()
    with (
        httpx.Client(base_url=server.base, timeout=600) as http,
        http.stream(
            "POST", "/v1/chat/completions", json=body, headers=server.headers_for(sid)
        ) as r,
    ):
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return time.perf_counter() - t0
    raise AssertionError("the stream ended without content")


def _checkpointed(server: Server, sid: str, timeout: float = 120.0) -> dict[str, Any]:
    """Ask for a checkpoint and wait until the session's newest one is on disk."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.base, timeout=60) as http:
        http.post(f"/v1/sessions/{sid}/checkpoint").raise_for_status()
        while time.monotonic() < deadline:
            info: dict[str, Any] = http.get(f"/v1/sessions/{sid}").json()
            if info.get("pending_tokens") == 0 and info.get("snapshot_bytes", 0) > 0:
                return info
            time.sleep(0.2)
    raise TimeoutError("the checkpoint did not reach the disk")


@pytest.mark.benchmark(group="server-kill-9")
def test_first_token_after_kill_9(
    benchmark: Any, llama_server: Path, smollm2: tuple[str, Path]
) -> None:
    """A ~2.3k-token session: ours is killed with SIGKILL after its checkpoint and restarted,
    then asked the next question (restore from the chunks, prefill of the new turn only);
    llama-server, restarted too, gets the whole conversation again (it replays it)."""
    name, gguf = smollm2
    history = _conversation()
    question = {"role": "user", "content": "Which notebook holds the receipts?"}
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        ours = start_ours(name, data, 1)
        try:
            with httpx.Client(base_url=ours.base, timeout=600) as http:
                http.post("/v1/sessions/kill/import", json={"messages": history}).raise_for_status()
            _first_token_s(ours, "kill", [{"role": "user", "content": "Hello again."}])
            info = _checkpointed(ours, "kill")
        finally:
            ours.proc.kill()  # kill -9: no final checkpoint, no clean shutdown
            ours.proc.wait(30)
        ours = start_ours(name, data, 1)
        try:
            rows["ours"] = _first_token_s(ours, "kill", [question])
        finally:
            ours.stop()
        peer = start_peer(llama_server, gguf, 1)
        try:
            replay = [*history, {"role": "user", "content": "Hello again."}, question]
            rows["llama-server"] = _first_token_s(peer, "kill", replay)
        finally:
            peer.stop()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(
        model=name,
        window_tokens=info.get("window_tokens"),
        ours_first_token_s=round(rows["ours"], 3),
        llama_server_first_token_s=round(rows["llama-server"], 3),
        ratio=round(rows["llama-server"] / rows["ours"], 1),
    )
    print(
        f"\nkill -9, {info.get('window_tokens')} tokens: ours {rows['ours']:.2f} s to the first "
        f"token, llama-server replaying {rows['llama-server']:.2f} s"
    )
