"""runtime.snapshot.layout against the pinned llama.cpp: a known answer per cache type, and
sliced blobs byte-identical to what llama.cpp gives for the same cells."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from runtime.snapshot import layout as L

llamaffi = pytest.importorskip("llamaffi")

SRC, TMP = 0, 2
CTX: dict[str, Any] = {"n_ctx": 1024, "n_batch": 512, "n_seq_max": 4, "n_threads": 2}
CACHES: dict[str, dict[str, Any]] = {
    "f16": {"type_k": "f16", "type_v": "f16", "flash_attn": False},
    "f16-fa": {"type_k": "f16", "type_v": "f16", "flash_attn": True},
    "q8_0-fa": {"type_k": "q8_0", "type_v": "q8_0", "flash_attn": True},
}
#: bytes per row of n values: f16 2n, q8_0 34 per 32
ROW = {"f16": lambda n: 2 * n, "q8_0": lambda n: n // 32 * 34}


def tokens_of(model: Any, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(10, model.n_vocab - 10, n)]


def build(ctx: Any, tokens: list[int], seq: int = SRC, turn: int = 37) -> None:
    for i in range(0, len(tokens), turn):
        ctx.decode(tokens[i : i + turn], seq_id=seq, logits="none")


def scratch_copy(ctx: Any, p0: int, p1: int) -> bytes:
    """What the scratch path gives for positions [p0, p1) of SRC."""
    ctx.memory.seq_cp(SRC, TMP, p0, p1)
    try:
        return bytes(ctx.seq_state_get(TMP).tobytes())
    finally:
        ctx.memory.seq_rm(TMP, -1, -1)


@pytest.mark.parametrize("cache", list(CACHES))
def test_known_answer(model: Any, cache: str) -> None:
    """The layout of a 100-cell state: counts, positions, V orientation, row sizes."""
    args = CACHES[cache]
    with model.context(**CTX, **args) as ctx:
        build(ctx, tokens_of(model, 100))
        blob = ctx.seq_state_get(SRC)
        lay = L.parse(blob)
    n_kv = model.n_head_kv * (model.n_embd // model.n_head)
    assert lay.size == blob.size
    assert lay.n_cells == 100
    assert lay.positions.tolist() == list(range(100))
    assert lay.n_layer == model.n_layer == len(lay.k) == len(lay.v)
    assert lay.v_trans == (not args["flash_attn"])
    row = ROW[str(args["type_k"])](n_kv)
    assert all(s.rows == 100 and s.row == row for s in lay.k)
    if lay.v_trans:
        assert lay.v_el == 2 and all(s.rows == n_kv and s.row == 200 for s in lay.v)
    else:
        assert all(s.rows == 100 and s.row == row for s in lay.v)


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("shifted", [False, True])
def test_slices_match_llama_cpp(model: Any, cache: str, shifted: bool) -> None:
    """Each sliced range (copied lazily, into a buffer of its size) equals llama.cpp's state
    of a sequence holding just those cells, and sets back into a fresh context as is."""
    args = CACHES[cache]
    tokens = tokens_of(model, 700, seed=3)
    with model.context(**CTX, **args) as ctx:
        build(ctx, tokens[:600])
        if shifted:  # cells out of position order: a window shift, then more decoding
            ctx.memory.seq_rm(SRC, 50, 150)
            ctx.memory.seq_add(SRC, 150, -1, -100)
            build(ctx, tokens[600:700])
        n = ctx.memory.pos_max(SRC) + 1
        blob = ctx.seq_state_get(SRC)
        lay = L.parse(blob)
        if shifted:
            assert lay.positions.tolist() != sorted(lay.positions.tolist())
        ranges = [(p, min(p + 256, n)) for p in range(0, n, 256)]
        sliced = L.slice_ranges(blob, lay, ranges, seq_id=TMP)
        for (p0, p1), part in zip(ranges, sliced, strict=True):
            copied = part.copy_into(np.full(part.size, 0xEE, dtype=np.uint8))
            assert copied.tobytes() == scratch_copy(ctx, p0, p1)
            with pytest.raises(L.LayoutError):
                part.copy_into(np.empty(part.size + 1, dtype=np.uint8))
        with model.context(**CTX, **args) as fresh:
            (last,) = [c.materialize() for c in L.slice_ranges(blob, lay, ranges[-1:], seq_id=1)]
            fresh.seq_state_set(last, 1)
            assert fresh.seq_state_get(1).tobytes() == last.tobytes()


def test_unknown_layouts_are_refused(model: Any) -> None:
    with model.context(**CTX) as ctx:
        build(ctx, tokens_of(model, 40))
        blob = ctx.seq_state_get(SRC)
    with pytest.raises(L.LayoutError):
        L.parse(blob[:-1])
    with pytest.raises(L.LayoutError):
        L.parse(np.concatenate([blob, np.zeros(4, np.uint8)]))
    bad = blob.copy()
    bad[8:12] = np.frombuffer(np.uint32(2).tobytes(), np.uint8)  # two streams
    with pytest.raises(L.LayoutError):
        L.parse(bad)
    bad = blob.copy()
    bad[0] ^= 1
    with pytest.raises(L.LayoutError):
        L.parse(bad)
