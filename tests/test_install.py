"""A non-editable install works from outside the source tree (issue: build-from-source installs).

Two installs into a new virtual environment, each then used from an empty directory:

* ``test_wheel_install``: a wheel built from this checkout (``pip wheel .``; the CMake tree
  under ``build/`` is reused, so it takes seconds);
* ``test_sdist_install``: an sdist (scikit-build-core's ``build_sdist``, what
  ``python -m build --sdist`` calls) installed with ``pip install``: pip builds it in an
  isolated environment from scratch, fetching and verifying the pinned llama.cpp source
  (about 3-4 minutes on 2 cores).

The new environment gets its third-party dependencies from the bootstrap's ``.venv`` through
a ``.pth`` line (so no second download of numpy/onnxruntime); a ``.pth`` line adds a path
only, it does not run the editable install's own ``.pth`` hook, so ``llamaffi`` and
``runtime`` can only come from the package just installed.

``test_wheel_install`` also checks that building the wheel leaves the libraries that running
processes have loaded alone (the source tree's ``llamaffi/lib``): it once stripped them in
place, and every process that had them mapped, this test run included, segfaulted at exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAMAFFI_LIB")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _new_env(tmp: Path) -> Path:
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp
    ).strip()
    deps = sysconfig.get_paths()["purelib"]  # this interpreter's (the bootstrap .venv)
    Path(site, "bootstrap-deps.pth").write_text(deps + "\n")
    return python


def _check_installed(python: Path, tmp: Path) -> None:
    empty = tmp / "empty"
    empty.mkdir()
    where = _run(
        [
            str(python),
            "-c",
            "import llamaffi, runtime; print(llamaffi.__file__); print(runtime.__file__)",
        ],
        empty,
    )
    for line in where.split():
        assert str(tmp / "venv") in line, f"imported from outside the new install: {line}"
    info = _run([str(python), "-m", "llamaffi", "info"], empty)
    assert "b11312" in info, info
    assert "llama-cpp-python==0.3.36" in info, info
    assert "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e" in info, info
    # the built-in random-weight model needs the packaged vocabulary
    out = _run(
        [str(python), "-m", "llamaffi.testing", "--preset", "tiny", str(empty / "t.gguf")], empty
    )
    assert (empty / "t.gguf").stat().st_size > 1_000_000, out
    demo = _run(
        [str(python), "-m", "runtime.demo", "--model", "tiny", "--dir", str(empty / "d")],
        empty,
        timeout=600,
    )
    assert "acknowledged" in demo, demo


# Loads the libraries from the source tree, waits for the wheel build, then calls into each of
# them (a decode) and exits normally.
_HOLDER = """
import sys
from llamaffi import Context, Model
model = Model(sys.argv[1])
ctx = Context(model, n_ctx=128)
print("loaded", flush=True)
sys.stdin.readline()
ctx.decode(model.tokenize("after the build"))
print("decoded", flush=True)
"""


def _lib_files() -> dict[str, tuple[int, int, int]]:
    """(inode, size, ctime) of every shared library in the source tree's llamaffi/lib."""
    lib = ROOT / "llamaffi" / "lib"
    return {
        p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_ctime_ns)
        for p in sorted(lib.glob("*.so*"))
        if not p.is_symlink()
    }


def test_wheel_install(tmp_path: Path, tiny_model_path: Path) -> None:
    before = _lib_files()
    assert before, "no shared library in llamaffi/lib"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tiny_model_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "loaded"
        wheel = _build_wheel(tmp_path)
    finally:
        out, err = holder.communicate("\n", timeout=120)
    # A library rewritten in place under a process that has it mapped loses that process'
    # relocations: its next call through the PLT (or its exit) segfaults.
    assert _lib_files() == before, "the wheel build rewrote llamaffi/lib"
    assert holder.returncode == 0, f"the process holding llamaffi/lib died:\n{out}\n{err}"
    assert "decoded" in out
    python = _new_env(tmp_path)
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp_path)
    _check_installed(python, tmp_path)


def _build_wheel(tmp_path: Path) -> Path:
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(dist),
            str(ROOT),
        ],
        ROOT,
    )
    (wheel,) = dist.glob("llamaffi-*.whl")
    return wheel


def test_sdist_install(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    code = f"import scikit_build_core.build as b; print(b.build_sdist({str(dist)!r}))"
    _run([sys.executable, "-c", code], ROOT)
    (sdist,) = dist.glob("llamaffi-*.tar.gz")
    python = _new_env(tmp_path)
    # build isolation: pip fetches scikit-build-core itself, as on a user's machine
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(sdist)], tmp_path, timeout=1500
    )
    _check_installed(python, tmp_path)
