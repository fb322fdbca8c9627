"""The README's main job, end to end: ``python -m runtime.demo`` (kill -9 and resume)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_demo(model: Path, directory: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "runtime.demo", "--model", str(model), "--dir", str(directory)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_demo_resumes_everything_after_kill_9(tmp_path: Path, tiny_model_path: Path) -> None:
    result = run_demo(tiny_model_path, tmp_path, timeout=600)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kill -9" in out
    assert "are there, word for word: True" in out
    assert "resumed from snapshot" in out
    assert "quarantined" in out  # the damaged snapshot was set aside
    assert "My dog is called Biscuit" in out.split("4. long-term memory")[1]
    # a second run in the same directory replaces only the demo's own data
    again = run_demo(tiny_model_path, tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path, tiny_model_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("user data")
    result = run_demo(tiny_model_path, tmp_path, timeout=120)
    assert result.returncode != 0
    assert "not made by this demo" in result.stderr
    assert (tmp_path / "run" / "precious.txt").read_text() == "user data"
