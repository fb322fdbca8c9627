"""The crash-and-resume memory demo: ``python -m runtime.demo [--model PATH]``.

1. A child process chats (user turns + generated replies). Every turn is journalled and
   fsynced, decoded into the session's KV sequence, snapshotted, and embedded into long-term
   memory. The parent ``kill -9``s it in the middle of a turn.
2. The parent resumes the session: the newest valid snapshot is restored and checked against
   the journal; it compares the restore time with a full re-prefill of the same tokens.
3. It damages the newest snapshot on disk and resumes again: the damaged file is quarantined
   and the KV is rebuilt from an older snapshot plus the journal.
4. It retrieves from long-term memory and puts the hits into the prompt.

Without ``--model`` a tiny random-weight model is written first; its replies are gibberish
(the weights are random) — the demo is about memory, not prose.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from runtime.session import ResumeReport, Session, SessionPool

SESSION = "alice"
USER_TURNS = [
    ("My dog is called Biscuit and she is afraid of thunder.", 0.9),
    ("I moved to Lisbon in March, near the river.", 0.7),
    ("Remind me to call the vet on Friday about Biscuit's vaccine.", 0.8),
    ("My sister Ana visits every second Sunday.", 0.6),
    ("I prefer tea in the morning and coffee after lunch.", 0.4),
    ("The project deadline moved to the 14th of December.", 0.8),
]
KILL_AFTER = 4  # acknowledged user turns before the kill


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from llamaffi.testing import make_model

    path = Path(args.dir) / "models" / f"{args.preset}-seed0.gguf"
    if not path.exists():
        _say(f"writing a {args.preset} random-weight model to {path} (--model for your own)")
        make_model(path, preset=args.preset, seed=0)
    return path


def _open(model_path: Path, n_seq_max: int = 2):  # type: ignore[no-untyped-def]
    from llamaffi import Model

    model = Model(model_path)
    ctx = model.context(n_ctx=2048, n_batch=512, n_seq_max=n_seq_max)
    # Warm up (first-decode graph allocation) so the timings below compare like with like.
    ctx.decode([model.bos if model.bos >= 0 else 0], seq_id=n_seq_max - 1)
    ctx.memory.seq_rm(n_seq_max - 1)
    return model, ctx


# -- phase 1: the process that dies ---------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    """Chat until killed; print one line per acknowledged step."""
    from runtime.embed import Embedder
    from runtime.memory import MemoryStore
    from runtime.session import SessionPool, sync_longterm

    run = Path(args.dir) / "run"
    _model, ctx = _open(Path(args.model))
    memory = MemoryStore.open(run / "longterm", Embedder.default())
    pool = SessionPool(ctx, run, keep=3)
    session, _ = pool.get(SESSION)
    for i, (text, importance) in enumerate(USER_TURNS):
        _say(f"BEGIN {i}")
        session.append("user", text, meta={"importance": importance})
        sync_longterm(session, memory)
        _say(f"SAVED {i} {text}")
        entry = session.reply(n_predict=8)
        _say(f"REPLY {i} {entry.text!r}")
    _say("DONE")
    time.sleep(60)  # wait to be killed
    return 0


def run_child(args: argparse.Namespace, model_path: Path) -> list[str]:
    """Run the chatting child, kill it mid-turn; return the user turns it acknowledged."""
    cmd = [sys.executable, "-m", "runtime.demo", "--child", "--model", str(model_path)]
    cmd += ["--dir", str(args.dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    acknowledged: list[str] = []
    killed = False
    for line in proc.stdout or ():
        kind, _, rest = line.rstrip("\n").partition(" ")
        if kind == "SAVED":
            acknowledged.append(rest.partition(" ")[2])
            _say(f"  user      {acknowledged[-1]}")
        elif kind == "REPLY":
            _say(f"  assistant {rest.partition(' ')[2]}")
        elif kind == "BEGIN" and len(acknowledged) == KILL_AFTER:
            # The child is now inside a turn: journal write, decode or snapshot.
            time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait()
    if not killed:
        raise SystemExit(f"the chatting process ended early (exit {proc.returncode}); see above")
    turn = KILL_AFTER + 1
    _say(f"  >>> kill -9 (pid {proc.pid}, exit {proc.returncode}) in the middle of turn {turn}")
    return acknowledged


# -- phase 2: resume -----------------------------------------------------------------------


def _resumed(pool: SessionPool) -> tuple[Session, ResumeReport]:
    session, report = pool.get(SESSION)
    if report is None:  # a fresh pool always resumes; this would be a bug in the demo
        raise SystemExit("the session was unexpectedly resident already")
    return session, report


def resume(model_path: Path, run: Path, acknowledged: list[str]) -> None:
    from runtime.session import SessionPool

    model, ctx = _open(model_path)
    with SessionPool(ctx, run, keep=3) as pool:
        session, report = _resumed(pool)
        users = [e.text for e in session.journal if e.role == "user"]
        intact = users[: len(acknowledged)] == acknowledged
        _say(
            f"  journal: {len(session.journal)} entries, {len(users)} user turns; all "
            f"{len(acknowledged)} acknowledged before the kill are there, word for word: {intact}"
        )
        if not intact:
            raise SystemExit("an acknowledged turn was lost: this is a bug, please report it")
        _say(
            f"  resumed from {report.source}: {report.restored_tokens} tokens restored "
            f"+ {report.replayed_tokens} replayed in {report.seconds * 1000:.1f} ms "
            f"({report.snapshot.name if report.snapshot else '-'})"
        )
        tokens = session.tokens()
        probe = model.tokenize(" Biscuit", add_special=False)
        ctx.memory.seq_cp(session.seq_id, 1)
        ctx.decode(probe, seq_id=1)
        restored_logits = ctx.logits()
        ctx.memory.seq_rm(1)
        start = time.perf_counter()
        ctx.decode(tokens, seq_id=1)
        prefill_s = time.perf_counter() - start
        ctx.decode(probe, seq_id=1)
        diff = float(np.max(np.abs(ctx.logits() - restored_logits)))
        ctx.memory.seq_rm(1)
        size = report.snapshot.stat().st_size if report.snapshot else 0
        raw = ctx.seq_state_size(session.seq_id)
        _say(
            f"  a full re-prefill of the same {len(tokens)} tokens takes {prefill_s * 1000:.1f} ms "
            f"(on the tiny model both are milliseconds; `./dev bench` measures a 22-layer model)"
        )
        _say(f"  max |logit diff|, batched re-prefill vs restored KV: {diff:.2e} (float rounding)")
        _say(f"  snapshot file {size:,} bytes for {raw:,} bytes of KV state")
    model.close()


def damage_and_resume(model_path: Path, run: Path) -> None:
    from runtime.session import SessionPool
    from runtime.store import SnapshotStore

    with SnapshotStore(run / "snapshots", readonly=True) as store:
        newest = store.generations(SESSION)[0][1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x40
    newest.write_bytes(data)
    _say(f"  flipped one bit in {newest.name}")
    model, ctx = _open(model_path)
    with SessionPool(ctx, run, keep=3) as pool:
        _, report = _resumed(pool)
        quarantined = sorted((newest.parent / "quarantine").glob("*.reason"))
        _say(
            f"  resumed from {report.source} "
            f"{report.snapshot.name if report.snapshot else ''}: "
            f"{report.restored_tokens} restored + {report.replayed_tokens} replayed from the "
            f"journal in {report.seconds * 1000:.1f} ms"
        )
        if quarantined:
            reason = quarantined[-1].read_text().strip().split(": ", 1)[0]
            _say(f"  quarantined {quarantined[-1].name.removesuffix('.reason')} ({reason})")
    model.close()


def recall(model_path: Path, run: Path) -> None:
    from runtime.embed import Embedder
    from runtime.memory import MemoryStore
    from runtime.session import SessionPool, sync_longterm

    question = "What is my dog's name, and what scares her?"
    model, ctx = _open(model_path)
    with (
        SessionPool(ctx, run, keep=3) as pool,
        MemoryStore.open(run / "longterm", Embedder.default()) as memory,
    ):
        session, _ = pool.get(SESSION)
        added = sync_longterm(session, memory)
        _say(
            f"  caught up from the journal: {added} turn(s) the crash kept out of long-term memory"
        )
        w = memory.weights
        _say(
            f"  {len(memory)} items; query {question!r}; score = {w.relevance}*similarity "
            f"+ {w.recency}*recency + {w.importance}*importance"
        )
        hits = memory.search(question, k=3, session=SESSION)
        for hit in hits:
            _say(
                f"  {hit.score:.3f}  sim {hit.similarity:.3f} rec {hit.recency:.2f} "
                f"imp {hit.importance:.1f}  {hit.text}"
            )
        notes = "; ".join(h.text for h in hits)
        session.append("system", f"Relevant memories: {notes}")
        session.append("user", question)
        reply = session.reply(n_predict=8)
        _say(f"  the prompt now carries the memories; assistant: {reply.text!r}")
    model.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the demo."""
    parser = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__)
    parser.add_argument("--model", help="your own GGUF (default: a tiny random-weight model)")
    parser.add_argument(
        "--dir", default="demo-data", help="working directory (default: %(default)s)"
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "tinyllama-geometry"],
        help="generated model without --model (tinyllama-geometry: 2.2 GB, slow prefill)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  [log] %(name)s: %(message)s")
    if args.child:
        return child(args)

    model_path = _model_path(args)
    run = Path(args.dir) / "run"
    marker = run / ".llamaffi-demo"
    if run.exists() and not marker.exists():
        raise SystemExit(f"{run} exists and was not made by this demo; choose another --dir")
    shutil.rmtree(run, ignore_errors=True)  # the previous demo run only (it has the marker)
    os.makedirs(run, exist_ok=True)
    marker.touch()
    _say(f"model: {model_path}\n\n1. chatting in a child process, then kill -9")
    acknowledged = run_child(args, model_path)
    _say("\n2. a new process resumes the session")
    resume(model_path, run, acknowledged)
    _say("\n3. damage the newest snapshot, resume again")
    damage_and_resume(model_path, run)
    _say("\n4. long-term memory: retrieve and put into the prompt")
    recall(model_path, run)
    _say(
        f"\nall data is in {run}/ (journals/, snapshots/, longterm/); "
        "`python -m runtime snapshot verify` checks the snapshots"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
