"""The cluster tier against its local counterpart, side by side in one run (issue 18).

    .venv/bin/python -m pytest benchmarks/test_bench_cluster.py --benchmark-enable -s
    BENCH_FULL=1 .venv/bin/python -m pytest benchmarks/test_bench_cluster.py \
        --benchmark-enable -s

Every figure is measured against real servers, those of the test suite
(``tests/runtime/cluster_fixtures.py``): an embedded PostgreSQL 18.6 with pgvector on a Unix
socket and a SeaweedFS S3 gateway on loopback, both on this machine. There is no network
between the runtime and the servers, so the figures are the software's cost, not a
datacentre's round trips; the servers share the CPU with the benchmark.

1. ``test_chunk_put`` / ``test_chunk_get``: :meth:`ChunkStore.commit` of a first checkpoint
   of a 1k- and a 4k-token state (every chunk new) and :meth:`ChunkStore.restore` of it, on the
   local directory and on S3 (configured as ``Runtime(kv=...)`` configures it). The get test
   also times fetching the chunks' bytes alone, and on S3 the HEAD that precedes every PUT.
   The model is the benchmark model (``tiny``; ``tinyllama-geometry`` with ``BENCH_FULL=1``:
   23 and 92 MB of f16 KV).
2. ``test_resume``: a session of about 2,000 tokens, built once per backend; each round opens
   a new :class:`Runtime` on the same data (local: the same directory; cluster: an empty
   directory as a new node, the journal from PostgreSQL and the checkpoint from S3) and times
   the first turn's resume (``timings["resume"]``: lease, journal, manifests, restore) and
   ``Reply.resumed.seconds`` (the restore itself). ``BENCH_MODEL`` models (``tiny``;
   ``tiny,smollm2`` with ``BENCH_FULL=1``).
3. ``test_turn_overhead``: warm short turns (``max_tokens=8``, no long-term memory) with the
   journal local (fsync), in PostgreSQL (``db=``) and with the KV on S3 too (``db=`` and
   ``kv=``); ``test_journal_append``: one journal append alone, local (fsync) against
   PostgreSQL (a fenced ``COMMIT`` with ``synchronous_commit = on``).
4. ``test_vector_query``: pgvector's HNSW against hnswlib (through
   :class:`runtime.longterm.hnsw.HnswIndex`, M=32, ef_construction=200), over the same vectors:
   N=5,000 × 384 by default (2,000 in CI mode), 100,000 with ``BENCH_FULL=1``
   (``BENCH_VECTORS`` overrides). Two data sets, as ``test_bench_index`` has them: ``random``
   (unit Gaussian vectors, the worst case) and ``clustered`` (1,000 centres, a 16-d latent
   spread; closer to sentence embeddings). pgvector is bulk-loaded with a binary ``COPY`` and
   indexed with ``m=16`` (its default) and ``m=32``, both ``ef_construction=200`` (a table
   each); each query is one prepared ``SELECT ... ORDER BY embedding <=> $1 LIMIT 10`` with
   ``hnsw.ef_search`` set (at most 1000; ef 40, 128, 512 and 1000, only 40 and 512 in CI
   mode). Latency p50/p99 and recall@10 against exact numpy search over 200 queries; load and
   build times and index sizes in ``extra_info`` and the printed table.

Failover time is not measured here: ``tests/runtime/test_cluster_failover.py`` kills a real
``serve`` process and prints the time to the other node's first reply (docs/cluster.md,
"Measured").

Each test records its figures in ``extra_info`` (median, min and max as scalars, so the
report's table shows them); with ``-s`` the module prints the side-by-side tables when it ends.
"""

# ruff: noqa: F811 (pg_url and s3_env are fixtures imported from cluster_fixtures)

from __future__ import annotations

import dataclasses
import itertools
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest
from conftest import CI, FULL, RUNTIME_MODELS, percentile, require_model, rounds
from test_bench_runtime import long_turn, scripted_turn
from test_bench_snapshot import sized_state

from runtime.app import Runtime
from runtime.chunks import ChunkStore
from runtime.journal import DEFAULT_SEGMENT_ENTRIES
from runtime.longterm.hnsw import HnswIndex, IndexParams
from runtime.storage import LocalJournals
from tests.runtime.cluster_fixtures import S3_BUCKET, pg_url, s3_env  # noqa: F401

#: Warm-up rounds before the measured ones (none in CI mode: one round of everything).
WARMUP = 0 if CI else 1


