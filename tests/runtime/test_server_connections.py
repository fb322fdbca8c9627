"""Slow clients are cut off: a request must arrive whole within the deadline, however it
dribbles, while a slow reply to a complete request is never cut; connections are capped."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.runtime.server_helpers import ThreadServer

TIMEOUT = 0.6


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


async def slow(request: Request) -> Response:
    body = await request.body()
    await asyncio.sleep(3 * TIMEOUT)  # longer than the deadline: the request is in, though
    return PlainTextResponse(f"got {len(body)}")


APP = Starlette(
    routes=[Route("/health", health), Route("/slow", slow, methods=["POST"])],
)


@pytest.fixture
def server() -> Iterator[ThreadServer]:
    with ThreadServer(APP, request_timeout=TIMEOUT, max_connections=64) as s:
        yield s


def _closed_by_server(sock: socket.socket, drip: bytes, until: float) -> bool:
    """Send ``drip`` a byte at a time (one per 50 ms) until the server closes the socket or
    ``until`` passes; whether it closed it."""
    sock.settimeout(0.05)
    i = 0
    while time.monotonic() < until:
        try:
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        if drip:
            try:
                sock.send(drip[i % len(drip) : i % len(drip) + 1])
            except (ConnectionResetError, BrokenPipeError):
                return True
            i += 1
    return False


def test_dribbling_and_silent_clients_are_closed(server: ThreadServer) -> None:
    heads = b"POST /slow HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    body_first = b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    kinds = [b""] * 7 + [heads] * 7 + [b"x" * 1000] * 6
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in kinds]
    for sock, kind in zip(socks, kinds, strict=True):
        if kind.startswith(b"x"):
            sock.sendall(body_first)  # complete headers, then a body that never ends
    start = time.monotonic()
    results: list[bool] = [False] * len(socks)

    def watch(i: int) -> None:
        results[i] = _closed_by_server(socks[i], kinds[i], start + 10 * TIMEOUT)

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(socks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - start
    for sock in socks:
        sock.close()
    assert all(results), f"{results.count(False)} of {len(socks)} slow connections still open"
    assert took < 10 * TIMEOUT
    # and the server still serves
    with urllib.request.urlopen(f"{server.base}/health", timeout=5) as r:
        assert r.status == 200


def test_a_slow_reply_to_a_complete_request_is_not_cut(server: ThreadServer) -> None:
    req = urllib.request.Request(f"{server.base}/slow", data=b"y" * 5000, method="POST")
    start = time.monotonic()
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.read() == b"got 5000"
    assert time.monotonic() - start >= 3 * TIMEOUT
    # keep-alive: a second request on one connection, after a pause, gets its own deadline
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(4):
            conn.request("GET", "/health")
            reply = conn.getresponse()
            assert (reply.status, reply.read()) == (200, b"ok")
            time.sleep(0.6 * TIMEOUT)  # 2.4 deadlines in all: each request has its own
        assert conn.sock is not None  # one connection throughout
    finally:
        conn.close()


def test_a_pipelined_request_left_half_sent_is_closed(server: ThreadServer) -> None:
    """Two requests in one packet, the second's body never finished: once the first is
    answered, the second still has a deadline (uvicorn drops its keep-alive timer then)."""
    first = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(first + second)
        assert _closed_by_server(sock, b"", time.monotonic() + 10 * TIMEOUT)


def test_an_upgrade_request_is_not_cut_while_its_reply_runs(server: ThreadServer) -> None:
    """h11 holds a request with an Upgrade header in MIGHT_SWITCH_PROTOCOL until the reply
    starts: that is a request fully in, and its slow reply is served."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /slow HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
            b"Content-Length: 2\r\n\r\nhi"
        )
        sock.settimeout(10)
        got = b""
        while b"got 2" not in got:
            piece = sock.recv(1024)
            assert piece, f"closed before the reply: {got!r}"
            got += piece
        assert got.startswith(b"HTTP/1.1 200")


def test_connections_beyond_the_cap_get_503() -> None:
    with ThreadServer(APP, request_timeout=30, max_connections=3) as s:
        idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(2)]
        time.sleep(0.2)
        with urllib.request.urlopen(f"{s.base}/health", timeout=5) as r:  # the third: served
            assert r.status == 200
        idle.append(socket.create_connection(("127.0.0.1", s.port)))
        time.sleep(0.2)
        try:
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"{s.base}/health", timeout=5)
            assert info.value.code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        with urllib.request.urlopen(f"{s.base}/health", timeout=5) as r:
            assert r.status == 200
