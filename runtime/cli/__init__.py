"""Command line: ``python -m runtime <group> <command> ...``.

Each group lives in its own module and registers its subcommands here; the handlers only
parse arguments and call the runtime's public API (CLI -> runtime -> llamaffi -> C).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from runtime.errors import (
    ArgumentError,
    ArgumentTypeError,
    InvalidNameError,
    MemoryRuntimeError,
)

logger = logging.getLogger(__name__)

# (group name, "module:function") registering that group's subparsers; imported lazily so that
# `python -m runtime memory ...` never loads libllama and `snapshot ...` never loads onnxruntime.
GROUPS: dict[str, tuple[str, str]] = {
    "chat": (
        "runtime.cli.chat_cmd",
        "talk to the model with memory (a terminal, or a turn per line)",
    ),
    "stats": ("runtime.cli.stats_cmd", "what a runtime data directory holds (read-only)"),
    "snapshot": ("runtime.cli.snapshot_cmd", "short-term memory: KV snapshot files"),
    "memory": ("runtime.cli.memory_cmd", "long-term memory: embedded items + hnswlib index"),
    "serve": ("runtime.cli.serve_cmd", "an OpenAI-compatible HTTP server (sessions survive it)"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the parser; only the group named in ``argv`` (if any) is imported."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="python -m runtime",
        description="Chat with a local LLM that keeps its memory, serve it over HTTP, and "
        "inspect and maintain the runtime's files: KV snapshots (short-term memory) and the "
        "long-term memory store.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    wanted = next((a for a in argv if a in GROUPS), None)
    for name, (module, help_text) in GROUPS.items():
        sub = groups.add_parser(name, help=help_text)
        if name == wanted:
            register: Callable[[argparse.ArgumentParser], None] = importlib.import_module(
                module
            ).register
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code.

    0: success; 1: the runtime failed (damaged or locked store, I/O error); 2: bad input
    (argparse's own usage errors, and any ``ValueError``/``TypeError`` the API raises for
    arguments the parser let through). Every failure prints ``error: <message>`` on stderr;
    ``-v`` adds the traceback of errors caught here.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "func", None)
    if handler is None:
        parser.parse_args([*args_list, "--help"])
        return 2
    try:
        rc: int = handler(args)
    except (ArgumentError, ArgumentTypeError, InvalidNameError) as exc:
        # the API's typed argument checks (a session id among them): runtime errors, but
        # about the input, not the files
        return _fail(exc, 2)
    except MemoryRuntimeError as exc:
        # before ValueError: several runtime errors (a store written by another model) are
        # ValueErrors too, but they are about the files, not the command line
        return _fail(exc, 1)
    except OSError as exc:
        return _fail(exc, 1)
    except (ValueError, TypeError) as exc:
        # the API's argument checks, for anything the parser's type= functions did not catch
        return _fail(exc, 2)
    return rc


def _fail(exc: BaseException, rc: int) -> int:
    logger.debug("command failed", exc_info=exc)
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
    print(f"error: {where}{message}", file=sys.stderr)
    return rc