def _p(values: list[float]) -> dict[str, float]:
    """Median, p95 and range of ``values`` (ms), as scalars for ``extra_info``."""
    return {
        "p50_ms": round(percentile(values, 50), 3),
        "p95_ms": round(percentile(values, 95), 3),
        "min_ms": round(min(values), 3),
        "max_ms": round(max(values), 3),
    }


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _fmt(ms: float) -> str:
    if ms >= 10_000:
        return f"{ms / 1000:.1f} s"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def _spread(p: dict[str, float]) -> str:
    """``median (min–max)`` of a :func:`_p` dict, in ms."""
    return f"{_fmt(p['p50_ms'])} ({_fmt(p['min_ms'])}–{_fmt(p['max_ms'])})"


# -- the side-by-side tables ------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    """One printed table: rows of figures by column, or free-form rows under a header."""

    title: str
    columns: tuple[str, ...]
    figures: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    rows: list[tuple[str, ...]] = dataclasses.field(default_factory=list)

    def render(self) -> list[str]:
        if self.rows:
            out = [self.title, "", "| " + " | ".join(self.columns) + " |"]
            out.append("|---" + "|---:" * (len(self.columns) - 1) + "|")
            return out + ["| " + " | ".join(r) + " |" for r in self.rows]
        base = self.columns[0]
        ratios = [f"{c} / {base}" for c in self.columns[1:]]
        header = ["", *self.columns, *ratios]
        out = [self.title, "", "| " + " | ".join(header) + " |"]
        out.append("|---" + "|---:" * (len(header) - 1) + "|")
        for label, by_column in self.figures.items():
            cells = [_spread(by_column[c]) if c in by_column else "–" for c in self.columns]
            for c in self.columns[1:]:
                if c in by_column and base in by_column and by_column[base]["p50_ms"] > 0:
                    cells.append(f"{by_column[c]['p50_ms'] / by_column[base]['p50_ms']:.2f}×")
                else:
                    cells.append("–")
            note = f" ({self.notes[label]})" if label in self.notes else ""
            out.append(f"| {label}{note} | " + " | ".join(cells) + " |")
        return out


class Tables:
    """Figures measured in this module, printed as side-by-side tables when it ends."""

    def __init__(self) -> None:
        self._tables: dict[str, Table] = {}

    def table(self, title: str, columns: tuple[str, ...]) -> Table:
        return self._tables.setdefault(title, Table(title, columns))

    def add(
        self,
        title: str,
        columns: tuple[str, ...],
        row: str,
        column: str,
        figures: dict[str, float],
        note: str = "",
    ) -> None:
        table = self.table(title, columns)
        table.figures.setdefault(row, {})[column] = figures
        if note:
            table.notes[row] = note

    def render(self) -> str:
        out: list[str] = []
        for table in self._tables.values():
            out += ["", *table.render()]
        return "\n".join(out)


@pytest.fixture(scope="module")
def tables() -> Iterator[Tables]:
    collected = Tables()
    yield collected
    text = collected.render()
    if text:
        print(f"\n\n== cluster against local ({'full' if FULL else 'ci' if CI else 'default'})")
        print(text)


@pytest.fixture(scope="module")
def s3_client(s3_env: dict[str, str]) -> Any:
    """One boto3 client for every S3 store of the module (as a runtime holds one): rounds
    reuse its connections, so no round pays a TCP setup the runtime would not."""
    import boto3

    return boto3.client("s3")


def kv_url() -> str:
    """A fresh prefix in the test bucket."""
    return f"s3://{S3_BUCKET}/bench-{secrets.token_hex(4)}"


# -- 1. chunk put / get -----------------------------------------------------------------------

SIZES = (1024, 4096)
STORES = ("local", "s3")
PUT = "chunk put: ChunkStore.commit of a first checkpoint (every chunk new), ms: median (min–max)"
GET = "chunk get: ChunkStore.restore into a sequence, ms: median (min–max)"


@dataclasses.dataclass
class KvState:
    """A context with ``tokens`` decoded into sequence 0 (sequences 1 and 2 free)."""

    ctx: Any
    tokens: list[int]


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}tok" for n in SIZES])
def kv_state(
    request: pytest.FixtureRequest, bench_model: Any, bench_config: Any, bench_models_dir: Path
) -> Iterator[KvState]:
    ctx, tokens = sized_state(bench_model, bench_config, bench_models_dir, int(request.param))
    with ctx:
        yield KvState(ctx, tokens)


def chunk_store(kind: str, root: Path, client: Any) -> ChunkStore:
    """A chunk store as the runtime builds it: the local directory, or an S3 prefix with the
    settings of ``Runtime(kv=...)`` (chunks keyed per session, shared with other nodes)."""
    if kind == "local":
        return ChunkStore(root)
    from runtime.storage.s3 import S3BlobStore

    blobs = S3BlobStore(kv_url(), client=client)
    return ChunkStore(root, lock=False, blobs=blobs, dedup="session", shared=True)


