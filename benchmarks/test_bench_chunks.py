"""Chunked checkpoints: an incremental checkpoint (+64 tokens) against a full snapshot.

Run the reported figures (``tinyllama-geometry``) with::

    BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/test_bench_chunks.py \
        --benchmark-enable --benchmark-min-rounds=5 --benchmark-columns=min,median,rounds

Each benchmark records the bytes it wrote in ``extra_info``: ``checkpoint_bytes`` (chunk files
and the manifest) against ``full_bytes`` (one snapshot of the same state). The prefilled state
is cached next to the benchmark model (see ``test_bench_snapshot.sized_state``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_bench_snapshot import sized_state

from runtime import snapshot as S
from runtime.chunks import ChunkStore, shift_lineage

SIZES = (1024, 4096)
ADDED = 64


@dataclasses.dataclass
class Grown:
    """A session of ``n`` tokens checkpointed, then ``ADDED`` more tokens decoded."""

    ctx: Any
    tokens: list[int]  # all n + ADDED
    store: ChunkStore
    directory: Path


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}tok" for n in SIZES])
def grown(
    request: pytest.FixtureRequest,
    bench_model: Any,
    bench_config: Any,
    bench_models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Grown]:
    n = int(request.param)
    ctx, tokens = sized_state(bench_model, bench_config, bench_models_dir, n)
    directory = tmp_path_factory.mktemp(f"chunks-{n}")
    store = ChunkStore(directory / "store")
    store.commit(store.plan_capture(ctx, 0, tokens, scratch_seq=2, session_id="s", journal_seq=0))
    more = [bench_model.tokenize(" and then", add_special=False)[0]] * ADDED
    ctx.decode(more, seq_id=0, logits="none")
    try:
        yield Grown(ctx, tokens + more, store, directory)
    finally:
        store.close()
        ctx.close()


def _drop_newest(store: ChunkStore) -> None:
    """Undo the last checkpoint (newest manifest, then its now unreferenced chunks)."""
    newest = store.latest("s")
    if newest is not None and newest.n_tokens > SIZES[0] and len(store.manifests("s")) > 1:
        (store.manifest_dir / "s" / f"{newest.generation:012d}.kvman").unlink()
        store.reload()  # the benchmark's own reset: forget the deleted manifest
        store.collect_garbage()


@pytest.mark.benchmark(group="checkpoint")
def test_incremental_checkpoint(benchmark: Any, grown: Grown, bench_config: Any) -> None:
    """plan_capture (copy the new chunks and the tail) + commit (compress, write, fsync, GC)."""
    store, ctx = grown.store, grown.ctx
    written: list[int] = []

    def checkpoint() -> None:
        before = store.stats()["written_bytes"]
        pending = store.plan_capture(
            ctx, 0, grown.tokens, scratch_seq=2, session_id="s", journal_seq=1
        )
        store.commit(pending)
        written.append(store.stats()["written_bytes"] - before)

    benchmark.pedantic(checkpoint, setup=lambda: _drop_newest(store), rounds=7, iterations=1)
    full = S.capture(ctx, 0, grown.tokens).header.file_size
    benchmark.extra_info.update(
        bench_config.as_info(),
        n_tokens=len(grown.tokens) - ADDED,
        added=ADDED,
        checkpoint_bytes=written[-1],
        full_bytes=full,
        bytes_ratio=round(written[-1] / full, 4),
    )
    assert written[-1] < full


@pytest.mark.benchmark(group="checkpoint")
def test_full_snapshot(benchmark: Any, grown: Grown, bench_config: Any) -> None:
    """capture + atomic write + fsync of the whole state: what a checkpoint cost before."""
    path = grown.directory / "full.kvsnap"
    size = benchmark.pedantic(
        lambda: S.write(path, S.capture(grown.ctx, 0, grown.tokens)), rounds=7, iterations=1
    )
    benchmark.extra_info.update(
        bench_config.as_info(), n_tokens=len(grown.tokens) - ADDED, full_bytes=size
    )


@pytest.mark.benchmark(group="shift")
def test_checkpoint_after_shift(
    benchmark: Any, bench_model: Any, bench_config: Any, bench_models_dir: Path, tmp_path: Path
) -> None:
    """A window shift (keep 256, drop 1024 of 4096) renumbers positions: the checkpoint after it
    rewrites every chunk past the shift point. Records the bytes."""
    n, keep, drop = SIZES[-1], 256, 1024
    ctx, tokens = sized_state(bench_model, bench_config, bench_models_dir, n)
    with ctx, ChunkStore(tmp_path / "store") as store:
        store.commit(
            store.plan_capture(ctx, 0, tokens, scratch_seq=2, session_id="s", journal_seq=0)
        )
        ctx.memory.seq_rm(0, keep, keep + drop)
        ctx.memory.seq_add(0, keep + drop, -1, -drop)
        more = [tokens[-1]] * ADDED  # the decode that applies the shift to K
        ctx.decode(more, seq_id=0, logits="none")
        window = tokens[:keep] + tokens[keep + drop :] + more
        lineage = shift_lineage((), keep, tokens[keep : keep + drop])
        before = store.stats()["written_bytes"]

        def checkpoint() -> None:
            pending = store.plan_capture(
                ctx, 0, window, scratch_seq=2, session_id="s", journal_seq=1, lineage=lineage
            )
            store.commit(pending)

        benchmark.pedantic(checkpoint, rounds=1, iterations=1)
        shifted = store.stats()["written_bytes"] - before
        full = S.capture(ctx, 0, window).header.file_size
    benchmark.extra_info.update(
        bench_config.as_info(),
        n_tokens=n,
        keep=keep,
        dropped=drop,
        shift_checkpoint_bytes=shifted,
        full_bytes=full,
        bytes_ratio=round(shifted / full, 4),
    )
