"""Context: decoding, determinism, state round trips, memory semantics, error paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llamaffi import Context, Model, Sampler
from llamaffi.errors import ClosedError, ContextError, DecodeError, StateError

PROMPT = "The memory of a long-running assistant must survive a crash, intact."


@pytest.fixture()
def ctx(model: Model) -> Iterator[Context]:
    c = model.context(n_ctx=512, n_batch=64, n_seq_max=4, n_threads=2)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tokens(model: Model) -> list[int]:
    toks = model.tokenize(PROMPT)
    assert len(toks) > 10
    return toks


def next_logits_after_restore(ctx: Context, blob: np.ndarray, seq: int, last: int, pos: int):
    ctx.seq_state_set(blob, seq)
    ctx.decode([last], seq_id=seq, pos=pos)
    return ctx.logits()


def test_greedy_generation_is_deterministic_across_contexts(
    model: Model, tokens: list[int]
) -> None:
    outs = []
    for _ in range(2):
        with model.context(n_ctx=256, n_threads=2) as c:
            outs.append(c.generate(tokens, 12))
    assert outs[0] == outs[1]
    assert len(outs[0]) >= 1


def test_decode_splits_long_inputs_into_batches(ctx: Context, model: Model) -> None:
    toks = (model.tokenize(PROMPT * 20))[:200]  # > n_batch=64
    ctx.decode(toks)
    assert ctx.memory.pos_max(0) == len(toks) - 1
    one_shot = ctx.logits()
    # same tokens decoded one batch at a time by hand give the same last logits
    ctx.memory.clear()
    for off in range(0, len(toks), 50):
        ctx.decode(toks[off : off + 50])
    assert np.array_equal(ctx.logits(), one_shot)


def test_pos_none_continues_the_sequence(ctx: Context, tokens: list[int]) -> None:
    ctx.decode(tokens[:5], seq_id=1)
    ctx.decode(tokens[5:], seq_id=1)
    assert ctx.memory.pos_min(1) == 0
    assert ctx.memory.pos_max(1) == len(tokens) - 1


def test_logits_all_and_indexing(ctx: Context, tokens: list[int]) -> None:
    ctx.decode(tokens[:8], logits="all")
    rows = [ctx.logits(i) for i in range(8)]
    assert np.array_equal(ctx.logits(-1), rows[-1])
    assert not np.array_equal(rows[0], rows[1])
    with pytest.raises(IndexError):
        ctx.logits(8)
    ctx.decode(tokens[8:10], logits="none")
    with pytest.raises(IndexError):
        ctx.logits()


def test_state_round_trip_bit_exact_same_and_other_seq(ctx: Context, tokens: list[int]) -> None:
    head, last = tokens[:-1], tokens[-1]
    ctx.decode(head, seq_id=0)
    blob = ctx.seq_state_get(0)
    assert blob.dtype == np.uint8 and blob.size == ctx.seq_state_size(0)
    ctx.decode([last], seq_id=0)
    reference = ctx.logits()

    ctx.memory.clear()
    assert ctx.memory.pos_max(0) == -1
    same = next_logits_after_restore(ctx, blob, 0, last, len(head))
    assert np.array_equal(same, reference)

    ctx.memory.clear()
    other = next_logits_after_restore(ctx, blob, 3, last, len(head))
    assert np.array_equal(other, reference)
    assert ctx.memory.pos_max(0) == -1


def test_state_restores_into_a_fresh_context(model: Model, tokens: list[int]) -> None:
    head, last = tokens[:-1], tokens[-1]
    with model.context(n_ctx=512, n_threads=2) as a:
        a.decode(head)
        blob = a.seq_state_get(0).copy()
        a.decode([last])
        reference = a.logits()
    with model.context(n_ctx=512, n_threads=2) as b:
        assert np.array_equal(next_logits_after_restore(b, blob, 0, last, len(head)), reference)


def test_seq_state_get_into_a_reused_buffer(ctx: Context, tokens: list[int]) -> None:
    ctx.decode(tokens)
    size = ctx.seq_state_size(0)
    buf = np.zeros(size + 100, dtype=np.uint8)
    view = ctx.seq_state_get(0, out=buf)
    assert view.base is buf or np.shares_memory(view, buf)
    assert np.array_equal(view, ctx.seq_state_get(0))
    with pytest.raises(StateError):
        ctx.seq_state_get(0, out=np.zeros(size - 1, dtype=np.uint8))


def test_state_set_accepts_bytes(ctx: Context, tokens: list[int]) -> None:
    ctx.decode(tokens)
    blob = bytes(ctx.seq_state_get(0))
    ctx.memory.clear()
    assert ctx.seq_state_set(blob, 1) == len(blob)
    assert ctx.memory.pos_max(1) == len(tokens) - 1


@pytest.mark.parametrize("cut", [0, 1, 7, 64, 1000, -1])
def test_truncated_state_is_a_clean_error_and_leaves_seq_empty(
    ctx: Context, tokens: list[int], cut: int
) -> None:
    ctx.decode(tokens, seq_id=0)
    blob = ctx.seq_state_get(0)
    ctx.decode(tokens[:3], seq_id=2)  # something to be wiped by the failed restore
    with pytest.raises(StateError):
        ctx.seq_state_set(blob[: cut if cut >= 0 else blob.size - 1], 2)
    assert ctx.memory.pos_max(2) == -1
    assert ctx.memory.pos_max(0) == len(tokens) - 1  # other sequences untouched
    ctx.decode(tokens[:4], seq_id=2)  # and the context still works
    assert ctx.memory.pos_max(2) == 3


def test_garbage_state_is_a_clean_error(ctx: Context) -> None:
    rng = np.random.default_rng(1)
    for size in (4, 16, 100, 10_000, 200_000):
        with pytest.raises(StateError):
            ctx.seq_state_set(rng.integers(0, 256, size, dtype=np.uint8), 1)
        assert ctx.memory.pos_max(1) == -1


def test_whole_state_round_trip(ctx: Context, tokens: list[int]) -> None:
    ctx.decode(tokens[:-1], seq_id=0)
    ctx.decode(tokens[:5], seq_id=1)
    blob = ctx.state_get()
    ctx.decode([tokens[-1]], seq_id=0)
    reference = ctx.logits()
    ctx.memory.clear()
    ctx.state_set(blob)
    assert ctx.memory.pos_max(1) == 4
    ctx.decode([tokens[-1]], seq_id=0)
    assert np.array_equal(ctx.logits(), reference)
    with pytest.raises(StateError):
        ctx.state_set(blob[:100])
    assert ctx.memory.pos_max(0) == -1


def test_llama_seq_file_round_trip(ctx: Context, tokens: list[int], tmp_path: Path) -> None:
    ctx.decode(tokens[:-1])
    path = tmp_path / "seq.bin"
    assert ctx.seq_state_save_file(path, 0, tokens[:-1]) > 0
    ctx.decode([tokens[-1]])
    reference = ctx.logits()
    ctx.memory.clear()
    assert ctx.seq_state_load_file(path, 2, len(tokens)) == tokens[:-1]
    ctx.decode([tokens[-1]], seq_id=2)
    assert np.array_equal(ctx.logits(), reference)
    with pytest.raises(StateError):
        ctx.seq_state_load_file(tmp_path / "missing.bin", 0, 10)


def test_seq_cp_rm_keep_semantics(ctx: Context, tokens: list[int]) -> None:
    n = len(tokens)
    ctx.decode(tokens[:-1], seq_id=0)
    ctx.decode([tokens[-1]], seq_id=0)
    reference = ctx.logits()
    ctx.memory.seq_rm(0, n - 1, -1)  # drop the last token again

    ctx.memory.seq_cp(0, 1)
    assert ctx.memory.pos_max(1) == n - 2
    ctx.decode([tokens[-1]], seq_id=1)
    assert np.array_equal(ctx.logits(), reference)  # the copy attends exactly like the source

    assert ctx.memory.seq_rm(1, 3, -1)  # keep [0, 3)
    assert (ctx.memory.pos_min(1), ctx.memory.pos_max(1)) == (0, 2)
    assert ctx.memory.pos_max(0) == n - 2  # source untouched

    ctx.decode(tokens[:2], seq_id=2)
    ctx.memory.seq_keep(1)
    assert ctx.memory.pos_max(0) == -1 and ctx.memory.pos_max(2) == -1
    assert ctx.memory.pos_max(1) == 2


def test_seq_add_and_div_shift_positions(ctx: Context, tokens: list[int]) -> None:
    assert ctx.memory.can_shift()
    ctx.decode(tokens[:6], seq_id=0)
    ctx.memory.seq_add(0, 0, -1, 10)
    assert (ctx.memory.pos_min(0), ctx.memory.pos_max(0)) == (10, 15)
    ctx.decode(tokens[6:8], seq_id=0)  # continues after the shifted end
    assert ctx.memory.pos_max(0) == 17
    ctx.memory.seq_div(0, 0, -1, 2)
    assert (ctx.memory.pos_min(0), ctx.memory.pos_max(0)) == (5, 8)
    with pytest.raises(ValueError):
        ctx.memory.seq_div(0, 0, -1, 1)


def test_invalid_arguments_are_refused_before_c(ctx: Context, model: Model) -> None:
    with pytest.raises(ValueError):
        ctx.decode([1, 2], seq_id=ctx.n_seq_max)
    with pytest.raises(ValueError):
        ctx.decode([1, 2], seq_id=-1)
    with pytest.raises(ValueError):
        ctx.decode([])
    with pytest.raises(ValueError):
        ctx.decode([model.n_vocab])
    with pytest.raises(ValueError):
        ctx.seq_state_get(99)
    with pytest.raises(ValueError):
        ctx.memory.seq_rm(0, 5, 2)
    with pytest.raises(DecodeError):
        ctx.decode([1] * 10, pos=ctx.n_ctx - 5)


def test_decode_into_inconsistent_position_reports_the_code(
    ctx: Context, tokens: list[int]
) -> None:
    ctx.decode(tokens[:5])
    with pytest.raises(DecodeError) as info:
        ctx.decode(tokens[5:7], pos=2)
    assert info.value.code == -1
    assert info.value.function == "llama_decode"


def test_context_parameter_validation(model: Model) -> None:
    with pytest.raises(ContextError):
        model.context(n_seq_max=0)
    with pytest.raises(ContextError):
        model.context(type_k="f13")
    with pytest.raises(ContextError, match="flash_attn"):
        model.context(type_v="q8_0", flash_attn=False)
    with pytest.raises(ContextError):
        model.context(flash_attn="auto")  # type: ignore[arg-type]


def test_quantized_cache_and_flash_attention(model: Model, tokens: list[int]) -> None:
    with model.context(n_ctx=256, type_k="q8_0", type_v="q8_0", flash_attn=True) as c:
        assert (c.type_k, c.type_v, c.flash_attn) == ("q8_0", "q8_0", True)
        c.decode(tokens)
        assert np.isfinite(c.logits()).all()


def test_sampler_chain(model: Model, ctx: Context, tokens: list[int]) -> None:
    ctx.decode(tokens)
    greedy = Sampler.greedy()
    best = int(np.argmax(ctx.logits()))
    assert greedy.sample(ctx) == best
    seeded = [
        Sampler()
        .penalties(model.n_vocab, 64, 1.1)
        .top_k(40)
        .top_p(0.95)
        .min_p(0.05)
        .temp(0.8)
        .dist(7)
        for _ in range(2)
    ]
    assert seeded[0].sample(ctx) == seeded[1].sample(ctx)
    incomplete = Sampler().top_k(5)
    with pytest.raises(Exception, match="greedy"):
        incomplete.sample(ctx)
    for s in (greedy, *seeded, incomplete):
        s.close()
        s.close()
    with pytest.raises(ClosedError):
        greedy.sample(ctx)


def test_use_after_close(model: Model, tokens: list[int]) -> None:
    c = model.context(n_ctx=128)
    mem = c.memory
    c.close()
    c.close()
    with pytest.raises(ClosedError):
        c.decode(tokens)
    with pytest.raises(ClosedError):
        c.seq_state_get(0)
    with pytest.raises(ClosedError):
        mem.pos_max(0)


def test_closing_the_model_closes_its_contexts(tiny_model_path: Path) -> None:
    m = Model(tiny_model_path)
    c = m.context(n_ctx=128)
    m.close()
    assert c.closed
    with pytest.raises(ClosedError):
        c.decode([1])


def test_context_keeps_its_model_alive(tiny_model_path: Path) -> None:
    c = Model(tiny_model_path).context(n_ctx=128)  # no other reference to the model
    import gc

    gc.collect()
    c.decode([1, 2, 3])
    assert c.model.n_layer >= 1
    c.close()


def test_float_token_ids_are_refused(ctx: Context) -> None:
    from llamaffi.errors import ArgumentError

    with pytest.raises(ArgumentError):
        ctx.decode([1.7, 2.0])  # type: ignore[list-item]
    with pytest.raises(ArgumentError):
        ctx.decode(np.array([1, 2], dtype=np.float32))


def test_decode_batch_gives_each_sequence_its_own_logits(ctx: Context, tokens: list[int]) -> None:
    # three sequences with different prompts; one batch carries the next token of each
    prompts = [tokens[:8], tokens[3:14], tokens[5:9]]
    nexts = [tokens[8], tokens[14], tokens[9]]
    alone = []
    for seq, (prompt, nxt) in enumerate(zip(prompts, nexts, strict=True)):
        ctx.decode(prompt, seq_id=seq)
        ctx.decode([nxt], seq_id=seq)
        alone.append(ctx.logits())
        ctx.memory.seq_rm(seq, len(prompt), -1)  # back to the prompt only
    ctx.decode_batch([0, 1, 2], nexts, [len(p) for p in prompts])
    for i in range(3):
        batched = ctx.logits(i)
        assert int(np.argmax(batched)) == int(np.argmax(alone[i]))
        np.testing.assert_allclose(batched, alone[i], rtol=0, atol=1e-3)
        assert ctx.memory.pos_max(i) == len(prompts[i])
    with pytest.raises(IndexError):
        ctx.logits(3)
    # a sampler reads output i of the batch
    greedy = Sampler.greedy()
    assert greedy.sample(ctx, 1) == int(np.argmax(alone[1]))
    greedy.close()


def test_decode_batch_carries_a_prompt_slice_beside_other_sequences(
    ctx: Context, tokens: list[int]
) -> None:
    # sequence 0 generates (one token), sequence 1 gets a prompt slice in the same batch;
    # only the flagged tokens keep logits, read by their place in the batch or -1
    ctx.decode(tokens[:6], seq_id=0)
    ctx.decode([tokens[6]], seq_id=0)
    gen_alone = ctx.logits()
    ctx.memory.seq_rm(0, 6, -1)
    ctx.decode(tokens[:9], seq_id=1)
    prompt_alone = ctx.logits()
    ctx.memory.seq_rm(1)
    slice_ = tokens[:9]
    ctx.decode_batch(
        [0] + [1] * len(slice_),
        [tokens[6], *slice_],
        [6, *range(len(slice_))],
        outputs=[True] + [False] * (len(slice_) - 1) + [True],
    )
    np.testing.assert_allclose(ctx.logits(0), gen_alone, rtol=0, atol=1e-3)
    np.testing.assert_allclose(ctx.logits(-1), prompt_alone, rtol=0, atol=1e-3)
    np.testing.assert_allclose(ctx.logits(len(slice_)), prompt_alone, rtol=0, atol=1e-3)
    with pytest.raises(IndexError):
        ctx.logits(1)  # a prompt token without logits
    assert ctx.memory.pos_max(1) == len(slice_) - 1 and ctx.memory.pos_max(0) == 6


def test_decode_batch_refuses_bad_batches(ctx: Context) -> None:
    from llamaffi.errors import ArgumentError

    with pytest.raises(ArgumentError, match="one token per sequence"):
        ctx.decode_batch([0, 0], [1, 2], [0, 1])
    with pytest.raises(ArgumentError):
        ctx.decode_batch([0], [1, 2], [0])
    with pytest.raises(ArgumentError):
        ctx.decode_batch([9], [1], [0])
    with pytest.raises(ArgumentError):
        ctx.decode_batch([0], [10**9], [0])


def test_a_token_without_logits_is_refused_not_read(ctx: Context, tokens: list[int]) -> None:
    # llama.cpp aborts the process on a batch place that kept no logits: check first
    ctx.decode(tokens[:8], seq_id=0)  # logits="last": only place 7 keeps them
    assert ctx.logits(7).shape == ctx.logits(-1).shape
    greedy = Sampler.greedy()
    for place in (0, 6, 8):
        with pytest.raises(IndexError):
            ctx.logits(place)
        with pytest.raises(IndexError):
            greedy.sample(ctx, place)
    assert greedy.sample(ctx, 7) == int(np.argmax(ctx.logits(-1)))
    greedy.close()