def _drop(store: ChunkStore, root: Path) -> None:
    """Delete what a round stored (its manifest, then its chunks), then close the store."""
    store.delete_session("bench")
    store.close()
    shutil.rmtree(root, ignore_errors=True)


def _state_info(bench_config: Any, state: KvState, store: ChunkStore, kind: str) -> dict[str, Any]:
    man = store.latest("bench")
    assert man is not None
    return {
        "preset": bench_config.preset,
        "store": kind,
        "n_tokens": len(state.tokens),
        "chunks": len(man.refs),
        "bytes": sum(ref.file_size for ref in man.refs),
    }


@pytest.mark.benchmark(group="cluster-chunk-put")
@pytest.mark.parametrize("kind", STORES)
def test_chunk_put(
    benchmark: Any,
    kv_state: KvState,
    kind: str,
    s3_client: Any,
    bench_config: Any,
    tmp_path: Path,
    tables: Tables,
) -> None:
    """Encode every chunk, store it (local: write + fsync; S3: HEAD + conditional PUT), then
    switch the manifest. The capture (the same for both) is planned outside the timing."""
    times: list[float] = []
    counter = itertools.count()
    info: dict[str, Any] = {}
    opened: list[tuple[ChunkStore, Path]] = []

    def setup() -> tuple[tuple[ChunkStore, Any, Path], dict[str, Any]]:
        root = tmp_path / f"round-{next(counter)}"
        store = chunk_store(kind, root, s3_client)
        opened.append((store, root))
        pending = store.plan_capture(
            kv_state.ctx, 0, kv_state.tokens, scratch_seq=2, session_id="bench", journal_seq=0
        )
        return (store, pending, root), {}

    def put(store: ChunkStore, pending: Any, root: Path) -> None:
        start = time.perf_counter()
        store.commit(pending)
        times.append(_ms(start))

    def teardown(store: ChunkStore, pending: Any, root: Path) -> None:
        opened.remove((store, root))
        info.update(_state_info(bench_config, kv_state, store, kind))
        _drop(store, root)

    try:
        benchmark.pedantic(
            put, setup=setup, teardown=teardown, rounds=rounds(7), warmup_rounds=WARMUP
        )
    finally:  # --benchmark-disable runs the target once and never the teardown
        while opened:
            teardown(opened[-1][0], None, opened[-1][1])
    measured = times[WARMUP:] if len(times) > WARMUP else times
    figures = _p(measured)
    benchmark.extra_info.update(info, **figures)
    tables.add(
        PUT, STORES, f"{len(kv_state.tokens)} tokens", kind, figures,
        note=f"{info['chunks']} chunks, {info['bytes'] / 1e6:.2f} MB",
    )  # fmt: skip


@pytest.mark.benchmark(group="cluster-chunk-get")
@pytest.mark.parametrize("kind", STORES)
def test_chunk_get(
    benchmark: Any,
    kv_state: KvState,
    kind: str,
    s3_client: Any,
    bench_config: Any,
    tmp_path: Path,
    tables: Tables,
) -> None:
    """Read every chunk (local: mapped from the page cache; S3: one GET each), verify, decode
    and ``seq_state_set`` it into sequence 1. Also timed alone: the chunks' bytes fetched
    (copied out), and on S3 the HEAD of each chunk that every PUT starts with."""
    ctx, tokens = kv_state.ctx, kv_state.tokens
    store = chunk_store(kind, tmp_path / "store", s3_client)
    try:
        man = store.commit(
            store.plan_capture(ctx, 0, tokens, scratch_seq=2, session_id="bench", journal_seq=0)
        )
        times: list[float] = []

        def get() -> None:
            start = time.perf_counter()
            restored = store.restore(ctx, man, 1, scratch_seq=2)
            times.append(_ms(start))
            assert restored == tokens

        benchmark.pedantic(get, rounds=rounds(7), warmup_rounds=WARMUP, iterations=1)
        assert ctx.memory.pos_max(1) == len(tokens) - 1
        ctx.memory.seq_rm(1)
        fetch, head = [], []
        for _ in range(rounds(7)):
            start = time.perf_counter()
            n_bytes = sum(len(bytes(store.blobs.get(ref.key))) for ref in man.refs)
            fetch.append(_ms(start))
            start = time.perf_counter()
            assert all(store.blobs.has(ref.key) for ref in man.refs)
            head.append(_ms(start))
        info = _state_info(bench_config, kv_state, store, kind)
    finally:
        _drop(store, tmp_path / "store")
    assert n_bytes == info["bytes"]
    measured = times[WARMUP:] if len(times) > WARMUP else times
    figures = _p(measured)
    benchmark.extra_info.update(
        info,
        **figures,
        fetch_p50_ms=_p(fetch)["p50_ms"],
        head_all_p50_ms=_p(head)["p50_ms"],
    )
    label = f"{len(tokens)} tokens"
    note = f"{info['chunks']} chunks, {info['bytes'] / 1e6:.2f} MB"
    tables.add(GET, STORES, f"{label}: restore", kind, figures, note=note)
    tables.add(GET, STORES, f"{label}: fetch the bytes only", kind, _p(fetch))
    tables.add(PUT, STORES, f"{label}: a HEAD of every chunk (before each PUT)", kind, _p(head))


