"""The KV I/O suite: what keeping short-term memory costs, how fast it comes back, how it grows.

For each model of ``BENCH_MODEL`` and each session length of ``BENCH_SIZES`` (see conftest),
side by side in one run, on the same KV state (f16, plus ``q8_0`` at 1,024 tokens; sessions
above ``BENCH_PREFILL_MAX`` are tiled from that state rather than prefilled, see ``_tile``):

* **raw**: llama.cpp's ``llama_state_seq_save_file`` (with and without fsync) and
  ``llama_state_seq_load_file``;
* **ours**: a full snapshot saved (capture + atomic write + fsync) and restored
  (``restore_file``), each also split into its stages, timed here with ``runtime.snapshot``'s
  own functions: save = get, filter, compress, digest, write, fsync; restore = read, verify,
  decompress, unfilter, set. The incremental checkpoint (+64 tokens) and the chunked restore
  of ``runtime.chunks``;
* **codecs** (at 1,024 tokens): zstd levels -1, 1, 3, 9 x plane filter on/off x 1, 2 threads;
* **the peer**: llama-cpp-python 0.3.36 ``Llama.save_state()`` pickled to a file and fsynced
  (what its ``LlamaDiskCache`` stores; diskcache itself does not fsync), and ``pickle.load`` +
  ``Llama.load_state()`` (see ``peer.py`` for where the package comes from);
* **re-prefill**: decoding the same tokens from scratch, what a restart without snapshots costs.

Every benchmark's ``extra_info`` names its ``method`` (and ``stage``), the model, its geometry
and KV type, the token count and the bytes written; ``report.py`` turns them into the tables,
the scaling fits and the charts. Prefilled states are cached next to the benchmark models.

    BENCH_FULL=1 ./dev bench -k "kvio or kvquant"   # the reported configuration
    ./dev bench --ci                                # CI: tiny model, one round each
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from conftest import CI, FULL, KV_MODELS, KV_SIZES, prompt_tokens, rounds

from runtime import snapshot as S
from runtime.chunks import ChunkStore

#: Longer sessions than this are not prefilled (4,096 tokens of tinyllama-geometry took 134 s
#: here, 16,384 would take over half an hour): their state is tiled from this one's.
PREFILL_MAX = int(os.environ.get("BENCH_PREFILL_MAX", "4096"))
#: Tokens added before the incremental checkpoint.
ADDED = 64
#: Session length of the codec grid and of the q8_0 case: the size closest to 1,024.
CODEC_TOKENS = min(KV_SIZES, key=lambda n: (abs(n - 1024), n))
#: Rounds of the cheap benchmarks and of the slow ones (re-prefill, level 9).
ROUNDS = rounds(7 if FULL else 5)
SLOW_ROUNDS = rounds(3 if FULL else 2)


# -- models and prefilled states ------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any

    def info(self) -> dict[str, Any]:
        m = self.model
        return {
            "model": self.name,
            "model_file": self.path.name,
            "model_bytes": self.path.stat().st_size,
            "n_layer": int(m.n_layer),
            "n_embd": int(m.n_embd),
            "n_head": int(m.n_head),
            "n_head_kv": int(m.n_head_kv),
            "n_vocab": int(m.n_vocab),
        }


def _model_path(name: str, models_dir: Path) -> Path:
    from runtime.models import GENERATED, resolve_model

    if name in GENERATED:  # the same cached file as conftest's bench_model_path
        from llamaffi.testing import make_model

        path = models_dir / f"{GENERATED[name]}-seed0.gguf"
        if not path.exists():
            make_model(path, preset=GENERATED[name], seed=0)
        return path
    return Path(resolve_model(name).path)


@pytest.fixture(scope="session")
def kv_models(bench_models_dir: Path) -> Iterator[dict[str, LoadedModel]]:
    """Models of the suite, loaded on first use and kept for the session."""
    loaded: dict[str, LoadedModel] = {}
    try:
        yield loaded
    finally:
        for entry in loaded.values():
            entry.model.close()
        loaded.clear()


def _get_model(kv_models: dict[str, LoadedModel], name: str, models_dir: Path) -> LoadedModel:
    import llamaffi
    from runtime.errors import ModelNotFoundError

    if name not in kv_models:
        try:
            path = _model_path(name, models_dir)
        except ModelNotFoundError as exc:
            pytest.skip(f"model {name!r} is not available: {exc}")
        kv_models[name] = LoadedModel(name, path, llamaffi.Model(path))
    return kv_models[name]


@dataclasses.dataclass
class KvCase:
    """A context whose seq 0 holds ``tokens``; seq 1 is the restore target, seq 2 scratch."""

    lm: LoadedModel
    kv_type: str
    ctx: Any
    tokens: list[int]
    raw_file: Path  # llama_state_seq_save_file of seq 0
    ours_file: Path  # a snapshot of seq 0, default codec
    directory: Path
    prefill_s: float | None  # seconds the prefill took, if it ran in this process
    synthesized: bool = False  # tiled from the BENCH_PREFILL_MAX state, not prefilled

    @property
    def n(self) -> int:
        return len(self.tokens)

    def info(self, method: str, **more: Any) -> dict[str, Any]:
        return {
            **self.lm.info(),
            "kv_type": self.kv_type,
            "n_tokens": self.n,
            "method": method,
            "raw_bytes": self.raw_file.stat().st_size,
            "ours_bytes": self.ours_file.stat().st_size,
            "mode": "ci" if CI else ("full" if FULL else "default"),
            "synthesized": self.synthesized,
            "flash_attn": bool(self.ctx.flash_attn),
            **more,
        }

    def clear(self, *seqs: int) -> None:
        for seq in seqs or (1, 2):
            self.ctx.memory.seq_rm(seq, -1, -1)

    def check_restored(self, seq: int = 1, n: int | None = None) -> None:
        assert self.ctx.memory.pos_max(seq) == (n or self.n) - 1


def _state_cache(models_dir: Path, lm: LoadedModel, kv_type: str, n: int) -> Path:
    fingerprint = str(lm.model.fingerprint)[:12]
    return models_dir / f"kvio-{lm.path.stem}-{fingerprint}-{kv_type}-{n}.state"


def _prefilled(
    ctx: Any, lm: LoadedModel, tag: str, tokens: list[int], models_dir: Path
) -> float | None:
    """Fill seq 0 of ``ctx`` with ``tokens``: from the cached state file if it fits, else by
    decoding them (and caching the result). Returns the seconds a decode took, else None."""
    n = len(tokens)
    cache = _state_cache(models_dir, lm, tag, n)
    if cache.exists():
        try:
            if ctx.seq_state_load_file(cache, 0, n + 1) == tokens:
                return None
        except Exception:  # a stale cache (another build): prefill again
            pass
    ctx.memory.seq_rm(0, -1, -1)
    start = time.perf_counter()
    ctx.decode(tokens, seq_id=0, logits="none")
    elapsed = time.perf_counter() - start
    ctx.seq_state_save_file(cache, 0, tokens)
    return elapsed


def _tile(ctx: Any, base: Any, n_base: int, n: int) -> None:
    """Seq 0 := ``n / n_base`` copies of the state ``base`` at consecutive positions.

    Each copy is set into seq 1, shifted by ``k * n_base`` positions, shared into seq 0 and
    dropped from seq 1. The K rows are not re-rotated (no decode runs), which does not matter
    for I/O: the bytes are real KV of this model, in llama.cpp's own layout. The context must
    use flash attention (V stored row per cell, like K): then a copy's rows of one layer are
    ``n_base`` rows (over 1 MiB here) away from the next copy's, so no 1 MiB zstd frame holds
    a repeat. With the transposed V of a non-flash-attention cache, each V row would hold the
    copies a few kB apart and compress unrealistically well.
    """
    ctx.memory.seq_rm(0, -1, -1)
    for k in range(n // n_base):
        ctx.memory.seq_rm(1, -1, -1)
        ctx.seq_state_set(base, 1)
        if k:
            ctx.memory.seq_add(1, 0, -1, k * n_base)
        ctx.memory.seq_cp(1, 0, -1, -1)
        ctx.memory.seq_rm(1, -1, -1)


def _make_case(lm: LoadedModel, kv_type: str, n: int, models_dir: Path, tmp: Path) -> KvCase:
    tokens = prompt_tokens(lm.model, n)
    synthesized = n > PREFILL_MAX
    if synthesized and n % PREFILL_MAX:
        pytest.skip(f"{n} tokens is not a multiple of BENCH_PREFILL_MAX={PREFILL_MAX}")
    m = lm.model
    row_bytes = int(m.n_head_kv) * (int(m.n_embd) // int(m.n_head)) * 2
    if synthesized and PREFILL_MAX * row_bytes < S.DEFAULT_CODEC.chunk_size:
        pytest.skip(
            f"tiling {PREFILL_MAX}-token copies of {row_bytes}-byte rows would repeat inside "
            "one zstd frame (unrealistic compression)"
        )
    # a quantized V cache needs flash attention, and so does tiling (see _tile)
    flash_attn = kv_type != "f16" or synthesized
    ctx = lm.model.context(
        n_ctx=2 * n + ADDED + 256,
        n_batch=512,
        n_seq_max=3,
        type_k=kv_type,
        type_v=kv_type,
        flash_attn=flash_attn,
    )
    tag = kv_type + ("-fa" if flash_attn and kv_type == "f16" else "")
    prefill_s = None
    if synthesized:
        _prefilled(ctx, lm, tag, tokens[:PREFILL_MAX], models_dir)
        base = ctx.seq_state_get(0)
        _tile(ctx, base, PREFILL_MAX, n)
        del base
        assert ctx.memory.pos_max(0) == n - 1
    else:
        prefill_s = _prefilled(ctx, lm, tag, tokens, models_dir)
    raw, ours = tmp / "raw.bin", tmp / "ours.kvsnap"
    ctx.seq_state_save_file(raw, 0, tokens)
    S.write(ours, S.capture(ctx, 0, tokens))
    return KvCase(lm, kv_type, ctx, tokens, raw, ours, tmp, prefill_s, synthesized)


CASES = [(m, "f16", n) for m in KV_MODELS for n in KV_SIZES]
Q8_CASES = [(m, "q8_0", CODEC_TOKENS) for m in KV_MODELS if CODEC_TOKENS <= PREFILL_MAX]


def _case_id(case: tuple[str, str, int]) -> str:
    model, kv_type, n = case
    return f"{Path(model).stem}-{kv_type}-{n}"


@pytest.fixture(scope="module", params=CASES + Q8_CASES, ids=_case_id)
def kv(
    request: pytest.FixtureRequest,
    kv_models: dict[str, LoadedModel],
    bench_models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[KvCase]:
    """Every case: the f16 size sweep and q8_0 at one size; one context per case."""
    name, kv_type, n = request.param
    lm = _get_model(kv_models, name, bench_models_dir)
    tmp = tmp_path_factory.mktemp(f"kvio-{_case_id(request.param)}")
    case = _make_case(lm, kv_type, n, bench_models_dir, tmp)
    try:
        yield case
    finally:
        case.ctx.close()


def _only_f16(kv: KvCase) -> KvCase:
    if kv.kv_type != "f16":
        pytest.skip("measured on the f16 cases only")
    return kv


@pytest.fixture
def kv16(kv: KvCase) -> KvCase:
    """The f16 cases only (checkpoints, codecs, the peer, re-prefill)."""
    return _only_f16(kv)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pedantic(
    benchmark: Any,
    fn: Callable[..., Any],
    *,
    setup: Callable[[], Any] | None = None,
    n_rounds: int = ROUNDS,
) -> Any:
    return benchmark.pedantic(fn, setup=setup, rounds=n_rounds, iterations=1, warmup_rounds=0)


# -- raw reference --------------------------------------------------------------------------------


@pytest.mark.benchmark(group="kvio-save")
@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "nofsync"])
def test_kvio_save_raw(benchmark: Any, kv: KvCase, fsync: bool) -> None:
    """llama_state_seq_save_file (+ fsync of the file), into a new file each round with the
    previous round's deleted: the I/O of a first checkpoint (new blocks, old ones freed), as
    ``test_kvio_save_chunks_first`` does it. Overwriting one file every round measured
    3x cheaper than writing fresh files on the development VM's disk once a few hundred MB
    had been written (80-100 ms against 75 ms rising to 290 ms at 4k), so the two sides must
    write alike."""
    paths: list[Path] = []

    def fresh() -> None:
        for old in paths:
            old.unlink(missing_ok=True)
        paths[:] = [kv.directory / f"raw-save-{time.monotonic_ns()}.bin"]

    def save() -> int:
        n: int = kv.ctx.seq_state_save_file(paths[0], 0, kv.tokens)
        if fsync:
            _fsync_path(paths[0])
        return n

    written = _pedantic(benchmark, save, setup=fresh)
    assert written == paths[0].stat().st_size
    paths[0].unlink()
    method = "raw save + fsync" if fsync else "raw save (no fsync)"
    benchmark.extra_info.update(kv.info(method, bytes=written))


@pytest.mark.benchmark(group="kvio-restore")
def test_kvio_load_raw(benchmark: Any, kv: KvCase) -> None:
    """llama_state_seq_load_file into seq 1 (no checks beyond llama.cpp's own)."""
    _pedantic(
        benchmark,
        lambda: kv.ctx.seq_state_load_file(kv.raw_file, 1, kv.n + 1),
        setup=kv.clear,
    )
    kv.check_restored()
    kv.clear()
    benchmark.extra_info.update(kv.info("raw load", bytes=kv.raw_file.stat().st_size))


# -- ours, whole ----------------------------------------------------------------------------------


@pytest.mark.benchmark(group="kvio-save")
def test_kvio_save_ours(benchmark: Any, kv: KvCase) -> None:
    """capture (get + planes + zstd-1 + xxh3) + atomic write + fsync (file and directory)."""
    path = kv.directory / "save.kvsnap"
    size = _pedantic(benchmark, lambda: S.write(path, S.capture(kv.ctx, 0, kv.tokens)))
    assert size == path.stat().st_size
    benchmark.extra_info.update(kv.info("ours save", bytes=size))


@pytest.mark.benchmark(group="kvio-restore")
def test_kvio_restore_ours(benchmark: Any, kv: KvCase) -> None:
    """restore_file: map, verify, decompress, set into seq 1."""
    _pedantic(benchmark, lambda: S.restore_file(kv.ctx, kv.ours_file, 1), setup=kv.clear)
    kv.check_restored()
    kv.clear()
    benchmark.extra_info.update(kv.info("ours restore", bytes=kv.ours_file.stat().st_size))


# -- ours, stage by stage -------------------------------------------------------------------------


@dataclasses.dataclass
class Parts:
    """The intermediate products of a save, for timing each stage on its own."""

    raw: Any  # the llama.cpp blob
    planes: list[np.ndarray]  # the filtered frames' inputs, in chunk table order
    frames: list[bytes]
    snapshot: S.Snapshot


def _split(raw: Any, codec: S.Codec) -> list[np.ndarray]:
    data = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    data = data.reshape(-1).view(np.uint8)
    out: list[np.ndarray] = []
    for start in range(0, data.size, codec.chunk_size):
        seg = data[start : start + codec.chunk_size]
        n_low = (seg.size + 1) // 2
        low, high = np.empty(n_low, np.uint8), np.empty(seg.size - n_low, np.uint8)
        S.split_planes(seg, low, high)
        out += [low, high]
    return out


def _map(fn: Callable[[int], Any], n: int, threads: int = 0) -> list[Any]:
    """``fn`` over ``range(n)`` on the snapshot module's own pool (zstd releases the GIL), as
    its compress and decode use it; on a pool of the same size if it is no longer exported."""
    pmap = getattr(S, "parallel_map", None)
    if pmap is not None:
        return list(pmap(fn, n, threads))
    import concurrent.futures

    workers = threads or max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(n)))


