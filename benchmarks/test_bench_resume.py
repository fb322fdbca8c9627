"""Resume cost against the journal's age: ``pool.get`` of a session with a current checkpoint.

A session that runs for weeks has a long journal. With a current checkpoint, resuming it must
cost what it replays (nothing here), not what the session ever said. The journal is built at
1k, 10k and 100k entries (short turns, the window shifted as it fills, as a long chat does),
with the KV of its final window checkpointed into the chunk store; then each round opens a
fresh pool and times ``pool.get``. The figure to read is the ratio of 100k to 1k (issue 12:
within 2x).

Setup writes the journal straight through :class:`runtime.journal.Journal` (no decode per
turn: a 100k-turn prefill would take an hour on this model) and decodes only the final window
into the KV before the checkpoint; the checkpoint is therefore self-consistent (its tokens are
the journal's window), which is all a resume checks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.conftest import CI, FULL, rounds
from runtime.chunks import ChunkStore
from runtime.journal import DEFAULT_SEGMENT_ENTRIES, Journal
from runtime.layout import JOURNAL_DIR
from runtime.session import WINDOW_ROLE, ChunkCheckpointer, Session, SessionPool
from runtime.session.checkpointer import CheckpointPolicy
from runtime.storage import LocalJournals

SIZES = (1_000, 10_000, 100_000)
N_CTX = 512
SCRATCH = 3
CTX: dict[str, Any] = {"n_batch": 512, "n_seq_max": 4, "n_threads": 2, "kv_unified": True}


def _write_journal(path: Path, n_entries: int, turn_tokens: int = 6) -> None:
    """``n_entries`` journal entries: alternating user/assistant turns of ``turn_tokens`` ids,
    and a window shift (journalled, as the runtime does) whenever the window would pass 3/4 of
    ``N_CTX``; the shift drops the oldest turns after the first down to half of it."""
    spans: list[int] = []  # token count per turn in the window
    with Journal(path, fsync=False) as journal:
        while len(journal) < n_entries:
            i = len(journal)
            if sum(spans) + turn_tokens > (3 * N_CTX) // 4 and len(spans) > 2:
                a = b = spans[0]
                keep = sum(spans)
                while keep - (b - a) > N_CTX // 2 and len(spans) > 2:
                    b += spans.pop(1)
                journal.append(WINDOW_ROLE, "", (), {"drop": [a, b]})
                continue
            tokens = [10 + (i * 7 + j) % 180 for j in range(turn_tokens)]
            journal.append("user" if i % 2 == 0 else "assistant", f"turn {i}", tokens)
            spans.append(turn_tokens)


@pytest.fixture(scope="module")
def long_sessions(
    bench_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """(context, root): one session per size, each with a checkpoint of its final window."""
    from llamaffi import Model
    from llamaffi.testing import make_model

    path = bench_models_dir / "tiny-resume.gguf"
    if not path.exists():
        make_model(path, preset="tiny")
    root = tmp_path_factory.mktemp("resume")
    with Model(path) as model, model.context(n_ctx=N_CTX, **CTX) as ctx:
        chunks = ChunkStore(root / "kv")
        for n in SIZES if not CI else SIZES[:2]:
            sid = f"s{n}"
            _write_journal(root / JOURNAL_DIR / f"{sid}.log", n)
            # the first open walks the whole journal (no checkpoint yet): setup only
            checkpointer = ChunkCheckpointer(chunks, sid, scratch_seq=SCRATCH)
            journal = Journal(root / JOURNAL_DIR / f"{sid}.log")
            session = Session(ctx, 0, sid, journal, checkpointer)
            ctx.memory.seq_rm(0)
            ctx.decode(session.tokens(), seq_id=0, pos=0)
            # the KV now holds the window: checkpoint it
            checkpointer.take_now(ctx, 0, session.window, journal[-1].seq)
            ctx.memory.seq_rm(0)
            journal.close()
        chunks.close()
        yield ctx, root


@pytest.mark.parametrize("n_entries", SIZES)
def test_pool_get_with_current_checkpoint(
    benchmark: Any, long_sessions: Any, n_entries: int
) -> None:
    """``pool.get`` (open journal, window from the checkpoint, restore its chunks)."""
    if CI and n_entries == SIZES[-1]:
        pytest.skip("CI mode: 100k entries take a minute to build")
    ctx, root = long_sessions
    sid = f"s{n_entries}"
    reports = []

    def setup() -> tuple[tuple[SessionPool], dict[str, Any]]:
        ctx.memory.clear()
        journals = LocalJournals(root, fsync=True, segment_entries=DEFAULT_SEGMENT_ENTRIES)
        pool = SessionPool(
            ctx, journals, n_seq=2, chunks=ChunkStore(root / "kv"), scratch_seq=SCRATCH
        )
        return (pool,), {}

    def run(pool: SessionPool) -> None:
        _, report = pool.get(sid)
        reports.append(report)
        pool.close()

    benchmark.pedantic(run, setup=setup, rounds=rounds(7), iterations=1)
    report = reports[-1]
    assert report is not None and report.source == "snapshot" and report.replayed_tokens == 0
    journal_bytes = sum(
        f.stat().st_size for f in (root / JOURNAL_DIR).glob(f"{sid}.log*") if f.is_file()
    )
    benchmark.extra_info.update(
        {
            "journal_entries": n_entries,
            "journal_bytes": journal_bytes,
            "window_tokens": report.n_tokens,
            "resume_seconds": report.seconds,
        }
    )


def test_full_walk_reference(benchmark: Any, long_sessions: Any) -> None:
    """What every open paid before: reading and parsing every entry (10k here)."""
    _, root = long_sessions
    path = root / JOURNAL_DIR / "s10000.log"

    def walk() -> int:
        with Journal(path, readonly=True) as journal:
            return sum(1 for _ in journal)

    start = time.perf_counter()
    assert walk() == 10_000
    benchmark.extra_info["first_walk_seconds"] = time.perf_counter() - start
    benchmark.pedantic(walk, rounds=rounds(3), iterations=1)


def test_soak_turns_stay_flat(benchmark: Any, bench_models_dir: Path, tmp_path: Path) -> None:
    """20 sessions, 20k short turns with ``BENCH_FULL=1`` (2k by default, 400 in CI mode,
    ``BENCH_SOAK_TURNS`` to choose) round-robin over 3 sequences, so every turn resumes a
    suspended session: turns/s, the resume time, RSS and disk per tenth of the run must stay
    flat as the journals grow (the issue's soak fell from 32.3 to 14.8 turns/s). The journals
    rotate every 256 entries and the opt-in retention compacts them, so disk stays bounded."""
    from llamaffi import Model

    path = bench_models_dir / "tiny-resume.gguf"
    if not path.exists():
        from llamaffi.testing import make_model

        make_model(path, preset="tiny")
    total = int(os.environ.get("BENCH_SOAK_TURNS", 400 if CI else 20_000 if FULL else 2_000))
    block = max(total // 10, 1)
    blocks: list[dict[str, float]] = []

    def soak() -> None:
        with Model(path) as model, model.context(n_ctx=N_CTX, **CTX) as ctx:
            pool = SessionPool(
                ctx,
                LocalJournals(tmp_path, fsync=False, segment_entries=256),
                n_seq=3,
                chunks=ChunkStore(tmp_path / "kv"),
                scratch_seq=SCRATCH,
                policy=CheckpointPolicy.every_turn(),
            )
            start, resume_s = time.perf_counter(), 0.0
            for turn in range(total):
                t0 = time.perf_counter()
                session, report = pool.get(f"user{turn % 20}")
                if report is not None:
                    resume_s += time.perf_counter() - t0
                tokens = [10 + (turn * 7 + j) % 180 for j in range(6)]
                session.reserve(len(tokens))
                session.append_tokens("user", f"turn {turn}", tokens)
                # the opt-in retention, as Runtime(journal_retention="window") applies it
                # (there is no long-term memory here to hold anything back)
                session.compact_journal(keep_from=len(session.journal))
                if (turn + 1) % block == 0:
                    now = time.perf_counter()
                    blocks.append(
                        {
                            "turns_per_s": block / (now - start),
                            "resume_ms": resume_s / block * 1e3,
                            "rss_mb": _rss_mb(),
                            "journal_mb": _du(tmp_path / "journals") / 1e6,
                            "kv_mb": _du(tmp_path / "kv") / 1e6,
                        }
                    )
                    start, resume_s = now, 0.0
            pool.close()

    benchmark.pedantic(soak, rounds=1, iterations=1)
    first, last = blocks[0], blocks[-1]
    benchmark.extra_info.update(
        {
            "turns": total,
            "sessions": 20,
            "first_block_turns_per_s": round(first["turns_per_s"], 1),
            "last_block_turns_per_s": round(last["turns_per_s"], 1),
            "first_block_resume_ms": round(first["resume_ms"], 2),
            "last_block_resume_ms": round(last["resume_ms"], 2),
            "rss_growth": round(last["rss_mb"] / first["rss_mb"] - 1, 4),
            "max_journal_mb": round(max(b["journal_mb"] for b in blocks), 2),
            "max_kv_mb": round(max(b["kv_mb"] for b in blocks), 2),
            "blocks": blocks,
        }
    )


def _rss_mb() -> float:
    """Resident set size now (not the peak), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
