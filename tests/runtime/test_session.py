"""Sessions: resume from a checkpoint + journal, fall back to the journal, LRU suspension."""

from __future__ import annotations

import dataclasses
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llamaffi import Context, Model, Sampler
from runtime.app.batching import Generation
from runtime.chunks import MANIFEST_SUFFIX, ChunkStore
from runtime.errors import PersistError, RestoreError
from runtime.journal import DEFAULT_SEGMENT_ENTRIES, Entry, Journal
from runtime.session import (
    WINDOW_ROLE,
    ChunkCheckpointer,
    ContextFullError,
    Session,
    SessionError,
    SessionPool,
)
from runtime.session.checkpointer import CheckpointPolicy
from runtime.storage import LocalJournals

TURNS = [
    ("user", "My dog is called Biscuit and she loves the beach."),
    ("user", "I moved to Lisbon in March."),
    ("user", "Remind me to call the vet on Friday."),
]
SCRATCH = 3
PROBE_SEQ = 2  # neither a pool sequence (0, 1) nor the scratch one
EVERY_TURN = CheckpointPolicy.every_turn()
#: checkpoints only on suspend and close (or when a test asks for one)
NEVER = CheckpointPolicy(every_tokens=0, every_seconds=0.0, idle_seconds=0.0)


@pytest.fixture()
def ctx(model: Model) -> Iterator[Context]:
    c = model.context(n_ctx=1024, n_batch=128, n_seq_max=4, n_threads=2, kv_unified=True)
    yield c
    c.close()


@pytest.fixture()
def small_ctx(model: Model) -> Iterator[Context]:
    c = model.context(n_ctx=256, n_batch=128, n_seq_max=4, n_threads=2, kv_unified=True)
    yield c
    c.close()


def make_pool(
    ctx: Context, root: Path, *, policy: CheckpointPolicy = EVERY_TURN, keep: int = 2, **kw: Any
) -> SessionPool:
    chunks = ChunkStore(root / "kv", keep=keep, chunk_tokens=32)
    journals = LocalJournals(root, fsync=True, segment_entries=DEFAULT_SEGMENT_ENTRIES)
    return SessionPool(
        ctx, journals, chunks=chunks, scratch_seq=SCRATCH, n_seq=2, policy=policy, **kw
    )


def say(session: Session, role: str, text: str) -> Entry:
    """One turn rendered as ``role: text`` on its own line (room made first)."""
    model = session.ctx.model
    tokens = model.tokenize(f"{role}: {text}\n", add_special=session.first_turn)
    session.reserve(len(tokens))
    return session.append_tokens(role, text, tokens)


def reply(session: Session, n_predict: int = 6) -> Entry:
    """A greedy reply of at most ``n_predict`` tokens, closed by a newline."""
    newline = session.ctx.model.tokenize("\n", add_special=False)
    session.reserve(n_predict + len(newline))
    gen = Generation(session, n_predict, Sampler.greedy(), close=lambda _text: newline)
    entry, _ = gen.run_alone()
    return entry


def next_logits(ctx: Context, seq_id: int, probe: list[int]) -> np.ndarray:
    ctx.decode(probe, seq_id=seq_id)
    return ctx.logits()


def live_logits(ctx: Context, seq_id: int, probe: list[int]) -> np.ndarray:
    """What the live (pre-crash) KV of ``seq_id`` predicts after ``probe``; KV unchanged."""
    ctx.memory.seq_rm(PROBE_SEQ)
    ctx.memory.seq_cp(seq_id, PROBE_SEQ)
    out = next_logits(ctx, PROBE_SEQ, probe)
    ctx.memory.seq_rm(PROBE_SEQ)
    return out


def prefill_logits(ctx: Context, tokens: list[int], probe: list[int]) -> np.ndarray:
    """Logits of a from-scratch batched prefill of ``tokens``."""
    ctx.memory.seq_rm(PROBE_SEQ)
    ctx.decode(tokens, seq_id=PROBE_SEQ)
    out = next_logits(ctx, PROBE_SEQ, probe)
    ctx.memory.seq_rm(PROBE_SEQ)
    return out


