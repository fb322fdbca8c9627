"""Subprocess for the chunk store's crash tests: checkpoint sessions in a loop until killed.

Usage: ``python tests/runtime/chunk_writer.py ROOT MODEL SEED``

Two sessions grow by small turns and are checkpointed after each; when one passes 700 tokens
it is deleted and starts again, so chunk writes, manifest switches, pruning and garbage
collection all happen often. Prints ``ready`` once the first checkpoint is durable.
"""

from __future__ import annotations

import sys

import numpy as np

from llamaffi import Model
from runtime.chunks import ChunkStore


def main() -> int:
    root, model_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(seed)
    with (
        Model(model_path) as model,
        model.context(n_ctx=2048, n_batch=512, n_seq_max=3, n_threads=1) as ctx,
        ChunkStore(root, chunk_tokens=64, threads=1) as store,
    ):
        sessions = {0: "a", 1: "b"}
        tokens: dict[int, list[int]] = {}
        for seq, sid in sessions.items():
            got = store.restore_latest(ctx, sid, seq, scratch_seq=2)
            tokens[seq] = list(got.tokens) if got is not None else []
        first = True
        while True:
            for seq, sid in sessions.items():
                if len(tokens[seq]) > 700:
                    store.delete_session(sid)
                    ctx.memory.seq_rm(seq)
                    tokens[seq] = []
                turn = [int(t) for t in rng.integers(10, model.n_vocab - 10, 40)]
                ctx.decode(turn, seq_id=seq, logits="none")
                tokens[seq] += turn
                pending = store.plan_capture(
                    ctx, seq, tokens[seq], scratch_seq=2, session_id=sid, journal_seq=0
                )
                store.commit(pending)
                if first:
                    print("ready", flush=True)
                    first = False


if __name__ == "__main__":
    sys.exit(main())