# -- 2. resume of a 2k-token session ----------------------------------------------------------

#: Restarts per backend (after the warm-up one).
RESUME_ROUNDS = 5 if FULL else 3
SESSION_TOKENS = 2000
N_CTX = 4096
MAX_TOKENS = 8
TTL = 10.0
BACKENDS = ("local", "cluster")
RESUME = (
    "resume of a ~2k-token session in a newly opened runtime (first turn), ms: median (min–max)"
)


@pytest.fixture(scope="module", params=RUNTIME_MODELS)
def model_name(request: pytest.FixtureRequest) -> str:
    """A model of ``BENCH_MODEL`` (``tiny``; ``tiny,smollm2`` with ``BENCH_FULL=1``)."""
    return require_model(str(request.param))


@dataclasses.dataclass
class Deployment:
    """Where a runtime keeps its state: a directory, or PostgreSQL + S3 for nodes."""

    kind: str
    root: Path
    pg_url: str
    kv_url: str

    def open(self, model: str, node: str, **kw: Any) -> Runtime:
        """Open a runtime (local: always the same directory; cluster: node ``node``'s)."""
        if self.kind == "local":
            return Runtime.open(self.root, model=model, n_ctx=N_CTX, embedder=False, **kw)
        return Runtime.open(
            self.root / node,
            model=model,
            n_ctx=N_CTX,
            embedder=False,
            db=self.pg_url,
            kv=self.kv_url,
            node_id=node,
            lease_ttl_s=TTL,
            **kw,
        )


@dataclasses.dataclass
class LongSession:
    """A session of about :data:`SESSION_TOKENS` tokens, checkpointed, its runtime closed."""

    where: Deployment
    model: str
    session_id: str
    n_tokens: int
    users: list[str]  # the user turns so far, in order


def build_session(where: Deployment, model: str) -> LongSession:
    # a fresh id: the database is the whole test session's, shared by every test using it
    session = f"long-{secrets.token_hex(4)}"
    users: list[str] = []
    with where.open(model, "builder") as rt:
        n = 0
        while n < SESSION_TOKENS:
            users.append(long_turn(len(users)))
            rt.chat(session, users[-1], max_tokens=MAX_TOKENS, remember=False)
            n = int(rt.session_info(session)["window_tokens"])
        rt.checkpoint(session)
    return LongSession(where, model, session, n, users)