def _compress(planes: list[np.ndarray], level: int) -> list[bytes]:
    local = __import__("threading").local()

    def work(i: int) -> bytes:
        cctx = getattr(local, "cctx", None)
        if cctx is None:
            cctx = local.cctx = zstandard.ZstdCompressor(
                level=level, write_checksum=True, write_content_size=True
            )
        return bytes(cctx.compress(planes[i].data))

    return _map(work, len(planes))


@pytest.fixture(scope="module")
def parts(kv: KvCase) -> Parts:
    raw = kv.ctx.seq_state_get(0)
    planes = _split(raw, S.DEFAULT_CODEC)
    frames = _compress(planes, S.DEFAULT_CODEC.level)
    snap = S.capture(kv.ctx, 0, kv.tokens)
    return Parts(raw, planes, frames, snap)


SAVE_STAGES = ("get", "filter", "compress", "digest", "write", "fsync")
RESTORE_STAGES = ("read", "verify", "decompress", "unfilter", "set")


@pytest.mark.benchmark(group="kvio-save-stages")
@pytest.mark.parametrize("stage", SAVE_STAGES)
def test_kvio_save_stage(benchmark: Any, kv: KvCase, parts: Parts, stage: str) -> None:
    """One stage of a save: get (llama_state_seq_get_data), filter (byte planes), compress
    (zstd-1 of every frame, on the module's pool), digest (xxh3-128 of every frame), write
    (header + frames into a new file, page cache only), fsync (file, rename, directory)."""
    codec = S.DEFAULT_CODEC
    counter = itertools.count()
    directory = kv.directory / f"stage-{stage}"
    directory.mkdir(exist_ok=True)

    def fresh_path() -> Path:
        for old in directory.iterdir():
            old.unlink()
        return directory / f"{next(counter)}.kvsnap"

    setup: Callable[[], Any] | None = None
    if stage == "get":

        def fn() -> Any:
            return kv.ctx.seq_state_get(0)

    elif stage == "filter":

        def fn() -> Any:
            return _split(parts.raw, codec)

    elif stage == "compress":

        def fn() -> Any:
            return _compress(parts.planes, codec.level)

    elif stage == "digest":

        def fn() -> Any:
            return [S.chunk_digest(f) for f in parts.frames]

    elif stage == "write":

        def setup() -> Any:
            return (fresh_path(),), {}

        def fn(path: Path) -> Any:
            with open(path, "wb") as f:
                return parts.snapshot.write_to(f)

    else:  # fsync: the data is written (not synced) in the setup

        def setup() -> Any:
            path = fresh_path()
            with open(path, "wb") as f:
                parts.snapshot.write_to(f)
            return (path,), {}

        def fn(path: Path) -> Any:
            _fsync_path(path)
            final = path.with_suffix(".final")
            os.replace(path, final)
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return final

    _pedantic(benchmark, fn, setup=setup)
    benchmark.extra_info.update(
        kv.info("ours save", stage=stage, bytes=kv.ours_file.stat().st_size)
    )


