"""The long-term memory and embedder packages: the embedder's re-exports, the direct
constructor, typed argument errors, and the helpers defined once in llamaffi._util."""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llamaffi
import runtime.embed
from llamaffi._util import cache_root, sha256_fd, sha256_file
from runtime import errors
from runtime.cli import main
from runtime.longterm import MemoryStore
from tests.runtime.memory_helpers import HashEmbedder

ROOT = Path(__file__).resolve().parents[2]

# every public name the single modules defined before the split, and where it lives now
MOVED = {
    "runtime.embed": [
        ("Embedder", "runtime.embed.embedder"),
        ("EmbedStats", "runtime.embed.embedder"),
        ("export_minilm", "runtime.embed.export"),
        ("quantize_int8", "runtime.embed.export"),
        ("read_safetensors", "runtime.embed.export"),
        ("default_source_dir", "runtime.embed.export"),
        ("EmbedderError", "runtime.errors"),
        ("sha256_file", "llamaffi._util"),
        ("cache_root", "llamaffi._util"),
    ],
}


@pytest.mark.parametrize(
    ("old", "name", "new"), [(old, n, new) for old, pairs in MOVED.items() for n, new in pairs]
)
def test_old_import_paths_give_the_same_objects(old: str, name: str, new: str) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(
        importlib.import_module(new), name
    )


def test_every_embed_name_is_importable() -> None:
    for name in runtime.embed.__all__:
        assert hasattr(runtime.embed, name), f"runtime.embed.{name}"


def test_shared_errors_are_llamaffis() -> None:
    # one class per meaning: a refused argument and use after close are the same error
    # whether a context, a store or the runtime raises them
    assert errors.ArgumentError is llamaffi.ArgumentError
    assert errors.ArgumentTypeError is llamaffi.ArgumentTypeError
    assert errors.ClosedError is llamaffi.ClosedError
    for cls, builtin in (
        (errors.ArgumentError, ValueError),
        (errors.ArgumentTypeError, TypeError),
        (errors.ClosedError, ValueError),
    ):
        assert issubclass(cls, llamaffi.LlamaError) and issubclass(cls, builtin)
    assert issubclass(errors.RuntimeArgumentError, errors.ArgumentError)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.IndexFileError, ValueError),
        (errors.StoreMismatchError, ValueError),
        (errors.ReadOnlyError, PermissionError),
        (errors.DiskFullError, OSError),
        (errors.DamagedStoreError, ValueError),
    ],
)
def test_moved_errors_subclass_the_base_and_the_builtin(
    cls: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(cls, errors.MemoryRuntimeError) and issubclass(cls, builtin)


def test_memory_store_opens_in_its_constructor(tmp_path: Path) -> None:
    with MemoryStore(tmp_path, HashEmbedder()) as store:
        item = store.add("opened directly")
    with MemoryStore(tmp_path, HashEmbedder(), read_only=True) as again:  # the alias
        assert [h.id for h in again.search("opened directly", 1)] == [item]
    with pytest.raises(errors.ClosedError):
        store.add("after close")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.search("q", 0), errors.ArgumentError),
        (lambda s: s.search("q", kinds=["nope"]), errors.ArgumentError),
        (lambda s: s.add("x", importance=2.0), errors.ArgumentError),
        (lambda s: s.add("x", kind="nope"), errors.ArgumentError),
        (lambda s: s.add("x", meta={"v": float("nan")}), errors.ArgumentError),
        (lambda s: s.add_many("not a list"), errors.ArgumentTypeError),
        (lambda s: s.add("x", now="yesterday"), errors.ArgumentTypeError),
        (lambda s: s.find(session=None, meta_key="a.b", value=1), errors.ArgumentError),
    ],
)
def test_memory_store_argument_errors_are_typed(tmp_path: Path, call: object, error: type) -> None:
    with MemoryStore(tmp_path, HashEmbedder()) as store:
        with pytest.raises(error):
            call(store)  # type: ignore[operator]
        assert len(store) == 0  # refused before anything was written


def test_a_bad_save_every_is_refused_before_the_directory_is_made(tmp_path: Path) -> None:
    with pytest.raises(errors.ArgumentError):
        MemoryStore(tmp_path / "store", HashEmbedder(), save_every=0)
    assert not (tmp_path / "store").exists()


def test_cli_reports_a_store_argument_error_as_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import runtime.cli.memory_cmd as cli_memory

    monkeypatch.setattr(cli_memory, "_embedder", lambda args: HashEmbedder())
    rc = main(["memory", "add", "--dir", str(tmp_path), "--meta", '{"v": NaN}', "hello"])
    assert rc == 2  # an argument error, as before the errors were typed (not 1: a file error)
    assert "not JSON-serialisable" in capsys.readouterr().err


def test_sha256_helpers_agree_with_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, 1000) == hashlib.sha256(data).hexdigest()  # many small reads
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sha256_fd(fd, 1000, block=64) == hashlib.sha256(data[:1000]).digest()
        assert sha256_fd(fd, len(data) + 99) == hashlib.sha256(data).digest()  # stops at EOF
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # pread: the offset did not move
    finally:
        os.close(fd)


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAFFI_CACHE", str(tmp_path / "override"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "override"
    monkeypatch.setenv("LLAMAFFI_CACHE", "")  # empty counts as unset
    assert cache_root() == tmp_path / "xdg" / "llamaffi"
    monkeypatch.delenv("LLAMAFFI_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "llamaffi"


def test_llamaffi_does_not_import_the_runtime() -> None:
    code = (
        "import sys, llamaffi, llamaffi._util, llamaffi.model\n"
        "bad = sorted(m for m in sys.modules if m == 'runtime' or m.startswith('runtime.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
