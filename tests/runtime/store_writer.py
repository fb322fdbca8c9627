"""Subprocess for the store's crash tests: write snapshots in a loop until killed.

Usage: ``python tests/runtime/store_writer.py ROOT SESSION RAW_BYTES [SECONDS]``

Snapshot ``k`` holds :func:`payload` ``(k)`` and the token ids ``[k]``, so a reader can tell
whether a snapshot is intact. Prints ``ready`` once the first snapshot is durable.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from runtime import snapshot
from runtime.store import SnapshotStore

IDENTITY = snapshot.CacheIdentity(
    build_number=11312,
    model_fingerprint="cd" * 32,
    n_layer=2,
    n_embd=64,
    n_head=4,
    n_head_kv=2,
    n_seq_max=1,
    type_k="f16",
    type_v="f16",
    flash_attn=False,
    kv_unified=True,
)


def payload(k: int, n: int) -> np.ndarray:
    """Deterministic f16-like bytes for snapshot ``k``."""
    rng = np.random.default_rng(k)
    return rng.standard_normal(n // 2).astype(np.float16).view(np.uint8)


def make(k: int, n: int, session: str) -> snapshot.Snapshot:
    """Snapshot number ``k``."""
    return snapshot.encode(
        payload(k, n),
        identity=IDENTITY,
        tokens=[k],
        seq_id=0,
        session_id=session,
        codec=snapshot.Codec(chunk_size=256 << 10, threads=1),
    )


def main() -> int:
    root, session, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
    deadline = time.monotonic() + seconds
    start = time.time_ns() % 1_000_000_000
    # Encode up front, so that most of the loop's time is spent writing and a kill usually
    # lands in the middle of a write.
    snapshots = [make(start + i, n, session) for i in range(4)]
    with SnapshotStore(root, keep=3) as store:
        i = 0
        while time.monotonic() < deadline:
            store.save(session, snapshots[i % len(snapshots)])
            if i == 0:
                print("ready", flush=True)
            i += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
