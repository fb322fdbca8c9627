"""``python -m llamaffi info``: print the build number, pin, library path, CPU features, backends.

``python -m llamaffi generate --model PATH "prompt"`` runs a short greedy generation.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m llamaffi")
    sub = parser.add_subparsers(dest="cmd", required=True)
    info_p = sub.add_parser("info", help="build and runtime information")
    info_p.add_argument("--json", action="store_true", help="print JSON")
    gen_p = sub.add_parser("generate", help="greedy generation (a smoke test)")
    gen_p.add_argument("--model", required=True, help="a GGUF file")
    gen_p.add_argument("-n", type=int, default=16, help="tokens to generate")
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

            with Model(args.model) as model, model.context(n_ctx=512) as ctx:
                out = ctx.generate(model.tokenize(args.prompt), args.n)
                print(args.prompt + model.detokenize(out))
    except LlamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