def run_turns(pool: SessionPool, sid: str = "alice") -> list[int]:
    session, report = pool.get(sid)
    assert report is not None and report.source == "empty"
    for role, text in TURNS:
        say(session, role, text)
    reply(session)
    return session.journal.tokens()


def crash(pool: SessionPool) -> None:
    """Drop the pool like a killed process would: no suspend, no final checkpoint."""
    for session in pool.resident():
        session.journal.close()
    pool.chunks.close()


def manifest_files(root: Path, sid: str) -> list[Path]:
    return sorted((root / "kv" / "manifests" / sid).glob(f"*{MANIFEST_SUFFIX}"), reverse=True)


def test_resume_from_a_checkpoint_is_exact(ctx: Context, tmp_path: Path) -> None:
    pool = make_pool(ctx, tmp_path)
    tokens = run_turns(pool)
    probe = ctx.model.tokenize(" probe", add_special=False)
    before = live_logits(ctx, 0, probe)
    crash(pool)
    ctx.memory.clear()

    pool = make_pool(ctx, tmp_path)
    session, report = pool.get("alice")
    assert report is not None
    assert report.source == "snapshot"
    assert report.n_tokens == len(tokens) == report.restored_tokens
    assert report.replayed_tokens == 0
    assert session.journal.tokens() == tokens
    assert np.array_equal(next_logits(ctx, session.seq_id, probe), before)
    pool.close()


def test_turns_after_the_last_checkpoint_are_replayed(ctx: Context, tmp_path: Path) -> None:
    pool = make_pool(ctx, tmp_path, policy=NEVER)
    session, _ = pool.get("bob")
    for i, (role, text) in enumerate(TURNS):
        say(session, role, text)
        if i == 1:
            session.checkpoint()  # after turn 2 only
    tokens = session.journal.tokens()
    probe = [42]
    before = live_logits(ctx, 0, probe)
    crash(pool)
    ctx.memory.clear()

    pool = make_pool(ctx, tmp_path)
    session, report = pool.get("bob")
    assert report is not None and report.source == "snapshot"
    assert report.restored_tokens + report.replayed_tokens == len(tokens)
    assert report.replayed_tokens == len(session.journal[2].tokens)
    # a user turn replays with the same batching as when it was first decoded: bit-exact
    assert np.array_equal(next_logits(ctx, session.seq_id, probe), before)
    pool.close()


def test_damaged_checkpoint_falls_back_to_an_older_one(ctx: Context, tmp_path: Path) -> None:
    pool = make_pool(ctx, tmp_path, keep=5)
    tokens = run_turns(pool)
    probe = [7]
    before = live_logits(ctx, 0, probe)
    newest = manifest_files(tmp_path, "alice")[0]
    crash(pool)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(data)
    ctx.memory.clear()

    pool = make_pool(ctx, tmp_path, keep=5)
    session, report = pool.get("alice")
    assert report is not None and report.source == "snapshot"
    assert report.replayed_tokens > 0  # the turns after the older checkpoint
    assert not newest.exists()  # quarantined
    assert list((newest.parent / "quarantine").glob(f"{newest.name}.*"))
    assert report.n_tokens == len(tokens)
    # the replayed reply was first decoded token by token: equal up to float rounding
    np.testing.assert_allclose(next_logits(ctx, session.seq_id, probe), before, atol=2e-3)
    pool.close()


def test_no_checkpoint_rebuilds_from_the_journal(ctx: Context, tmp_path: Path) -> None:
    pool = make_pool(ctx, tmp_path)
    tokens = run_turns(pool)
    crash(pool)
    shutil.rmtree(tmp_path / "kv")
    ctx.memory.clear()
    pool = make_pool(ctx, tmp_path)
    session, report = pool.get("alice")
    assert report is not None
    assert (report.source, report.restored_tokens, report.replayed_tokens) == (
        "journal",
        0,
        len(tokens),
    )
    probe = [9]
    got = next_logits(ctx, session.seq_id, probe)
    np.testing.assert_allclose(got, prefill_logits(ctx, tokens, probe), atol=2e-3)
    pool.close()


