"""MemoryStore: durability, recovery of the derived index, scoring, locking, the CLI."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime.embed import EmbedStats
from runtime.errors import ClosedError, LockedError, ReadOnlyError, StoreMismatchError
from runtime.longterm import MemoryStore, ScoringWeights
from runtime.longterm.db import DB_NAME, TOUCH_FLUSH_EVERY
from runtime.longterm.manifest import MANIFEST_NAME
from tests.runtime.memory_helpers import HashEmbedder

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("memory_crash_child.py")
DAY = 86400.0


def open_store(directory: Path, **kwargs: object) -> MemoryStore:
    return MemoryStore(directory, HashEmbedder(), **kwargs)  # type: ignore[arg-type]


def blob_of(directory: Path) -> Path:
    (blob,) = directory.glob("index-*.hnsw")
    return blob


def fill(directory: Path, n: int = 50) -> dict[str, str]:
    with open_store(directory) as store:
        ids = store.add_many([f"fact {i}" for i in range(n)])
    return dict(zip(ids, (f"fact {i}" for i in range(n)), strict=True))


def assert_all_found(store: MemoryStore, items: dict[str, str]) -> None:
    assert len(store) == len(items)
    for item_id, text in items.items():
        got = store.get(item_id)
        assert got is not None and got.text == text
        hits = store.search(text, 3, touch=False)
        assert hits[0].id == item_id, (text, [h.text for h in hits])
        assert hits[0].similarity == pytest.approx(1.0, abs=1e-5)


# -- basics ---------------------------------------------------------------------------------


def test_add_get_delete_search(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        a = store.add("alpha", kind="fact", session="s1", importance=0.9, meta={"src": "x"})
        b = store.add("beta", kind="turn", session="s2")
        item = store.get(a)
        assert item is not None
        assert (item.text, item.kind, item.session, item.importance, item.meta) == (
            "alpha",
            "fact",
            "s1",
            0.9,
            {"src": "x"},
        )
        assert [h.id for h in store.search("beta", 1)] == [b]
        assert [h.id for h in store.search("beta", 5, session="s1")] == [a]
        assert [h.id for h in store.search("alpha", 5, kinds=["turn"])] == [b]
        assert store.delete(a) is True
        assert store.delete(a) is False
        assert store.get(a) is None
        assert [h.id for h in store.search("alpha", 5)] == [b]
        stats = store.stats()
        assert stats["items"] == 1 and stats["index_live"] == 1


def test_bad_input(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        with pytest.raises(ValueError):
            store.add("x", kind="diary")
        with pytest.raises(ValueError):
            store.add("x", importance=1.5)
        with pytest.raises(TypeError):
            store.add(None)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            store.add("   ")
        with pytest.raises(ValueError):
            store.add("x", meta={"bad": float("nan")})
        with pytest.raises(ValueError):
            store.search("x", 0)
        with pytest.raises(ValueError):
            store.search("x", 3, kinds=["diary"])
        assert len(store) == 0


def test_closed_store_raises(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.close()
    store.close()
    with pytest.raises(ClosedError):
        store.add("x")
    with pytest.raises(ClosedError):
        store.search("x")


def test_reopen_with_another_model_is_refused(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    with pytest.raises(StoreMismatchError):
        MemoryStore(tmp_path, HashEmbedder(model_id="other"))  # type: ignore[arg-type]
    with pytest.raises(StoreMismatchError):
        MemoryStore(tmp_path, HashEmbedder(dim=16))  # type: ignore[arg-type]


def test_delete_and_reuse_keeps_slots_bounded(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        ids = store.add_many([f"item {i}" for i in range(100)])
        for item_id in ids[:60]:
            store.delete(item_id)
        store.add_many([f"new item {i}" for i in range(60)])
        stats = store.stats()
        assert stats["items"] == 100
        assert stats["index_slots"] == 100  # deleted slots were reused, none added


def test_filtered_search_over_a_large_allowed_set_uses_the_graph(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add_many([f"x{i}" for i in range(300)], session="a")
        target = store.add("needle", session="b")
        import runtime.longterm.index as memory

        old = memory.EXACT_FILTER_LIMIT
        memory.EXACT_FILTER_LIMIT = 10  # force the hnswlib filter path
        try:
            hits = store.search("needle", 5, session="b")
        finally:
            memory.EXACT_FILTER_LIMIT = old
        assert [h.id for h in hits] == [target]


# -- scoring --------------------------------------------------------------------------------


def test_recency_and_importance_break_ties(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    with open_store(tmp_path) as store:
        old = store.add("same text", now=now - 30 * DAY, importance=0.5)
        new = store.add("same text", now=now - 1 * DAY, importance=0.5)
        hits = store.search("same text", 2, now=now, touch=False)
        assert [h.id for h in hits] == [new, old]
        assert hits[0].recency == pytest.approx(0.5 ** (1 / 7))
        important = store.add("same text", now=now - 30 * DAY, importance=1.0)
        hits = store.search("same text", 3, now=now, touch=False)
        assert hits[0].id == new and hits[1].id == important


def test_search_touches_last_access(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    with open_store(tmp_path) as store:
        item_id = store.add("remember me", now=now - 10 * DAY)
        store.search("remember me", 1, now=now)
        item = store.get(item_id)
        assert item is not None and item.accessed == now and item.stored_at == now - 10 * DAY


def test_relevance_dominates_by_default(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    with open_store(tmp_path) as store:
        target = store.add("the query itself", now=now - 365 * DAY, importance=0.0)
        store.add_many([f"fresh noise {i}" for i in range(20)], now=now, importance=1.0)
        assert store.search("the query itself", 1, now=now)[0].id == target


def test_weights_validation() -> None:
    with pytest.raises(ValueError):
        ScoringWeights(recency=-1.0)
    with pytest.raises(ValueError):
        ScoringWeights(half_life_s=0.0)
    w = ScoringWeights(relevance=1, recency=0, importance=0)
    assert w.score(0.3, 1.0, 1.0) == pytest.approx(0.3)


# -- recovery of the derived index ------------------------------------------------------------


def _truncate(d: Path) -> None:
    blob = blob_of(d)
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])


def _garbage(d: Path) -> None:
    blob = blob_of(d)
    blob.write_bytes(os.urandom(blob.stat().st_size))


def _flip(d: Path) -> None:
    blob = blob_of(d)
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0x40
    blob.write_bytes(bytes(data))


def _delete_blob(d: Path) -> None:
    blob_of(d).unlink()


def _delete_all(d: Path) -> None:
    blob_of(d).unlink()
    (d / MANIFEST_NAME).unlink()


def _garbage_manifest(d: Path) -> None:
    (d / MANIFEST_NAME).write_bytes(b"not a manifest")


@pytest.mark.parametrize(
    "damage", [_truncate, _garbage, _flip, _delete_blob, _delete_all, _garbage_manifest]
)
def test_damaged_index_is_rebuilt(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    items = fill(tmp_path, 40)
    damage(tmp_path)  # type: ignore[operator]
    with open_store(tmp_path) as store:
        assert store.recovered
        assert_all_found(store, items)
    with open_store(tmp_path) as store:
        assert store.recovered == ""  # the rebuilt index was saved


def test_index_from_another_store_is_rebuilt(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    items = fill(a, 30)
    fill(b, 30)
    for f in a.glob("index*"):
        f.unlink()
    for f in b.glob("index*"):
        shutil.copy(f, a / f.name)
    with open_store(a) as store:
        assert "another store" in store.recovered
        assert_all_found(store, items)


def test_unsaved_adds_and_deletes_are_replayed(tmp_path: Path) -> None:
    items = fill(tmp_path, 20)
    store = open_store(tmp_path, save_every=10_000)
    extra = store.add_many([f"late {i}" for i in range(5)])
    items.update(zip(extra, (f"late {i}" for i in range(5)), strict=True))
    gone = next(iter(items))
    store.delete(gone)
    del items[gone]
    # simulate a crash: drop the handles without saving the index
    store._keeper().dirty = 0  # close then skips the save, as a killed process would
    store.close()
    with open_store(tmp_path) as reopened:
        assert reopened.recovered == ""
        assert_all_found(reopened, items)
        assert all(h.id != gone for h in reopened.search("fact 0", 5))


def test_second_writer_gets_a_clear_error(tmp_path: Path) -> None:
    with open_store(tmp_path):
        code = (
            "import sys; sys.path.insert(0, sys.argv[2])\n"
            "from runtime.longterm import MemoryStore\n"
            "from runtime.errors import LockedError\n"
            "from tests.runtime.memory_helpers import HashEmbedder\n"
            "try:\n"
            "    MemoryStore(sys.argv[1], HashEmbedder())\n"
            "except LockedError as e:\n"
            "    print('locked:', e); sys.exit(3)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 3, proc.stderr
        assert "already open for writing" in proc.stdout
        with pytest.raises(LockedError):
            open_store(tmp_path)


def test_read_only_store_works_beside_a_writer(tmp_path: Path) -> None:
    items = fill(tmp_path, 10)
    with open_store(tmp_path) as writer:
        extra = writer.add("added while open")
        reader = open_store(tmp_path, read_only=True)
        try:
            assert len(reader) == 11
            assert reader.search("added while open", 1)[0].id == extra
            assert reader.search(items[next(iter(items))], 1)[0].id == next(iter(items))
            with pytest.raises(ReadOnlyError):
                reader.add("nope")
        finally:
            reader.close()


# -- kill -9 ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_never_loses_an_acknowledged_add(tmp_path: Path) -> None:
    rng = random.Random(1234)
    acknowledged: dict[str, str] = {}
    start = 0
    for _round in range(30):
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(tmp_path), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        lines = out.splitlines()
        for line in lines:
            item_id, sep, text = line.partition("\t")
            if sep:  # the last line may be torn by the kill: only complete lines count
                acknowledged[item_id] = text
        start += len(lines) + 1
        with open_store(tmp_path) as store:
            for item_id, text in acknowledged.items():
                item = store.get(item_id)
                assert item is not None, f"round {_round}: lost {item_id} ({text})"
                assert item_id in [h.id for h in store.search(text, 5, touch=False)]
    assert len(acknowledged) > 30


# -- CLI --------------------------------------------------------------------------------------


def test_cli_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import runtime.cli.memory_cmd as cli_memory
    from runtime.cli import main

    monkeypatch.setattr(cli_memory, "_embedder", lambda args: HashEmbedder())
    d = str(tmp_path / "store")
    assert (
        main(
            [
                "memory",
                "add",
                "--dir",
                d,
                "the sky is blue",
                "--kind",
                "fact",
                "--importance",
                "0.8",
                "--meta",
                '{"a": 1}',
            ]
        )
        == 0
    )
    item_id = capsys.readouterr().out.strip()
    assert main(["memory", "search", "--dir", d, "the sky is blue", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert item_id in out and "the sky is blue" in out
    assert main(["memory", "stats", "--dir", d]) == 0
    assert '"items": 1' in capsys.readouterr().out
    assert main(["memory", "rebuild", "--dir", d]) == 0
    assert "1 items" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:  # argparse's type= check: a usage error
        main(["memory", "add", "--dir", d, "x", "--meta", "{bad"])
    assert exited.value.code == 2
    assert "--meta: not JSON" in capsys.readouterr().err
    # search on a directory with no store is an error, not a traceback
    assert main(["memory", "search", "--dir", str(tmp_path / "none"), "q"]) == 1


def test_large_k_returns_everything_in_order(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add_many([f"entry {i}" for i in range(700)])
        hits = store.search("entry 5", 650, touch=False)
        assert len(hits) == 650 and hits[0].text == "entry 5"
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_index_is_saved_periodically_and_tombstones_are_pruned(tmp_path: Path) -> None:
    import sqlite3

    from runtime.longterm.manifest import Manifest

    with open_store(tmp_path, save_every=10) as store:
        ids = store.add_many([f"row {i}" for i in range(4)])
        assert not (tmp_path / MANIFEST_NAME).exists() or (
            Manifest.from_bytes((tmp_path / MANIFEST_NAME).read_bytes()).max_seq == 0
        )
        for i in range(8):
            store.add(f"more {i}")
        manifest = Manifest.from_bytes((tmp_path / MANIFEST_NAME).read_bytes())
        assert manifest.max_seq >= 10 and manifest.live == manifest.max_seq
        store.delete(ids[0])
        store.save_index()
        manifest = Manifest.from_bytes((tmp_path / MANIFEST_NAME).read_bytes())
        assert manifest.live == 11 and manifest.max_tomb == 1
    with sqlite3.connect(tmp_path / "memory.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0] == 0


def _accessed_in_sqlite(directory: Path, item_id: str) -> float:
    db = sqlite3.connect(f"file:{directory / DB_NAME}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT accessed FROM items WHERE id = ?", (item_id,)).fetchone()
        return float(row[0])
    finally:
        db.close()


def test_touches_are_batched_and_flushed_on_close(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    store = open_store(tmp_path)
    item_id = store.add("remember me", now=now - 10 * DAY)
    store.search("remember me", 1, now=now)
    # not written yet: a search costs no synchronous write ...
    assert _accessed_in_sqlite(tmp_path, item_id) == now - 10 * DAY
    # ... but recency already uses the pending access
    hit = store.search("remember me", 1, now=now + 1, touch=False)[0]
    assert hit.accessed == now and hit.recency == pytest.approx(1.0, abs=1e-5)
    store.close()
    assert _accessed_in_sqlite(tmp_path, item_id) == now


def test_touches_are_flushed_every_n_searches(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    with open_store(tmp_path) as store:
        item_id = store.add("remember me", now=now - DAY)
        for i in range(TOUCH_FLUSH_EVERY):
            store.search("remember me", 1, now=now + i)
        assert _accessed_in_sqlite(tmp_path, item_id) == now + TOUCH_FLUSH_EVERY - 1


class TruncatingEmbedder(HashEmbedder):
    """Reports texts over 20 characters as truncated, as the real embedder's last_stats does."""

    def embed(self, texts: list[str]) -> np.ndarray:
        self.last_stats = EmbedStats(len(texts), sum(len(t) > 20 for t in texts))
        return super().embed(texts)


