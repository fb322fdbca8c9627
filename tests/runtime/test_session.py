"""Sessions: resume from snapshot + journal, fall back to the journal, LRU suspension."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llamaffi import Context, Model
from runtime.session import Session, SessionError, SessionPool
from runtime.snapshot import FILE_SUFFIX

TURNS = [
    ("user", "My dog is called Biscuit and she loves the beach."),
    ("user", "I moved to Lisbon in March."),
    ("user", "Remind me to call the vet on Friday."),
]


@pytest.fixture()
def ctx(model: Model) -> Iterator[Context]:
    c = model.context(n_ctx=1024, n_batch=128, n_seq_max=2, n_threads=2)
    yield c
    c.close()


def next_logits(ctx: Context, seq_id: int, probe: list[int]) -> np.ndarray:
    ctx.decode(probe, seq_id=seq_id)
    return ctx.logits()


def live_logits(ctx: Context, seq_id: int, probe: list[int]) -> np.ndarray:
    """What the live (pre-crash) KV of ``seq_id`` predicts after ``probe``; KV unchanged."""
    scratch = 1 - seq_id
    ctx.memory.seq_rm(scratch)
    ctx.memory.seq_cp(seq_id, scratch)
    out = next_logits(ctx, scratch, probe)
    ctx.memory.seq_rm(scratch)
    return out


def prefill_logits(ctx: Context, tokens: list[int], probe: list[int]) -> np.ndarray:
    """Logits of a from-scratch batched prefill of ``tokens`` in seq 1."""
    ctx.memory.seq_rm(1)
    ctx.decode(tokens, seq_id=1)
    out = next_logits(ctx, 1, probe)
    ctx.memory.seq_rm(1)
    return out


def run_turns(pool: SessionPool, sid: str = "alice") -> list[int]:
    session, report = pool.get(sid)
    assert report is not None and report.source == "empty"
    for role, text in TURNS:
        session.append(role, text)
    session.reply(n_predict=6)
    return session.journal.tokens()


def crash(pool: SessionPool) -> None:
    """Drop the pool like a killed process would: no suspend, no final snapshot."""
    for session in pool._sessions.values():
        session.journal.close()
    pool.store.close()


def test_resume_from_snapshot_is_exact(ctx: Context, tmp_path: Path) -> None:
    pool = SessionPool(ctx, tmp_path)
    tokens = run_turns(pool)
    probe = ctx.model.tokenize(" probe", add_special=False)
    before = live_logits(ctx, 0, probe)
    crash(pool)
    ctx.memory.clear()

    pool = SessionPool(ctx, tmp_path)
    session, report = pool.get("alice")
    assert report is not None
    assert report.source == "snapshot"
    assert report.n_tokens == len(tokens) == report.restored_tokens
    assert report.replayed_tokens == 0
    assert session.journal.tokens() == tokens
    assert np.array_equal(next_logits(ctx, session.seq_id, probe), before)
    pool.close()


def test_turns_after_the_last_snapshot_are_replayed(ctx: Context, tmp_path: Path) -> None:
    pool = SessionPool(ctx, tmp_path, snapshot_every=2)
    session, _ = pool.get("bob")
    for role, text in TURNS:  # snapshots after turn 2 only
        session.append(role, text)
    tokens = session.journal.tokens()
    probe = [42]
    before = live_logits(ctx, 0, probe)
    crash(pool)
    ctx.memory.clear()

    pool = SessionPool(ctx, tmp_path)
    session, report = pool.get("bob")
    assert report is not None and report.source == "snapshot"
    assert report.restored_tokens + report.replayed_tokens == len(tokens)
    assert report.replayed_tokens == len(session.journal[2].tokens)
    # a user turn replays with the same batching as when it was first decoded: bit-exact
    assert np.array_equal(next_logits(ctx, session.seq_id, probe), before)
    pool.close()


def test_damaged_snapshot_falls_back_to_an_older_one(ctx: Context, tmp_path: Path) -> None:
    pool = SessionPool(ctx, tmp_path, keep=5)
    tokens = run_turns(pool)
    probe = [7]
    before = live_logits(ctx, 0, probe)
    newest = pool.store.generations("alice")[0][1]
    crash(pool)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(data)
    ctx.memory.clear()

    pool = SessionPool(ctx, tmp_path, keep=5)
    session, report = pool.get("alice")
    assert report is not None and report.source == "snapshot"
    assert report.snapshot != newest
    assert report.replayed_tokens > 0  # the turns after the older snapshot
    assert not newest.exists()  # quarantined
    assert report.n_tokens == len(tokens)
    # the replayed reply was first decoded token by token: equal up to float rounding
    np.testing.assert_allclose(next_logits(ctx, session.seq_id, probe), before, atol=2e-3)
    pool.close()


def test_no_snapshot_rebuilds_from_the_journal(ctx: Context, tmp_path: Path) -> None:
    pool = SessionPool(ctx, tmp_path)
    tokens = run_turns(pool)
    crash(pool)
    for path in (tmp_path / "snapshots" / "alice").glob(f"*{FILE_SUFFIX}"):
        path.unlink()
    ctx.memory.clear()
    pool = SessionPool(ctx, tmp_path)
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


def plant(pool_root: Path, session_id: str, source: Path) -> Path:
    target = pool_root / "snapshots" / session_id / f"{999999:012d}{FILE_SUFFIX}"
    target.write_bytes(source.read_bytes())
    return target


def test_another_sessions_snapshot_is_not_used(ctx: Context, tmp_path: Path) -> None:
    pool = SessionPool(ctx, tmp_path)
    run_turns(pool, "alice")
    run_turns(pool, "carol")  # same turns, same tokens: only the owner differs
    carol_newest = pool.store.generations("carol")[0][1]
    crash(pool)
    planted = plant(tmp_path, "alice", carol_newest)
    ctx.memory.clear()
    pool = SessionPool(ctx, tmp_path)
    _, report = pool.get("alice")
    assert report is not None and report.source == "snapshot"
    assert report.snapshot != planted
    assert any("belongs to session 'carol'" in s for s in report.skipped)
    assert not planted.exists()  # quarantined
    pool.close()


def test_snapshot_that_diverges_from_the_journal_is_not_used(ctx: Context, tmp_path: Path) -> None:
    other_root = tmp_path / "other"
    with SessionPool(ctx, other_root) as other:
        session, _ = other.get("alice")
        session.append("user", "A completely different conversation.")
        foreign = other.store.generations("alice")[0][1]
        ctx.memory.clear()
        pool = SessionPool(ctx, tmp_path / "main")
        run_turns(pool, "alice")
        crash(pool)
        planted = plant(tmp_path / "main", "alice", foreign)
    ctx.memory.clear()
    pool = SessionPool(ctx, tmp_path / "main")
    _, report = pool.get("alice")
    assert report is not None and report.source == "snapshot"
    assert report.snapshot != planted
    assert any("not a prefix of the journal" in s for s in report.skipped)
    pool.close()


def test_lru_suspension_frees_kv_and_resumes(ctx: Context, tmp_path: Path) -> None:
    with SessionPool(ctx, tmp_path) as pool:  # n_seq_max=2
        a, _ = pool.get("a")
        a.append("user", "first session")
        b, _ = pool.get("b")
        b.append("user", "second session")
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
            b.append("user", "not resident")
        assert len(pool._sessions) == 2  # suspended sessions hold no journal or KV


def test_session_ids_are_validated(ctx: Context, tmp_path: Path) -> None:
    with SessionPool(ctx, tmp_path) as pool:
        for bad in ("../escape", "", "a/b", ".hidden"):
            with pytest.raises(ValueError):
                pool.get(bad)


def test_session_requires_resume(ctx: Context, tmp_path: Path) -> None:
    with SessionPool(ctx, tmp_path) as pool:
        session = Session(ctx, 0, "x", tmp_path, pool.store)
        with pytest.raises(SessionError):
            session.append("user", "hi")
        session.journal.close()


class HashEmbedder:
    """A fast stand-in for MiniLM: deterministic unit vectors from a text hash."""

    model_id = "hash-test"
    dim = 16

    def embed(self, texts: list[str]) -> np.ndarray:
        import hashlib

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


def test_sync_longterm_catches_up_once(ctx: Context, tmp_path: Path) -> None:
    from runtime.memory import MemoryStore
    from runtime.session import sync_longterm

    with (
        SessionPool(ctx, tmp_path) as pool,
        MemoryStore.open(tmp_path / "lt", HashEmbedder()) as memory,
    ):
        session, _ = pool.get("alice")
        session.append("user", TURNS[0][1], meta={"importance": 0.9})
        assert sync_longterm(session, memory) == 1
        session.append("user", TURNS[1][1])
        session.reply(n_predict=3)  # assistant turns are not ingested by default
        # a crash right after memory.add but before the watermark was written:
        mark = session.journal.path.with_suffix(".ingested")
        memory.add(
            TURNS[1][1],
            kind="turn",
            session="alice",
            meta={"journal_seq": 1, "role": "user"},
        )
        mark.write_text("0\n")
        session.append("user", TURNS[2][1])
        assert sync_longterm(session, memory) == 1  # only turn 2: turn 1 was found, not re-added
        assert sync_longterm(session, memory) == 0
        texts = sorted(h.text for h in memory.search(TURNS[0][1], k=10, session="alice"))
        assert texts == sorted(t for _, t in TURNS)
        top = memory.search(TURNS[0][1], k=1)[0]
        assert top.importance == pytest.approx(0.9) and top.meta["journal_seq"] == 0


@pytest.fixture()
def small_ctx(model: Model) -> Iterator[Context]:
    c = model.context(n_ctx=256, n_batch=128, n_seq_max=4, n_threads=2)
    yield c
    c.close()


def test_a_turn_that_does_not_fit_is_refused_before_the_journal(
    small_ctx: Context, tmp_path: Path
) -> None:
    from runtime.session import ContextFullError

    with SessionPool(small_ctx, tmp_path, window="refuse") as pool:
        session, _ = pool.get("long")
        with pytest.raises(ContextFullError):
            for i in range(100):
                session.append("user", f"turn number {i} of a conversation that keeps going")
        n_entries, n_tokens = len(session.journal), session.n_tokens
        assert n_tokens <= small_ctx.n_ctx
        assert small_ctx.memory.pos_max(session.seq_id) == n_tokens - 1  # KV == journal
        with pytest.raises(ContextFullError):
            session.append("user", "still too long " * 20)
        assert len(session.journal) == n_entries  # nothing journalled
        session.reply(n_predict=1000)  # capped to the room that is left
        assert session.n_tokens <= small_ctx.n_ctx
    with SessionPool(small_ctx, tmp_path, window="refuse") as pool:  # and it still resumes
        session, report = pool.get("long")
        assert report is not None and report.n_tokens == session.n_tokens


def test_the_window_shifts_and_resumes_exactly(small_ctx: Context, tmp_path: Path) -> None:
    from runtime.journal import Journal
    from runtime.session import WINDOW_ROLE

    pool = SessionPool(small_ctx, tmp_path)  # window="shift" is the default
    session, _ = pool.get("long")
    first = session.append("system", "You are a helpful assistant.")
    for i in range(60):
        session.append("user", f"turn number {i} of a conversation that keeps going")
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

    pool = SessionPool(small_ctx, tmp_path)
    session, report = pool.get("long")
    assert report is not None and report.source == "snapshot"
    assert session.tokens() == window
    assert np.array_equal(next_logits(small_ctx, session.seq_id, probe), before)
    crash(pool)

    # without snapshots the journal replays every turn and every shift, bit for bit
    for path in (tmp_path / "snapshots" / "long").glob(f"*{FILE_SUFFIX}"):
        path.unlink()
    small_ctx.memory.clear()
    with SessionPool(small_ctx, tmp_path) as pool:
        session, report = pool.get("long")
        assert report is not None and report.source == "journal"
        assert session.tokens() == window
        assert np.array_equal(next_logits(small_ctx, session.seq_id, probe), before)
    with Journal(tmp_path / "journals" / "long.log", readonly=True) as journal:
        texts = [e.text for e in journal if e.role == "user"]
        assert len(texts) == 60  # dropped turns are still in the journal


def test_pool_suspends_others_to_fit_the_shared_cache(small_ctx: Context, tmp_path: Path) -> None:
    with SessionPool(small_ctx, tmp_path) as pool:
        a, _ = pool.get("a")
        for i in range(10):
            a.append("user", f"session a says something fairly long, number {i}")
        b, _ = pool.get("b")
        for i in range(10):
            b.append("user", f"session b says something fairly long, number {i}")
        # 4 sequences but only 256 cells: a had to go for b to grow
        assert a.n_tokens + b.n_tokens > small_ctx.n_ctx
        assert not a.resident and b.resident
        _, report = pool.get("a")
        assert report is not None and report.n_tokens == a.n_tokens
        assert not b.resident


def test_snapshot_failure_never_fails_a_journalled_turn(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.store import StoreWriteError

    with SessionPool(ctx, tmp_path) as pool:
        session, _ = pool.get("alice")

        def enospc(*args: object, **kwargs: object) -> None:
            raise StoreWriteError(28, "No space left on device")

        monkeypatch.setattr(pool.store, "save", enospc)
        entry = session.append("user", TURNS[0][1])  # no exception: the turn is safe
        assert session.snapshot_failures == 1
        assert session.journal[-1] == entry and session.resident
        monkeypatch.undo()
        session.append("user", TURNS[1][1])  # the next turn's snapshot succeeds
        assert session.snapshot_failures == 1
        assert pool.store.latest_valid("alice") is not None


def test_restore_refused_by_llama_keeps_the_file(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime import snapshot as snapshot_mod

    pool = SessionPool(ctx, tmp_path)
    tokens = run_turns(pool)
    files = pool.store.generations("alice")
    crash(pool)
    ctx.memory.clear()

    def refuse(*args: object, **kwargs: object) -> None:
        raise snapshot_mod.RestoreError("no free KV cells right now")

    monkeypatch.setattr(snapshot_mod, "restore", refuse)
    with SessionPool(ctx, tmp_path) as pool:
        _, report = pool.get("alice")
        assert report is not None and report.source == "journal"
        assert report.replayed_tokens == len(tokens)
        assert [p for _, p in files] == [p for _, p in pool.store.generations("alice")]


def test_sync_longterm_never_duplicates_after_a_crash_mid_batch(
    ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.memory import MemoryStore
    from runtime.session import sync_longterm

    with (
        SessionPool(ctx, tmp_path) as pool,
        MemoryStore.open(tmp_path / "lt", HashEmbedder()) as memory,
    ):
        session, _ = pool.get("alice")
        for _, text in TURNS:
            session.append("user", text)
        real_add = memory.add
        calls = 0

        def add_then_crash(*args: object, **kwargs: object) -> str:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise KeyboardInterrupt  # the process dies before the third add
            return real_add(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(memory, "add", add_then_crash)
        with pytest.raises(KeyboardInterrupt):
            sync_longterm(session, memory)
        monkeypatch.undo()
        assert sync_longterm(session, memory) == 1
        texts = [h.text for h in memory.search(TURNS[0][1], k=10, session="alice")]
        assert sorted(texts) == sorted(t for _, t in TURNS)


def test_delete_forgets_a_session(ctx: Context, tmp_path: Path) -> None:
    with SessionPool(ctx, tmp_path) as pool:
        run_turns(pool, "gone")
        pool.delete("gone")
        assert not (tmp_path / "journals" / "gone.log").exists()
        assert pool.store.generations("gone") == []
        _, report = pool.get("gone")
        assert report is not None and report.source == "empty"


def test_replaying_a_shift_gets_room_for_the_longer_window_first(
    small_ctx: Context, tmp_path: Path
) -> None:
    from runtime.session import WINDOW_ROLE

    pool = SessionPool(small_ctx, tmp_path, snapshot_every=0)  # snapshots only on suspend
    a, _ = pool.get("a")
    a.append("system", "You are a helpful assistant.")
    i = 0
    while not any(e.role == WINDOW_ROLE for e in a.journal):
        a.append("user", f"turn {i} " + "blah " * 15)
        i += 1
    a.append("user", "after the shift")
    window = a.tokens()
    crash(pool)  # no snapshot: a comes back from the journal, shift included
    small_ctx.memory.clear()

    with SessionPool(small_ctx, tmp_path, snapshot_every=0) as pool:
        b, _ = pool.get("b")
        while b.n_tokens < small_ctx.n_ctx - len(window) - 5:
            b.append("user", "x")
        a2, report = pool.get("a")  # the replay peaks above the final window: b must go
        assert report is not None and report.source == "journal"
        assert a2.tokens() == window
        assert not b.resident


def test_snapshot_ids_name_their_journal_entry(ctx: Context, tmp_path: Path) -> None:
    from runtime.session import _journal_seq_of

    with SessionPool(ctx, tmp_path) as pool:
        session, _ = pool.get("alice")
        session.append("user", TURNS[0][1])
        session.append("user", TURNS[1][1])
        stored = pool.store.latest_valid("alice")
        assert stored is not None
        assert _journal_seq_of(stored.snapshot.header.snapshot_id) == 1
    assert _journal_seq_of("0123456789abcdef") is None  # a snapshot made elsewhere
    assert _journal_seq_of("j-1-abcdef") == -1


def test_a_snapshot_claiming_the_wrong_entry_is_not_used(ctx: Context, tmp_path: Path) -> None:
    from runtime import snapshot as snapshot_mod

    pool = SessionPool(ctx, tmp_path, keep=5)
    session, _ = pool.get("alice")
    for _, text in TURNS:
        session.append("user", text)
    newest = pool.store.generations("alice")[0][1]
    snap = snapshot_mod.read(newest)
    crash(pool)
    # the same KV, relabelled as if taken after entry 0: its tokens do not match that point
    forged = snapshot_mod.encode(
        snapshot_mod.decode(snap),
        identity=snap.header.identity,
        tokens=snap.tokens,
        seq_id=snap.seq_id,
        pos_min=snap.header.pos_min,
        pos_max=snap.header.pos_max,
        n_ctx=snap.header.n_ctx,
        session_id="alice",
        snapshot_id="j0-forged",
    )
    planted = newest.with_name(f"{999999:012d}{FILE_SUFFIX}")
    snapshot_mod.write(planted, forged)
    ctx.memory.clear()
    with SessionPool(ctx, tmp_path, keep=5) as pool:
        _, report = pool.get("alice")
        assert report is not None and report.snapshot != planted
        assert any("not a prefix" in s for s in report.skipped)


def test_sync_longterm_finds_the_uncertain_entry_among_many_equal_texts(
    ctx: Context, tmp_path: Path
) -> None:
    from runtime.memory import MemoryStore
    from runtime.session import sync_longterm

    with (
        SessionPool(ctx, tmp_path) as pool,
        MemoryStore.open(tmp_path / "lt", HashEmbedder()) as memory,
    ):
        session, _ = pool.get("alice")
        for _ in range(60):  # many equal texts that rank above the uncertain one
            memory.add("ok", kind="turn", session="alice", importance=1.0)
        entry = session.append("user", "ok")
        memory.add("ok", kind="turn", session="alice", meta={"journal_seq": entry.seq})
        # crash before the watermark: the entry is uncertain
        assert sync_longterm(session, memory) == 0
        assert len(memory.find(session="alice", meta_key="journal_seq", value=entry.seq)) == 1
