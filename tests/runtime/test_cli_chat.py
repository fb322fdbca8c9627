"""``python -m runtime chat``: one stdout line per durable turn, escaped; SIGTERM closes
cleanly (final checkpoints, exit 0)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runtime.cli.chat_cmd import escape_line
from runtime.journal import Journal


def _chat(root: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "runtime", "chat", "--dir", str(root), "--model", "tiny"]
    cmd += ["--session", "cli", "--max-tokens", "6", "--no-memory", *extra]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_escape_line_keeps_one_line() -> None:
    assert escape_line("a\nb\\c\r") == "a\\nb\\\\c\\r"
    assert "\n" not in escape_line("x\n\n\ny")


def test_piped_turns_give_one_line_each_after_the_journal(tmp_path: Path) -> None:
    proc = _chat(tmp_path)
    out, err = proc.communicate("first turn\n\nsecond turn\n", timeout=300)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2  # the empty line is not a turn
    journal = Journal(tmp_path / "journals" / "cli.log", readonly=True)
    try:
        users = [e.text for e in journal if e.role == "user"]
        replies = [e.text for e in journal if e.role == "assistant"]
    finally:
        journal.close()
    assert users == ["first turn", "second turn"]
    assert lines == [escape_line(r) for r in replies]
    assert "runtime: loading model" in err  # progress goes to stderr


def test_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(tmp_path: Path) -> None:
    """It was the end of the chat (rc 2, a TypeError from the embedder's tokenizer, every
    later line lost); now the line is refused with its reason, nothing of it is written, and
    the next line is a turn."""
    cmd = [sys.executable, "-m", "runtime", "chat", "--dir", str(tmp_path), "--model", "tiny"]
    cmd += ["--session", "cli", "--max-tokens", "4"]  # memory on: the embedder sees the text
    # C.UTF-8 reads stdin with surrogateescape already; strict decoding (other UTF-8
    # locales) raised UnicodeDecodeError at the line
    for env in ({"LC_ALL": "C.UTF-8"}, {"PYTHONIOENCODING": "utf-8:strict"}):
        proc = subprocess.run(
            cmd, input=b"caf\xe9 latte\nsecond line\n", capture_output=True, timeout=300,
            env={**os.environ, **env},
        )  # fmt: skip
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, err
        assert "chat: error: text: is not valid Unicode" in err
        assert len(proc.stdout.splitlines()) == 2  # an empty line for the refused turn
    journal = Journal(tmp_path / "journals" / "cli.log", readonly=True)
    try:
        users = [e.text for e in journal if e.role == "user"]
    finally:
        journal.close()
    assert users == ["second line", "second line"]


def test_a_bad_session_id_is_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runtime", "chat", "--dir", str(tmp_path), "--session", "a/b"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr  # was 1, the code of a failed store
    assert "error: invalid session id 'a/b'" in proc.stderr


def test_sigterm_closes_with_final_checkpoint(tmp_path: Path) -> None:
    proc = _chat(tmp_path, "--checkpoint-tokens", "100000")
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("hello there\n")
    proc.stdin.flush()
    assert proc.stdout.readline()  # the turn is durable
    manifests = tmp_path / "kv" / "manifests" / "cli"
    # the idle sweeper waits 2 s; nothing is checkpointed yet
    assert not manifests.exists() or not list(manifests.glob("*"))
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 0
    # no checkpoint by policy (100000 tokens) or idle (< 2 s): this one is the close's
    assert list(manifests.glob("*")), "no final checkpoint"