def _read_file(path: Path) -> memoryview:
    size = path.stat().st_size
    view = np.empty(size, dtype=np.uint8).data
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(view)
        while got < size:
            more = f.readinto(view[got:])
            if not more:
                break
            got += more
    return view


@pytest.mark.benchmark(group="kvio-restore-stages")
@pytest.mark.parametrize("stage", RESTORE_STAGES)
def test_kvio_restore_stage(benchmark: Any, kv: KvCase, parts: Parts, stage: str) -> None:
    """One stage of a restore: read (the file into one buffer), verify (header SHA-256 and
    every frame's xxh3-128, ``Snapshot.from_buffer``), decompress (zstd of every frame on the
    module's pool), unfilter (merge the byte planes), set (llama_state_seq_set_data)."""
    snap = S.read(kv.ours_file)
    header = snap.header
    setup: Callable[[], Any] | None = None
    if stage == "read":

        def fn() -> Any:
            return _read_file(kv.ours_file)

    elif stage == "verify":
        buffer = _read_file(kv.ours_file)

        def fn() -> Any:
            return S.Snapshot.from_buffer(buffer)

    elif stage == "decompress":
        local = __import__("threading").local()

        def work(i: int) -> Any:
            dctx = getattr(local, "dctx", None)
            if dctx is None:
                dctx = local.dctx = zstandard.ZstdDecompressor()
            return dctx.decompress(snap.chunks[i], max_output_size=header.chunk_raw_len(i))

        def fn() -> Any:
            return _map(work, len(snap.chunks))

    elif stage == "unfilter":
        out = np.empty(header.raw_size, np.uint8)

        def fn() -> Any:
            for k in range(header.n_segments):
                start = k * header.chunk_size
                dst = out[start : start + header.segment_len(k)]
                S.merge_planes(parts.planes[2 * k], parts.planes[2 * k + 1], dst)
            return out

    else:
        raw = parts.raw

        def setup() -> Any:
            kv.clear()
            return (), {}

        def fn() -> Any:
            return kv.ctx.seq_state_set(raw, 1)

    _pedantic(benchmark, fn, setup=setup)
    if stage == "set":
        kv.check_restored()
    kv.clear()
    benchmark.extra_info.update(
        kv.info("ours restore", stage=stage, bytes=kv.ours_file.stat().st_size)
    )


