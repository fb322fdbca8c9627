"""The crash-and-resume memory demo: ``python -m runtime.demo [--model smollm2|tiny|PATH]``.

What it shows, on SmolLM2-135M-Instruct by default (about a minute on 2 cores):

1. A child process tells the assistant one distinctive fact in each of three sessions (one
   salient fact per session: a 135M model mixes up several facts in one conversation), then
   is ``kill -9``'d in the middle of a generation.
2. A new process opens the same data directory. Each session resumes from its newest valid
   snapshot plus the journal; the demo prints where it came from and how long it took, against
   a re-prefill of the same tokens, and asks about the fact: the model answers from its
   restored KV cache.
3. A session with a small context window is driven until its first turn (the fact) has left
   the window. Asked about it, the model gets it back through long-term memory retrieval; the
   demo prints the memories used and the answer.
4. An idle session is suspended to disk (its KV cells freed: the cell counts before and after
   are printed), its newest snapshot is damaged on disk, and it resumes anyway: the damaged
   file is quarantined and an older snapshot plus the journal rebuild it.

``--model tiny`` runs the same steps on a random-weight model in seconds (its replies are
gibberish: the demo is then about the memory machinery, not the answers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.layout import CHUNK_DIR, JOURNAL_DIR, LONGTERM_DIR, QUARANTINE_DIR

if TYPE_CHECKING:
    from runtime.app import Runtime

FACTS = {
    "alice": ("My dog is called Biscuit.", "What is my dog called?", "biscuit"),
    "bruno": ("I work as a baker.", "What is my job?", "baker"),
    "chen": ("My sister's name is Ana.", "What is my sister's name?", "ana"),
}
SMALL_TALK = "Nice weather today, isn't it?"
LONG_ASK = "Tell me a long story about a lighthouse keeper."
WINDOW_SESSION = "dora"
WINDOW_FACT = ("My favourite colour is teal.", "What is my favourite colour?", "teal")
FILLER = [
    "The train this morning was twelve minutes late.",
    "We painted the kitchen a pale shade of green.",
    "I read three chapters of a novel about sailors.",
    "The neighbours are building a wooden fence.",
]
MARKER = ".llamaffi-demo"


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _open(directory: Path, args: argparse.Namespace, n_ctx: int = 2048) -> Runtime:
    from runtime.app import Runtime

    return Runtime.open(directory, model=args.model, n_ctx=n_ctx, max_resident=3)


# -- 1: the process that dies -----------------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    """Tell each session its fact, then start a long reply and wait to be killed."""
    with _open(Path(args.dir) / "run", args) as rt:
        for session, (fact, _q, _k) in FACTS.items():
            for text in (fact, SMALL_TALK):
                reply = rt.chat(session, text, max_tokens=32)
                # printed only once chat() returned: the turn is in the journal (fsynced)
                print("ACK " + json.dumps([session, text, reply.text]), flush=True)
        print("LONG", flush=True)
        rt.chat("story", LONG_ASK, max_tokens=400, on_token=lambda _t: print("TOK", flush=True))
        print("DONE", flush=True)
        time.sleep(60)
    return 0


def run_child(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Run the child; kill -9 it a few tokens into its long reply. Returns the acknowledged
    user turns."""
    cmd = [sys.executable, "-m", "runtime.demo", "--child", "--model", args.model]
    cmd += ["--dir", args.dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    acked: list[tuple[str, str]] = []
    tokens = 0
    for line in proc.stdout or ():
        kind, _, rest = line.rstrip("\n").partition(" ")
        if kind == "ACK":
            session, text, reply = json.loads(rest)
            acked.append((session, text))
            _say(f"  [{session}] user: {text}")
            _say(f"  [{session}] assistant: {reply}")
        elif kind == "LONG":
            _say(f"  [story] user: {LONG_ASK}")
        elif kind == "TOK":
            tokens += 1
            if tokens == 12:  # in the middle of the generation
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    if tokens < 12:
        raise SystemExit(f"the chatting process ended early (exit {proc.returncode})")
    _say(f"  >>> kill -9 (pid {proc.pid}) after {tokens} tokens of the reply")
    return acked


# -- 2: resume --------------------------------------------------------------------------------


def resume(args: argparse.Namespace, acked: list[tuple[str, str]]) -> None:
    """Reopen, check every acknowledged turn, time restore vs re-prefill, ask each fact."""
    run = Path(args.dir) / "run"
    start = time.perf_counter()
    with _open(run, args) as rt:
        _say(f"  runtime opened in {time.perf_counter() - start:.1f} s")
        for session in FACTS:
            users = [h["text"] for h in rt.history(session) if h["role"] == "user"]
            mine = [t for s, t in acked if s == session]
            if users[: len(mine)] != mine:
                raise SystemExit(f"an acknowledged turn of {session} was lost: this is a bug")
        _say(f"  journal: all {len(acked)} acknowledged turns are there, word for word")
        for session, (_fact, question, key) in FACTS.items():
            reply = rt.chat(session, question, max_tokens=32)
            r = reply.resumed
            assert r is not None
            prefill_ms = rt.time_reprefill(session, r.n_tokens) * 1000
            _say(
                f"  [{session}] resumed from {r.source}: {r.restored_tokens} tokens restored + "
                f"{r.replayed_tokens} replayed in {r.seconds * 1000:.1f} ms "
                f"(a re-prefill of the same {r.n_tokens} tokens: {prefill_ms:.0f} ms)"
            )
            verdict = "recalled" if key in reply.text.lower() else "not recalled"
            _say(f"  [{session}] user: {question}")
            _say(f"  [{session}] assistant: {reply.text}   <- {verdict} from the restored KV")


# -- 3: retrieval after the window moved on ---------------------------------------------------


def window(args: argparse.Namespace) -> None:
    """A small window: the first turn leaves it, and comes back through retrieval."""
    fact, question, key = WINDOW_FACT
    n_ctx = 256
    with _open(Path(args.dir) / "small-window", args, n_ctx=n_ctx) as rt:
        rt.chat(WINDOW_SESSION, fact, max_tokens=24)
        _say(f"  [{WINDOW_SESSION}] user: {fact}   (n_ctx={rt.n_ctx})")
        first = next(h["seq"] for h in rt.history(WINDOW_SESSION) if h["role"] == "user")
        turns = 0
        while first in rt.window_seqs(WINDOW_SESSION):
            rt.chat(WINDOW_SESSION, FILLER[turns % len(FILLER)], max_tokens=24)
            turns += 1
        window_tokens = rt.session_info(WINDOW_SESSION)["window_tokens"]
        _say(
            f"  {turns} more turns later the window holds {window_tokens} tokens and the "
            "first turn has shifted out of it"
        )
        reply = rt.chat(WINDOW_SESSION, question, max_tokens=32)
        for m in reply.memories:
            _say(f"  retrieved (similarity {m.similarity:.2f}, score {m.score:.2f}): {m.text}")
        verdict = "recalled" if key in reply.text.lower() else "not recalled"
        _say(f"  [{WINDOW_SESSION}] user: {question}")
        _say(f"  [{WINDOW_SESSION}] assistant: {reply.text}   <- {verdict} through retrieval")


# -- 4: suspend, damage, resume ---------------------------------------------------------------


def suspend_and_damage(args: argparse.Namespace) -> None:
    """Suspend an idle session (cells freed), damage its newest snapshot, resume anyway."""
    run = Path(args.dir) / "run"
    with _open(run, args) as rt:
        rt.chat("bruno", "Thanks, that is all for now.", max_tokens=16)
        before = rt.session_info("bruno")["kv_cells"]
        rt.suspend("bruno")
        after = rt.session_info("bruno")["kv_cells"]
        _say(f"  suspended idle session bruno: its KV cells {before} -> {after}")
        checkpoints = rt.checkpoints("bruno")
        newest = checkpoints[0]
        path = Path(newest["files"][-1])  # the last chunk (the partial tail, if it has one)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(data)
        _say(
            f"  its newest checkpoint (manifest {newest['generation']}, "
            f"{len(newest['files'])} chunks; {len(checkpoints)} checkpoints kept): flipped one "
            f"bit in chunk {path.name[:12]}"
        )
        reply = rt.chat("bruno", "Are you still there?", max_tokens=16)
        r = reply.resumed
        assert r is not None
        _say(
            f"  resumed from {r.source} {Path(r.snapshot).name if r.snapshot else ''}: "
            f"{r.restored_tokens} restored + {r.replayed_tokens} replayed in "
            f"{r.seconds * 1000:.1f} ms"
        )
        for why in r.skipped:
            _say(f"  skipped: {why}")
        quarantine = run / CHUNK_DIR / QUARANTINE_DIR
        for reason in sorted(quarantine.glob("*.reason")):
            text = reason.read_text().strip().split(": ", 1)[-1]
            _say(f"  quarantined {reason.name.removesuffix('.reason')[:12]}: {text[:100]}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the demo."""
    parser = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__)
    parser.add_argument(
        "--model", default="smollm2", help="smollm2 (default), tiny, or a path to a GGUF"
    )
    parser.add_argument(
        "--dir", default="demo-data", help="working directory (default: %(default)s)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  [log] %(name)s: %(message)s")
    if args.child:
        return child(args)
    root = Path(args.dir)
    marker = root / MARKER
    if root.exists() and any(root.iterdir()) and not marker.exists():
        raise SystemExit(f"{root} exists and was not made by this demo; choose another --dir")
    shutil.rmtree(root, ignore_errors=True)  # the previous demo run only (it has the marker)
    os.makedirs(root, exist_ok=True)
    marker.touch()
    start = time.perf_counter()
    _say(f"model: {args.model}\n\n1. three sessions, one fact each, in a child process; kill -9")
    acked = run_child(args)
    _say("\n2. a new process resumes every session and asks about its fact")
    resume(args, acked)
    _say("\n3. a small window: the fact leaves the KV, retrieval brings it back")
    window(args)
    _say("\n4. an idle session is suspended to disk; a damaged snapshot is skipped")
    suspend_and_damage(args)
    _say(
        f"\ndone in {time.perf_counter() - start:.0f} s; the data is in {root}/ "
        f"({JOURNAL_DIR}/, {CHUNK_DIR}/, {LONGTERM_DIR}/ per runtime directory)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
