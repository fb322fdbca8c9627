"""llamaffi.compute: every llama_decode runs on one thread, whoever calls; results, errors and
Ctrl-C reach the caller, and an interrupted caller still waits for the C call to end."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import llamaffi.context
from llamaffi import Model, compute

PROMPT = "One thread decodes for every caller."


def test_decodes_from_any_thread_run_on_the_compute_thread(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    raw: Callable[..., Any] = llamaffi.context.batch.llama_decode

    def recording(*args: Any) -> Any:
        seen.append(threading.current_thread().name)
        return raw(*args)

    monkeypatch.setattr(llamaffi.context.batch, "llama_decode", recording)
    tokens = model.tokenize(PROMPT)
    with model.context(n_ctx=256, n_batch=64, n_seq_max=3, n_threads=2) as ctx:
        ctx.decode(tokens, seq_id=0)  # from the main thread
        workers = [
            threading.Thread(target=ctx.decode, args=(tokens,), kwargs={"seq_id": s})
            for s in (1, 2)
        ]
        for w in workers:  # one after another: a context takes one call at a time
            w.start()
            w.join()
        ctx.decode_batch([0, 1], [tokens[0], tokens[1]], [len(tokens), len(tokens)])
    assert len(seen) == 4
    assert set(seen) == {"llama-compute"}


def test_results_and_errors_reach_the_caller() -> None:
    assert compute.run(lambda a, b: a + b, 2, 3) == 5
    assert compute.run(threading.current_thread) is not threading.current_thread()

    def fails() -> None:
        raise ValueError("from the compute thread")

    with pytest.raises(ValueError, match="from the compute thread"):
        compute.run(fails)
    # a call made from the compute thread itself runs there at once (no deadlock)
    assert compute.run(lambda: compute.run(lambda: threading.current_thread().name)) == (
        "llama-compute"
    )


def test_ctrl_c_waits_for_the_call_to_end_then_raises() -> None:
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.5)
        finished.set()

    # a real SIGINT: it wakes the caller's wait, as a Ctrl-C does
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        compute.run(slow)
    # the interrupt came at 0.1 s, but the call was never cut nor left running behind
    assert finished.is_set()