# -- incremental checkpoints and the chunked restore ----------------------------------------------


@dataclasses.dataclass
class Grown:
    """A chunk store with one checkpoint of seq 0, and the state of seq 0 + ``ADDED`` tokens."""

    kv: KvCase
    store: ChunkStore
    tokens: list[int]  # the n tokens of seq 0, then ADDED more
    state: Any  # seq_state_get of that grown sequence

    def into_seq1(self) -> None:
        """Put the grown state into seq 1 (other benchmarks of the case clear seq 1)."""
        ctx = self.kv.ctx
        if ctx.memory.pos_max(1) != len(self.tokens) - 1:
            self.kv.clear()
            ctx.seq_state_set(self.state, 1)


@pytest.fixture(scope="module")
def grown(kv: KvCase) -> Iterator[Grown]:
    _only_f16(kv)
    store = ChunkStore(kv.directory / "chunks")
    store.commit(
        store.plan_capture(kv.ctx, 0, kv.tokens, scratch_seq=2, session_id="s", journal_seq=0)
    )
    kv.clear()
    kv.ctx.memory.seq_cp(0, 1, -1, -1)
    more = prompt_tokens(kv.lm.model, kv.n + ADDED)[kv.n :]
    kv.ctx.decode(more, seq_id=1, logits="none")
    state = kv.ctx.seq_state_get(1)
    try:
        yield Grown(kv, store, kv.tokens + more, state)
    finally:
        store.close()
        kv.clear()


