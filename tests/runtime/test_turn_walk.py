"""The walk of one warm ``chat`` turn, call by call: which runtime modules it runs code in.

docs/architecture.md ("The modules one turn passes through") names them on its "Walk:" line. A
part that starts to call back up into the facade, or a turn whose modules differ from that
line, fails here, so the docs stay the walk a reader follows.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import runtime
from runtime import Runtime

ROOT = str(Path(runtime.__file__).parent) + "/"

DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def documented_walk() -> set[str]:
    """The modules docs/architecture.md's "Walk:" line names (a warm turn, embedder off)."""
    text = DOCS.read_text()
    start = text.index("\nWalk: ")
    line = text[start : text.index("\n\n", start + 1)]
    return set(re.findall(r"`([a-z_/]+\.py)`", line))


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
    walk = documented_walk()
    assert up == []
    assert seen == walk, (sorted(seen - walk), sorted(walk - seen))


def test_the_walk_sees_a_call_back_up(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: Any
) -> None:
    """The probe itself: a part that asks the facade for something during a turn is seen (the
    planted call is compiled as if it were in ``app/recall.py``)."""
    with Runtime.open(tmp_path / "data", tiny_model_path, embedder=False) as rt:
        rt.chat("s", "Hello there.", max_tokens=4)
        recall = type(rt._recall)  # the test reaches in to plant the call
        scope: dict[str, Any] = {"retrieve": recall.retrieve, "rt": rt}
        source = (
            "def calling_up(self, *a, **k):\n    rt.sessions()\n"
            "    return retrieve(self, *a, **k)\n"
        )
        exec(compile(source, ROOT + "app/recall.py", "exec"), scope)
        monkeypatch.setattr(recall, "retrieve", scope["calling_up"])
        _, up = _walk(rt, "And again.")
    assert up and up[0].startswith("app/recall.py:"), up