def test_add_warns_once_when_texts_are_truncated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = TruncatingEmbedder()
    store = MemoryStore(tmp_path, embedder)  # type: ignore[arg-type]
    with store, caplog.at_level(logging.WARNING, logger="runtime.embed.embedder"):
        store.add_many(["short", "x" * 30, "y" * 40])
        store.add("short too")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 3 texts" in warnings[0].getMessage()
    assert "256 tokens" in warnings[0].getMessage()


class _HookedLock:
    """An RLock that runs ``hook`` (once) when its owner releases it completely."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = threading.local()
        self.hook: Callable[[], None] | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        self._depth.n = getattr(self._depth, "n", 0) + 1

    def __exit__(self, *exc: object) -> None:
        self._depth.n -= 1
        self._lock.release()
        if self._depth.n == 0 and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()


def test_delete_right_after_the_add_commit_leaves_no_stale_label(tmp_path: Path) -> None:
    # the first time add_many lets go of the store lock after its SQLite commit, another
    # thread deletes the new item: add_many used to release the lock before its index add,
    # so the delete missed the label and the add then made it live in the index
    store = open_store(tmp_path)
    lock = _HookedLock()
    store._lock = lock  # type: ignore[assignment]
    real_tx = store._tx

    def delete_newest() -> None:
        db = sqlite3.connect(f"file:{tmp_path / DB_NAME}?mode=ro", uri=True)
        (item_id,) = db.execute("SELECT id FROM items ORDER BY seq DESC LIMIT 1").fetchone()
        db.close()
        thread = threading.Thread(target=store.delete, args=(item_id,))
        thread.start()
        thread.join(timeout=10)

    @contextlib.contextmanager
    def tx() -> Iterator[sqlite3.Connection]:
        with real_tx() as db:
            yield db
        if lock.hook is None and not armed:
            armed.append(True)
            lock.hook = delete_newest

    armed: list[bool] = []
    store._tx = tx  # type: ignore[method-assign]
    with store:
        store.add("short-lived")
        assert armed
        assert len(store) == 0 and len(store._keeper().hnsw) == 0
        assert store.search("short-lived", 5, touch=False) == []
