"""scripts/fetch_llama_cpp.py: the pin is enforced, the cache is reused."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def fetch() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fetch_llama_cpp", ROOT / "scripts/fetch_llama_cpp.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pin_names_the_required_sdist(fetch: ModuleType) -> None:
    pin = fetch.load_pin()
    assert pin["package"] == "llama-cpp-python"
    assert pin["version"] == "0.3.36"
    assert pin["sha256"] == "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


def test_wrong_checksum_is_a_hard_failure(fetch: ModuleType, tmp_path: Path) -> None:
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    archive.write_bytes(b"tampered")
    with pytest.raises(fetch.FetchError, match="sha256 mismatch"):
        fetch.verify(archive, "0" * 64)
    assert not archive.exists()  # moved aside so the next run downloads afresh
    assert archive.with_suffix(".gz.bad").exists()


def test_matching_checksum_passes(fetch: ModuleType, tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"content")
    fetch.verify(archive, hashlib.sha256(b"content").hexdigest())


def test_cached_download_is_reused(
    fetch: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin = {"package": "x", "version": "1", "filename": "x-1.tar.gz"}
    (tmp_path / "x-1.tar.gz").write_bytes(b"cached")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the archive is cached")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    assert fetch.download(pin, tmp_path) == tmp_path / "x-1.tar.gz"


def test_archive_without_the_subtree_is_refused(fetch: ModuleType, tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("pkg-1/README")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(fetch.FetchError, match=r"no vendor/llama\.cpp"):
        fetch.extract(archive, "vendor/llama.cpp")
