#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source into vendor/llama.cpp/.

The source comes from the PyPI sdist named in ``vendor/llama.cpp/pin.toml``. The archive is
downloaded once with pip into a cache directory, checked against the pinned sha256 (a mismatch
is a hard failure, also for a cached file), and only its ``vendor/llama.cpp/`` subtree is
extracted. A stamp file records which pin the tree came from, so a second run is a no-op.

Standard library only: CMake calls this script before the build when the tree is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor" / "llama.cpp"
PIN_FILE = VENDOR / "pin.toml"
STAMP = VENDOR / ".pin-stamp"
KEEP = {"pin.toml", "README.md"}


class FetchError(RuntimeError):
    """The pinned source could not be fetched or did not match its pin."""


def load_pin() -> dict[str, str]:
    with PIN_FILE.open("rb") as f:
        pin = tomllib.load(f)
    return dict(pin["sdist"])


def cache_dir() -> Path:
    base = os.environ.get("LLAMAFFI_CACHE") or Path.home() / ".cache" / "llamaffi"
    path = Path(base) / "sdist"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(pin: dict[str, str], dest: Path) -> Path:
    archive = dest / pin["filename"]
    if archive.exists():
        print(f"fetch: using cached {archive}")
        return archive
    spec = f"{pin['package']}=={pin['version']}"
    print(f"fetch: pip download {spec}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    # The sdist's metadata step would install its build backend; we only want the file.
    cmd += ["--no-build-isolation", "-d", str(dest), spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if not archive.exists():
        # pip refuses to "download" without preparing metadata when build isolation is off
        # and the backend is missing; retry with isolation before giving up.
        cmd.remove("--no-build-isolation")
        result = subprocess.run(cmd, capture_output=True, text=True)
    if not archive.exists():
        raise FetchError(f"pip download of {spec} failed:\n{result.stdout}\n{result.stderr}")
    return archive


def verify(archive: Path, expected: str) -> None:
    actual = sha256_of(archive)
    if actual != expected:
        # Leave the file for inspection under another name so a retry downloads afresh.
        bad = archive.with_suffix(archive.suffix + ".bad")
        archive.replace(bad)
        raise FetchError(
            f"sha256 mismatch for {archive.name}: expected {expected}, got {actual} "
            f"(moved to {bad}); refusing to build from unpinned source"
        )


def extract(archive: Path, subdir: str) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/{subdir}/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise FetchError(f"{archive.name} has no {subdir}/ tree")
        with tempfile.TemporaryDirectory(dir=VENDOR.parent) as tmp:
            tar.extractall(tmp, members=members, filter="data")
            src = Path(tmp) / top / subdir
            for child in VENDOR.iterdir():
                if child.name not in KEEP:
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            for child in src.iterdir():
                if child.name not in KEEP:
                    shutil.move(str(child), VENDOR / child.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="re-extract even if up to date")
    args = parser.parse_args(argv)
    pin = load_pin()
    want = f"{pin['filename']} {pin['sha256']}\n"
    up_to_date = STAMP.exists() and STAMP.read_text() == want
    if not args.force and up_to_date and (VENDOR / "include" / "llama.h").exists():
        print("fetch: vendor/llama.cpp is up to date")
        return 0
    try:
        archive = download(pin, cache_dir())
        verify(archive, pin["sha256"])
        extract(archive, pin["subdir"])
    except FetchError as exc:
        print(f"fetch: error: {exc}", file=sys.stderr)
        return 1
    STAMP.write_text(want)
    print(f"fetch: extracted {pin['package']}=={pin['version']} into {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