@pytest.mark.benchmark(group="cluster-resume")
@pytest.mark.parametrize("kind", BACKENDS)
def test_resume(
    benchmark: Any,
    model_name: str,
    kind: str,
    pg_url: str,
    s3_env: dict[str, str],
    tmp_path: Path,
    tables: Tables,
) -> None:
    """Open a runtime on the session's data, then one turn (``max_tokens=1``): its resume.

    Each round's turn is journalled and checkpointed at close, so the session grows by a few
    tokens a round (the same on both backends); the next round restores that checkpoint."""
    session = build_session(Deployment(kind, tmp_path / "data", pg_url, kv_url()), model_name)
    opened: list[Runtime] = []
    open_ms: list[float] = []
    resume_ms: list[float] = []
    restore_ms: list[float] = []
    reports: list[Any] = []
    counter = itertools.count()

    def setup() -> tuple[tuple[Runtime], dict[str, Any]]:
        start = time.perf_counter()
        rt = session.where.open(session.model, f"node-{next(counter)}")
        open_ms.append(_ms(start))
        opened.append(rt)
        return (rt,), {}

    def first_turn(rt: Runtime) -> None:
        question = f"Question {len(session.users)}: what was the first thing I told you?"
        session.users.append(question)
        reply = rt.chat(
            session.session_id, question, max_tokens=1, remember=False, use_memory=False
        )
        resume_ms.append(reply.timings["resume"])
        assert reply.resumed is not None
        restore_ms.append(reply.resumed.seconds * 1000)
        reports.append(reply.resumed)

    def close(rt: Runtime) -> None:
        opened.remove(rt)
        try:
            history = rt.history(session.session_id)
            assert [h["text"] for h in history if h["role"] == "user"] == session.users
        finally:
            rt.close()  # the final checkpoint: what the next round restores

    try:
        benchmark.pedantic(
            first_turn,
            setup=setup,
            teardown=close,
            rounds=rounds(RESUME_ROUNDS),
            warmup_rounds=WARMUP,
        )
    finally:  # --benchmark-disable runs the target once and never the teardown
        while opened:
            close(opened[-1])
    # every round came back from the checkpoint, not by re-prefilling the journal
    assert all(r.source == "snapshot" and r.restored_tokens > 0 for r in reports), reports
    skip = WARMUP if len(reports) > WARMUP else 0
    last = reports[-1]
    figures = _p(resume_ms[skip:])
    benchmark.extra_info.update(
        model=model_name,
        backend=kind,
        session_tokens=session.n_tokens,
        restored_tokens=last.restored_tokens,
        replayed_tokens=last.replayed_tokens,
        **figures,
        restore_p50_ms=_p(restore_ms[skip:])["p50_ms"],
        open_p50_ms=_p(open_ms[skip:])["p50_ms"],
    )
    row = f"{model_name}, {session.n_tokens} tokens"
    tables.add(RESUME, BACKENDS, f"{row}: timings['resume']", kind, figures)
    tables.add(RESUME, BACKENDS, f"{row}: of which the restore", kind, _p(restore_ms[skip:]))
    tables.add(RESUME, BACKENDS, f"{row}: Runtime.open before it", kind, _p(open_ms[skip:]))


# -- 3. turn overhead with the journal in PostgreSQL ------------------------------------------

TURN_ROUNDS = 30 if FULL else 10
VARIANTS = ("local", "db", "db+kv")
TURN = (
    "warm short turn (tiny, max_tokens=8, no long-term memory), ms: median (min–max); "
    "prefill includes the journal append"
)
APPEND = "journal append (one user entry of 40 tokens), ms: median (min–max)"


@pytest.mark.benchmark(group="cluster-turn")
@pytest.mark.parametrize("variant", VARIANTS)
def test_turn_overhead(
    benchmark: Any,
    variant: str,
    pg_url: str,
    s3_env: dict[str, str],
    tmp_path: Path,
    tables: Tables,
) -> None:
    """The same scripted short turns; ``timings`` of each (after two warm-up turns)."""
    kw: dict[str, Any] = {}
    if variant != "local":
        kw = {"db": pg_url, "node_id": f"turn-{secrets.token_hex(2)}", "lease_ttl_s": TTL}
    if variant == "db+kv":
        kw["kv"] = kv_url()
    replies: list[Any] = []
    session = f"turns-{secrets.token_hex(4)}"
    with Runtime.open(tmp_path / "data", model="tiny", n_ctx=N_CTX, embedder=False, **kw) as rt:
        rt.chat(session, "Hello! " + scripted_turn(0), max_tokens=MAX_TOKENS)  # system prompt
        counter = itertools.count(1)

        def turn() -> None:
            reply = rt.chat(session, scripted_turn(next(counter)), max_tokens=MAX_TOKENS)
            replies.append(reply)

        warmup = 0 if CI else 2
        benchmark.pedantic(turn, rounds=rounds(TURN_ROUNDS), warmup_rounds=warmup)
        users = [h["text"] for h in rt.history(session) if h["role"] == "user"]
    assert len(users) == len(replies) + 1
    measured = replies[warmup:] if len(replies) > warmup else replies
    figures = {k: _p([r.timings[k] for r in measured]) for k in ("total", "prefill", "generation")}
    own = _p([r.runtime_ms for r in measured])
    benchmark.extra_info.update(
        variant=variant,
        turns=len(measured),
        **figures["total"],
        prefill_p50_ms=figures["prefill"]["p50_ms"],
        generation_p50_ms=figures["generation"]["p50_ms"],
        runtime_p50_ms=own["p50_ms"],
    )
    for key, label in (("total", "total"), ("prefill", "prefill"), ("generation", "generation")):
        tables.add(TURN, VARIANTS, label, variant, figures[key])
    tables.add(TURN, VARIANTS, "Reply.runtime_ms", variant, own)


MEMORY_VARIANTS = ("local", "db")
MEMORY_TURN = (
    "warm short turn with long-term memory on (tiny, max_tokens=8, a 384-wide hash embedder "
    "so that only the store's cost shows), ms: median (min–max); db: the shared memory, "
    "replicated through PostgreSQL"
)


