"""Helpers for the server tests: a uvicorn server in a thread, and ``python -m runtime serve``
as a subprocess that can be killed and restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    base: str, timeout: float = 60.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    """Poll ``/health`` until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base} did not become healthy in {timeout} s")


class ThreadServer:
    """A real uvicorn server for ``app`` on a free loopback port, in a thread."""

    def __init__(self, app: Any, **limits: Any) -> None:
        import uvicorn

        from runtime.server.connections import uvicorn_config

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", **limits
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_healthy(self.base)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ServeProcess:
    """``python -m runtime serve --model tiny`` on a fixed port over one data directory."""

    def __init__(self, data_dir: Path, *extra: str, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.log = data_dir.parent / f"{data_dir.name}-serve.log"

    def start(self) -> ServeProcess:
        cmd = [
            sys.executable, "-m", "runtime", "serve", "--dir", str(self.data_dir),
            "--model", "tiny", "--port", str(self.port), "--n-ctx", "2048", *self.extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env
            )
        wait_healthy(self.base, proc=self.proc)
        return self

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self.proc = None
        return rc

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
