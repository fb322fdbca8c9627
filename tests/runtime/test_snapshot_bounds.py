"""Bounded allocation on the snapshot read path: sizes are checked against the context first."""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from runtime import snapshot as S

llamaffi = pytest.importorskip("llamaffi")

GiB = 1 << 30


@pytest.fixture(scope="module")
def ctx(model: Any) -> Iterator[Any]:
    with model.context(n_ctx=512, n_batch=512, n_seq_max=2, n_threads=2) as c:
        yield c


def _forge(header: S.SnapshotHeader, frames: list[bytes], **changes: Any) -> S.Snapshot:
    """A snapshot with valid checksums around ``frames`` (whatever they hold)."""
    return S.Snapshot.from_bytes(_forged_bytes(header, frames, **changes))


def _forged_bytes(header: S.SnapshotHeader, frames: list[bytes], **changes: Any) -> bytes:
    """:func:`_forge`'s file, not parsed back (a reader may refuse its header)."""
    entries = tuple(S.ChunkEntry(len(f), S.chunk_digest(f)) for f in frames)
    forged = dataclasses.replace(
        header, chunks=entries, compressed_size=sum(e.size for e in entries), **changes
    )
    return S.Snapshot(forged, tuple(frames)).to_bytes()


def _zero_frame(size: int, *, content_size: bool) -> bytes:
    """A zstd frame of ``size`` zero bytes, made in 1 MiB steps (never ``size`` in memory)."""
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
    obj = cctx.compressobj(size=size if content_size else -1)
    block = bytes(1 << 20)
    out = [obj.compress(block) for _ in range(size >> 20)]
    out.append(obj.flush())
    return b"".join(out)


@pytest.fixture(scope="module")
def small(ctx: Any, model: Any) -> S.Snapshot:
    tokens = list(model.tokenize("The quick brown fox jumps over the lazy dog."))
    ctx.decode(tokens, seq_id=0, logits="none")
    snap = S.capture(ctx, 0, tokens)
    ctx.memory.seq_rm(0)
    return snap


def _restore_peak(ctx: Any, snap: S.Snapshot) -> tuple[S.CorruptSnapshotError, int]:
    tracemalloc.start()
    try:
        with pytest.raises(S.CorruptSnapshotError) as info:
            S.restore(ctx, snap, 1)
        return info.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_bound_covers_a_full_window(model: Any) -> None:
    """The bound is above the real state of a full window, and not far above (f16 and q8_0)."""
    for kwargs in ({}, {"type_k": "q8_0", "type_v": "q8_0", "flash_attn": True}):
        with model.context(n_ctx=256, n_batch=256, n_seq_max=2, **kwargs) as c:
            bound = S.max_state_size(c)
            assert S.max_state_size(c) == bound  # cached per context
            c.decode([5 + i % 100 for i in range(c.n_ctx)], seq_id=0, logits="none")
            full = c.seq_state_size(0)
            assert full <= bound <= 1.3 * full + (80 << 10), (kwargs, full, bound)


def test_bound_non_unified(model: Any) -> None:
    with model.context(n_ctx=512, n_batch=256, n_seq_max=2, kv_unified=False) as c:
        c.decode([7] * 256, seq_id=1, logits="none")
        assert c.seq_state_size(1) <= S.max_state_size(c)


