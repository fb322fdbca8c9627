"""A long-lived session: resume cost follows what is replayed, not the journal's age.

The journal rotates into segments and each chunked checkpoint records its window, so a resume
reads the checkpoint, the window's own entries and whatever came after it. These tests prove
that by damaging the journal's old segments: a resume that walked the whole journal would hit
the damage; ours never reads there.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.chunks import ChunkStore
from runtime.journal import JournalCorruptError
from runtime.session import SessionError, SessionPool
from runtime.session.checkpointer import CheckpointPolicy
from runtime.storage import LocalJournals

llamaffi = pytest.importorskip("llamaffi")

SCRATCH = 3
CTX: dict[str, Any] = {"n_batch": 256, "n_seq_max": 4, "n_threads": 2, "kv_unified": True}


EVERY_TURN = CheckpointPolicy.every_turn()
#: no checkpoint but on suspend and close (or when a test asks for one)
NEVER = CheckpointPolicy(every_tokens=0, every_seconds=0.0, idle_seconds=0.0)


def _pool(ctx: Any, root: Path, policy: CheckpointPolicy = EVERY_TURN) -> SessionPool:
    return SessionPool(
        ctx,
        LocalJournals(root, fsync=False, segment_entries=8),
        policy=policy,
        n_seq=2,
        chunks=ChunkStore(root / "kv"),
        scratch_seq=SCRATCH,
    )


def _talk(pool: SessionPool, sid: str, turns: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    session, _ = pool.get(sid)
    for i in range(turns):
        tokens = [int(t) for t in rng.integers(10, 200, size=int(rng.integers(3, 9)))]
        session.reserve(len(tokens))
        session.append_tokens("user" if i % 2 == 0 else "assistant", f"turn {i}", tokens)


def _damage_first_segment(root: Path, sid: str, keep: set[int]) -> int:
    """Flip a byte in the first record of segment 0 whose seq is not in ``keep``."""
    seg = root / "journals" / f"{sid}.log.000000000000.seg"
    data = bytearray(seg.read_bytes())
    offset = seq = 0
    while seq in keep:
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 12 + length + 4
        seq += 1
    assert offset < len(data), "every entry of segment 0 is in the window"
    data[offset + 20] ^= 0xFF
    seg.write_bytes(bytes(data))
    return seq


def _logits_after(ctx: Any, seq: int, n_tokens: int) -> np.ndarray:
    batch_token = 42
    ctx.decode([batch_token], seq_id=seq, pos=n_tokens)
    out = np.array(ctx.logits(-1), copy=True)
    ctx.memory.seq_rm(seq, n_tokens, -1)
    return out


def test_resume_reads_only_the_checkpointed_window(model: Any, tmp_path: Path) -> None:
    with model.context(n_ctx=256, **CTX) as ctx:  # small: the window shifts many times
        pool = _pool(ctx, tmp_path)
        _talk(pool, "s", 60)
        session, _ = pool.get("s")
        assert session.journal.n_segments >= 3
        assert any(e.role == "window" for e in session.journal)  # shifts happened
        session.checkpoint()
        tokens, messages = session.tokens(), session.messages()
        keep = session.window_seqs()
        want = _logits_after(ctx, session.seq_id, len(tokens))
        pool.close()

        _damage_first_segment(tmp_path, "s", keep)
        pool = _pool(ctx, tmp_path)
        session, report = pool.get("s")
        assert report is not None and report.source == "snapshot"
        assert report.replayed_tokens == 0
        assert session.tokens() == tokens and session.messages() == messages
        got = _logits_after(ctx, session.seq_id, len(tokens))
        assert np.array_equal(got, want)
        with pytest.raises(JournalCorruptError):  # the damage is real: a full walk finds it
            list(session.journal)
        pool.close()


def test_turns_after_the_checkpoint_are_replayed(model: Any, tmp_path: Path) -> None:
    with model.context(n_ctx=256, **CTX) as ctx:
        pool = _pool(ctx, tmp_path)
        _talk(pool, "s", 60)
        session, _ = pool.get("s")
        session.checkpoint()
        pool.close()
        pool = _pool(ctx, tmp_path, policy=NEVER)
        _talk(pool, "s", 5, seed=1)  # journalled, not checkpointed
        session, _ = pool.get("s")
        tokens = session.tokens()
        want = _logits_after(ctx, session.seq_id, len(tokens))
        keep = session.window_seqs()
        session.discard()  # lose the KV without a checkpoint (a crash)
        pool.close()

        _damage_first_segment(tmp_path, "s", keep)
        pool = _pool(ctx, tmp_path)
        session, report = pool.get("s")
        assert report is not None and report.source == "snapshot"
        assert report.replayed_tokens > 0 and session.tokens() == tokens
        got = _logits_after(ctx, session.seq_id, len(tokens))
        assert int(np.argmax(got)) == int(np.argmax(want))
        np.testing.assert_allclose(got, want, atol=1e-3)
        pool.close()


def test_a_forged_window_is_not_trusted(model: Any, tmp_path: Path) -> None:
    """A manifest whose recorded window disagrees with the journal is not used for the
    window: the journal is walked instead (it is the truth)."""
    with model.context(n_ctx=4096, **CTX) as ctx:
        pool = _pool(ctx, tmp_path)
        _talk(pool, "s", 12)
        session, _ = pool.get("s")
        session.checkpoint()
        tokens, messages = session.tokens(), session.messages()
        pool.close()

        with ChunkStore(tmp_path / "kv") as store:
            man = store.latest("s")
        assert man is not None
        spans = [list(span) for span in man.meta["window"]["spans"]]
        spans[1][2] = spans[3][2]  # span 1 claims entry 3 (same length or not: it must fail)
        forged = dataclasses.replace(man, meta={"window": {"spans": spans}})
        (path,) = [
            p
            for p in (tmp_path / "kv" / "manifests").rglob("*")
            if p.is_file() and p.read_bytes() == man.to_bytes()
        ]
        path.write_bytes(forged.to_bytes())

        pool = _pool(ctx, tmp_path)
        session, report = pool.get("s")
        assert session.tokens() == tokens and session.messages() == messages
        assert report is not None and report.source == "snapshot"
        pool.close()


# -- retention (opt-in) ---------------------------------------------------------------------------


def _compacted(ctx: Any, root: Path) -> tuple[list[int], list[tuple[str, str]], int]:
    pool = _pool(ctx, root)
    _talk(pool, "s", 60)
    session, _ = pool.get("s")
    session.checkpoint()
    needs = session.journal_needs()
    assert needs is not None
    from_seq, window = needs
    assert window == session.window_seqs() and 0 in window  # the first turn stays pinned
    segments = session.journal.n_segments
    freed = session.compact_journal(keep_from=len(session.journal))
    assert freed > 0 and session.journal.compacted
    assert 0 < session.journal.n_segments < segments
    for seq in window | set(range(from_seq, len(session.journal))):
        assert session.journal[seq].seq == seq  # everything a resume needs is still there
    tokens, messages = session.tokens(), session.messages()
    pool.close()
    return tokens, messages, from_seq


def test_compaction_keeps_what_a_resume_needs(model: Any, tmp_path: Path) -> None:
    with model.context(n_ctx=256, **CTX) as ctx:
        tokens, messages, _ = _compacted(ctx, tmp_path)
        pool = _pool(ctx, tmp_path)
        session, report = pool.get("s")
        assert report is not None and report.source == "snapshot"
        assert session.tokens() == tokens and session.messages() == messages
        _talk(pool, "s", 3, seed=2)  # and it goes on
        pool.close()


def test_compaction_is_bounded_by_keep_from(model: Any, tmp_path: Path) -> None:
    with model.context(n_ctx=256, **CTX) as ctx:
        pool = _pool(ctx, tmp_path)
        _talk(pool, "s", 60)
        session, _ = pool.get("s")
        session.checkpoint()
        assert session.compact_journal(keep_from=3) == 0  # long-term memory is behind
        assert not session.journal.compacted
        pool.close()


def test_lost_checkpoint_after_compaction_reprefills_the_window(model: Any, tmp_path: Path) -> None:
    """Every KV chunk lost and the old journal compacted away: the window recorded in the
    manifest is decoded afresh (not bit-exact, but the same conversation), not an error."""
    with model.context(n_ctx=256, **CTX) as ctx:
        tokens, messages, _ = _compacted(ctx, tmp_path)
        for chunk in (tmp_path / "kv" / "chunks").rglob("*"):
            if chunk.is_file():
                chunk.unlink()
        pool = _pool(ctx, tmp_path)
        session, report = pool.get("s")
        assert report is not None and report.restored_tokens == 0
        assert any("re-prefilled" in why for why in report.skipped)
        assert session.tokens() == tokens and session.messages() == messages
        assert ctx.memory.pos_max(session.seq_id) == len(tokens) - 1
        _talk(pool, "s", 3, seed=3)
        session, _ = pool.get("s")
        session.checkpoint()
        after = session.tokens()
        pool.close()
        pool = _pool(ctx, tmp_path)
        session, report = pool.get("s")
        assert report is not None and report.source == "snapshot"
        assert session.tokens() == after
        pool.close()


def test_compacted_journal_without_any_checkpoint_is_a_clear_error(
    model: Any, tmp_path: Path
) -> None:
    with model.context(n_ctx=256, **CTX) as ctx:
        _compacted(ctx, tmp_path)
        import shutil

        shutil.rmtree(tmp_path / "kv" / "manifests")
        pool = _pool(ctx, tmp_path)
        with pytest.raises(SessionError, match="retention removed old entries"):
            pool.get("s")
        pool.close()
