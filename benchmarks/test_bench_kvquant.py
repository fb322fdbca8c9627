"""q8_0 KV against f16: what quantizing the cache changes in the next-token logits, and what it
saves in snapshot bytes, chunk bytes and KV RAM.

On SmolLM2 (``BENCH_KVQUANT_MODEL``, default ``smollm2``; ``tiny`` in CI mode), three caches
decode the same text one token at a time for ``POSITIONS`` (200) positions:

* ``f16``: f16 K and V without flash attention (plain attention, the reference);
* ``f16-fa``: f16 with flash attention (the runtime's default), to tell flash attention's own
  rounding from q8_0's;
* ``q8_0``: q8_0 K and V, which needs flash attention (the runtime's ``kv_type="q8_0"``).

``test_kvquant_decode`` times that decode and records, against the reference, the largest
absolute logit difference over every position and vocabulary entry, the mean of each
position's largest difference, the share of positions whose top-1 token agrees, and the mean
and largest KL divergence of the next-token distributions.
``test_kvquant_checkpoint`` prefills ``BYTES_TOKENS`` (1,024) tokens, times a chunked
checkpoint, and records the raw state, full snapshot, chunk store and KV RAM bytes; it then
restores the chunks into a fresh context and asserts that state and next-token logits are bit
for bit those of the live context.

    BENCH_FULL=1 ./dev bench -k kvquant
    .venv/bin/python -m pytest benchmarks/test_bench_kvquant.py --benchmark-enable
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CI, prompt_tokens, require_model, rounds

from runtime import snapshot as S
from runtime.chunks import ChunkStore

MODEL = os.environ.get("BENCH_KVQUANT_MODEL", "tiny" if CI else "smollm2")
#: Positions whose next-token logits are compared.
POSITIONS = 50 if CI else 200
#: Tokens of the state whose bytes are measured.
BYTES_TOKENS = 256 if CI else 1024
#: kind -> context arguments; the first is the reference.
KINDS: dict[str, dict[str, Any]] = {
    "f16": {"type_k": "f16", "type_v": "f16", "flash_attn": False},
    "f16-fa": {"type_k": "f16", "type_v": "f16", "flash_attn": True},
    "q8_0": {"type_k": "q8_0", "type_v": "q8_0", "flash_attn": True},
}
REFERENCE = "f16"
#: Bytes per element of the cache types measured here (ggml: block bytes / block elements).
TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32}
CTX_ARGS: dict[str, Any] = {"n_batch": 512, "n_seq_max": 3}

#: Varied English (a few topics, no repeats), so that the next token is not trivially predictable.
TEXT = (
    "The harbour was quiet before dawn, except for the gulls and a single engine turning over "
    "somewhere near the fuel dock. Maria checked the tide table twice, then folded it into her "
    "coat. In the kitchen of the small hotel above the square, the baker had already lit the "
    "oven; the smell of bread reached the street long before the shutters opened. Meanwhile, "
    "three hundred kilometres inland, a committee was arguing about the budget for a new "
    "railway bridge: steel prices had risen by a fifth since spring, and the engineers wanted "
    "a wider safety margin for the winter floods. Photosynthesis converts light into chemical "
    "energy; chlorophyll absorbs mostly blue and red wavelengths, which is why leaves look "
    "green. A good recipe for lentil soup needs onions, carrots, cumin, a bay leaf and patience. "
    "When the first ferry finally left, nobody on board noticed the fog lifting over the cliffs, "
    "because everyone was reading the same surprising headline about the election results. "
    "Later that week, the museum reopened its hall of maps, including a chart from 1612 that "
    "shows California as an island."
)


@dataclasses.dataclass
class Quant:
    """The model, the compared token ids and each kind's logits (``POSITIONS`` x vocab)."""

    model: Any
    name: str
    tokens: list[int]
    logits: dict[str, np.ndarray]


def _model_path(name: str) -> Path:
    from runtime.models import resolve_model

    return resolve_model(require_model(name)).path


def _decode_positions(ctx: Any, tokens: list[int]) -> np.ndarray:
    """Decode ``tokens`` one at a time into seq 0 of an empty ``ctx``; every next-token row."""
    out = np.empty((len(tokens), ctx.n_vocab), dtype=np.float32)
    for i, tok in enumerate(tokens):
        ctx.decode([tok], seq_id=0)
        out[i] = ctx.logits()
    return out


@pytest.fixture(scope="module")
def quant() -> Iterator[Quant]:
    import llamaffi

    with llamaffi.Model(_model_path(MODEL)) as model:
        tokens = list(model.tokenize(TEXT))
        if len(tokens) < POSITIONS:
            tokens += prompt_tokens(model, POSITIONS - len(tokens))
        tokens = tokens[:POSITIONS]
        logits = {}
        for kind, args in KINDS.items():
            with model.context(n_ctx=POSITIONS + 64, **CTX_ARGS, **args) as ctx:
                logits[kind] = _decode_positions(ctx, tokens)
        yield Quant(model, MODEL, tokens, logits)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # type: ignore[no-any-return]