def test_another_sessions_manifest_is_not_used(ctx: Context, tmp_path: Path) -> None:
    pool = make_pool(ctx, tmp_path)
    alice = run_turns(pool, "alice")
    run_turns(pool, "carol")  # same turns, same tokens: only the owner differs
    carol, _ = pool.get("carol")
    say(carol, "user", "one more")  # carol's newest generation is past alice's
    carol_newest = manifest_files(tmp_path, "carol")[0]
    crash(pool)
    planted = tmp_path / "kv" / "manifests" / "alice" / carol_newest.name
    assert not planted.exists()
    planted.write_bytes(carol_newest.read_bytes())
    ctx.memory.clear()
    pool = make_pool(ctx, tmp_path)
    session, report = pool.get("alice")
    assert report is not None and report.source == "snapshot"
    assert report.restored_tokens == len(alice) and session.journal.tokens() == alice
    assert not planted.exists()  # quarantined: the body names another session
    reasons = list((planted.parent / "quarantine").glob("*.reason"))
    assert any("session_id" in p.read_text() for p in reasons)
    pool.close()


def test_a_manifest_that_diverges_from_the_journal_is_not_used(
    ctx: Context, tmp_path: Path
) -> None:
    with make_pool(ctx, tmp_path / "other") as other:
        session, _ = other.get("alice")
        for i in range(8):  # a later generation than the main root's
            say(session, "user", f"A completely different conversation, part {i}.")
        foreign = manifest_files(tmp_path / "other", "alice")[0]
        ctx.memory.clear()
    pool = make_pool(ctx, tmp_path / "main")
    tokens = run_turns(pool, "alice")
    crash(pool)
    planted = tmp_path / "main" / "kv" / "manifests" / "alice" / foreign.name
    assert not planted.exists()
    planted.write_bytes(foreign.read_bytes())
    ctx.memory.clear()
    pool = make_pool(ctx, tmp_path / "main")
    session, report = pool.get("alice")
    assert report is not None and report.source == "snapshot"
    assert session.journal.tokens() == tokens and report.restored_tokens == len(tokens)
    assert any("not the window after journal entry" in s for s in report.skipped)
    pool.close()


def test_a_manifest_claiming_the_wrong_entry_is_not_used(ctx: Context, tmp_path: Path) -> None:
    pool = make_pool(ctx, tmp_path, keep=5)
    session, _ = pool.get("alice")
    for _, text in TURNS:
        say(session, "user", text)
    newest = pool.chunks.manifests("alice")[0]
    assert newest.journal_seq == 2  # a manifest names the journal entry it follows
    crash(pool)
    # the same KV, relabelled as if taken after entry 0 and without its window record: its
    # tokens are not the window there, and the claim is checked, never trusted
    forged = dataclasses.replace(newest, generation=newest.generation + 1, journal_seq=0, meta={})
    planted = tmp_path / "kv" / "manifests" / "alice" / f"{forged.generation:012d}{MANIFEST_SUFFIX}"
    planted.write_bytes(forged.to_bytes())
    ctx.memory.clear()
    with make_pool(ctx, tmp_path, keep=5) as pool:
        _, report = pool.get("alice")
        assert report is not None and report.source == "snapshot"
        assert any(
            f"manifest {forged.generation}: its tokens are not the window after journal entry 0"
            in s
            for s in report.skipped
        )