def _drop_newest(store: ChunkStore, session: str, floor: int) -> None:
    """Undo the last checkpoint of ``session`` above ``floor`` tokens (the benchmark's reset)."""
    newest = store.latest(session)
    if newest is not None and newest.n_tokens > floor and len(store.manifests(session)) > 1:
        (store.manifest_dir / session / f"{newest.generation:012d}.kvman").unlink()
        store.reload()
        store.collect_garbage()


@pytest.mark.benchmark(group="kvio-checkpoint")
def test_kvio_checkpoint_incremental(benchmark: Any, kv16: KvCase, grown: Grown) -> None:
    """plan_capture + commit of seq 1 after +64 tokens: new chunks and the tail, manifest, GC."""
    store, written = grown.store, []
    grown.into_seq1()

    def checkpoint() -> None:
        before = store.stats()["written_bytes"]
        pending = store.plan_capture(
            kv16.ctx, 1, grown.tokens, scratch_seq=2, session_id="s", journal_seq=1
        )
        store.commit(pending)
        written.append(store.stats()["written_bytes"] - before)

    _pedantic(benchmark, checkpoint, setup=lambda: _drop_newest(store, "s", kv16.n))
    kv16.ctx.memory.seq_rm(2, -1, -1)
    benchmark.extra_info.update(
        kv16.info("ours checkpoint +64", bytes=written[-1], added=ADDED),
    )


