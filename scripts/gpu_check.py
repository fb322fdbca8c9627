#!/usr/bin/env python3
"""GPU check for a ``GGML_CUDA=on`` build: run on a machine with an NVIDIA GPU.

Checks that the CUDA backend is there, that a model offloaded with ``n_gpu_layers=-1`` keeps
its KV cache on the GPU, and that state and snapshot round trips are bit-exact there, also
across devices (GPU snapshot restored into a CPU context and back). Prints timings of
``seq_state_get``/``set`` and of snapshot save/restore against a full re-prefill.

    python scripts/gpu_check.py [--preset tiny|tinyllama-geometry] [--n-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, repeat: int = 5):  # type: ignore[no-untyped-def]
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--n-tokens", type=int, default=1024)
    parser.add_argument("--out", default="")
    parser.add_argument("--allow-cpu", action="store_true", help="dry run on a CPU build")
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    args = parser.parse_args()
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")

    import llamaffi
    from llamaffi import Model
    from llamaffi.testing import make_model
    from runtime import snapshot

    report: dict[str, object] = {}
    info = llamaffi.build_info()
    report["backends"] = info["backends"]
    report["devices"] = info["devices"]
    report["gpu_offload"] = info["supports_gpu_offload"]
    print(json.dumps(info, indent=1), flush=True)
    if not (info["supports_gpu_offload"] or args.allow_cpu):
        print("this build has no GPU backend (build with GGML_CUDA=on)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    path = make_model(work / "m.gguf", preset=args.preset, seed=0)
    report["model_write_s"] = round(time.perf_counter() - t, 2)
    rng = np.random.default_rng(0)
    with Model(path, n_gpu_layers=-1) as gpu_model, Model(path) as cpu_model:
        n = args.n_tokens
        tokens = [int(x) for x in rng.integers(3, gpu_model.n_vocab, n)]
        gctx = gpu_model.context(n_ctx=2 * n + 128, n_batch=512, n_seq_max=2)
        cctx = cpu_model.context(n_ctx=2 * n + 128, n_batch=512, n_seq_max=2)
        t = time.perf_counter()
        gctx.decode(tokens[:-1])
        report["gpu_prefill_s"] = round(time.perf_counter() - t, 4)
        blob, get_s = timed(lambda: gctx.seq_state_get(0))
        report["seq_state_bytes"] = int(blob.size)
        report["gpu_seq_state_get_ms"] = round(get_s * 1000, 2)
        snap, save_s = timed(lambda: snapshot.capture(gctx, 0, tokens[:-1]), repeat=3)
        report["snapshot_capture_ms"] = round(save_s * 1000, 2)
        report["snapshot_ratio"] = round(snap.header.raw_size / snap.header.compressed_size, 3)
        file = work / "s.kvsnap"
        snapshot.write(file, snap)
        gctx.decode([tokens[-1]])
        reference = gctx.logits()

        def set_into_1() -> int:
            gctx.memory.seq_rm(1)
            return gctx.seq_state_set(blob, 1)

        _, set_s = timed(set_into_1)
        report["gpu_seq_state_set_ms"] = round(set_s * 1000, 2)
        gctx.decode([tokens[-1]], seq_id=1, pos=n - 1)
        report["gpu_state_round_trip_bit_exact"] = bool(np.array_equal(gctx.logits(), reference))

        def restore_gpu() -> None:
            gctx.memory.seq_rm(1)
            snapshot.restore(gctx, snapshot.read(file), 1)

        _, restore_s = timed(restore_gpu)
        report["snapshot_read_verify_restore_ms"] = round(restore_s * 1000, 2)
        gctx.decode([tokens[-1]], seq_id=1, pos=n - 1)
        report["gpu_snapshot_round_trip_bit_exact"] = bool(np.array_equal(gctx.logits(), reference))

        # Across devices: the blob format is device-independent, the arithmetic is not.
        cctx.seq_state_set(blob, 0)
        cctx.decode([tokens[-1]], seq_id=0, pos=n - 1)
        diff = float(np.max(np.abs(cctx.logits() - reference)))
        report["gpu_to_cpu_restore_max_abs_logit_diff"] = diff
        try:
            snapshot.restore(cctx, snapshot.read(file), 1)
            report["gpu_snapshot_into_cpu_context"] = "accepted"
        except snapshot.SnapshotError as exc:
            report["gpu_snapshot_into_cpu_context"] = f"refused: {exc}"
        gctx.memory.clear()
        t = time.perf_counter()
        gctx.decode(tokens[:-1])
        report["gpu_reprefill_s"] = round(time.perf_counter() - t, 4)
        gctx.close()
        cctx.close()
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    ok = report["gpu_state_round_trip_bit_exact"] and report["gpu_snapshot_round_trip_bit_exact"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
