"""Dedup through the runtime: 20 sessions that open with the same ~1,000-token system prompt
keep its chunks once on disk, and ``Runtime.stats()`` reports the bytes that saves."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llamaffi")

from runtime.app import Runtime

SESSIONS = 20


def _system_prompt(rt: Runtime, target: int) -> str:
    """A system prompt of at most ``target`` tokens, within one sentence of it."""
    sentence = (
        "You keep notes about the user's projects, and you answer in short, plain sentences. "
    )
    text = sentence
    while len(rt.model.tokenize(text + sentence)) <= target:
        text += sentence
    return text


def test_twenty_sessions_share_the_system_prompt_chunks(tmp_path: Path) -> None:
    with Runtime.open(tmp_path / "probe", model="tiny", embedder=False) as probe:
        system = _system_prompt(probe, 1000)
        assert 975 <= len(probe.model.tokenize(system)) <= 1000
    with Runtime.open(
        tmp_path / "data",
        model="tiny",
        n_ctx=2048,
        max_resident=2,
        embedder=False,
        system_prompt=system,
    ) as rt:
        assert rt._chunks is not None
        chunk_tokens = rt._chunks.chunk_tokens
        for i in range(SESSIONS):
            rt.chat(f"user-{i:02d}", f"Hello, I am user number {i}.", max_tokens=3, seed=i)
        rt.checkpoint()
        for i in range(SESSIONS):  # evicted sessions were checkpointed when suspended
            rt.suspend(f"user-{i:02d}")
        mans = [rt._chunks.latest(f"user-{i:02d}") for i in range(SESSIONS)]
        assert all(m is not None for m in mans)
        stats = rt.stats()["snapshots"]
    chunk_stats = stats["chunks"]
    # every session's first chunks hold only the system prompt: the same keys everywhere
    first = mans[0]
    assert first is not None
    shared = [r for r in first.chunks if r.end <= 900]  # well inside the ~1,000-token prompt
    assert len(shared) == 900 // chunk_tokens == 3
    for man in mans:
        assert man is not None
        assert [r.key for r in man.chunks[: len(shared)]] == [r.key for r in shared]
    shared_bytes = sum(r.file_size for r in shared)
    assert chunk_stats["sessions"] == SESSIONS
    assert chunk_stats["dedup_saved_bytes"] >= (SESSIONS - 1) * shared_bytes
    assert stats["dedup_saved_bytes"] == chunk_stats["dedup_saved_bytes"]
    # on disk: the shared chunks once, plus what each session holds on its own
    own_keys = {r.key for m in mans if m is not None for r in m.refs} - {r.key for r in shared}
    assert chunk_stats["chunks"] == len(shared) + len(own_keys)
    assert (
        chunk_stats["chunk_bytes"]
        == chunk_stats["logical_bytes"] - chunk_stats["dedup_saved_bytes"]
    )
    assert chunk_stats["chunk_bytes"] < 0.35 * chunk_stats["logical_bytes"]