@pytest.mark.benchmark(group="kvio-save")
def test_kvio_save_chunks_first(benchmark: Any, kv16: KvCase) -> None:
    """A first checkpoint into an empty chunk store: plan_capture (one seq_state_get, sliced
    into 256-token chunks, compressed, hashed) + commit (chunk files, manifest, fsyncs);
    against ``raw save + fsync``. Each round gets a fresh store, so nothing deduplicates."""
    stores: list[ChunkStore] = []
    written: list[int] = []

    def fresh() -> None:  # the previous round's store is deleted, as the raw save's file
        for old in stores:
            old.close()
            shutil.rmtree(old.root)
        stores[:] = [ChunkStore(kv16.directory / f"first-{len(written)}-{time.monotonic_ns()}")]

    def save() -> None:
        store = stores[0]
        store.commit(
            store.plan_capture(
                kv16.ctx, 0, kv16.tokens, scratch_seq=2, session_id="s", journal_seq=0
            )
        )
        written.append(store.stats()["written_bytes"])

    _pedantic(benchmark, save, setup=fresh)
    for store in stores:
        store.close()
        shutil.rmtree(store.root)
    kv16.ctx.memory.seq_rm(2, -1, -1)
    benchmark.extra_info.update(kv16.info("ours chunked first save", bytes=written[-1]))


