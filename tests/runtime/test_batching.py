"""Continuous batching: sessions generating at the same time share each decode, and every
turn comes out whole: its reply journalled exactly as returned, the KV in step with the
journal, no session suspended in the middle of its reply.

Replies are not compared with a sequential run: a token decoded in a batch of three goes
through other matrix kernels than one decoded alone, so its logits differ in the last bits,
and on the random-weight test model (whose logits are nearly flat) that can change a greedy
choice, as it does in llama-server with several slots."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from runtime.app import Runtime

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 24}
QUESTIONS = ("Tell me a story about a lighthouse.", "And what happened next?")


def _open(path: Path, **kw: Any) -> Runtime:
    opts: dict[str, Any] = {"model": "tiny", "n_ctx": 2048, "embedder": False, "max_resident": 4}
    opts.update(kw)
    return Runtime.open(path, **opts)


def _sequential(path: Path, sessions: list[str], **kw: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with _open(path, **kw) as rt:
        for sid in sessions:
            out[sid] = [rt.chat(sid, f"{q} ({sid})", **GREEDY).text for q in QUESTIONS]
            out[sid].append(rt.chat(sid, "Once more.", **GREEDY).text)
    return out


def _concurrent(rt: Runtime, sessions: list[str]) -> dict[str, list[str]]:
    start = threading.Barrier(len(sessions))
    out: dict[str, list[str]] = {sid: [] for sid in sessions}
    errors: list[BaseException] = []

    def client(sid: str) -> None:
        try:
            start.wait()
            for q in QUESTIONS:
                out[sid].append(rt.chat(sid, f"{q} ({sid})", **GREEDY).text)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(sid,)) for sid in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


def _check_in_step(rt: Runtime, sid: str, replies: list[str], turns: int) -> None:
    history = rt.history(sid)
    assert [h["role"] for h in history] == ["system"] + ["user", "assistant"] * turns
    assert [h["text"] for h in history if h["role"] == "assistant"] == replies
    info = rt.session_info(sid)
    if info["resident"]:
        assert info["kv_cells"] == info["window_tokens"], info  # the KV is the journal's


def test_concurrent_turns_share_decodes(tmp_path: Path) -> None:
    sessions = ["a", "b", "c"]
    with _open(tmp_path / "together") as rt:
        together = _concurrent(rt, sessions)
        batching = rt.stats()["batching"]
        assert batching["widest"] >= 2, batching  # the turns really shared decodes
        assert batching["generating"] == 0
        for sid in sessions:
            _check_in_step(rt, sid, together[sid], 2)
            # and the next turn, alone, continues the session's KV
            together[sid].append(rt.chat(sid, "Once more.", **GREEDY).text)
            _check_in_step(rt, sid, together[sid], 3)


def test_a_prompt_rides_the_steps_of_a_reply_being_generated(tmp_path: Path) -> None:
    """A turn that starts while another session generates decodes its prompt in that
    session's steps (chunked prefill), not alone; both turns come out whole."""
    with _open(tmp_path / "d") as rt:
        rt.chat("long", "warm up", **GREEDY)
        rt.chat("b", "warm up", **GREEDY)
        generating = threading.Event()
        out: list[Any] = []

        def long_reply() -> None:
            out.append(
                rt.chat("long", "Go on for a while.", temperature=0.0, max_tokens=400,
                        on_token=lambda _piece: generating.set())
            )  # fmt: skip

        worker = threading.Thread(target=long_reply)
        worker.start()
        assert generating.wait(60)
        before = rt.stats()["batching"]["prefilled"]
        second = rt.chat("b", "A question asked meanwhile.", **GREEDY)
        worker.join(120)
        batching = rt.stats()["batching"]
        assert out and out[0].finish_reason == "length", "the long reply ended first"
        assert batching["prefilled"] - before >= second.prompt_tokens > 0, batching
        _check_in_step(rt, "long", [r["text"] for r in rt.history("long")
                                    if r["role"] == "assistant"], 2)  # fmt: skip
        _check_in_step(rt, "b", [r["text"] for r in rt.history("b")
                                 if r["role"] == "assistant"], 2)  # fmt: skip
        assert rt.history("b")[-1]["text"] == second.text
        # the next turn continues the KV the prompt was decoded into: nothing re-prefilled
        window = rt.session_info("b")["window_tokens"]
        assert rt.chat("b", "And again.", **GREEDY).cached_tokens == window


