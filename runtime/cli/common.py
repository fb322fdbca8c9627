"""Arguments shared by the commands that open a :class:`runtime.Runtime` (chat, serve)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.app import Runtime


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (every runtime command uses this one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """``--dir``, ``--model`` and the sizes every runtime command takes."""
    parser.add_argument("--dir", required=True, help="the runtime's data directory")
    parser.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (default), tiny (random weights, for tests) or a path to a GGUF file",
    )
    parser.add_argument("--n-ctx", type=positive_int, default=4096, help="KV cells (4096)")
    parser.add_argument(
        "--max-resident", type=positive_int, default=4, help="sessions kept in the KV cache (4)"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="no long-term memory (no embedder)"
    )
    parser.add_argument(
        "--no-flash-attn",
        action="store_true",
        help="plain attention (V stored transposed), as before flash attention was the "
        "default: checkpoints written under it restore; under the other setting a session is "
        "rebuilt from its journal once",
    )
    parser.add_argument(
        "--checkpoint-tokens",
        type=positive_int,
        default=None,
        help="checkpoint after N new tokens (default 256)",
    )
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="postgresql://... : journals, session leases, KV manifest pointers and "
        "long-term memories in PostgreSQL, shared by every node (default: the data "
        "directory)",
    )
    parser.add_argument(
        "--kv",
        default=None,
        metavar="URL",
        help="s3://bucket/prefix : KV chunks and manifests in an S3-compatible store "
        "(endpoint and credentials from the AWS_* variables; default: the data directory)",
    )
    parser.add_argument(
        "--node-id", default=None, help="this node's id in the leases (default: host-pid-hex)"
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=10.0,
        help="seconds a session lease lasts unrenewed: a dead node's sessions move after it (10)",
    )


def open_runtime(args: argparse.Namespace, **options: Any) -> Runtime:
    """Open the runtime the arguments describe (plus ``options``, more
    :class:`runtime.app.RuntimeConfig` options); progress lines go to stderr."""
    from runtime.app import Runtime
    from runtime.session.checkpointer import CheckpointPolicy

    policy = CheckpointPolicy()
    if args.checkpoint_tokens is not None:
        policy = CheckpointPolicy(every_tokens=args.checkpoint_tokens)
    return Runtime.open(
        args.dir,
        model=args.model,
        n_ctx=args.n_ctx,
        max_resident=args.max_resident,
        embedder=False if args.no_memory else None,
        flash_attn=not args.no_flash_attn,
        checkpoint=policy,
        db=args.db,
        kv=args.kv,
        node_id=args.node_id,
        lease_ttl_s=args.lease_ttl,
        progress=lambda line: print(f"runtime: {line}", file=sys.stderr, flush=True),
        **options,
    )