def test_lru_suspension_frees_kv_and_resumes(ctx: Context, tmp_path: Path) -> None:
    with make_pool(ctx, tmp_path) as pool:  # two sequences for sessions
        a, _ = pool.get("a")
        say(a, "user", "first session")
        b, _ = pool.get("b")
        say(b, "user", "second session")
        a_tokens = a.journal.tokens()
        c, _ = pool.get("c")  # evicts "a", the least recently used
        assert not a.resident and b.resident and c.resident
        assert c.seq_id == 0  # took a's slot
        assert ctx.memory.pos_max(0) == -1
        a2, report = pool.get("a")  # evicts "b"
        assert report is not None and report.source == "snapshot"
        assert report.n_tokens == len(a_tokens) and a2.journal.tokens() == a_tokens
        assert not b.resident
        with pytest.raises(SessionError, match=r"pool\.get"):
            say(b, "user", "not resident")
        assert len(pool.resident()) == 2  # suspended sessions hold no journal or KV


def test_session_ids_are_validated(ctx: Context, tmp_path: Path) -> None:
    with make_pool(ctx, tmp_path) as pool:
        for bad in ("../escape", "", "a/b", ".hidden"):
            with pytest.raises(ValueError):
                pool.get(bad)


def test_session_requires_resume(ctx: Context, tmp_path: Path) -> None:
    with ChunkStore(tmp_path / "kv") as chunks:
        journal = Journal(tmp_path / "journals" / "x.log")
        session = Session(ctx, 0, "x", journal, ChunkCheckpointer(chunks, "x", scratch_seq=SCRATCH))
        with pytest.raises(SessionError):
            say(session, "user", "hi")
        session.journal.close()


def test_a_turn_that_does_not_fit_is_refused_before_the_journal(
    small_ctx: Context, tmp_path: Path
) -> None:
    with make_pool(small_ctx, tmp_path, overflow="refuse") as pool:
        session, _ = pool.get("long")
        with pytest.raises(ContextFullError):
            for i in range(100):
                say(session, "user", f"turn number {i} of a conversation that keeps going")
        n_entries, n_tokens = len(session.journal), session.n_tokens
        assert n_tokens <= small_ctx.n_ctx
        assert small_ctx.memory.pos_max(session.seq_id) == n_tokens - 1  # KV == journal
        with pytest.raises(ContextFullError):
            say(session, "user", "still too long " * 20)
        assert len(session.journal) == n_entries  # nothing journalled
    with make_pool(small_ctx, tmp_path, overflow="refuse") as pool:  # and it still resumes
        session, report = pool.get("long")
        assert report is not None and report.n_tokens == session.n_tokens == n_tokens


def test_the_window_shifts_and_resumes_exactly(small_ctx: Context, tmp_path: Path) -> None:
    pool = make_pool(small_ctx, tmp_path)  # overflow="shift" is the default
    session, _ = pool.get("long")
    first = say(session, "system", "You are a helpful assistant.")
    for i in range(60):
        say(session, "user", f"turn number {i} of a conversation that keeps going")
    seq = session.seq_id
    assert session.n_tokens <= small_ctx.n_ctx
    window = session.tokens()
    assert window[: len(first.tokens)] == list(first.tokens)  # the first turn is kept
    assert small_ctx.memory.pos_min(seq) == 0
    assert small_ctx.memory.pos_max(seq) == len(window) - 1  # positions stay contiguous
    shifts = [e for e in session.journal if e.role == WINDOW_ROLE]
    assert shifts and len(session.journal) == 61 + len(shifts)  # every turn is journalled
    probe = [42]
    before = live_logits(small_ctx, seq, probe)
    crash(pool)
    small_ctx.memory.clear()

    pool = make_pool(small_ctx, tmp_path)
    session, report = pool.get("long")
    assert report is not None and report.source == "snapshot"
    assert session.tokens() == window
    assert np.array_equal(next_logits(small_ctx, session.seq_id, probe), before)
    crash(pool)

    # without checkpoints the journal replays every turn and every shift, bit for bit
    shutil.rmtree(tmp_path / "kv")
    small_ctx.memory.clear()
    with make_pool(small_ctx, tmp_path) as pool:
        session, report = pool.get("long")
        assert report is not None and report.source == "journal"
        assert session.tokens() == window
        assert np.array_equal(next_logits(small_ctx, session.seq_id, probe), before)
    with Journal(tmp_path / "journals" / "long.log", readonly=True) as journal:
        texts = [e.text for e in journal if e.role == "user"]
        assert len(texts) == 60  # dropped turns are still in the journal


