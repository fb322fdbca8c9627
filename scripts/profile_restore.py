"""Where a restore's time goes: a full snapshot and a chunked manifest against llama.cpp's load.

Prepares (and caches, next to the benchmark models) a ``tinyllama-geometry`` context holding
1,024 and 4,096 prompt tokens, writes the same state as llama.cpp's own sequence file, as one
snapshot and as a chunk store, then times, round-robin in one run so that every variant sees
the same machine load:

* ``raw``: ``llama_state_seq_load_file``;
* ``file``: :func:`runtime.snapshot.restore_file` (the mapped fast path);
* ``chunks``: :meth:`runtime.chunks.ChunkStore.restore`;

and the steps of each, timed on their own: mapping and checking the header, the xxh3
digests, zstd, the plane merge, ``seq_state_set`` of the whole blob, and per chunk the
``seq_state_set`` into the scratch sequence plus ``seq_cp``/``seq_rm``.

Usage::

    .venv/bin/python scripts/profile_restore.py [--preset tinyllama-geometry|smollm2] \
        [--sizes 1024,4096] [--rounds 7] [--codecs 1:planes,-1:none:nock,stored]

Each ``--codecs`` entry (``LEVEL:FILTER[:nock]`` or ``stored``) gets its own snapshot file and
chunk store of the same state, and the variants run round-robin. Prints one JSON object per
size (medians, min and max in milliseconds); ``ratio_*`` is a median over the raw load's
median, ``*_paired`` the median of the per-round ratios, ``*_min`` the minimum over the raw
load's minimum.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from conftest import BenchConfig  # noqa: E402
from test_bench_snapshot import sized_state  # noqa: E402

from runtime import snapshot as S  # noqa: E402
from runtime.chunks import ChunkStore  # noqa: E402


def _summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "median": round(statistics.median(ms), 2),
        "min": round(min(ms), 2),
        "max": round(max(ms), 2),
    }


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _steps_file(ctx: Any, path: Path, times: dict[str, list[float]]) -> None:
    """The steps of restore_file, one at a time (same code paths, timed apart)."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        size = f.seek(0, 2)
        f.seek(0)
        header = S.read_header(f, size, source=str(path))
        import mmap

        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    view = memoryview(mm)
    t1 = time.perf_counter()
    chunks = []
    offset = header.header_len
    for entry in header.chunks:
        chunks.append(view[offset : offset + entry.size])
        offset += entry.size
    S.verify_digests(header, chunks, None)
    t2 = time.perf_counter()
    snap = S.Snapshot(header=header, chunks=tuple(chunks))
    out = np.empty(header.raw_size, dtype=np.uint8)
    # zstd alone, each frame straight into its place in one buffer (no merge)
    dctx = zstandard.ZstdDecompressor()
    planes = np.empty(header.raw_size, dtype=np.uint8)
    spans = []
    pos = 0
    for i, c in enumerate(chunks):
        length = header.chunk_raw_len(i)
        if header.codec is S.CodecId.STORED:  # no zstd: the copy decode_into makes
            planes[pos : pos + length] = np.frombuffer(c, dtype=np.uint8)
        else:
            S.decompress_frame_into(header, i, c, planes[pos : pos + length], dctx, None)
        spans.append((pos, length))
        pos += length
    t3 = time.perf_counter()
    if header.filter is S.Filter.PLANES2:
        for k in range(header.n_segments):
            start = k * header.chunk_size
            dst = out[start : start + header.segment_len(k)]
            (a, la), (b, lb) = spans[2 * k], spans[2 * k + 1]
            S.merge_planes(planes[a : a + la], planes[b : b + lb], dst)
    t4 = time.perf_counter()
    S.decode_into(snap, out)  # the real decoder (frame checks, pool)
    t5 = time.perf_counter()
    ctx.seq_state_set(out, 1)
    t6 = time.perf_counter()
    ctx.memory.seq_rm(1, -1, -1)
    del snap, chunks, view, planes
    del mm  # closed once the last view of it is gone
    times["file.open_map_header"].append(t1 - t0)
    times["file.xxh3"].append(t2 - t1)
    times["file.zstd_1thread"].append(t3 - t2)
    times["file.merge_planes"].append(t4 - t3)
    times["file.decode_into_pool"].append(t5 - t4)
    times["file.seq_state_set"].append(t6 - t5)


def _steps_chunks(ctx: Any, store: ChunkStore, man: Any, times: dict[str, list[float]]) -> None:
    """The steps of ChunkStore.restore, chunk by chunk, serially."""
    load = 0.0
    setc = 0.0
    cp = 0.0
    for ref in man.refs:
        t0 = time.perf_counter()
        raw = store.load_chunk(man, ref)
        t1 = time.perf_counter()
        ctx.seq_state_set(raw, 2)
        t2 = time.perf_counter()
        ctx.memory.seq_cp(2, 1, -1, -1)
        ctx.memory.seq_rm(2, -1, -1)
        t3 = time.perf_counter()
        load += t1 - t0
        setc += t2 - t1
        cp += t3 - t2
    ctx.memory.seq_rm(1, -1, -1)
    times["chunks.load_serial"].append(load)
    times["chunks.state_set_scratch"].append(setc)
    times["chunks.seq_cp_rm"].append(cp)


FILTERS = {"planes": S.Filter.PLANES2, "none": S.Filter.NONE, "shuffle": S.Filter.SHUFFLE2}


