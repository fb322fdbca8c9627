"""Child of test_recall.py: tells each session its fact (and some small talk), then waits to
be killed. ``python recall_child.py KV_DIR WINDOW_DIR``."""

from __future__ import annotations

import sys
import time

from runtime.app import Runtime

FACTS = [
    ("My dog is called Biscuit.", "What is my dog called?", "biscuit"),
    ("My sister's name is Ana.", "What is my sister's name?", "ana"),
    ("I work as a baker.", "What is my job?", "baker"),
    ("My favourite colour is teal.", "What is my favourite colour?", "teal"),
    ("I drive a red Volvo.", "What car do I drive?", "volvo"),
]
SMALL_TALK = "Nice weather today, isn't it?"
FILLER = [
    "The train this morning was twelve minutes late.",
    "We painted the kitchen a pale shade of green.",
    "I read three chapters of a novel about sailors.",
    "The neighbours are building a wooden fence.",
]
WINDOW_N_CTX = 256


def main(kv_dir: str, window_dir: str) -> None:
    with Runtime.open(kv_dir, model="smollm2", n_ctx=2048, max_resident=5) as rt:
        for i, (fact, _q, _k) in enumerate(FACTS):
            rt.chat(f"kv{i}", fact, max_tokens=32)
            rt.chat(f"kv{i}", SMALL_TALK, max_tokens=32)
            print(f"told kv{i}", flush=True)
    # (the close above wrote final checkpoints; the window sessions below are killed with
    # unsaved turns, so they resume from snapshot + journal)
    with Runtime.open(window_dir, model="smollm2", n_ctx=WINDOW_N_CTX, max_resident=1) as rt:
        for i, (fact, _q, _k) in enumerate(FACTS):
            sid = f"win{i}"
            rt.chat(sid, fact, max_tokens=24)
            first = rt.history(sid)[1]["seq"]
            n = 0
            session = rt._pool.peek(sid)
            while session is not None and first in session.window_seqs():
                rt.chat(sid, FILLER[n % len(FILLER)], max_tokens=24)
                n += 1
                session = rt._pool.peek(sid)
            print(f"told {sid} ({n} filler turns)", flush=True)
        print("READY", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
