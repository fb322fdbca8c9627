"""``python -m runtime memory add|search|stats|rebuild --dir D``: long-term memory from a shell.

``add`` and ``rebuild`` open the store for writing (one writer per directory); ``search`` and
``stats`` open it read-only, so they work while an application holds the store open.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from runtime.arguments import MAX_TEXT_CHARS
from runtime.cli.common import positive_int
from runtime.embed import Embedder
from runtime.layout import LONGTERM_DIR, SHARED_LONGTERM_DIR
from runtime.longterm import MemoryStore
from runtime.longterm.db import DB_NAME
from runtime.longterm.items import KINDS


def _unit_interval(value: str) -> float:
    """argparse type: a finite float in [0, 1]."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return number


def _json_object(value: str) -> dict[str, Any]:
    """argparse type: a JSON object (the memory's metadata)."""
    try:
        obj = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {type(obj).__name__}")
    return obj


def _text(value: str) -> str:
    """argparse type: text that is not blank and not over MAX_TEXT_CHARS."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if len(value) > MAX_TEXT_CHARS:
        raise argparse.ArgumentTypeError(f"is {len(value)} characters; at most {MAX_TEXT_CHARS}")
    return value


def _store_dir(directory: str) -> Path:
    """The store directory itself, or the store inside a runtime data directory: its
    ``longterm/``, or else the replica of a ``--db`` runtime (``longterm-shared/``, which
    these commands read but never write: only a runtime writes through to the database)."""
    path = Path(directory)
    if (path / DB_NAME).exists():
        return path
    for name in (LONGTERM_DIR, SHARED_LONGTERM_DIR):
        if (path / name).is_dir():
            return path / name
    return path


def _embedder(args: argparse.Namespace) -> Embedder:
    if args.model_dir:
        return Embedder.from_dir(args.model_dir, threads=args.threads)
    return Embedder.default(threads=args.threads)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False))


def cmd_add(args: argparse.Namespace) -> int:
    """Add one memory (or one per stdin line with ``-``); print the new ids."""
    if args.text == "-":
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
        if not texts:
            print("error: no text on stdin", file=sys.stderr)
            return 2
    else:
        texts = [args.text]
    with MemoryStore(_store_dir(args.dir), _embedder(args)) as store:
        ids = store.add_many(
            texts, kind=args.kind, session=args.session, importance=args.importance, meta=args.meta
        )
    for item_id in ids:
        print(item_id)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Print the best memories for a query (tab-separated, or JSON with ``--json``)."""
    with MemoryStore(_store_dir(args.dir), _embedder(args), read_only=True) as store:
        hits = store.search(args.query, args.k, session=args.session, kinds=args.kind)
    if args.json:
        _print_json([h.__dict__ for h in hits])
    else:
        for h in hits:
            session = h.session if h.session is not None else "-"
            print(f"{h.score:.4f}\t{h.similarity:.4f}\t{session}\t{h.kind}\t{h.id}\t{h.text}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the store's counts and settings as JSON."""
    with MemoryStore(_store_dir(args.dir), _embedder(args), read_only=True) as store:
        _print_json(store.stats())
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Rebuild the index from SQLite and save it."""
    with MemoryStore(_store_dir(args.dir), _embedder(args)) as store:
        count = store.rebuild()
    print(f"rebuilt the index: {count} items")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``memory`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--dir", required=True, help="the store directory, or a runtime data directory"
        )
        p.add_argument(
            "--model-dir",
            help="a Hugging Face ONNX export directory (default: bundled all-MiniLM-L6-v2)",
        )
        p.add_argument("--threads", type=positive_int, default=None, help="onnxruntime threads")
        p.set_defaults(func=func)
        return p

    add = command("add", cmd_add, "add a memory; prints its id")
    add.add_argument(
        "text", type=_text, help="the text to remember, or - for one memory per stdin line"
    )
    add.add_argument("--kind", choices=KINDS, default="fact")
    add.add_argument("--session", default=None)
    add.add_argument("--importance", type=_unit_interval, default=0.5, help="0..1 (default 0.5)")
    add.add_argument(
        "--meta", type=_json_object, default=None, help="a JSON object stored with the memory"
    )

    search = command("search", cmd_search, "search memories")
    search.add_argument("query", type=_text)
    search.add_argument("-k", type=positive_int, default=5, help="hits to print (default 5)")
    search.add_argument("--session", default=None)
    search.add_argument("--kind", action="append", choices=KINDS, help="repeatable")
    search.add_argument("--json", action="store_true", help="print JSON")

    command("stats", cmd_stats, "print counts and settings (JSON)")
    command("rebuild", cmd_rebuild, "rebuild the index from SQLite")