def test_pool_suspends_others_to_fit_the_shared_cache(small_ctx: Context, tmp_path: Path) -> None:
    with make_pool(small_ctx, tmp_path) as pool:
        a, _ = pool.get("a")
        for i in range(10):
            say(a, "user", f"session a says something fairly long, number {i}")
        b, _ = pool.get("b")
        for i in range(10):
            say(b, "user", f"session b says something fairly long, number {i}")
        # two sequences but only 256 cells: a had to go for b to grow
        assert a.n_tokens + b.n_tokens > small_ctx.n_ctx
        assert not a.resident and b.resident
        _, report = pool.get("a")
        assert report is not None and report.n_tokens == a.n_tokens
        assert not b.resident


def test_checkpoint_failure_never_fails_a_journalled_turn(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_pool(ctx, tmp_path) as pool:
        session, _ = pool.get("alice")

        def enospc(*args: object, **kwargs: object) -> None:
            raise PersistError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(pool.chunks, "commit", enospc)
        entry = say(session, "user", TURNS[0][1])  # no exception: the turn is safe
        assert session.checkpoint_failures == 1
        assert session.journal[-1] == entry and session.resident
        assert pool.chunks.latest("alice") is None
        monkeypatch.undo()
        say(session, "user", TURNS[1][1])  # the next turn's checkpoint succeeds
        assert session.checkpoint_failures == 1
        latest = pool.chunks.latest("alice")
        assert latest is not None and latest.journal_seq == 1


def test_restore_refused_by_llama_keeps_the_files(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool(ctx, tmp_path)
    tokens = run_turns(pool)
    files = manifest_files(tmp_path, "alice")
    chunk_files = sorted((tmp_path / "kv" / "chunks").rglob("*.kvsnap"))
    crash(pool)
    ctx.memory.clear()

    def refuse(*args: object, **kwargs: object) -> None:
        raise RestoreError("no free KV cells right now")

    monkeypatch.setattr(ChunkStore, "restore", refuse)
    with make_pool(ctx, tmp_path) as pool:
        _, report = pool.get("alice")
        assert report is not None and report.source == "journal"
        assert report.replayed_tokens == len(tokens)
        assert manifest_files(tmp_path, "alice") == files
        assert sorted((tmp_path / "kv" / "chunks").rglob("*.kvsnap")) == chunk_files


def test_delete_forgets_a_session(ctx: Context, tmp_path: Path) -> None:
    with make_pool(ctx, tmp_path) as pool:
        run_turns(pool, "gone")
        pool.delete("gone")
        assert not (tmp_path / "journals" / "gone.log").exists()
        assert pool.chunks.manifests("gone") == []
        assert not (tmp_path / "kv" / "manifests" / "gone").exists()
        _, report = pool.get("gone")
        assert report is not None and report.source == "empty"


def test_replaying_a_shift_gets_room_for_the_longer_window_first(
    small_ctx: Context, tmp_path: Path
) -> None:
    pool = make_pool(small_ctx, tmp_path, policy=NEVER)  # checkpoints only on suspend
    a, _ = pool.get("a")
    say(a, "system", "You are a helpful assistant.")
    i = 0
    while not any(e.role == WINDOW_ROLE for e in a.journal):
        say(a, "user", f"turn {i} " + "blah " * 15)
        i += 1
    say(a, "user", "after the shift")
    window = a.tokens()
    crash(pool)  # no checkpoint: a comes back from the journal, shift included
    small_ctx.memory.clear()

    with make_pool(small_ctx, tmp_path, policy=NEVER) as pool:
        b, _ = pool.get("b")
        while b.n_tokens < small_ctx.n_ctx - len(window) - 5:
            say(b, "user", "x")
        a2, report = pool.get("a")  # the replay peaks above the final window: b must go
        assert report is not None and report.source == "journal"
        assert a2.tokens() == window
        assert not b.resident
