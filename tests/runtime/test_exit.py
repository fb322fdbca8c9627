"""A process that used a Runtime exits normally (status 0), whether it closed the runtime, left
it open, or dropped it without closing it; and no thread the runtime started outlives it.

Each case is a real subprocess on the tiny model: a turn, a checkpoint, a suspend, a turn that
resumes from the checkpoint, a second session, and the snapshot codec's thread pool in use.
Its first exit hook (registered before anything else, so it runs last, after the runtime's and
llamaffi's exit hooks have freed llama.cpp's context) lists the threads still alive and then
gives them time to run: a housekeeping thread left over there used to segfault on the freed
context (``llama_memory_seq_pos_max``) when the runtime had been dropped without close().
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD = """
import atexit, threading, time

def alive():
    return sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())

def last_hook():
    print("last exit hook:", alive(), flush=True)
    time.sleep(0.6)  # several housekeeping periods, on a context that is freed by now

atexit.register(last_hook)

import gc, sys
from runtime.app import Runtime
from runtime.session.checkpointer import CheckpointPolicy
from runtime.snapshot import Codec, compress_chunks

mode = sys.argv[2]
policy = CheckpointPolicy(every_tokens=0, every_seconds=0.0, idle_seconds=0.2)
rt = Runtime.open(sys.argv[1], model="tiny", embedder=False, n_ctx=512, checkpoint=policy)
rt.chat("a", "hello there", max_tokens=4)
rt.checkpoint("a")
rt.suspend("a")
rt.chat("a", "and again", max_tokens=4)
rt.chat("b", "another session", max_tokens=4)
compress_chunks(bytes(1 << 16), Codec(chunk_size=4096, threads=2))  # the codec's pool
print("open:", alive(), flush=True)

def first_hook():
    print("first exit hook:", alive(), flush=True)

atexit.register(first_hook)  # registered last: runs first
if mode == "close":
    rt.close()
    print("after close:", alive(), flush=True)
elif mode == "drop":
    del rt
    gc.collect()
"""


def _threads(out: str, label: str) -> list[str]:
    (line,) = [x for x in out.splitlines() if x.startswith(label + ":")]
    names = ast.literal_eval(line.split(":", 1)[1].strip())
    assert isinstance(names, list)
    return names


def _runtime_threads(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(("runtime-", "kvchunk"))]


@pytest.mark.parametrize("mode", ["close", "open", "drop"])
def test_exit_is_clean(tmp_path: Path, mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "data"), mode],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert _runtime_threads(_threads(proc.stdout, "open")), proc.stdout
    if mode == "close":
        assert _runtime_threads(_threads(proc.stdout, "after close")) == [], proc.stdout
    # concurrent.futures joins the codec pool's workers before any exit hook runs
    assert not [n for n in _threads(proc.stdout, "first exit hook") if n.startswith("kvsnap")]
    # every runtime thread was joined before llama.cpp was freed
    assert _threads(proc.stdout, "last exit hook") == [], proc.stdout
    # a runtime left open or dropped was closed at exit: both sessions are checkpointed
    for sid in ("a", "b"):
        assert list((tmp_path / "data" / "kv" / "manifests" / sid).glob("*.kvman")), sid