@pytest.mark.benchmark(group="kvio-restore")
def test_kvio_restore_chunks(benchmark: Any, kv16: KvCase, grown: Grown) -> None:
    """ChunkStore.restore of the newest manifest into an empty seq 1 (256-token chunks)."""
    grown.into_seq1()
    store = grown.store
    latest = store.latest("s")
    if latest is None or latest.n_tokens == kv16.n:  # the checkpoint benchmark did not run
        store.commit(
            store.plan_capture(
                kv16.ctx, 1, grown.tokens, scratch_seq=2, session_id="s", journal_seq=1
            )
        )
    man = store.latest("s")
    assert man is not None
    ctx = kv16.ctx
    _pedantic(benchmark, lambda: store.restore(ctx, man, 1, scratch_seq=2), setup=kv16.clear)
    kv16.check_restored(1, man.n_tokens)
    kv16.clear()
    benchmark.extra_info.update(
        kv16.info("ours chunked restore", bytes=man.file_size, n_chunks=len(man.refs))
    )


# -- codec choices --------------------------------------------------------------------------------

LEVELS = (-1, 1, 3, 9)
FILTERS = {"planes": S.Filter.PLANES2, "none": S.Filter.NONE}
THREADS = (1, 2)
CODECS = [(lv, f, t) for lv in LEVELS for f in FILTERS for t in THREADS]


def _codec_id(c: tuple[int, str, int]) -> str:
    return f"zstd{c[0]}-{c[1]}-{c[2]}t"


@pytest.fixture
def codec_case(kv16: KvCase) -> KvCase:
    if kv16.n != CODEC_TOKENS:
        pytest.skip(f"the codec grid runs at {CODEC_TOKENS} tokens")
    return kv16


@pytest.mark.benchmark(group="kvio-codec")
@pytest.mark.parametrize("direction", ["encode", "decode"])
@pytest.mark.parametrize("choice", CODECS, ids=_codec_id)
def test_kvio_codec(
    benchmark: Any, codec_case: KvCase, choice: tuple[int, str, int], direction: str
) -> None:
    """encode (filter + zstd + xxh3) or decode (zstd + unfilter) of the same state."""
    level, filt, threads = choice
    kv = codec_case
    codec = S.Codec(level=level, filter=FILTERS[filt], threads=threads)
    raw = kv.ctx.seq_state_get(0)
    ident = S.CacheIdentity.from_context(kv.ctx)

    def encode() -> S.Snapshot:
        return S.encode(raw, identity=ident, tokens=kv.tokens, seq_id=0, codec=codec)

    n_rounds = SLOW_ROUNDS if level >= 9 else ROUNDS
    if direction == "encode":
        snap = _pedantic(benchmark, encode, n_rounds=n_rounds)
    else:
        snap = encode()
        out = _pedantic(benchmark, lambda: S.decode(snap, threads=threads), n_rounds=n_rounds)
        assert out.tobytes() == np.frombuffer(raw, np.uint8).tobytes()
    file_bytes = snap.header.file_size
    benchmark.extra_info.update(
        kv.info(
            f"codec {direction}",
            level=level,
            filter=filt,
            threads=threads,
            bytes=file_bytes,
            ratio=round(snap.header.raw_size / file_bytes, 4),
        )
    )


# -- the peer: llama-cpp-python -------------------------------------------------------------------


@dataclasses.dataclass
class PeerCase:
    llm: Any
    module: Any
    variant: str
    path: Path  # the pickle file


