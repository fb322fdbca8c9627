"""Slow-client limits: uvicorn's h11 protocol with a deadline for receiving each request, and
the uvicorn configuration every server of this package uses.

uvicorn has no timeout that covers receiving a request: its keep-alive timeout only runs
between requests and is reset by every byte, so a client that opens a connection and sends
nothing, or dribbles its headers or body a byte at a time, holds the connection forever.
:class:`DeadlineProtocol` gives each request ``request_timeout`` seconds from its first byte
(or from the connection's opening) until it is fully received, then closes the connection.
Once a request is in, the deadline is off: a long reply or stream is never cut.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from runtime.errors import ArgumentError

logger = logging.getLogger(__name__)

#: Seconds a client has to send a whole request (headers and body), from its first byte.
DEFAULT_REQUEST_TIMEOUT_S = 20.0
#: Open connections (or running requests) beyond which a new request gets a 503.
DEFAULT_MAX_CONNECTIONS = 256
#: Seconds an idle keep-alive connection stays open between requests.
DEFAULT_KEEP_ALIVE_S = 5

#: client states in which its request is fully in (an Upgrade or CONNECT request waits in
#: MIGHT_SWITCH_PROTOCOL until the response: its reply must not be cut either)
_RECEIVED = (
    h11.DONE,
    h11.MUST_CLOSE,
    h11.CLOSED,
    h11.ERROR,
    h11.MIGHT_SWITCH_PROTOCOL,  # type: ignore[attr-defined]  # in h11, not in its __all__
    h11.SWITCHED_PROTOCOL,
)


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request is not fully received
    within :attr:`request_timeout` seconds of its first byte (see the module docstring)."""

    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte is a slow request too

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in _RECEIVED:
            self._disarm()
        else:  # a request has begun (or goes on): its clock runs from its first byte
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined next request may be in already, in part: uvicorn has just dropped its
        # keep-alive timer for it, so the deadline must run (an idle connection keeps
        # uvicorn's keep-alive timer instead)
        state = self.conn.their_state
        if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state in _RECEIVED:
            return
        who = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.info("%s sent no complete request in %.1f s: closed", who, self.request_timeout)
        self.transport.close()


def uvicorn_config(
    app: Any,
    *,
    host: str,
    port: int,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    keep_alive: int = DEFAULT_KEEP_ALIVE_S,
    **more: Any,
) -> Any:
    """The ``uvicorn.Config`` of a server of ``app``: the deadline protocol, requests served
    while fewer than ``max_connections`` other connections are open and fewer requests run
    (a request beyond either gets a 503; the connection itself is accepted), ``keep_alive``
    seconds between requests, no WebSocket protocol. ``more`` goes to ``uvicorn.Config``."""
    import uvicorn

    if not (request_timeout > 0 and keep_alive > 0 and max_connections >= 1):
        raise ArgumentError(
            "request_timeout and keep_alive must be > 0 and max_connections >= 1, got "
            f"{request_timeout}, {keep_alive}, {max_connections}"
        )
    protocol = type("DeadlineProtocol", (DeadlineProtocol,), {"request_timeout": request_timeout})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ws="none",
        # uvicorn counts the requesting connection itself: N connections get served at N + 1
        limit_concurrency=max_connections + 1,
        timeout_keep_alive=keep_alive,
        **more,
    )
