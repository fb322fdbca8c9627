"""``python -m llamaffi info``: print the build number, pin, library path, CPU features, backends.

``python -m llamaffi generate --model PATH "prompt"`` runs a short greedy generation. The
context holds the prompt plus ``-n`` tokens unless ``--n-ctx`` says otherwise; without
``--n-ctx`` it never exceeds the model's training context.

Exit codes: 0 success, 1 a llama.cpp error, 2 bad arguments (the request does not fit).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from llamaffi.errors import ArgumentError

if TYPE_CHECKING:
    from llamaffi.model import Model


def _positive_int(value: str) -> int:
    """argparse type: an int >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def context_size(model: Model, n_prompt: int, n_predict: int, n_ctx: int | None) -> int:
    """The context size for a generation; ``ValueError`` if the request cannot fit.

    ``generate`` decodes the prompt and every sampled token, so it needs
    ``n_prompt + n_predict`` cells. Without an explicit ``n_ctx`` that is capped by the
    model's training context (beyond it the model's positions are untrained).
    """
    needed = n_prompt + n_predict
    if n_ctx is not None:
        if n_ctx < needed:
            raise ArgumentError(
                f"--n-ctx {n_ctx} is too small: the prompt is {n_prompt} tokens and -n asks "
                f"for {n_predict} more ({needed} in all)"
            )
        return n_ctx
    limit = model.n_ctx_train
    if 0 < limit < needed:
        raise ArgumentError(
            f"the prompt ({n_prompt} tokens) plus -n {n_predict} needs {needed} tokens of "
            f"context, more than the model's training context of {limit}; lower -n or pass "
            "--n-ctx explicitly"
        )
    return needed


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m llamaffi")
    sub = parser.add_subparsers(dest="cmd", required=True)
    info_p = sub.add_parser("info", help="build and runtime information")
    info_p.add_argument("--json", action="store_true", help="print JSON")
    gen_p = sub.add_parser("generate", help="greedy generation (a smoke test)")
    gen_p.add_argument("--model", required=True, help="a GGUF file")
    gen_p.add_argument("-n", type=_positive_int, default=16, help="tokens to generate")
    gen_p.add_argument(
        "--n-ctx",
        type=_positive_int,
        default=None,
        help="context size in tokens (default: prompt + n, at most the model's training size)",
    )
    gen_p.add_argument("prompt")
    args = parser.parse_args(argv)

    from llamaffi.errors import LlamaError

    try:
        if args.cmd == "info":
            from llamaffi.info import collect, format_info

            info = collect()
            print(json.dumps(info, indent=2) if args.json else format_info(info))
        else:
            from llamaffi.model import Model

            with Model(args.model) as model:
                tokens = model.tokenize(args.prompt)
                n_ctx = context_size(model, len(tokens), args.n, args.n_ctx)
                with model.context(n_ctx=n_ctx) as ctx:
                    out = ctx.generate(tokens, args.n)
                print(args.prompt + model.detokenize(out))
    except ArgumentError as exc:  # context_size: the request does not fit (bad input)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LlamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