@pytest.fixture(scope="module")
def peer(kv: KvCase) -> Iterator[PeerCase]:
    """A ``llama_cpp.Llama`` over the same model whose KV holds the same state.

    The state is loaded from the raw sequence file (``llama_state_seq_load_file``, which the
    peer binds too) rather than prefilled again; ``input_ids``/``n_tokens`` are set as its
    ``eval`` would have left them.
    """
    from peer import PeerUnavailable, load_peer

    try:
        found = load_peer()
    except PeerUnavailable as exc:
        pytest.skip(f"the peer is not available: {exc}")
    _only_f16(kv)
    lc = found.module
    llm = lc.Llama(
        model_path=str(kv.lm.path),
        n_ctx=kv.n + ADDED + 256,
        n_batch=512,
        n_threads=max(1, len(os.sched_getaffinity(0))),
        flash_attn=bool(kv.ctx.flash_attn),  # the V layout of the state it loads
        verbose=False,
    )
    try:
        n = kv.n
        out = (lc.llama_token * (n + 1))()
        count = ctypes.c_size_t(0)
        ok = lc.llama_state_seq_load_file(
            llm.ctx, str(kv.raw_file).encode(), 0, out, n + 1, ctypes.byref(count)
        )
        if not ok or count.value != n:
            pytest.skip(f"the peer could not load the raw state ({ok}, {count.value} tokens)")
        llm.input_ids[:n] = kv.tokens
        llm.n_tokens = n
        yield PeerCase(llm, lc, found.variant, kv.directory / "peer.pkl")
    finally:
        llm.close()


def _peer_pos_max(p: PeerCase) -> int:
    return int(p.module.llama_memory_seq_pos_max(p.module.llama_get_memory(p.llm.ctx), 0))


def _peer_save(p: PeerCase) -> int:
    state = p.llm.save_state()
    with open(p.path, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    return p.path.stat().st_size


@pytest.mark.benchmark(group="kvio-save")
def test_kvio_peer_save(benchmark: Any, kv16: KvCase, peer: PeerCase) -> None:
    """Llama.save_state() (llama_state_get_data + scores copy) + pickle to a file + fsync."""
    size = _pedantic(benchmark, lambda: _peer_save(peer))
    state = pickle.loads(peer.path.read_bytes())
    benchmark.extra_info.update(
        kv16.info(
            "peer save",
            bytes=size,
            peer_variant=peer.variant,
            peer_state_bytes=int(state.llama_state_size),
            peer_scores_bytes=int(state.scores.nbytes),
        )
    )


@pytest.mark.benchmark(group="kvio-restore")
def test_kvio_peer_load(benchmark: Any, kv16: KvCase, peer: PeerCase) -> None:
    """pickle.load of the file + Llama.load_state() (llama_state_set_data)."""
    if not peer.path.exists():
        _peer_save(peer)
    mem = peer.module.llama_get_memory(peer.llm.ctx)

    def setup() -> Any:
        peer.module.llama_memory_clear(mem, True)
        return (), {}

    def load() -> None:
        with open(peer.path, "rb") as f:
            state = pickle.load(f)
        peer.llm.load_state(state)

    _pedantic(benchmark, load, setup=setup)
    assert _peer_pos_max(peer) == kv16.n - 1
    benchmark.extra_info.update(
        kv16.info("peer load", bytes=peer.path.stat().st_size, peer_variant=peer.variant)
    )


# -- re-prefill -----------------------------------------------------------------------------------


@pytest.mark.benchmark(group="kvio-restore")
def test_kvio_reprefill(benchmark: Any, kv16: KvCase) -> None:
    """Decode the same tokens into an empty seq 1 (logits of the last one): a restart's cost
    without snapshots."""
    if kv16.synthesized:
        pytest.skip(f"{kv16.n} tokens is above BENCH_PREFILL_MAX={PREFILL_MAX}: not prefilled")
    ctx = kv16.ctx
    _pedantic(
        benchmark,
        lambda: ctx.decode(kv16.tokens, seq_id=1, logits="last"),
        setup=kv16.clear,
        n_rounds=SLOW_ROUNDS if kv16.n <= 1024 or CI else 1,
    )
    kv16.check_restored()
    kv16.clear()
    benchmark.extra_info.update(
        kv16.info("re-prefill", bytes=0, first_prefill_s=kv16.prefill_s),
    )