def test_a_prompt_that_fails_in_a_step_fails_its_turn_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamaffi.errors import DecodeError

    with _open(tmp_path / "d") as rt:
        rt.chat("long", "warm up", **GREEDY)
        rt.chat("b", "warm up", **GREEDY)
        generating = threading.Event()
        out: list[Any] = []
        worker = threading.Thread(
            target=lambda: out.append(
                rt.chat("long", "Go on for a while.", temperature=0.0, max_tokens=400,
                        on_token=lambda _piece: generating.set())
            )
        )  # fmt: skip
        worker.start()
        assert generating.wait(60)
        real = rt.ctx.decode_batch

        def failing(*args: Any, outputs: Any = None) -> None:
            if outputs is not None:  # a step carrying a prompt slice: llama.cpp says no
                raise DecodeError("no KV slot (injected)", function="llama_decode", code=1)
            real(*args)

        monkeypatch.setattr(rt.ctx, "decode_batch", failing)
        with pytest.raises(DecodeError, match="injected"):
            rt.chat("b", "This prompt fails.", **GREEDY)
        monkeypatch.setattr(rt.ctx, "decode_batch", real)
        worker.join(120)
        assert out and out[0].finish_reason == "length"  # the other reply lived on
        replies = [h["text"] for h in rt.history("long") if h["role"] == "assistant"]
        assert replies[-1] == out[0].text
        _check_in_step(rt, "long", replies, 2)
        # the failed turn is journalled (the truth), and the session comes back from it
        assert rt.history("b")[-1]["text"] == "This prompt fails."
        assert rt.chat("b", "And now?", **GREEDY).resumed is not None


def test_a_turn_alone_replies_as_before(tmp_path: Path) -> None:
    # one session at a time goes through the same steps, one token each: the same replies
    sessions = ["a", "b"]
    first = _sequential(tmp_path / "one", sessions)
    assert _sequential(tmp_path / "two", sessions) == first


def test_more_sessions_than_sequences_wait_for_a_free_one(tmp_path: Path) -> None:
    # two sequences, four sessions generating at once: a turn waits for a sequence whose
    # turn has ended instead of suspending a session in the middle of its reply (which would
    # fail that reply's next decode). Replies are not compared with a sequential run: a
    # session resumed from a checkpoint may hold its cells in another order (see resume).
    sessions = ["a", "b", "c", "d"]
    with _open(tmp_path / "d", max_resident=2) as rt:
        together = _concurrent(rt, sessions)
        stats = rt.stats()
        assert stats["sessions"]["resident"] <= 2
        assert stats["sessions"]["known"] == 4
        for sid in sessions:
            _check_in_step(rt, sid, together[sid], 2)


def test_a_failing_callback_fails_its_turn_only(tmp_path: Path) -> None:
    with _open(tmp_path / "d") as rt:
        rt.chat("good", "warm up", **GREEDY)
        rt.chat("bad", "warm up", **GREEDY)
        start = threading.Barrier(2)
        results: dict[str, object] = {}

        def boom(_piece: str) -> None:
            raise ValueError("client went away")

        def run(sid: str, on_token: Any) -> None:
            start.wait()
            try:
                results[sid] = rt.chat(sid, "Tell me a long story.", on_token=on_token, **GREEDY)
            except ValueError as exc:
                results[sid] = exc

        threads = [
            threading.Thread(target=run, args=("good", None)),
            threading.Thread(target=run, args=("bad", boom)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert isinstance(results["bad"], ValueError)
        assert not isinstance(results["good"], BaseException)
        # the failed reply left nothing behind: the user turn waits for its answer
        assert rt.unanswered("bad") == "Tell me a long story."
        assert rt.answer("bad", **GREEDY).completion_tokens >= 1


def test_close_finishes_the_replies_in_progress(tmp_path: Path) -> None:
    rt = _open(tmp_path / "d")
    rt.chat("s", "warm up", **GREEDY)
    started = threading.Event()
    result: dict[str, object] = {}

    def slow(_piece: str) -> None:
        started.set()

    def run() -> None:
        try:
            result["reply"] = rt.chat("s", "Tell me more.", on_token=slow, max_tokens=64)
        except BaseException as exc:
            result["reply"] = exc

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(30)
    rt.close()
    t.join(30)
    reply = result["reply"]
    assert not isinstance(reply, BaseException), reply
    with _open(tmp_path / "d") as again:
        history = again.history("s")
    assert history[-1]["role"] == "assistant" and history[-1]["text"] == reply.text  # type: ignore[attr-defined]


@pytest.mark.parametrize("n", [1])
def test_a_lone_session_steps_alone(tmp_path: Path, n: int) -> None:
    with _open(tmp_path / "d") as rt:
        rt.chat("s", "hi", **GREEDY)
        assert rt.stats()["batching"]["widest"] == n
