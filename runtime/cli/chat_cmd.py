"""``python -m runtime chat``: talk to the model, with memory, from a terminal or a pipe.

Interactive (stdin is a terminal): the reply streams to stdout token by token.
Piped: one turn per input line; stdout carries exactly one line per reply (newlines and
backslashes inside it escaped as ``\\n`` and ``\\\\``), written only once the turn is durable
in the journal. A turn that fails (too long for the context, say) prints its error on stderr
and an empty line on stdout, and the chat goes on. Banners, progress and logs go to stderr.

SIGTERM or SIGINT ends the current reply early (it is kept and journalled as cancelled),
closes the runtime (final checkpoints) and exits 0. A second SIGINT exits at once (130),
which is still safe: every turn is in the journal before it is answered.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from runtime.cli.common import add_runtime_args, open_runtime
from runtime.errors import MemoryRuntimeError


class _Shutdown(Exception):
    """A signal arrived while waiting for input."""


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``chat`` arguments."""
    add_runtime_args(parser)
    parser.add_argument("--session", default="default", help="session id (default: default)")
    parser.add_argument("--max-tokens", type=int, default=None, help="reply length cap")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument(
        "--no-remember", action="store_true", help="keep these turns out of long-term memory"
    )
    parser.set_defaults(func=run)


def escape_line(text: str) -> str:
    """One reply as one line: backslashes and newlines escaped."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def run(args: argparse.Namespace) -> int:
    """The chat loop; returns the exit code."""
    from runtime.layout import validate_session_id

    validate_session_id(args.session)  # before the model loads
    if isinstance(sys.stdin, io.TextIOWrapper):
        # a line that is not UTF-8 is refused with its reason (the runtime's text rule sees a
        # lone surrogate), and the chat goes on; strict decoding would end it mid-stream
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    stop = threading.Event()
    # "reading": blocked in readline(), the only place a signal may unwind the loop
    state = {"reading": False, "signals": 0}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        state["signals"] += 1
        if state["signals"] > 1 and signum == signal.SIGINT:
            print(
                "\nchat: second interrupt, exiting now (the journal has every turn)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(130)
        stop.set()
        if state["reading"]:
            raise _Shutdown

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open_runtime(args) as rt:
            print(
                f"chat: session {args.session!r} in {args.dir} (Ctrl-D or Ctrl-C to end)",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(_Shutdown):
                _loop(rt, args, interactive, stop, state)
            print("chat: closing (writing final checkpoints)", file=sys.stderr, flush=True)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 0


def _loop(
    rt: Any,
    args: argparse.Namespace,
    interactive: bool,
    stop: threading.Event,
    state: dict[str, Any],
) -> None:
    while not stop.is_set():
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        state["reading"] = True
        try:
            if stop.is_set():
                return
            line = sys.stdin.readline()
        finally:
            state["reading"] = False
        if not line:
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        try:
            stream = _stream_to_stdout if interactive else None
            reply = rt.chat(
                args.session,
                text,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=args.seed,
                on_token=stream,
                cancelled=stop.is_set,
                remember=not args.no_remember,
            )
        except (MemoryRuntimeError, ValueError) as exc:
            # one bad line (too long, does not fit the context) is not the end of the chat;
            # nothing of it was acknowledged. Piped: an empty line keeps one line per turn.
            print(f"chat: error: {exc}", file=sys.stderr, flush=True)
            if not interactive:
                sys.stdout.write("\n")
                sys.stdout.flush()
            continue
        if interactive:
            print(flush=True)
            if reply.resumed is not None and reply.resumed.source != "empty":
                r = reply.resumed
                print(
                    f"  (resumed from {r.source}: {r.restored_tokens} restored + "
                    f"{r.replayed_tokens} replayed tokens in {r.seconds * 1000:.0f} ms)",
                    file=sys.stderr,
                )
        else:
            sys.stdout.write(escape_line(reply.text) + "\n")
            sys.stdout.flush()


def _stream_to_stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
