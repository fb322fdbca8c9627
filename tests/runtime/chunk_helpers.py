"""Chunk store checkpoints without a model: plain-data PendingCheckpoints, committed as the
writer thread would commit a real one (for tests of the store's files, not of KV)."""

from __future__ import annotations

import numpy as np

from runtime.chunks import ChunkStore, Manifest, PendingCheckpoint, PendingChunk, chunk_keys
from runtime.snapshot import CacheIdentity

IDENTITY = CacheIdentity(
    build_number=1,
    model_fingerprint="ab" * 32,
    n_layer=2,
    n_embd=64,
    n_head=4,
    n_head_kv=4,
    n_seq_max=2,
    type_k="f16",
    type_v="f16",
    flash_attn=False,
    kv_unified=True,
)


def commit_fake_checkpoint(
    store: ChunkStore, session_id: str, n_tokens: int = 4, *, raw_size: int = 1024, seed: int = 0
) -> Manifest:
    """Commit a checkpoint of ``n_tokens`` tokens whose chunks hold ``raw_size`` random bytes
    each; returns its manifest."""
    rng = np.random.default_rng(seed)
    tokens = tuple(int(t) for t in rng.integers(10, 1000, n_tokens))
    scope = f"session:{session_id}" if store.dedup == "session" else ""
    keys = chunk_keys(IDENTITY, tokens, 0, chunk_tokens=store.chunk_tokens, scope=scope)
    chunks = [
        PendingChunk(key, start, end, start, rng.integers(0, 256, raw_size, dtype=np.uint8))
        for key, start, end in keys
    ]
    for chunk in chunks:
        assert chunk.raw is not None
        chunk.raw_size = int(chunk.raw.size)
    pending = PendingCheckpoint(
        session_id=session_id,
        journal_seq=0,
        identity=IDENTITY,
        n_ctx=256,
        chunk_tokens=store.chunk_tokens,
        pos_min=0,
        tokens=tokens,
        chunks=chunks,
        lineage=(),
        scope=scope,
        meta={},
        created_ns=0,
    )
    return store.commit(pending)