@pytest.mark.benchmark(group="cluster-turn-memory")
@pytest.mark.parametrize("variant", MEMORY_VARIANTS)
def test_turn_memory_overhead(
    benchmark: Any, variant: str, pg_url: str, tmp_path: Path, tables: Tables
) -> None:
    """Short turns that retrieve from and write to long-term memory: local, or each node's
    replica of the shared memory (a pull before the search and the write, the write's rows
    published to PostgreSQL before its local commit). A database of its own, so the shared
    memory holds this run's items only."""
    from tests.runtime.memory_helpers import HashEmbedder

    kw: dict[str, Any] = {}
    if variant == "db":
        name = f"bench_{secrets.token_hex(4)}"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = urlunsplit(urlsplit(pg_url)._replace(path=f"/{name}"))
        kw = {"db": url, "node_id": f"mem-{secrets.token_hex(2)}", "lease_ttl_s": TTL}
    replies: list[Any] = []
    session = f"memory-{secrets.token_hex(4)}"
    embedder = HashEmbedder(dim=384)
    with Runtime.open(tmp_path / "data", model="tiny", n_ctx=N_CTX, embedder=embedder, **kw) as rt:
        for i in range(20):  # something to retrieve
            rt.remember(f"note {i}: {scripted_turn(i)}", session=session)
        rt.chat(session, "Hello! " + scripted_turn(0), max_tokens=MAX_TOKENS)
        counter = itertools.count(1)

        def turn() -> None:
            replies.append(rt.chat(session, scripted_turn(next(counter)), max_tokens=MAX_TOKENS))

        warmup = 0 if CI else 2
        benchmark.pedantic(turn, rounds=rounds(TURN_ROUNDS), warmup_rounds=warmup)
    measured = replies[warmup:] if len(replies) > warmup else replies
    assert all(r.memories for r in measured), "every turn retrieved from long-term memory"
    keys = ("total", "retrieval", "memory_write")
    figures = {k: _p([r.timings[k] for r in measured]) for k in keys}
    benchmark.extra_info.update(
        variant=variant,
        turns=len(measured),
        **figures["total"],
        retrieval_p50_ms=figures["retrieval"]["p50_ms"],
        memory_write_p50_ms=figures["memory_write"]["p50_ms"],
    )
    for key in keys:
        tables.add(MEMORY_TURN, MEMORY_VARIANTS, key, variant, figures[key])


@pytest.mark.benchmark(group="cluster-journal-append")
@pytest.mark.parametrize("kind", ("local", "postgres"))
def test_journal_append(
    benchmark: Any, kind: str, pg_url: str, tmp_path: Path, tables: Tables
) -> None:
    """One :meth:`JournalBackend.append`: local with fsync, or PostgreSQL (lease check and
    INSERT in one transaction, acknowledged after the commit's WAL flush)."""
    from runtime.storage.leases import Leases
    from runtime.storage.pgdb import PgDatabase
    from runtime.storage.postgres import PgJournals

    session = f"append-{secrets.token_hex(4)}"
    tokens = list(range(10, 50))
    closers: list[Callable[[], None]] = []
    times: list[float] = []
    try:
        if kind == "local":
            journals: Any = LocalJournals(
                tmp_path, fsync=True, segment_entries=DEFAULT_SEGMENT_ENTRIES
            )
        else:
            db = PgDatabase(pg_url)
            closers.append(db.close)
            leases = Leases(db, f"append-{secrets.token_hex(2)}", ttl_s=TTL)
            closers.append(leases.close)
            journals = PgJournals(db, leases)
        journal = journals.open(session)
        closers.append(journal.close)

        def append() -> None:
            start = time.perf_counter()
            journal.append("user", "a short user turn of forty tokens", tokens)
            times.append(_ms(start))

        benchmark.pedantic(append, rounds=rounds(200 if FULL else 50), warmup_rounds=0 if CI else 5)
        assert len(journal) == len(times)
        assert list(journal[-1].tokens) == tokens
    finally:
        for close in reversed(closers):
            close()
    skip = 0 if CI else 5
    figures = _p(times[skip:] if len(times) > skip else times)
    benchmark.extra_info.update(backend=kind, appends=len(times) - skip, **figures)
    tables.add(APPEND, ("local", "postgres"), "append", kind, figures)


# -- 4. pgvector HNSW against hnswlib ---------------------------------------------------------

