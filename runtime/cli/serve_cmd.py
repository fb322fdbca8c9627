"""``python -m runtime serve``: the OpenAI-compatible HTTP server (see :mod:`runtime.server`).

Binds to 127.0.0.1 by default. ``--api-key-file`` names a file whose first line is the key
every endpoint but ``/health`` then requires (``Authorization: Bearer <key>``);
``--api-keys`` instead names a file of ``tenant key`` lines, each key reaching only its
tenant's sessions and memories (:mod:`runtime.server.tenants`). SIGTERM or SIGINT: stop
accepting, finish or cancel what runs, write final checkpoints, exit 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.cli.common import add_runtime_args, open_runtime, positive_int
from runtime.errors import ArgumentError


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` arguments."""
    add_runtime_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8080, help="TCP port (8080)")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key-file", default=None, help="require this Bearer key")
    keys.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help="'tenant key' lines (or 'tenant sha256:<hex>'): a key reaches its tenant's data only",
    )
    parser.add_argument(
        "--max-queue", type=positive_int, default=64, help="waiting requests before 503s (64)"
    )
    parser.add_argument(
        "--max-body", type=positive_int, default=1 << 20, help="request body limit, bytes (1 MiB)"
    )
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds in-flight turns get on SIGTERM (10)"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=20.0,
        help="seconds a client has to send a whole request, from its first byte (20)",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=256,
        help="open connections and requests before 503s (256)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=0,
        help="sessions kept at most per tenant; a new one past it gets a 429 (0: no cap)",
    )
    parser.add_argument(
        "--session-ttl",
        type=float,
        default=0.0,
        help="delete a session (and its memories) idle this many seconds (0: never)",
    )
    parser.add_argument(
        "--advertise-url",
        default="",
        help="with --db: the URL other nodes send this node's sessions' clients to (409s)",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level (warning)")
    parser.set_defaults(func=run)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def read_api_key(path: str) -> str:
    """The key in ``path`` (its first line, stripped); an ArgumentError when there is none."""
    lines = Path(path).read_text().splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise ArgumentError(f"{path}: no API key in the file")
    return key


def run(args: argparse.Namespace) -> int:
    """Open the runtime and serve it until a signal; returns the exit code."""
    from runtime.server import serve
    from runtime.server.tenants import read_keys

    if args.grace < 0:
        raise ArgumentError(f"--grace must be >= 0, got {args.grace}")
    if not args.request_timeout > 0:
        raise ArgumentError(f"--request-timeout must be > 0, got {args.request_timeout}")
    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    api_keys = read_keys(args.api_keys) if args.api_keys else None
    rt = open_runtime(
        args,
        max_sessions=args.max_sessions,
        session_ttl_s=args.session_ttl,
        advertise_url=args.advertise_url,
    )
    print(
        f"serve: http://{args.host}:{args.port}/v1 (model {rt.model_name}, data {args.dir})",
        file=sys.stderr,
        flush=True,
    )
    rc = serve(
        rt,
        host=args.host,
        port=args.port,
        api_key=api_key,
        api_keys=api_keys,
        max_body=args.max_body,
        max_queue=args.max_queue,
        grace_s=args.grace,
        log_level=args.log_level,
        request_timeout=args.request_timeout,
        max_connections=args.max_connections,
    )
    print("serve: stopped (final checkpoints written)", file=sys.stderr, flush=True)
    return rc
