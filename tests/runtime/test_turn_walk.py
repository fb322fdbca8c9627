"""The walk of one warm ``chat`` turn, call by call: which runtime modules it runs code in.

docs/architecture.md ("The modules one turn passes through") lists them. A part that starts to
call back up into the facade, or a turn that starts to pass through a module the list does not
name, fails here, so the list in the docs stays the walk a reader follows.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import runtime
from runtime import Runtime

ROOT = str(Path(runtime.__file__).parent) + "/"

#: A warm turn's modules, long-term memory's embedder off (its store is one backend: with it
#: on, the turn also runs ``app/recall.py``'s store, ``longterm/*`` and ``embed/embedder.py``).
WARM_TURN = {
    "app/facade.py",  # Runtime.chat: the lock, the closed check
    "app/options.py",  # the turn's arguments and sampling overrides checked
    "layout.py",  # the session id checked
    "longterm/items.py",  # the one text rule (length, blank)
    "app/conversation.py",  # the turn's steps, part by part
    "app/sessions.py",  # the resident session
    "session/pool.py",  # residency: room for the reply
    "app/recall.py",  # memories for the prompt; the turn ingested behind its watermark
    "app/turn.py",  # the turn engine: render, tokenize, sample; the Reply
    "template.py",  # the GGUF's chat template
    "session/session.py",  # the user turn and the reply journalled, the window kept
    "journal/journal.py",  # the fsynced append
    "journal/record.py",  # the entry's bytes
    "session/window.py",  # the KV sequence: decode, what it holds
    "session/generation.py",  # the reply's state machine: sample, stop, finish
    "app/batching.py",  # the step that decodes every generating session together
    "session/checkpointer.py",  # the policy: is a checkpoint due
    "app/stats.py",  # the turn counted
}


def _walk(rt: Runtime, text: str) -> tuple[set[str], list[str]]:
    """The runtime modules one ``rt.chat`` runs code in, and every call into the facade made
    from another runtime module (a part calling back up)."""
    seen: set[str] = set()
    up: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(ROOT):
            return
        module = frame.f_code.co_filename[len(ROOT) :]
        seen.add(module)
        caller = frame.f_back
        if module == "app/facade.py" and caller is not None:
            where = caller.f_code.co_filename
            if where.startswith(ROOT) and where[len(ROOT) :] != "app/facade.py":
                up.append(f"{where[len(ROOT) :]}:{caller.f_lineno} -> {frame.f_code.co_name}")

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        rt.chat("s", text, max_tokens=8)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return seen, up


def test_a_warm_turn_walks_the_documented_modules_and_never_calls_back_up(
    tmp_path: Path, tiny_model_path: Path
) -> None:
    with Runtime.open(tmp_path / "data", tiny_model_path, embedder=False) as rt:
        rt.chat("s", "My name is Ann and I live in Oslo.", max_tokens=8)
        seen, up = _walk(rt, "Where do I live?")
    assert up == []
    assert seen == WARM_TURN, (sorted(seen - WARM_TURN), sorted(WARM_TURN - seen))
    assert len(WARM_TURN) == 18


def test_the_walk_sees_a_call_back_up(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: Any
) -> None:
    """The probe itself: a part that asks the facade for something during a turn is seen (the
    planted call is compiled as if it were in ``app/stats.py``)."""
    with Runtime.open(tmp_path / "data", tiny_model_path, embedder=False) as rt:
        rt.chat("s", "Hello there.", max_tokens=4)
        stats = type(rt._stats)  # the test reaches in to plant the call
        scope: dict[str, Any] = {"record": stats.record_turn, "rt": rt}
        source = (
            "def calling_up(self, *a, **k):\n    rt.sessions()\n    return record(self, *a, **k)\n"
        )
        exec(compile(source, ROOT + "app/stats.py", "exec"), scope)
        monkeypatch.setattr(stats, "record_turn", scope["calling_up"])
        _, up = _walk(rt, "And again.")
    assert up and up[0].startswith("app/stats.py:"), up