def test_identity_is_computed_once_per_context(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    first = S.identity_of(ctx)
    monkeypatch.setattr(llamaffi, "build_info", lambda: pytest.fail("build_info called again"))
    assert S.CacheIdentity.from_context(ctx) is first


def test_forged_terabyte_header_refused_without_allocating(ctx: Any, small: S.Snapshot) -> None:
    raw = 1 << 40
    chunk = S.MAX_CHUNK_SIZE
    n = S.count_chunks(raw, chunk, S.Filter.PLANES2)
    forged = _forge(small.header, [b"\x00" * 3] * n, raw_size=raw, chunk_size=chunk)
    assert forged.header.raw_size == raw  # the checksums are all valid
    err, peak = _restore_peak(ctx, forged)
    assert err.field == "raw_size"
    assert peak < 32 << 20
    assert ctx.memory.pos_max(1) == -1


def test_declared_gigabyte_frames_refused(ctx: Any, small: S.Snapshot) -> None:
    """Frames that really expand to 1 GiB in all, declared honestly in a valid header."""
    frame = _zero_frame(S.MAX_CHUNK_SIZE, content_size=True)
    assert len(frame) < 1 << 20
    forged = _forge(
        small.header, [frame] * 4, raw_size=GiB, chunk_size=S.MAX_CHUNK_SIZE, filter=S.Filter.NONE
    )
    err, peak = _restore_peak(ctx, forged)
    assert err.field == "raw_size" and peak < 32 << 20


def test_zstd_bomb_without_content_size_refused(ctx: Any, small: S.Snapshot) -> None:
    """A 1 GiB bomb in a header whose sizes are plausible: the frame check stops it first."""
    bomb = _zero_frame(GiB, content_size=False)
    header = small.header
    frames = [bomb, *small.chunks[1:]]
    forged = _forge(header, [bytes(f) for f in frames])
    err, peak = _restore_peak(ctx, forged)
    assert err.field.startswith("chunk[0]")
    assert peak < 32 << 20


@pytest.mark.parametrize(
    ("codec", "field"),
    [
        (S.CodecId.ZSTD, "raw_size"),  # refused by size before anything is allocated
        (S.CodecId.STORED, "codec"),  # a stored chunk's frames must be its raw segments
    ],
)
def test_session_resume_quarantines_a_forged_chunk(
    model: Any, tmp_path: Path, codec: S.CodecId, field: str
) -> None:
    from runtime.chunks import ChunkStore
    from runtime.journal import DEFAULT_SEGMENT_ENTRIES
    from runtime.session import SessionPool
    from runtime.session.checkpointer import CheckpointPolicy
    from runtime.storage import LocalJournals

    def open_pool(c: Any) -> SessionPool:
        chunks = ChunkStore(tmp_path / "kv", keep=5)
        policy = CheckpointPolicy.every_turn()
        return SessionPool(
            c,
            LocalJournals(tmp_path, fsync=True, segment_entries=DEFAULT_SEGMENT_ENTRIES),
            chunks=chunks,
            scratch_seq=2,
            n_seq=1,
            policy=policy,
        )

    with model.context(n_ctx=1024, n_batch=128, n_seq_max=3, n_threads=2, kv_unified=True) as c:
        pool = open_pool(c)
        session, _ = pool.get("alice")
        for text in ("My dog is called Biscuit and she loves the beach.", "I moved in March."):
            tokens = c.model.tokenize(f"user: {text}\n", add_special=session.first_turn)
            session.reserve(len(tokens))
            session.append_tokens("user", text, tokens)
        newest = pool.chunks.latest("alice")
        assert newest is not None
        victim = pool.chunks.chunk_path(newest.refs[-1].key)  # the newest one's own tail
        for s in pool.resident():  # crash: no suspend, no final checkpoint
            s.journal.close()
        pool.chunks.close()
        real = S.read(victim)
        n = S.count_chunks(1 << 40, S.MAX_CHUNK_SIZE, real.header.filter)
        forged = _forged_bytes(
            real.header,
            [b"\x01" * 2] * n,
            raw_size=1 << 40,
            chunk_size=S.MAX_CHUNK_SIZE,
            codec=codec,
        )
        victim.write_bytes(forged)
        c.memory.clear()

        pool = open_pool(c)
        session, report = pool.get("alice")
        assert report is not None and report.source == "snapshot"
        assert any(field in s for s in report.skipped)
        assert not victim.exists()
        reasons = list((tmp_path / "kv" / "quarantine").glob("*.reason"))
        assert any(field in p.read_text() for p in reasons)
        assert report.n_tokens == len(session.journal.tokens())
        pool.close()


def test_a_manifest_claiming_huge_chunks_is_refused_before_allocating(
    model: Any, tmp_path: Path
) -> None:
    """A manifest naming a chunk of a terabyte (a bug or a forgery) is refused by size,
    before the restore allocates its buffers, and leaves both sequences empty."""
    from runtime.chunks import ChunkError, ChunkStore

    with (
        model.context(n_ctx=1024, n_batch=128, n_seq_max=3, n_threads=2) as c,
        ChunkStore(tmp_path / "kv") as store,
    ):
        c.decode([5 + i % 50 for i in range(300)], seq_id=0, logits="none")
        tokens = [5 + i % 50 for i in range(300)]
        man = store.commit(
            store.plan_capture(c, 0, tokens, scratch_seq=2, session_id="s", journal_seq=0)
        )
        big = dataclasses.replace(man.chunks[0], raw_size=1 << 40)
        forged = dataclasses.replace(man, chunks=(big, *man.chunks[1:]))
        tracemalloc.start()
        try:
            with pytest.raises(ChunkError) as info:
                store.restore(c, forged, 1, scratch_seq=2)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert info.value.field == "manifest_raw_size" and peak < 64 << 20
        assert c.memory.pos_max(1) == -1 and c.memory.pos_max(2) == -1
        assert store.restore(c, man, 1, scratch_seq=2) == tokens
