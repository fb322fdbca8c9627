"""Shared fixtures: tiny random-weight GGUF models built on the fly (cached per session)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from llamaffi import Model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's generated models live (``$LLAMAFFI_TEST_MODELS`` to reuse them)."""
    override = os.environ.get("LLAMAFFI_TEST_MODELS")
    if override:
        path = Path(override)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("models")


def _make(model_dir: Path, name: str, **kwargs: object) -> Path:
    from llamaffi.testing import make_model

    path = model_dir / f"{name}.gguf"
    if not path.exists():
        make_model(path, **kwargs)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="session")
def tiny_model_path(model_dir: Path) -> Path:
    """The ``tiny`` preset, seed 0."""
    return _make(model_dir, "tiny-seed0", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def other_model_path(model_dir: Path) -> Path:
    """Same geometry as :func:`tiny_model_path`, another seed: a different model."""
    return _make(model_dir, "tiny-seed1", preset="tiny", seed=1)


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Iterator[Model]:
    """The tiny model loaded once per test module (closed after it)."""
    from llamaffi import Model

    with Model(tiny_model_path) as m:
        yield m


# -- exit without interpreter teardown (CI) ----------------------------------------------------
#
# Twice, a full CI-like run (every test passed) ended with "Segmentation fault" AFTER pytest's
# summary, i.e. in the interpreter's teardown of a process that had run ~660 tests (models,
# contexts, onnxruntime sessions, uvicorn threads). It did not reproduce on any subset
# (tests/llamaffi + tests/runtime: 656 passed, exit 0), no Python stack was printed with
# PYTHONFAULTHANDLER=1 (so it is past Python's finalization, in C/C++ exit-time destructors),
# and every product process the tests start (demo, chat, serve, kill loops) exits 0. Until
# the cause is found, LLAMAFFI_TEST_HARD_EXIT=1 (set by .ci/run) ends the test process with
# pytest's own exit status right after its report, listing the threads still alive.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get("LLAMAFFI_TEST_HARD_EXIT") != "1" or not _EXIT_STATUS:
        return
    import sys
    import threading

    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    print(f"conftest: hard exit {_EXIT_STATUS[-1]}; threads alive: {alive}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[-1])