DIM = 384
N_VECTORS = int(os.environ.get("BENCH_VECTORS", 100_000 if FULL else 2_000 if CI else 5_000))
N_QUERIES = 200
K = 10
#: hnswlib's M and ef_construction are the runtime's (:class:`IndexParams`); pgvector's m
#: 16 (its default) and 32, with the same ef_construction.
PG_M = (16, 32)
EF_CONSTRUCTION = 200
#: ef of the queries; 512 is the runtime's ef_search, pgvector accepts at most 1000.
EFS = (40, 512) if CI else (40, 128, 512, 1000)
ENGINES = ("hnswlib", *(f"pgvector-m{m}" for m in PG_M))
#: pgvector's build: the graph must fit in maintenance_work_mem (else it is built on disk,
#: many times slower); one parallel worker plus the leader, the two cores hnswlib uses.
PG_BUILD_SETTINGS = {"maintenance_work_mem": "1GB", "max_parallel_maintenance_workers": "1"}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vectors(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``N_VECTORS`` data vectors and ``N_QUERIES`` queries (``test_bench_index``'s sets)."""
    rng = np.random.default_rng(7)
    if kind == "random":
        return _unit(rng.standard_normal((N_VECTORS, DIM))), _unit(
            rng.standard_normal((N_QUERIES, DIM))
        )
    centres = rng.standard_normal((1000, DIM))
    basis = rng.standard_normal((16, DIM)) / 4.0

    def draw(n: int) -> np.ndarray:
        offsets = rng.standard_normal((n, 16)) @ basis
        noise = 0.3 * rng.standard_normal((n, DIM))
        return _unit(centres[rng.integers(0, 1000, n)] + offsets + noise)

    return draw(N_VECTORS), draw(N_QUERIES)


def exact_top_k(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The exact ``K`` nearest ids of each query (cosine = dot product of unit vectors)."""
    sims = queries @ data.T
    top = np.argpartition(-sims, K, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
    ids: np.ndarray = np.take_along_axis(top, order, axis=1)
    return ids


@dataclasses.dataclass
class VectorCase:
    """One data set, indexed by hnswlib and in one pgvector table per m."""

    kind: str
    queries: np.ndarray
    truth: np.ndarray
    hnsw: HnswIndex
    conn: Any  # psycopg connection, pgvector types registered
    pg_tables: dict[str, str]  # engine -> table
    build_s: dict[str, float]  # engine -> index build seconds
    load_s: dict[str, float]  # engine -> bulk load (COPY) seconds
    index_mb: dict[str, float]  # engine -> size of the pgvector index
    pg_engine: str  # pgvector's version and the server's shared_buffers, for the title


def _scalar(conn: Any, query: str, *params: Any) -> str:
    """The one value ``query`` returns, as text."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return str(row[0])


def build_pgvector(conn: Any, table: str, data: np.ndarray, m: int) -> tuple[float, float]:
    """Load ``data`` into a new table with a binary COPY, then build its HNSW index; return
    the seconds of each."""
    from psycopg import sql

    ident = sql.Identifier(table)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
    conn.execute(
        sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY, embedding vector({}))").format(
            ident, sql.Literal(DIM)
        )
    )
    start = time.perf_counter()
    copy_sql = sql.SQL("COPY {} (id, embedding) FROM STDIN WITH (FORMAT BINARY)").format(ident)
    with conn.cursor().copy(copy_sql) as copy:
        copy.set_types(["int4", "vector"])
        for i, row in enumerate(data):
            copy.write_row((i, row))
    load = time.perf_counter() - start
    for name, value in PG_BUILD_SETTINGS.items():
        conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    start = time.perf_counter()
    conn.execute(
        sql.SQL(
            "CREATE INDEX {} ON {} USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = {}, ef_construction = {})"
        ).format(
            sql.Identifier(f"{table}_hnsw"), ident, sql.Literal(m), sql.Literal(EF_CONSTRUCTION)
        )
    )
    build = time.perf_counter() - start
    conn.execute(sql.SQL("ANALYZE {}").format(ident))
    return load, build


@pytest.fixture(scope="module", params=["random", "clustered"])
def vector_case(request: pytest.FixtureRequest, pg_url: str) -> Iterator[VectorCase]:
    import psycopg
    from pgvector.psycopg import register_vector
    from psycopg import sql

    kind = str(request.param)
    data, queries = vectors(kind)
    truth = exact_top_k(data, queries)
    build_s: dict[str, float] = {}
    load_s: dict[str, float] = {}
    index_mb: dict[str, float] = {}
    index = HnswIndex(IndexParams(dim=DIM), capacity=N_VECTORS)
    start = time.perf_counter()
    index.add(data, np.arange(N_VECTORS, dtype=np.uint64))
    build_s["hnswlib"] = time.perf_counter() - start
    load_s["hnswlib"] = 0.0
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        pg_version = _scalar(conn, "SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        shared_buffers = _scalar(conn, "SHOW shared_buffers")
        pg_tables: dict[str, str] = {}
        for m in PG_M:
            engine = f"pgvector-m{m}"
            table = f"bench_vectors_{kind}_m{m}"
            load_s[engine], build_s[engine] = build_pgvector(conn, table, data, m)
            pg_tables[engine] = table
            size = _scalar(conn, "SELECT pg_relation_size(%s::regclass)", f"{table}_hnsw")
            index_mb[engine] = int(size) / 1e6
        # the planner may prefer a sequential scan of a small table: only the index is measured
        conn.execute("SET enable_seqscan = off")
        print(
            f"\nbuilt {kind} N={N_VECTORS}: "
            + ", ".join(f"{e} {s:.1f} s" for e, s in build_s.items())
        )
        try:
            yield VectorCase(
                kind,
                queries,
                truth,
                index,
                conn,
                pg_tables,
                build_s,
                load_s,
                index_mb,
                f"pgvector {pg_version} HNSW (shared_buffers {shared_buffers})",
            )
        finally:
            for table in pg_tables.values():
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))


