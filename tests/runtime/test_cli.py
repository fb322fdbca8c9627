"""``python -m runtime``: exit codes and messages for good and bad input, never a traceback."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pytest

import runtime.cli.memory_cmd as cli_memory
from runtime.cli import main
from runtime.errors import MemoryRuntimeError
from tests.runtime.memory_helpers import HashEmbedder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hash_embedder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_memory, "_embedder", lambda args: HashEmbedder())


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["memory", "add", "--importance", "2", "x"], "not in [0, 1]"),
        (["memory", "add", "--importance", "nan", "x"], "not in [0, 1]"),
        (["memory", "add", "--importance", "high", "x"], "is not a number"),
        (["memory", "add", "--meta", "[1]", "x"], "must be a JSON object, not list"),
        (["memory", "add", "--meta", "{bad", "x"], "not JSON"),
        (["memory", "add", ""], "must not be empty"),
        (["memory", "add", "   "], "must not be empty"),
        (["memory", "search", "-k", "0", "q"], "not a positive integer"),
        (["memory", "search", "-k", "many", "q"], "not an integer"),
        (["memory", "search", ""], "must not be empty"),
        (["memory", "stats", "--threads", "0"], "not a positive integer"),
    ],
)
def test_bad_memory_arguments_exit_2_without_a_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    group, command, *rest = args
    proc = run_cli(group, command, "--dir", str(tmp_path / "store"), *rest)
    assert proc.returncode == 2, proc.stderr
    assert "error: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists()  # refused before the store was touched


def test_memory_add_and_search_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hash_embedder: None
) -> None:
    d = str(tmp_path / "store")
    assert main(["memory", "add", "--dir", d, "--importance", "1", "--meta", '{"a": 1}', "hi"]) == 0
    item_id = capsys.readouterr().out.strip()
    assert main(["memory", "search", "--dir", d, "-k", "1", "--json", "hi"]) == 0
    out = capsys.readouterr().out
    assert item_id in out and '"a": 1' in out and '"importance": 1.0' in out


def test_memory_add_from_empty_stdin_is_an_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    hash_embedder: None,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    assert main(["memory", "add", "--dir", str(tmp_path), "-"]) == 2
    assert capsys.readouterr().err == "error: no text on stdin\n"


def test_memory_search_of_a_missing_store_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hash_embedder: None
) -> None:
    assert main(["memory", "search", "--dir", str(tmp_path / "none"), "q"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def _raising(exc: BaseException) -> object:
    def handler(args: argparse.Namespace) -> int:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("exc", "rc", "message"),
    [
        (ValueError("k must be a positive int"), 2, "error: k must be a positive int\n"),
        (TypeError("meta must be a mapping"), 2, "error: meta must be a mapping\n"),
        (MemoryRuntimeError("the store is locked"), 1, "error: the store is locked\n"),
        (PermissionError(13, "Permission denied", "/x/y"), 1, "error: /x/y: Permission denied\n"),
    ],
)
def test_dispatcher_turns_api_errors_into_messages(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
    rc: int,
    message: str,
) -> None:
    monkeypatch.setattr(cli_memory, "cmd_stats", _raising(exc))
    assert main(["memory", "stats", "--dir", str(tmp_path)]) == rc
    assert capsys.readouterr().err == message


def test_dispatcher_lets_real_bugs_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_memory, "cmd_stats", _raising(KeyError("bug")))
    with pytest.raises(KeyError):
        main(["memory", "stats", "--dir", str(tmp_path)])


# -- snapshot verify ------------------------------------------------------------------------


def test_verify_missing_path_is_not_found_not_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    assert main(["snapshot", "verify", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {missing}: no such file or directory\n"
    assert "DAMAGED" not in captured.out


def test_verify_damaged_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.kvsnap"
    bad.write_bytes(b"not a snapshot at all" * 10)
    assert main(["snapshot", "verify", str(tmp_path)]) == 1
    assert f"DAMAGED {bad}" in capsys.readouterr().out


def test_verify_missing_path_wins_over_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.kvsnap").write_bytes(b"junk")
    assert main(["snapshot", "verify", str(tmp_path), str(tmp_path / "gone.kvsnap")]) == 2
    assert "DAMAGED" not in capsys.readouterr().out


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_verify_empty_directory_says_so_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet: list[str]
) -> None:
    assert main(["snapshot", "verify", *quiet, str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"no snapshot files found in {tmp_path}: nothing to verify\n"


def test_inspect_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot", "inspect", str(tmp_path / "x.kvsnap")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_inspect_reads_a_chunk_manifest(
    tmp_path: Path, tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It called a valid manifest a corrupt snapshot ("bad magic ... not a KV snapshot")."""
    import json

    from runtime import Runtime

    with Runtime.open(tmp_path / "d", tiny_model_path, embedder=False) as rt:
        rt.chat("s1", "Hello there.", max_tokens=4)
        n_tokens = rt.session_info("s1")["window_tokens"]
    manifest = max((tmp_path / "d" / "kv" / "manifests").rglob("*.kvman"))
    assert main(["snapshot", "inspect", "--json", str(manifest)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "chunk store manifest" and info["session_id"] == "s1"
    assert info["n_tokens"] == n_tokens and info["chunks"] >= 1
    assert main(["snapshot", "inspect", str(manifest)]) == 0
    assert "session_id" in capsys.readouterr().out


# -- python -m llamaffi generate ------------------------------------------------------------


def test_llamaffi_generate_sizes_the_context_from_prompt_and_n(
    tiny_model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llamaffi.__main__ import main as llamaffi_main

    # the old hard-coded n_ctx=512 failed here after generating 512 tokens
    assert llamaffi_main(["generate", "--model", str(tiny_model_path), "-n", "600", "hi"]) == 0
    assert capsys.readouterr().out.startswith("hi")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-n", "5000"], "more than the model's training context of 2048"),
        (["-n", "600", "--n-ctx", "100"], "--n-ctx 100 is too small"),
    ],
)
def test_llamaffi_generate_refuses_what_cannot_fit_before_generating(
    tiny_model_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    from llamaffi.__main__ import main as llamaffi_main

    assert llamaffi_main(["generate", "--model", str(tiny_model_path), *extra, "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err


def test_no_flash_attn_reaches_the_runtime_and_stats_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime.cli.common import add_runtime_args, open_runtime

    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    for flag, shown in (["--no-flash-attn"], "off"), ([], "on"):
        data = tmp_path / (flag[0][2:] if flag else "default")
        args = parser.parse_args(["--dir", str(data), "--model", "tiny", "--no-memory", *flag])
        with open_runtime(args) as rt:
            assert rt.config.flash_attn is (not flag)
            assert rt.ctx.flash_attn is (not flag)
        capsys.readouterr()
        assert main(["stats", "--dir", str(data)]) == 0
        assert f"flash attention {shown}" in capsys.readouterr().out
