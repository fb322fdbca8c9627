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