def parse_codec(text: str) -> S.Codec:
    """``LEVEL:FILTER[:nock]``, e.g. ``1:planes`` (the snapshot default) or ``-1:none:nock``
    (``nock``: frames without zstd's content checksum); ``stored`` (the chunk default)."""
    if text == "stored":
        return S.Codec(level=0, filter=S.Filter.NONE, checksum=False, codec_id=S.CodecId.STORED)
    level, _, rest = text.partition(":")
    filt, _, flag = rest.partition(":")
    return S.Codec(level=int(level), filter=FILTERS[filt or "planes"], checksum=flag != "nock")


def _model_path(name: str, models_dir: Path) -> Path:
    if name == "smollm2":
        from runtime.models import resolve_model

        return resolve_model(name).path
    from llamaffi.testing import make_model

    path = models_dir / f"{name}-seed0.gguf"
    if not path.exists():
        make_model(path, preset=name, seed=0)
    return path


def profile(
    preset: str, n: int, rounds: int, codecs: dict[str, S.Codec], models_dir: Path
) -> dict[str, Any]:
    """Time every variant and step ``rounds`` times for ``n`` tokens; return the summary.

    The variants run round-robin (raw, then each codec's file and chunk restore), so that a
    change of machine load hits them all alike.
    """
    import llamaffi

    config = BenchConfig(preset, n, 2 * n + 256)
    with (
        llamaffi.Model(_model_path(preset, models_dir)) as model,
        tempfile.TemporaryDirectory() as tmp,
    ):
        ctx, tokens = sized_state(model, config, models_dir, n)
        d = Path(tmp)
        raw = d / "raw.bin"
        ctx.seq_state_save_file(raw, 0, tokens)
        files: dict[str, Path] = {}
        stores: dict[str, tuple[ChunkStore, Any]] = {}
        for name, codec in codecs.items():
            files[name] = d / f"{name}.kvsnap"
            S.write(files[name], S.capture(ctx, 0, tokens, codec=codec))
            store = ChunkStore(d / f"chunks-{name}", codec=codec)
            store.commit(
                store.plan_capture(ctx, 0, tokens, scratch_seq=2, session_id="p", journal_seq=0)
            )
            stores[name] = (store, store.latest("p"))
        capacity = n + 1
        times: dict[str, list[float]] = collections.defaultdict(list)

        def variants() -> dict[str, Callable[[], Any]]:
            out: dict[str, Callable[[], Any]] = {
                "raw": lambda: ctx.seq_state_load_file(raw, 1, capacity)
            }
            for name in codecs:
                store, man = stores[name]
                out[f"{name}/file"] = lambda p=files[name]: S.restore_file(ctx, p, 1)
                out[f"{name}/chunks"] = lambda s=store, m=man: s.restore(ctx, m, 1, scratch_seq=2)
            return out

        for fn in variants().values():  # warm-up: page cache, pools
            fn()
            ctx.memory.seq_rm(1, -1, -1)
        for _ in range(rounds):
            for name, fn in variants().items():
                times[name].append(_timed(fn))
                if ctx.memory.pos_max(1) != n - 1:
                    raise RuntimeError(f"{name} restored {ctx.memory.pos_max(1) + 1} cells")
                ctx.memory.seq_rm(1, -1, -1)
            for name in codecs:
                steps: dict[str, list[float]] = collections.defaultdict(list)
                _steps_file(ctx, files[name], steps)
                _steps_chunks(ctx, *stores[name], steps)
                for key, values in steps.items():
                    times[f"{name}/{key}"].extend(values)
        for store, _ in stores.values():
            store.close()
        ctx.close()
        raw_med = statistics.median(times["raw"])
        summary: dict[str, Any] = {
            "preset": preset,
            "n_tokens": n,
            "rounds": rounds,
            "raw_bytes": raw.stat().st_size,
            "ms": {k: _summary(v) for k, v in times.items()},
        }
        raw_min = min(times["raw"])

        def paired(key: str) -> float:
            # the median of each round's ratio: a load change between rounds cancels out
            ratios = [t / r for t, r in zip(times[key], times["raw"], strict=True)]
            return round(statistics.median(ratios), 3)

        for name in codecs:
            summary[name] = {
                "file_bytes": files[name].stat().st_size,
                "chunk_bytes": stores[name][1].file_size,
                "ratio_file": round(statistics.median(times[f"{name}/file"]) / raw_med, 3),
                "ratio_chunks": round(statistics.median(times[f"{name}/chunks"]) / raw_med, 3),
                "ratio_file_paired": paired(f"{name}/file"),
                "ratio_chunks_paired": paired(f"{name}/chunks"),
                "ratio_file_min": round(min(times[f"{name}/file"]) / raw_min, 3),
                "ratio_chunks_min": round(min(times[f"{name}/chunks"]) / raw_min, 3),
            }
        return summary


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tinyllama-geometry", help="or smollm2")
    parser.add_argument("--sizes", default="1024,4096")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--codecs",
        default="1:planes,-1:none:nock,stored",
        help="LEVEL:FILTER[:nock] or stored,... side by side",
    )
    parser.add_argument(
        "--models-dir", type=Path, default=Path.home() / ".cache/llamaffi/bench-models"
    )
    args = parser.parse_args(argv)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    codecs = {text: parse_codec(text) for text in args.codecs.split(",")}
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(profile(args.preset, n, args.rounds, codecs, args.models_dir)))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
