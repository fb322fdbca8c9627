"""Chunked checkpoints: bit-exact restores, window shifts, dedup, incremental cost, GC, crashes."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from runtime import snapshot as S
from runtime.chunks import (
    CHUNK_CODEC,
    MANIFEST_SUFFIX,
    ChunkError,
    ChunkStore,
    chunk_keys,
    shift_lineage,
)
from runtime.snapshot.layout import StateSlice

llamaffi = pytest.importorskip("llamaffi")

SRC, SCRATCH = 0, 2
CTX_ARGS: dict[str, Any] = {"n_batch": 512, "n_seq_max": 4, "n_threads": 2}
CHILD = Path(__file__).with_name("chunk_writer.py")


def make_tokens(model: Any, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(10, model.n_vocab - 10, n)]


def build(ctx: Any, tokens: list[int], seq: int = SRC, turn: int = 37) -> None:
    """Decode ``tokens`` into ``seq`` as many small turns."""
    for i in range(0, len(tokens), turn):
        ctx.decode(tokens[i : i + turn], seq_id=seq, logits="none")


def next_logits(ctx: Any, seq: int, token: int) -> np.ndarray:
    ctx.decode([token], seq_id=seq)
    return np.array(ctx.logits())


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[ChunkStore]:
    with ChunkStore(tmp_path / "chunks") as s:
        yield s


def checkpoint(
    store: ChunkStore, ctx: Any, tokens: list[int], sid: str, seq: int = SRC, **kw: Any
) -> Any:
    pending = store.plan_capture(
        ctx, seq, tokens, scratch_seq=SCRATCH, session_id=sid, journal_seq=len(tokens), **kw
    )
    return store.commit(pending)


def check_equal_restores(
    model: Any, store: ChunkStore, ctx: Any, tokens: list[int], probe: int, **ctx_args: Any
) -> None:
    """Chunks, a full snapshot and the live context agree bit for bit (state and logits).

    ``ctx_args``: extra arguments of the fresh contexts (the cache type of ``ctx``)."""
    live_blob = ctx.seq_state_get(SRC).tobytes()
    snap = S.capture(ctx, SRC, tokens)
    live = next_logits(ctx, SRC, probe)
    ctx.memory.seq_rm(SRC, len(tokens), -1)  # undo the probe
    man = store.latest("s")
    assert man is not None and list(man.tokens) == tokens
    # a fresh context per restore, so that every sequence sits in the same cells
    with model.context(n_ctx=ctx.n_ctx, **CTX_ARGS, **ctx_args) as fresh:
        assert store.restore(fresh, man, 1, scratch_seq=SCRATCH) == tokens
        assert fresh.memory.pos_max(SCRATCH) == -1
        restored_blob = fresh.seq_state_get(1)
        from_chunks = next_logits(fresh, 1, probe)
    with model.context(n_ctx=ctx.n_ctx, **CTX_ARGS, **ctx_args) as fresh:
        S.restore(fresh, snap, 1)
        from_full = next_logits(fresh, 1, probe)
    # the chunked blob equals the live one except for the seq id recorded per cell
    assert len(restored_blob) == len(live_blob)
    assert np.array_equal(from_chunks, live)
    assert np.array_equal(from_chunks, from_full)


@pytest.mark.parametrize("n", [1000, pytest.param(4000, marks=pytest.mark.slow)])
def test_bit_identical_after_many_turns(model: Any, store: ChunkStore, n: int) -> None:
    tokens = make_tokens(model, n + 1)
    probe, tokens = tokens[-1], tokens[:-1]
    with model.context(n_ctx=n + 256, **CTX_ARGS) as ctx:
        done = 0
        for step in (300, 301, 700, n):  # incremental checkpoints as the session grows
            build(ctx, tokens[done:step])
            done = step
            man = checkpoint(store, ctx, tokens[:done], "s")
            assert man.n_tokens == done
        check_equal_restores(model, store, ctx, tokens, probe)


@pytest.mark.slow
def test_bit_identical_at_16k_tokens_across_a_window_shift(model: Any, store: ChunkStore) -> None:
    """16k tokens in 97-token turns, checkpointed as the session grows; then a window shift
    (keep 512, drop 4,096) and more turns: chunks, a full snapshot and the live context agree
    bit for bit before and after the shift."""
    n, keep, drop, more = 16_384, 512, 4096, 300
    tokens = make_tokens(model, n + more + 2, seed=16)
    probe, probe2 = tokens[-2], tokens[-1]
    with model.context(n_ctx=n + 256, **CTX_ARGS) as ctx:
        done = 0
        for step in (1000, 4500, 9001, n):
            build(ctx, tokens[done:step], turn=97)
            done = step
            assert checkpoint(store, ctx, tokens[:done], "s").n_tokens == done
        check_equal_restores(model, store, ctx, tokens[:n], probe)
        ctx.memory.seq_rm(SRC, keep, keep + drop)
        ctx.memory.seq_add(SRC, keep + drop, -1, -drop)
        build(ctx, tokens[n : n + more], turn=97)  # the decode that applies the shift to K
        window = tokens[:keep] + tokens[keep + drop : n + more]
        lineage = shift_lineage((), keep, tokens[keep : keep + drop])
        after = checkpoint(store, ctx, window, "s", lineage=lineage)
        assert after.n_tokens == n - drop + more
        assert after.chunks[0].key == store.manifests("s")[1].chunks[0].key  # before the shift
        check_equal_restores(model, store, ctx, window, probe2)


@pytest.mark.slow
def test_bit_identical_at_4k_tokens_on_smollm2(store: ChunkStore) -> None:
    """The real model: 4,096 tokens of SmolLM2 (f16 KV, the runtime's layout) in 127-token
    turns, checkpointed as the session grows, restore from chunks bit for bit."""
    from runtime.errors import ModelNotFoundError
    from runtime.models import resolve_model

    try:
        path = resolve_model("smollm2").path
    except ModelNotFoundError as exc:
        pytest.skip(f"SmolLM2 is not installed: {exc}")
    with llamaffi.Model(path) as smol:
        n = 4096
        tokens = make_tokens(smol, n + 1, seed=22)
        probe, tokens = tokens[-1], tokens[:-1]
        with smol.context(n_ctx=n + 256, **CTX_ARGS) as ctx:
            done = 0
            for step in (700, 2049, n):
                build(ctx, tokens[done:step], turn=127)
                done = step
                assert checkpoint(store, ctx, tokens[:done], "s").n_tokens == done
            check_equal_restores(smol, store, ctx, tokens, probe)


def test_chunk_codec_and_older_chunks(model: Any, tmp_path: Path) -> None:
    """New chunks use CHUNK_CODEC (stored: the state's own bytes, a digest per segment);
    chunks written with the two former defaults (zstd 1 with byte planes and content
    checksums; zstd -1 without) still restore, mixed in one manifest, bit for bit. A damaged
    chunk of either kind is a typed error before any of its bytes reach llama.cpp."""
    tokens = make_tokens(model, 900, seed=17)
    root = tmp_path / "store"
    former = S.Codec(level=-1, filter=S.Filter.NONE, checksum=False)
    with model.context(n_ctx=1024, **CTX_ARGS) as ctx:
        build(ctx, tokens[:300])
        with ChunkStore(root, level=1) as oldest:
            first = checkpoint(oldest, ctx, tokens[:300], "s")
        build(ctx, tokens[300:600])
        with ChunkStore(root, codec=former) as old:
            second = checkpoint(old, ctx, tokens[:600], "s")
        build(ctx, tokens[600:])
        live = ctx.seq_state_get(SRC).tobytes()
        with ChunkStore(root, threads=2) as store:  # the pipelined restore (2 workers)
            assert store.codec == CHUNK_CODEC
            man = checkpoint(store, ctx, tokens, "s")
            assert man.chunks[0].key == first.chunks[0].key  # reused, not rewritten
            assert man.chunks[1].key == second.chunks[1].key
            headers = [S.inspect(store.chunk_path(c.key)) for c in man.chunks]
            got = [(h.codec, h.filter, h.level) for h in headers]
            assert got == [
                (S.CodecId.ZSTD, S.Filter.PLANES2, 1),
                (S.CodecId.ZSTD, S.Filter.NONE, -1),
                (S.CodecId.STORED, S.Filter.NONE, 0),
            ]
            frame = S.read(store.chunk_path(man.chunks[1].key)).chunks[0]
            assert not zstandard.get_frame_parameters(bytes(frame)).has_checksum
            stored = S.read(store.chunk_path(man.chunks[2].key))
            assert b"".join(bytes(c) for c in stored.chunks) == S.decode(stored).tobytes()
            assert store.verify().ok
            with model.context(n_ctx=1024, **CTX_ARGS) as fresh:
                store.restore(fresh, man, SRC, scratch_seq=SCRATCH)
                assert fresh.seq_state_get(SRC).tobytes() == live
                # a damaged chunk in the middle of the pipeline: typed error, both seqs empty
                for k in (2, 1):  # the later first: a quarantined chunk is then missing
                    victim = store.chunk_path(man.chunks[k].key)
                    data = bytearray(victim.read_bytes())
                    data[len(data) // 2] ^= 0x01
                    victim.write_bytes(bytes(data))
                    with pytest.raises(ChunkError) as info:
                        store.restore(fresh, man, SRC, scratch_seq=SCRATCH)
                    assert info.value.key == man.chunks[k].key and not info.value.missing
                    assert info.value.field.endswith(".checksum")
                    assert fresh.memory.pos_max(SRC) == -1
                    assert fresh.memory.pos_max(SCRATCH) == -1


def test_a_chunk_of_a_newer_format_is_refused_but_never_moved_aside(
    model: Any, store: ChunkStore
) -> None:
    """A chunk another node wrote in a format this reader does not know may be fine: the
    restore fails with field ``version`` (the caller falls back to the journal) and leaves
    the file where it is, so a node not yet upgraded cannot delete a newer node's chunks."""
    tokens = make_tokens(model, 300, seed=23)
    with model.context(n_ctx=1024, **CTX_ARGS) as ctx:
        build(ctx, tokens)
        man = checkpoint(store, ctx, tokens, "s")
        path = store.chunk_path(man.chunks[0].key)
        data = bytearray(path.read_bytes())
        data[8:10] = struct.pack("<H", S.FORMAT_VERSION + 1)
        path.write_bytes(bytes(data))
        with model.context(n_ctx=1024, **CTX_ARGS) as fresh:
            with pytest.raises(ChunkError) as info:
                store.restore(fresh, man, SRC, scratch_seq=SCRATCH)
            assert info.value.field == "version"
            assert fresh.memory.pos_max(SRC) == -1 and fresh.memory.pos_max(SCRATCH) == -1
        assert path.read_bytes() == bytes(data)
        assert not list((store.root / "quarantine").glob("*"))


def test_q8_0_cache_restores_bit_exactly_through_chunks(model: Any, store: ChunkStore) -> None:
    """A q8_0 K/V cache (flash attention on, as the runtime sets it) built by small turns and
    checkpointed incrementally restores from chunks bit for bit: state and next-token logits
    equal the live context's and a full snapshot's. After a window shift the restored KV is
    still the live KV, position by position, bit for bit; the logits then agree only to
    rounding, because the live cache's cells are no longer in position order (a restore puts
    them in order, and flash attention sums over cells in cell order)."""
    q8: dict[str, Any] = {"type_k": "q8_0", "type_v": "q8_0", "flash_attn": True}
    tokens = make_tokens(model, 1100, seed=21)
    with model.context(n_ctx=1280, **CTX_ARGS, **q8) as ctx:
        done = 0
        for end in (300, 700, 1000):
            build(ctx, tokens[done:end])
            done = end
            man = checkpoint(store, ctx, tokens[:end], "s")
        assert S.inspect(store.chunk_path(man.chunks[0].key)).identity.type_k == "q8_0"
        q8_bytes = man.chunks[0].raw_size
        check_equal_restores(model, store, ctx, tokens[:1000], tokens[1000], **q8)
        keep, drop = 100, 200
        ctx.memory.seq_rm(SRC, keep, keep + drop)
        ctx.memory.seq_add(SRC, keep + drop, -1, -drop)
        build(ctx, tokens[1000:1090])
        window = tokens[:keep] + tokens[keep + drop : 1090]
        lineage = shift_lineage((), keep, tokens[keep : keep + drop])
        after = checkpoint(store, ctx, window, "s", lineage=lineage)
        live = next_logits(ctx, SRC, tokens[1090])
        with (
            model.context(n_ctx=1280, **CTX_ARGS, **q8) as fresh,
            ChunkStore(store.root / "again") as again,
        ):
            store.restore(fresh, after, 1, scratch_seq=SCRATCH)
            # the restored sequence, cut into chunks again: the same bytes as the live one's
            pending = again.plan_capture(
                fresh, 1, window, scratch_seq=SCRATCH, session_id="s", journal_seq=0
            )
            assert len(pending.chunks) == len(after.refs)
            for ref, chunk in zip(after.refs, pending.chunks, strict=True):
                raw = chunk.raw
                assert raw is not None
                if isinstance(raw, StateSlice):  # cut from one seq_state_get, copied later
                    raw = raw.materialize()
                assert raw.tobytes() == store.load_chunk(after, ref).tobytes()
            again.discard(pending)
            restored = next_logits(fresh, 1, tokens[1090])
        assert int(restored.argmax()) == int(live.argmax())
        assert float(np.abs(restored - live).max()) < 1e-2
    with model.context(n_ctx=1280, **CTX_ARGS) as f16, ChunkStore(store.root / "f16") as other:
        build(f16, tokens[:256])
        f16_bytes = checkpoint(other, f16, tokens[:256], "s").chunks[0].raw_size
    assert 0.5 < q8_bytes / f16_bytes < 0.56  # 34 bytes per 32 values against 64


def test_window_shift(model: Any, store: ChunkStore) -> None:
    tokens = make_tokens(model, 900, seed=3)
    keep, drop = 100, 300
    with model.context(n_ctx=1024, **CTX_ARGS) as ctx:
        build(ctx, tokens[:700])
        before = checkpoint(store, ctx, tokens[:700], "s")
        written0 = store.stats()["written_bytes"]
        # the session's shift: drop [keep, keep + drop), move the rest down
        ctx.memory.seq_rm(SRC, keep, keep + drop)
        ctx.memory.seq_add(SRC, keep + drop, -1, -drop)
        window = tokens[:keep] + tokens[keep + drop : 700]
        lineage = shift_lineage((), keep, tokens[keep : keep + drop])
        build(ctx, tokens[700:899])
        window += tokens[700:899]
        after = checkpoint(store, ctx, window, "s", lineage=lineage)
        shift_bytes = store.stats()["written_bytes"] - written0
        assert after.lineage == lineage
        # chunks wholly before the shift point keep their keys; none after it may be reused
        assert keep < store.chunk_tokens
        old_keys = {r.key for r in before.refs}
        assert not old_keys & {r.key for r in after.refs}
        fresh_keys = {k for k, _, _ in chunk_keys(after.identity, window, 0)}
        assert not fresh_keys & {r.key for r in after.refs}  # never a fresh prefill's chunks
        assert shift_bytes > 0.8 * sum(r.file_size for r in after.refs)
        check_equal_restores(model, store, ctx, window, tokens[899])


def test_shift_after_a_full_chunk_keeps_it(model: Any, store: ChunkStore) -> None:
    tokens = make_tokens(model, 800, seed=4)
    with model.context(n_ctx=1024, **CTX_ARGS) as ctx:
        build(ctx, tokens[:700])
        before = checkpoint(store, ctx, tokens[:700], "s")
        keep, drop = 300, 200
        ctx.memory.seq_rm(SRC, keep, keep + drop)
        ctx.memory.seq_add(SRC, keep + drop, -1, -drop)
        # llama.cpp applies a shift to K at the next decode, and state_seq_get copies K as it
        # is: a capture between the shift and that decode would save unrotated keys.
        build(ctx, tokens[700:720])
        window = tokens[:keep] + tokens[keep + drop : 720]
        after = checkpoint(
            store, ctx, window, "s", lineage=shift_lineage((), keep, tokens[keep : keep + drop])
        )
        assert after.chunks[0].key == before.chunks[0].key  # positions 0..255: untouched
        assert after.chunks[0].key != (before.chunks[1].key if len(before.chunks) > 1 else "")
        assert {r.key for r in after.refs[1:]}.isdisjoint({r.key for r in before.refs})
        check_equal_restores(model, store, ctx, window, tokens[799])


def test_dedup_shared_prefix(model: Any, store: ChunkStore) -> None:
    prefix = make_tokens(model, 600, seed=5)
    with model.context(n_ctx=1600, **CTX_ARGS) as ctx:
        mans = []
        for seq, sid in ((0, "a"), (1, "b")):
            own = make_tokens(model, 100, seed=10 + seq)
            if seq == 0:
                build(ctx, prefix, seq=0, turn=600)
            else:  # the runtime shares a common prompt's cells: the same KV bits
                ctx.memory.seq_cp(0, 1, 0, len(prefix))
            build(ctx, own, seq=seq)
            pending = store.plan_capture(
                ctx, seq, prefix + own, scratch_seq=3, session_id=sid, journal_seq=1
            )
            if sid == "b":  # the shared full chunks are not even copied out again
                assert pending.new_chunks == 1
            mans.append(store.commit(pending))
        a, b = mans
        shared = {r.key for r in a.chunks} & {r.key for r in b.chunks}
        assert len(shared) == 600 // store.chunk_tokens
        stats = store.stats()
        assert stats["chunks"] == len(a.keys | b.keys)
        assert stats["dedup_saved_bytes"] == sum(r.file_size for r in a.chunks[:2])
        assert stats["logical_bytes"] == a.file_size + b.file_size
        # b restores from a's chunks and matches b's live state
        live = ctx.seq_state_get(1).tobytes()
        with model.context(n_ctx=1600, **CTX_ARGS) as fresh:
            store.restore(fresh, b, 1, scratch_seq=3)
            assert fresh.seq_state_get(1).tobytes() == live


def test_twenty_sessions_store_a_shared_system_prompt_once(model: Any, store: ChunkStore) -> None:
    """20 sessions whose first 1,000 tokens are the same system prompt: its three full chunks
    are written once, and stats() counts the 19 copies not stored."""
    system = make_tokens(model, 1000, seed=20)
    n_sessions, own_len = 20, 20  # 1,020 tokens: 3 full chunks and a 252-token tail
    full = 1000 // store.chunk_tokens  # 3 chunks wholly inside the prompt
    with model.context(n_ctx=2048, **CTX_ARGS) as ctx:
        build(ctx, system, seq=0)
        mans = []
        for i in range(n_sessions):
            ctx.memory.seq_cp(0, 1, -1, -1)  # the shared prompt's cells, as a runtime would
            own = make_tokens(model, own_len, seed=100 + i)
            build(ctx, own, seq=1)
            pending = store.plan_capture(
                ctx, 1, system + own, scratch_seq=3, session_id=f"s{i:02d}", journal_seq=1
            )
            assert pending.new_chunks == (full + 1 if i == 0 else 1)  # later: only the tail
            mans.append(store.commit(pending))
            ctx.memory.seq_rm(1, -1, -1)
    shared = [r.key for r in mans[0].chunks]
    assert len(shared) == full and all([r.key for r in m.chunks] == shared for m in mans)
    tails = {m.tail.key for m in mans if m.tail is not None}
    assert len(tails) == n_sessions
    on_disk = {p.name.split(".")[0] for p in store.chunk_dir.rglob("*.kvsnap")}
    assert on_disk == set(shared) | tails  # 3 + 20 files, not 4 x 20
    shared_bytes = sum(r.file_size for r in mans[0].chunks)
    tail_bytes = sum(m.tail.file_size for m in mans if m.tail is not None)
    stats = store.stats()
    assert stats["chunks"] == full + n_sessions
    assert stats["sessions"] == n_sessions
    assert stats["chunk_bytes"] == shared_bytes + tail_bytes
    assert stats["logical_bytes"] == n_sessions * shared_bytes + tail_bytes
    assert stats["dedup_saved_bytes"] == (n_sessions - 1) * shared_bytes
    assert stats["chunk_bytes"] < 0.3 * stats["logical_bytes"]


def test_session_dedup_scope_shares_nothing(model: Any, tmp_path: Path) -> None:
    prefix = make_tokens(model, 300, seed=6)
    with (
        ChunkStore(tmp_path / "c", dedup="session") as store,
        model.context(n_ctx=1024, **CTX_ARGS) as ctx,
    ):
        build(ctx, prefix, seq=0)
        build(ctx, prefix, seq=1)
        a = store.commit(
            store.plan_capture(ctx, 0, prefix, scratch_seq=3, session_id="a", journal_seq=1)
        )
        b = store.commit(
            store.plan_capture(ctx, 1, prefix, scratch_seq=3, session_id="b", journal_seq=1)
        )
        assert a.keys.isdisjoint(b.keys)


def test_incremental_checkpoint_writes_only_new_chunks(model: Any, store: ChunkStore) -> None:
    tokens = make_tokens(model, 1064, seed=7)
    with model.context(n_ctx=1280, **CTX_ARGS) as ctx:
        build(ctx, tokens[:1000])
        checkpoint(store, ctx, tokens[:1000], "s")
        build(ctx, tokens[1000:])
        w0 = store.stats()["written_bytes"]
        pending = store.plan_capture(
            ctx, SRC, tokens, scratch_seq=SCRATCH, session_id="s", journal_seq=2
        )
        # chunk 3 (768..1023) is new, plus the 40-token tail; chunks 0-2 are not copied
        assert pending.new_chunks == 2
        assert pending.copied_bytes < 0.3 * ctx.seq_state_size(SRC)
        man = store.commit(pending)
        written = store.stats()["written_bytes"] - w0
        assert written == man.chunks[3].file_size + man.tail.file_size + len(man.to_bytes())
        full = S.capture(ctx, SRC, tokens).header.file_size
        assert written < 0.35 * full  # 296 of 1064 tokens' worth
        # inside the tail: only the tail is written again
        more = make_tokens(model, 30, seed=70)
        build(ctx, more)
        w0 = store.stats()["written_bytes"]
        pending = store.plan_capture(
            ctx, SRC, tokens + more, scratch_seq=SCRATCH, session_id="s", journal_seq=3
        )
        assert pending.new_chunks == 1
        man = store.commit(pending)
        written = store.stats()["written_bytes"] - w0
        assert written == man.tail.file_size + len(man.to_bytes())
        assert written < 0.1 * full


def test_gc_keeps_every_referenced_chunk(model: Any, store: ChunkStore) -> None:
    tokens = make_tokens(model, 900, seed=8)
    with model.context(n_ctx=1024, **CTX_ARGS) as ctx:
        for end in range(100, 901, 100):
            build(ctx, tokens[end - 100 : end])
            checkpoint(store, ctx, tokens[:end], "s")
        mans = store.manifests("s")
        assert [m.n_tokens for m in mans] == [900, 800]  # keep=2
        on_disk = {p.name.split(".")[0] for p in store.chunk_dir.rglob("*.kvsnap")}
        assert on_disk == mans[0].keys | mans[1].keys  # old tails collected, nothing else
        report = store.verify()
        assert report.ok and not report.orphans and report.manifests == 2
        store.delete_session("s")
        assert not list(store.chunk_dir.rglob("*.kvsnap"))
        assert store.latest("s") is None


def test_damaged_chunk_falls_back_to_older_manifest(model: Any, store: ChunkStore) -> None:
    tokens = make_tokens(model, 700, seed=9)
    with model.context(n_ctx=2048, **CTX_ARGS) as ctx:
        build(ctx, tokens[:600])
        older = checkpoint(store, ctx, tokens[:600], "s")
        build(ctx, tokens[600:])
        newest = checkpoint(store, ctx, tokens, "s")
        tail = store.chunk_path(newest.tail.key)
        data = bytearray(tail.read_bytes())
        data[-10] ^= 0x40
        tail.write_bytes(bytes(data))
        with pytest.raises(ChunkError) as info:
            store.restore(ctx, newest, 1, scratch_seq=SCRATCH)
        assert info.value.key == newest.tail.key and not info.value.missing
        assert ctx.memory.pos_max(1) == -1 and ctx.memory.pos_max(SCRATCH) == -1
        assert not tail.exists()  # quarantined
        assert list((store.root / "quarantine").glob(f"{newest.tail.key}*"))
        got = store.restore_latest(ctx, "s", 1, scratch_seq=SCRATCH)
        assert got is not None and got.generation == older.generation
        assert ctx.memory.pos_max(1) == 599
        ctx.memory.seq_rm(1)
        # a missing chunk is a typed error too, and the next checkpoint writes it again
        store.chunk_path(older.chunks[0].key).unlink()
        with pytest.raises(ChunkError) as info:
            store.restore(ctx, older, 1, scratch_seq=SCRATCH)
        assert info.value.missing and info.value.key == older.chunks[0].key
        assert ctx.memory.pos_max(1) == -1
        report = store.verify()
        assert not report.ok and report.missing


def test_damaged_manifest_is_quarantined(model: Any, store: ChunkStore) -> None:
    tokens = make_tokens(model, 300, seed=11)
    with model.context(n_ctx=1024, **CTX_ARGS) as ctx:
        build(ctx, tokens[:200])
        checkpoint(store, ctx, tokens[:200], "s")
        build(ctx, tokens[200:])
        newest = checkpoint(store, ctx, tokens, "s")
    path = store.manifest_dir / "s" / f"{newest.generation:012d}.kvman"
    data = bytearray(path.read_bytes())
    data[60] ^= 1
    path.write_bytes(bytes(data))
    latest = store.latest("s")
    assert latest is not None and latest.n_tokens == 200
    assert not path.exists() and list((path.parent / "quarantine").iterdir())


def test_refusals(model: Any, store: ChunkStore, other_model_path: Path) -> None:
    tokens = make_tokens(model, 50)
    with model.context(n_ctx=512, **CTX_ARGS) as ctx:
        build(ctx, tokens)
        with pytest.raises(ValueError, match="positions"):
            store.plan_capture(
                ctx, SRC, tokens[:-1], scratch_seq=SCRATCH, session_id="s", journal_seq=0
            )
        ctx.memory.seq_cp(SRC, SCRATCH)
        with pytest.raises(ValueError, match="not empty"):
            store.plan_capture(ctx, SRC, tokens, scratch_seq=SCRATCH, session_id="s", journal_seq=0)
        ctx.memory.seq_rm(SCRATCH)
        man = checkpoint(store, ctx, tokens, "s")
    with (
        llamaffi.Model(other_model_path) as other,
        other.context(n_ctx=512, **CTX_ARGS) as octx,
        pytest.raises(S.IncompatibleSnapshotError),
    ):
        store.restore(octx, man, 1, scratch_seq=SCRATCH)


def test_concurrent_commit_on_a_writer_thread(model: Any, store: ChunkStore) -> None:
    """commit on one thread while plan_capture/restore run on the caller's, two sessions."""
    import queue
    import threading

    todo: queue.Queue[Any] = queue.Queue()
    errors: list[BaseException] = []

    def writer() -> None:
        while (item := todo.get()) is not None:
            try:
                store.commit(item)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    a, b = make_tokens(model, 600, seed=12), make_tokens(model, 600, seed=13)
    with model.context(n_ctx=2048, **CTX_ARGS) as ctx:
        for end in range(60, 601, 60):
            for seq, toks, sid in ((0, a, "a"), (1, b, "b")):
                build(ctx, toks[end - 60 : end], seq=seq)
                todo.put(
                    store.plan_capture(
                        ctx, seq, toks[:end], scratch_seq=3, session_id=sid, journal_seq=end
                    )
                )
        todo.put(None)
        thread.join()
        assert not errors
        assert store.verify().ok
        for sid, toks in (("a", a), ("b", b)):
            man = store.latest(sid)
            assert man is not None and list(man.tokens) == toks


def _run_crash(tmp_path: Path, model_path: Path, iterations: int) -> None:
    rng = random.Random(1234)
    root = tmp_path / "crash"
    for it in range(iterations):
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(root), str(model_path), str(it)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        with ChunkStore(root) as store:
            report = store.verify(deep=False)
            assert not report.missing, report.missing
            assert not report.damaged_chunks and not report.damaged_manifests
            with llamaffi.Model(model_path) as model, model.context(n_ctx=1024, **CTX_ARGS) as ctx:
                for sid in store.sessions():
                    man = store.latest(sid)
                    if man is None:
                        continue
                    assert store.restore(ctx, man, 1, scratch_seq=SCRATCH) == list(man.tokens)
                    assert ctx.memory.pos_max(1) == man.n_tokens - 1
                    ctx.memory.seq_rm(1)
        assert not list(root.rglob(".tmp-*"))  # the writable open removed them


def test_crash_during_commit_and_gc(tmp_path: Path, tiny_model_path: Path) -> None:
    _run_crash(tmp_path, tiny_model_path, 20)


@pytest.mark.slow
def test_crash_during_commit_and_gc_many(tmp_path: Path, tiny_model_path: Path) -> None:
    _run_crash(tmp_path, tiny_model_path, 50)


def _verify_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", "snapshot", "verify", str(path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_verify_chunk_store(model: Any, tmp_path: Path) -> None:
    root = tmp_path / "store"
    tokens = make_tokens(model, 600, seed=14)
    with ChunkStore(root) as store, model.context(n_ctx=1024, **CTX_ARGS) as ctx:
        build(ctx, tokens)
        man = checkpoint(store, ctx, tokens, "s")
        build(ctx, tokens[:100], seq=1)
        other = checkpoint(store, ctx, tokens[:100], "t", seq=1)
    ok = _verify_cli(root)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "chunk store, 2 manifests, 4 chunks, 0 orphans" in ok.stdout
    # a manifest lost before GC leaves orphans: reported, not damage
    (root / "manifests" / "t" / f"{other.generation:012d}.kvman").unlink()
    orphan = _verify_cli(tmp_path)  # found below a parent directory too
    assert orphan.returncode == 0
    assert f"ORPHAN {root}: chunk {other.tail.key}" in orphan.stdout
    # a damaged chunk and a missing one are damage
    victim = ChunkStore(root, readonly=True).chunk_path(man.chunks[0].key)
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    ChunkStore(root, readonly=True).chunk_path(man.chunks[1].key).unlink()
    bad = _verify_cli(root)
    assert bad.returncode == 1
    assert f"DAMAGED {root}: chunk {man.chunks[0].key}" in bad.stdout
    assert f"MISSING {root}: chunk {man.chunks[1].key}" in bad.stdout


def test_reload_sees_files_changed_behind_the_stores_back(tmp_path: Path) -> None:
    from tests.runtime.chunk_helpers import commit_fake_checkpoint

    with ChunkStore(tmp_path / "kv", chunk_tokens=4) as store:
        older = commit_fake_checkpoint(store, "s", 8, seed=1)
        newest = commit_fake_checkpoint(store, "s", 8, seed=2)  # other tokens: other chunks
        assert store.stats()["chunks"] == 4
        (store.manifest_dir / "s" / f"{newest.generation:012d}{MANIFEST_SUFFIX}").unlink()
        assert store.collect_garbage() == []  # the index still names newest's chunks
        store.reload()
        assert sorted(store.collect_garbage()) == sorted(newest.keys - older.keys)
        latest = store.latest("s")
        assert latest is not None and latest.generation == older.generation
        assert store.stats()["chunks"] == 2 and store.verify().ok