def _agreement(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(got64 - ref64)
    per_position = diff.max(axis=1)
    log_p, log_q = _log_softmax(ref64), _log_softmax(got64)
    kld = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)  # KL(reference || got), per position
    same = ref.argmax(axis=1) == got.argmax(axis=1)
    top1 = float(np.mean(same))
    return {
        "max_abs_diff": round(float(per_position.max()), 5),
        "mean_max_abs_diff": round(float(per_position.mean()), 5),
        "logit_range": round(float(ref.max() - ref.min()), 3),
        "top1_agreement": round(top1, 4),
        "top1_disagreements": int(np.count_nonzero(~same)),
        "mean_kld": round(float(kld.mean()), 6),
        "max_kld": round(float(kld.max()), 6),
    }


def _kv_ram_bytes(ctx: Any) -> int:
    """Bytes of the K and V cache tensors: n_ctx cells x layers x (K row + V row)."""
    model = ctx.model
    head = int(model.n_embd) // max(1, int(model.n_head))
    width = int(model.n_head_kv) * head
    row = (TYPE_BYTES[ctx.type_k] + TYPE_BYTES[ctx.type_v]) * width
    return int(ctx.n_ctx * int(model.n_layer) * row)


@pytest.mark.benchmark(group="kvquant-decode")
@pytest.mark.parametrize("kind", list(KINDS))
def test_kvquant_decode(benchmark: Any, quant: Quant, kind: str) -> None:
    """Decode ``POSITIONS`` tokens one at a time; the logits' change against f16."""
    with quant.model.context(n_ctx=POSITIONS + 64, **CTX_ARGS, **KINDS[kind]) as ctx:

        def run() -> np.ndarray:
            return _decode_positions(ctx, quant.tokens)

        def clear() -> None:
            ctx.memory.seq_rm(0, -1, -1)

        got = benchmark.pedantic(run, setup=clear, rounds=rounds(3), iterations=1)
        # the run is deterministic: the timed decode gives the fixture's logits exactly
        assert np.array_equal(got, quant.logits[kind])
    info = _agreement(quant.logits[REFERENCE], got)
    benchmark.extra_info.update(
        model=quant.name,
        kv_type=KINDS[kind]["type_k"],
        flash_attn=KINDS[kind]["flash_attn"],
        positions=POSITIONS,
        reference=REFERENCE,
        **info,
    )
    if kind == REFERENCE:
        assert info["max_abs_diff"] == 0.0
    if kind == "q8_0":
        fa = _agreement(quant.logits["f16-fa"], got)
        benchmark.extra_info.update(
            vs_f16_fa_max_abs_diff=fa["max_abs_diff"],
            vs_f16_fa_top1_agreement=fa["top1_agreement"],
            vs_f16_fa_mean_kld=fa["mean_kld"],
        )


@pytest.mark.benchmark(group="kvquant-bytes")
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_kvquant_checkpoint(benchmark: Any, quant: Quant, kind: str, tmp_path: Path) -> None:
    """A chunked checkpoint of ``BYTES_TOKENS`` tokens; bytes of every form of the state; and a
    bit-exact restore through the chunks."""
    tokens = prompt_tokens(quant.model, BYTES_TOKENS)
    probe = quant.tokens[0]
    n_ctx = BYTES_TOKENS + 256
    with quant.model.context(n_ctx=n_ctx, **CTX_ARGS, **KINDS[kind]) as ctx:
        ctx.decode(tokens, seq_id=0, logits="none")
        raw_bytes = ctx.seq_state_size(0)
        snapshot_bytes = S.capture(ctx, 0, tokens).header.file_size
        stores: list[ChunkStore] = []

        def setup() -> tuple[tuple[ChunkStore], dict[str, Any]]:
            store = ChunkStore(tmp_path / f"store-{len(stores)}")
            stores.append(store)
            return (store,), {}

        def checkpoint(store: ChunkStore) -> Any:
            pending = store.plan_capture(
                ctx, 0, tokens, scratch_seq=2, session_id="s", journal_seq=1
            )
            return store.commit(pending)

        man = benchmark.pedantic(checkpoint, setup=setup, rounds=rounds(5), iterations=1)
        store = stores[-1]
        chunk_bytes = store.stats()["chunk_bytes"]
        live_state = ctx.seq_state_get(0).tobytes()
        ctx.decode([probe], seq_id=0)
        live_logits = ctx.logits()
        with quant.model.context(n_ctx=n_ctx, **CTX_ARGS, **KINDS[kind]) as fresh:
            assert store.restore(fresh, man, 0, scratch_seq=2) == tokens
            assert fresh.seq_state_get(0).tobytes() == live_state
            fresh.decode([probe], seq_id=0)
            assert np.array_equal(fresh.logits(), live_logits)
        kv_ram = _kv_ram_bytes(ctx)
        for s in stores:
            s.close()
    benchmark.extra_info.update(
        model=quant.name,
        kv_type=KINDS[kind]["type_k"],
        flash_attn=KINDS[kind]["flash_attn"],
        n_tokens=BYTES_TOKENS,
        n_ctx=n_ctx,
        raw_state_bytes=raw_bytes,
        raw_bytes_per_token=round(raw_bytes / BYTES_TOKENS, 1),
        snapshot_bytes=snapshot_bytes,
        chunk_bytes=chunk_bytes,
        kv_ram_bytes=kv_ram,
        kv_ram_bytes_per_cell=round(kv_ram / n_ctx, 1),
        restore_bit_exact=True,
    )