def searcher(case: VectorCase, engine: str, ef: int) -> Callable[[np.ndarray], list[int]]:
    """One query of ``engine`` at ``ef``: the ids of the ``K`` nearest."""
    if engine == "hnswlib":
        return lambda q: case.hnsw.query(q, K, ef=ef)[0]
    from psycopg import sql

    conn, table = case.conn, case.pg_tables[engine]
    conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(ef)))
    query = sql.SQL("SELECT id FROM {} ORDER BY embedding <=> %s LIMIT {}").format(
        sql.Identifier(table), sql.Literal(K)
    )
    plan = "\n".join(
        r[0] for r in conn.execute(sql.SQL("EXPLAIN ") + query, (case.queries[0],)).fetchall()
    )
    assert f"Index Scan using {table}_hnsw" in plan, plan
    cur = conn.cursor()

    def search(q: np.ndarray) -> list[int]:
        cur.execute(query, (q,), prepare=True)
        return [int(row[0]) for row in cur.fetchall()]

    return search


@pytest.mark.benchmark(group="cluster-vector-query")
@pytest.mark.parametrize("ef", EFS)
@pytest.mark.parametrize("engine", ENGINES)
def test_vector_query(
    benchmark: Any, vector_case: VectorCase, engine: str, ef: int, tables: Tables
) -> None:
    """``N_QUERIES`` queries one at a time: latency p50/p99, recall@10 against exact search.
    The benchmark itself repeats the first query."""
    case = vector_case
    search = searcher(case, engine, ef)
    latencies, recalls = [], []
    for q, truth in zip(case.queries, case.truth, strict=True):
        start = time.perf_counter()
        found = search(q)
        latencies.append(_ms(start))
        assert len(found) == K
        recalls.append(len(set(found) & set(truth.tolist())) / K)
    benchmark.pedantic(search, args=(case.queries[0],), rounds=rounds(20), iterations=1)
    p = _p(latencies)
    recall = float(np.mean(recalls))
    assert 0.0 <= recall <= 1.0
    benchmark.extra_info.update(
        data=case.kind,
        n=N_VECTORS,
        engine=engine,
        ef=ef,
        p50_ms=p["p50_ms"],
        p99_ms=round(percentile(latencies, 99), 3),
        min_ms=p["min_ms"],
        max_ms=p["max_ms"],
        recall_at_10=round(recall, 4),
        build_s=round(case.build_s[engine], 2),
        load_s=round(case.load_s[engine], 2),
        index_mb=round(case.index_mb.get(engine, 0.0), 1),
    )
    table = tables.table(
        f"{case.pg_engine} against hnswlib (HnswIndex, M=32), "
        f"N={N_VECTORS:,} × {DIM}, {N_QUERIES} queries one at a time, k={K}, "
        f"ef_construction={EF_CONSTRUCTION}; latency ms: median (min–max)",
        ("data", "index", "load (COPY)", "build (size)", "ef", "p50 (min–max)", "p99", "recall@10"),
    )
    load, build = "–", f"{case.build_s[engine]:.1f} s"
    if engine in case.index_mb:
        load = f"{case.load_s[engine]:.2f} s"
        build += f" ({case.index_mb[engine]:.0f} MB)"
    table.rows.append(
        (
            case.kind,
            engine,
            load,
            build,
            str(ef),
            _spread(p),
            _fmt(percentile(latencies, 99)),
            f"{recall:.3f}",
        )
    )
