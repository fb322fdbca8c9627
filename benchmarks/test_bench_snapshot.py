"""KV snapshots against llama.cpp's own sequence files: save, restore, size; codec choices.

Run the reported configuration (tinyllama-geometry, 1024 tokens, f16 KV) with::

    BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/test_bench_snapshot.py \
        --benchmark-enable --benchmark-columns=min,median,mean,rounds

Each benchmark's ``extra_info`` records the configuration and the file sizes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime import snapshot as S


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass
class Saved:
    ours: Path
    raw: Path


@pytest.fixture(scope="module")
def saved(prefilled: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    """One file of each kind, written once, for the restore benchmarks."""
    directory = tmp_path_factory.mktemp("bench-snapshot")
    ours, raw = directory / "ours.kvsnap", directory / "raw.bin"
    S.write(ours, S.capture(prefilled.ctx, 0, prefilled.tokens))
    prefilled.ctx.seq_state_save_file(raw, 0, prefilled.tokens)
    yield Saved(ours, raw)


def _sizes(saved: Saved) -> dict[str, Any]:
    ours, raw = saved.ours.stat().st_size, saved.raw.stat().st_size
    return {"ours_bytes": ours, "raw_bytes": raw, "size_ratio": round(ours / raw, 4)}


@pytest.mark.benchmark(group="save")
def test_save_snapshot(
    benchmark: Any, prefilled: Any, saved: Saved, tmp_path: Path, bench_config: Any
) -> None:
    """capture (get_data + byte planes + zstd + xxh3) + atomic write + fsync (file and dir)."""
    path = tmp_path / "s.kvsnap"

    def save() -> int:
        return S.write(path, S.capture(prefilled.ctx, 0, prefilled.tokens))

    size = benchmark(save)
    assert size == path.stat().st_size
    benchmark.extra_info.update(bench_config.as_info(), **_sizes(saved))


@pytest.mark.benchmark(group="save")
def test_save_llama_file(
    benchmark: Any, prefilled: Any, saved: Saved, tmp_path: Path, bench_config: Any
) -> None:
    """llama_state_seq_save_file + fsync of the file."""
    path = tmp_path / "raw.bin"

    def save() -> int:
        n: int = prefilled.ctx.seq_state_save_file(path, 0, prefilled.tokens)
        _fsync(path)
        return n

    assert benchmark(save) == path.stat().st_size
    benchmark.extra_info.update(bench_config.as_info(), **_sizes(saved))


@pytest.mark.benchmark(group="restore")
def test_restore_snapshot(benchmark: Any, prefilled: Any, saved: Saved, bench_config: Any) -> None:
    """read + verify (header SHA-256, xxh3 per chunk) + decompress + merge planes + set_data."""
    ctx = prefilled.ctx
    benchmark(lambda: S.restore(ctx, S.read(saved.ours), 1))
    assert ctx.memory.pos_max(1) == len(prefilled.tokens) - 1
    ctx.memory.seq_rm(1, -1, -1)
    benchmark.extra_info.update(bench_config.as_info(), **_sizes(saved))


@pytest.mark.benchmark(group="restore")
def test_restore_llama_file(
    benchmark: Any, prefilled: Any, saved: Saved, bench_config: Any
) -> None:
    """llama_state_seq_load_file."""
    ctx = prefilled.ctx
    capacity = len(prefilled.tokens) + 1
    benchmark(lambda: ctx.seq_state_load_file(saved.raw, 1, capacity))
    assert ctx.memory.pos_max(1) == len(prefilled.tokens) - 1
    ctx.memory.seq_rm(1, -1, -1)
    benchmark.extra_info.update(bench_config.as_info(), **_sizes(saved))


# -- codec choices ----------------------------------------------------------------------------

CODECS = {
    "plain-zstd1": S.Codec(level=1, filter=S.Filter.NONE),
    "shuffle-zstd1": S.Codec(level=1, filter=S.Filter.SHUFFLE2),
    "planes-zstd-1": S.Codec(level=-1),
    "planes-zstd1": S.Codec(level=1),
    "planes-zstd3": S.Codec(level=3),
    "planes-zstd1-4MiB": S.Codec(level=1, chunk_size=4 << 20),
    "planes-zstd1-256KiB": S.Codec(level=1, chunk_size=256 << 10),
}


@pytest.fixture(scope="module")
def raw_state(prefilled: Any) -> Any:
    return prefilled.ctx.seq_state_get(0)


@pytest.mark.benchmark(group="codec-encode")
@pytest.mark.parametrize("name", list(CODECS))
def test_codec_encode(
    benchmark: Any, raw_state: Any, prefilled: Any, name: str, bench_config: Any
) -> None:
    """Compression alone (filter + zstd + xxh3) of the same state with each codec."""
    codec = CODECS[name]
    ident = S.CacheIdentity.from_context(prefilled.ctx)

    def encode() -> S.Snapshot:
        return S.encode(raw_state, identity=ident, tokens=prefilled.tokens, seq_id=0, codec=codec)

    snap = benchmark(encode)
    benchmark.extra_info.update(
        bench_config.as_info(),
        raw_bytes=snap.header.raw_size,
        file_bytes=snap.header.file_size,
        ratio=round(snap.header.raw_size / snap.header.file_size, 4),
    )


@pytest.mark.benchmark(group="codec-decode")
@pytest.mark.parametrize("name", list(CODECS))
def test_codec_decode(
    benchmark: Any, raw_state: Any, prefilled: Any, name: str, bench_config: Any
) -> None:
    """Decompression alone (zstd + un-filter) into a fresh buffer."""
    ident = S.CacheIdentity.from_context(prefilled.ctx)
    snap = S.encode(
        raw_state, identity=ident, tokens=prefilled.tokens, seq_id=0, codec=CODECS[name]
    )
    out = benchmark(S.decode, snap)
    assert out.tobytes() == raw_state.tobytes()
    benchmark.extra_info.update(bench_config.as_info())


# -- where the restore time goes ----------------------------------------------------------------


@pytest.mark.benchmark(group="restore-steps")
def test_step_read(benchmark: Any, saved: Saved, bench_config: Any) -> None:
    """read: the file into one buffer, header checks, xxh3 of every chunk."""
    snap = benchmark(S.read, saved.ours)
    assert snap.header.file_size == saved.ours.stat().st_size
    benchmark.extra_info.update(bench_config.as_info())


@pytest.mark.benchmark(group="restore-steps")
def test_step_decode(benchmark: Any, saved: Saved, bench_config: Any) -> None:
    """decode: zstd + merge planes into a fresh raw-sized buffer."""
    snap = S.read(saved.ours)
    out = benchmark(S.decode, snap)
    assert out.size == snap.header.raw_size
    benchmark.extra_info.update(bench_config.as_info())


@pytest.mark.benchmark(group="restore-steps")
def test_step_state_set(benchmark: Any, prefilled: Any, raw_state: Any, bench_config: Any) -> None:
    """llama_state_seq_set_data of the raw blob alone."""
    ctx = prefilled.ctx
    benchmark(ctx.seq_state_set, raw_state, 1)
    assert ctx.memory.pos_max(1) == len(prefilled.tokens) - 1
    ctx.memory.seq_rm(1, -1, -1)
    benchmark.extra_info.update(bench_config.as_info())


# -- restore against the raw load at 1,024 and 4,096 tokens ------------------------------------
#
# Run the reported figures with (median of at least 5 rounds, side by side in one run):
#   BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/test_bench_snapshot.py -k sized \
#       --benchmark-enable --benchmark-min-rounds=7 --benchmark-columns=min,median,rounds

SIZES = (1024, 4096)


@dataclasses.dataclass
class Sized:
    """A context holding ``n`` prompt tokens in seq 0, and the files of that state."""

    ctx: Any
    tokens: list[int]
    ours: Path
    fast: Path  # the same state written with zstd level -1
    raw: Path
    chunks: Any  # a ChunkStore holding one manifest of seq 0 (session "bench")


def sized_state(bench_model: Any, bench_config: Any, models_dir: Path, n: int) -> Any:
    """A context with ``n`` prompt tokens in seq 0; the prefill is cached as a llama.cpp file.

    Prefilling 4,096 tokens of ``tinyllama-geometry`` takes minutes on two cores, so the state
    is saved next to the model (``<preset>-seed0-<n>.state``) and loaded on later runs.
    """
    from conftest import prompt_tokens

    tokens = prompt_tokens(bench_model, n)
    ctx = bench_model.context(
        n_ctx=2 * n + 256, n_batch=512, n_seq_max=3, type_k="f16", type_v="f16"
    )
    cache = models_dir / f"{bench_config.preset}-seed0-{n}.state"
    loaded = False
    if cache.exists():
        try:
            loaded = ctx.seq_state_load_file(cache, 0, n + 1) == tokens
        except Exception:  # a stale cache: prefill again
            loaded = False
    if not loaded:
        ctx.memory.seq_rm(0)
        ctx.decode(tokens, seq_id=0, logits="none")
        ctx.seq_state_save_file(cache, 0, tokens)
    return ctx, tokens


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}tok" for n in SIZES])
def sized(
    request: pytest.FixtureRequest,
    bench_model: Any,
    bench_config: Any,
    bench_models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Sized]:
    from runtime.chunks import ChunkStore

    n = int(request.param)
    ctx, tokens = sized_state(bench_model, bench_config, bench_models_dir, n)
    directory = tmp_path_factory.mktemp(f"sized-{n}")
    ours, raw = directory / "ours.kvsnap", directory / "raw.bin"
    S.write(ours, S.capture(ctx, 0, tokens))
    fast = directory / "fast.kvsnap"
    S.write(fast, S.capture(ctx, 0, tokens, codec=S.Codec(level=-1)))
    ctx.seq_state_save_file(raw, 0, tokens)
    store = ChunkStore(directory / "chunks")
    store.commit(
        store.plan_capture(ctx, 0, tokens, scratch_seq=2, session_id="bench", journal_seq=0)
    )
    try:
        yield Sized(ctx, tokens, ours, fast, raw, store)
    finally:
        store.close()
        ctx.close()


def _sized_info(sized: Sized, bench_config: Any) -> dict[str, Any]:
    return {
        **bench_config.as_info(),
        "n_tokens": len(sized.tokens),
        "ours_bytes": sized.ours.stat().st_size,
        "raw_bytes": sized.raw.stat().st_size,
    }


def _check_restored(sized: Sized) -> None:
    assert sized.ctx.memory.pos_max(1) == len(sized.tokens) - 1
    sized.ctx.memory.seq_rm(1, -1, -1)


@pytest.mark.benchmark(group="restore-sized")
def test_sized_restore_snapshot(benchmark: Any, sized: Sized, bench_config: Any) -> None:
    """restore(ctx, read(path)): copy the file, verify, decompress, set."""
    benchmark(lambda: S.restore(sized.ctx, S.read(sized.ours), 1))
    _check_restored(sized)
    benchmark.extra_info.update(_sized_info(sized, bench_config))


@pytest.mark.benchmark(group="restore-sized")
def test_sized_restore_file(benchmark: Any, sized: Sized, bench_config: Any) -> None:
    """restore_file: the file mapped (no copy), verify, decompress, set."""
    benchmark(lambda: S.restore_file(sized.ctx, sized.ours, 1))
    _check_restored(sized)
    benchmark.extra_info.update(_sized_info(sized, bench_config))


@pytest.mark.benchmark(group="restore-sized")
def test_sized_restore_file_level_minus1(benchmark: Any, sized: Sized, bench_config: Any) -> None:
    """restore_file of a zstd level -1 snapshot (larger file, cheaper literals to decode)."""
    benchmark(lambda: S.restore_file(sized.ctx, sized.fast, 1))
    _check_restored(sized)
    benchmark.extra_info.update(
        _sized_info(sized, bench_config), fast_bytes=sized.fast.stat().st_size
    )


@pytest.mark.benchmark(group="restore-sized")
def test_sized_restore_chunks(benchmark: Any, sized: Sized, bench_config: Any) -> None:
    """ChunkStore.restore: 256-token chunks, decoded ahead while llama.cpp sets the last one."""
    man = sized.chunks.latest("bench")
    benchmark(lambda: sized.chunks.restore(sized.ctx, man, 1, scratch_seq=2))
    _check_restored(sized)
    benchmark.extra_info.update(_sized_info(sized, bench_config), n_chunks=len(man.refs))


@pytest.mark.benchmark(group="restore-sized")
def test_sized_restore_llama_file(benchmark: Any, sized: Sized, bench_config: Any) -> None:
    """llama_state_seq_load_file (no checks beyond llama.cpp's own)."""
    capacity = len(sized.tokens) + 1
    benchmark(lambda: sized.ctx.seq_state_load_file(sized.raw, 1, capacity))
    _check_restored(sized)
    benchmark.extra_info.update(_sized_info(sized, bench_config))
