"""runtime.Runtime on the tiny random-weight model: the turn, prefix reuse, the directory
lock, resume, eviction (replies equal whatever the slot count), overflow past 3x n_ctx with
retrieval of dropped turns, stats, and argument errors that write nothing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.app import Runtime, RuntimeArgumentError, RuntimeConfig, read_stats
from runtime.errors import LockedError
from runtime.session.checkpointer import CheckpointPolicy

GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="module")
def embedder() -> object:
    from runtime.embed import Embedder

    return Embedder.default()


@pytest.fixture
def rt(tmp_path: Path, embedder: object) -> Iterator[Runtime]:
    with Runtime.open(tmp_path / "data", model="tiny", n_ctx=1024, embedder=embedder) as r:
        yield r


def test_turn_is_journalled_and_reuses_the_prefix(rt: Runtime) -> None:
    first = rt.chat("alice", "My dog is called Biscuit.", **GREEDY)
    assert first.text == first.text.strip()
    assert first.finish_reason in ("stop", "length")
    assert first.completion_tokens >= 1
    session = rt._pool.peek("alice")
    assert session is not None
    before = session.tokens()
    second = rt.chat("alice", "What is my dog called?", **GREEDY)
    after = session.tokens()
    # only the new turn was decoded: the whole earlier window is a prefix of the new one
    assert after[: len(before)] == before
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(before)
    assert second.completion_tokens <= GREEDY["max_tokens"]
    # the new tokens: the prompt, the reply and the end-of-turn marker decoded after it
    assert second.prompt_tokens + second.completion_tokens <= len(after) - len(before)
    assert second.prompt_tokens + second.completion_tokens + 16 >= len(after) - len(before)
    roles = [h["role"] for h in rt.history("alice")]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    texts = [h["text"] for h in rt.history("alice") if h["role"] == "user"]
    assert texts == ["My dog is called Biscuit.", "What is my dog called?"]
    for key in ("retrieval", "render", "prefill", "generation", "memory_write", "total"):
        assert second.timings[key] >= 0.0


def test_chat_template_markers_are_in_the_kv_not_in_the_reply(rt: Runtime) -> None:
    reply = rt.chat("bob", "Hello there", **GREEDY)
    assert "<|im_start|>" not in reply.text and "<|im_end|>" not in reply.text
    session = rt._pool.peek("bob")
    assert session is not None
    rendered = rt.model.detokenize(session.tokens(), unparse_special=True)
    assert "<|im_start|>system\n" in rendered
    assert "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n" in rendered
    assert rendered.endswith("<|im_end|>\n")  # the reply's end of turn is decoded too


def test_bad_arguments_write_nothing(rt: Runtime) -> None:
    cases = [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"seed": "x"}, "seed"),
    ]
    for kwargs, name in cases:
        with pytest.raises(RuntimeArgumentError) as info:
            rt.chat("carol", "hi", **kwargs)  # type: ignore[arg-type]
        assert info.value.field == name
    with pytest.raises(RuntimeArgumentError):
        rt.chat("carol", "   ")
    with pytest.raises(ValueError):
        rt.chat("../etc", "hi")
    assert rt.history("carol") == []
    assert not (rt.root / "journals" / "carol.log").exists()


def test_second_open_names_the_holder(tmp_path: Path, embedder: object) -> None:
    with Runtime.open(tmp_path, model="tiny", embedder=False):
        code = (
            "import sys\nfrom runtime.app import Runtime\n"
            "try:\n    Runtime.open(sys.argv[1], model='tiny', embedder=False)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
        ).stdout
        assert out.startswith("LockedError"), out
        assert str(__import__("os").getpid()) in out
        with pytest.raises(LockedError):
            Runtime.open(tmp_path, model="tiny", embedder=False)


def test_close_is_idempotent_and_resume_comes_from_a_snapshot(
    tmp_path: Path, embedder: object
) -> None:
    rt = Runtime.open(tmp_path, model="tiny", embedder=embedder)
    rt.chat("dana", "I live in Lisbon.", **GREEDY)
    tokens = rt._pool.peek("dana").tokens()  # type: ignore[union-attr]
    rt.close()
    rt.close()
    assert rt.closed
    with pytest.raises(ValueError):
        rt.chat("dana", "hi")
    with Runtime.open(tmp_path, model="tiny", embedder=embedder) as again:
        reply = again.chat("dana", "Where do I live?", **GREEDY)
        assert reply.resumed is not None
        assert reply.resumed.source == "snapshot"  # the final checkpoint at close
        assert reply.resumed.restored_tokens == len(tokens)
        assert reply.resumed.replayed_tokens == 0
        assert reply.cached_tokens == len(tokens)
        stats = again.stats()
        assert stats["resumes"]["snapshot"] == 1
        assert stats["sessions"]["known"] == 1


def _round_robin(root: Path, slots: int, embedder: object, kv_type: str) -> list[str]:
    replies = []
    with Runtime.open(
        root,
        model="tiny",
        n_ctx=2048,
        max_resident=slots,
        embedder=embedder,
        # flash attention (the default, and q8_0 needs it) skips the other sessions' masked
        # cells, so a session's sums follow its own cells in cell order. Without it, f16
        # attention sums over the cache in SIMD blocks whose grouping follows the cells'
        # absolute slots, so a resumed session (cells packed elsewhere) can differ from a
        # never-evicted one by float rounding, and greedy decoding on random weights flips at
        # such a near-tie (seen at b6628de on this machine: reply 15 of 18). Flash attention is
        # not wholly free of the slots either: a one-token f16 decode over 512 cells or more
        # splits the cells between the threads by slot, and a layout that puts a session's
        # first cells far from its later ones (tried on 2026-12-07: new sessions sharing the
        # system prompt's cells) flipped reply 15 again. The turns here keep each session's
        # cells together in both runs. The restored cells themselves are byte-identical in
        # both (test_chunks, test_snapshot_llama).
        kv_type=kv_type,
        checkpoint=CheckpointPolicy(every_tokens=10_000, every_seconds=0),
    ) as rt:
        for turn in range(3):
            for s in range(6):
                reply = rt.chat(f"s{s}", f"turn {turn} of session {s}: tell me more", **GREEDY)
                replies.append(reply.text)
        if slots < 6:
            assert rt.stats()["resumes"]["snapshot"] > 0  # eviction really happened
    return replies


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_eviction_keeps_replies_identical(tmp_path: Path, embedder: object, kv_type: str) -> None:
    """2 sequence slots and 6 sessions round-robin give the same replies as 6 slots."""
    assert _round_robin(tmp_path / "two", 2, embedder, kv_type) == _round_robin(
        tmp_path / "six", 6, embedder, kv_type
    )


def test_suspend_frees_cells(rt: Runtime) -> None:
    rt.chat("erin", "A long enough message to hold some cells.", **GREEDY)
    used = rt.stats()["kv"]["cells_used"]
    assert used > 0
    rt.suspend("erin")
    assert rt.stats()["kv"]["cells_used"] == 0
    assert rt.stats()["sessions"]["resident"] == 0
    reply = rt.chat("erin", "and back", **GREEDY)
    assert reply.resumed is not None and reply.resumed.source == "snapshot"


def test_overflow_retrieves_dropped_turns(tmp_path: Path, embedder: object) -> None:
    """A session driven past 3x n_ctx keeps answering; its early fact comes back through
    retrieval once the turn has left the KV window."""
    n_ctx = 256
    with Runtime.open(tmp_path, model="tiny", n_ctx=n_ctx, embedder=embedder) as rt:
        rt.chat("fay", "My dog is called Biscuit.", **GREEDY)
        filler = [
            "The weather was mild and grey all week long.",
            "We painted the kitchen a pale shade of green.",
            "The train to Porto left twelve minutes late.",
            "I read three chapters of a novel about sailors.",
        ]
        i = 0
        while rt._pool.peek("fay").journal.n_tokens < 3 * n_ctx:  # type: ignore[union-attr]
            rt.chat("fay", filler[i % len(filler)] + f" ({i})", **GREEDY)
            i += 1
        session = rt._pool.peek("fay")
        assert session is not None
        assert session.n_tokens <= n_ctx
        first_user = next(h for h in rt.history("fay") if h["role"] == "user")
        assert first_user["seq"] not in session.window_seqs()  # the fact has left the window
        reply = rt.chat("fay", "What is my dog called?", **GREEDY)
        assert any("Biscuit" in m.text for m in reply.memories), reply.memories
        assert "Biscuit" in rt.model.detokenize(session.tokens())  # it is in the prompt


def test_near_duplicates_are_stored_once(rt: Runtime) -> None:
    rt.chat("gus", "I like green tea.", **GREEDY)
    rt.chat("gus", "I like green tea.", **GREEDY)
    hits = rt.search("green tea", k=10, session="gus")
    assert [h.text for h in hits].count("I like green tea.") == 1


def test_retrieval_skips_turns_still_in_the_window(rt: Runtime) -> None:
    rt.chat("hal", "My cat is called Tom.", **GREEDY)
    reply = rt.chat("hal", "What is my cat called?", **GREEDY)
    assert reply.memories == []  # the fact is in the KV window already


def test_global_memories_reach_every_session(rt: Runtime) -> None:
    rt.remember("The office wifi password is sunflower42.", importance=0.9)
    reply = rt.chat("ivy", "What is the office wifi password?", **GREEDY)
    assert any("sunflower42" in m.text for m in reply.memories)


def test_stats_cli_reads_a_running_runtime(rt: Runtime) -> None:
    rt.chat("jay", "hello", **GREEDY)
    rt.publish_stats()
    out = subprocess.run(
        [sys.executable, "-m", "runtime", "stats", "--dir", str(rt.root), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats = json.loads(out)
    assert stats["running"] is True
    assert stats["sessions"]["known"] == 1
    assert stats["journal"]["bytes"] > 0
    assert read_stats(rt.root)["model"]["name"] == "tiny"


def test_memory_search_cli_accepts_a_runtime_dir(rt: Runtime) -> None:
    rt.chat("kim", "My bicycle is painted orange.", **GREEDY)
    out = subprocess.run(
        [sys.executable, "-m", "runtime", "memory", "search", "--dir", str(rt.root), "bicycle"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    first = out.splitlines()[0].split("\t")
    assert first[2] == "kim" and first[-1] == "My bicycle is painted orange.", out


def test_deleted_session_id_starts_afresh(rt: Runtime) -> None:
    rt.chat("lee", "I collect blue stamps.", **GREEDY)
    rt.delete_session("lee")
    assert rt.history("lee") == [] and rt.search("stamps", k=5, session="lee") == []
    rt.chat("lee", "I collect red coins.", **GREEDY)
    assert [h.text for h in rt.search("collect", k=5, session="lee")] == ["I collect red coins."]


def test_cached_embedder_handles_many_texts(rt: Runtime) -> None:
    assert rt._recall.store is not None
    ids = rt._recall.store.add_many([f"note number {i} about topic {i * 7}" for i in range(70)])
    assert len(ids) == 70


def test_a_runtime_left_open_is_closed_at_exit(tmp_path: Path) -> None:
    """No crash at interpreter exit (the housekeeping thread never sees a freed context) and
    the final checkpoint is written."""
    code = (
        "import sys\nfrom runtime.app import Runtime\n"
        "rt = Runtime.open(sys.argv[1], model='tiny', embedder=False)\n"
        "rt.chat('a', 'hello', max_tokens=4)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "kv" / "manifests" / "a").glob("*.kvman"))


def test_journal_retention_window_keeps_memory_and_the_window(
    tmp_path: Path, embedder: object
) -> None:
    """Opt-in retention: old segments go, the window and long-term memory stay, and the
    session resumes; the default keeps every entry."""
    kw = {"model": "tiny", "n_ctx": 256, "embedder": embedder, "journal_segment_entries": 8}
    facts = [f"My locker number {i} is {1000 + i}." for i in range(30)]
    with Runtime.open(tmp_path / "all", **kw) as rt:  # type: ignore[arg-type]
        for fact in facts[:12]:
            rt.chat("s", fact, **GREEDY)
        assert rt.compact_journals() == 0  # "all": nothing is ever dropped
        assert len(rt.history("s")) == 1 + 2 * 12
    with Runtime.open(tmp_path / "win", journal_retention="window", **kw) as rt:  # type: ignore[arg-type]
        for fact in facts:
            rt.chat("s", fact, **GREEDY)
        rt.checkpoint("s")
        window = rt._pool.peek("s").tokens()  # type: ignore[union-attr]
        # the housekeeping thread may compact too, during the turns and between two calls
        before = rt.stats()["journal"]["compacted_bytes"]
        freed = rt.compact_journals()
        assert freed > 0 and rt.stats()["journal"]["compacted_bytes"] >= before + freed
        kept = rt.history("s")
        assert 0 < len([h for h in kept if h["role"] == "user"]) < len(facts)
        assert kept[0]["role"] == "system"  # the pinned first turn stays
    with Runtime.open(tmp_path / "win", journal_retention="window", **kw) as rt:  # type: ignore[arg-type]
        reply = rt.chat("s", "Which locker is number 0?", **GREEDY)
        resumed = reply.resumed
        assert resumed is not None and resumed.source == "snapshot"
        assert resumed.restored_tokens == len(window) and resumed.replayed_tokens == 0
        hits = rt.search(facts[0], k=1, session="s")
        assert hits and hits[0].text == facts[0]  # dropped from the journal, not from memory


def test_constructor_opens_like_open(tmp_path: Path) -> None:
    with Runtime(tmp_path / "d", model="tiny", n_ctx=256, embedder=False) as rt:
        assert rt.chat("s", "hi", **GREEDY).text is not None
    with Runtime.open(tmp_path / "d", model="tiny", n_ctx=256, embedder=False) as rt:
        assert [h["role"] for h in rt.history("s")][-2:] == ["user", "assistant"]


@pytest.mark.parametrize("option", ["chunked", "snapshot_every"])
def test_removed_options_are_refused(tmp_path: Path, option: str) -> None:
    # chunked checkpoints are the only path: the whole-snapshot options are gone
    with pytest.raises(RuntimeArgumentError, match=f"{option}: is not an option"):
        Runtime(tmp_path / "d", model="tiny", **{option: False})
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_config_is_frozen_and_overrides_apply(tmp_path: Path) -> None:
    config = RuntimeConfig(model="tiny", n_ctx=256, embedder=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_ctx = 512  # type: ignore[misc]
    with Runtime(tmp_path / "d", config=config, max_resident=2) as rt:
        assert rt.config.max_resident == 2 and rt.config.n_ctx == 256
        assert rt.n_ctx == 256


def test_flash_attention_is_the_default_and_a_quantized_cache_needs_it(tmp_path: Path) -> None:
    with pytest.raises(RuntimeArgumentError, match="flash_attn") as info:
        Runtime(tmp_path / "q", model="tiny", embedder=False, kv_type="q8_0", flash_attn=False)
    assert info.value.field == "flash_attn"
    assert not (tmp_path / "q").exists()  # refused before anything was written
    with pytest.raises(RuntimeArgumentError, match="flash_attn"):
        Runtime(tmp_path / "s", model="tiny", embedder=False, flash_attn="yes")
    with Runtime(tmp_path / "d", model="tiny", n_ctx=256, embedder=False) as rt:
        assert rt.stats()["model"]["flash_attn"] is True


def test_a_checkpoint_of_the_other_attention_layout_resumes_from_the_journal(
    tmp_path: Path,
) -> None:
    """Plain attention stores V transposed: its checkpoint is another cache layout, so a
    runtime with flash attention rebuilds the session from the journal instead, once, and
    the history is whole."""
    opts: dict[str, Any] = {"model": "tiny", "n_ctx": 512, "embedder": False}
    with Runtime(tmp_path / "d", flash_attn=False, **opts) as rt:
        rt.chat("s", "My name is Ann and I live in Oslo.", **GREEDY)
        rt.suspend("s")
        before = rt.history("s")
    with Runtime(tmp_path / "d", **opts) as rt:
        reply = rt.chat("s", "Where do I live?", **GREEDY)
        assert reply.resumed is not None and reply.resumed.source == "journal"
        assert any("flash_attn" in why for why in reply.resumed.skipped), reply.resumed.skipped
        assert rt.history("s")[: len(before)] == before
    with Runtime(tmp_path / "d", **opts) as rt:  # once: its close checkpointed the new layout
        reply = rt.chat("s", "And my name?", **GREEDY)
        assert reply.resumed is not None and reply.resumed.source == "snapshot"
