"""Long-conversation memory benchmark: LoCoMo's layout, plus a synthetic set of updates,
numbers and names.

A conversation is imported through ``Runtime.import_history`` with its original timestamps
(each turn as a ``user`` message named by its speaker), consolidated (facts, summaries) with
``Runtime.consolidate``, and every question is searched with ``Runtime.search`` in its
session. A question is **found@k** when all its evidence turns are among the sources of the
top-k hits. Only turn and fact hits that name at most :data:`MAX_SOURCES` source turns count:
a summary covering a whole session would otherwise "find" everything in it (summaries still
take their place in the top k).

The data is read from a path (``LOCOMO_DIR``, default ``../shared/data/locomo-dev`` beside
the repository); LoCoMo is CC BY-NC 4.0, for evaluation only, and never copied here.

    python benchmarks/longmem.py [--locomo DIR] [--ablation] [--json OUT]
    python benchmarks/longmem.py --qa 8       # end-to-end QA on SmolLM2, token F1 (a sample)
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOCOMO = ROOT.parent / "shared" / "data" / "locomo-dev"
#: Hits naming more source turns than this do not count towards found@k.
MAX_SOURCES = 3
#: Context of the benchmark runtime: a whole LoCoMo conversation (about 30k tokens) fits the
#: tiny model's KV (1 KiB a token), so the import is measured, not the window shift.
N_CTX = 65536
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}


@dataclass
class Turn:
    """One turn of a conversation."""

    dia: str
    speaker: str
    text: str
    said_at: float


@dataclass
class Question:
    """One question with the turns that hold its evidence."""

    text: str
    evidence: list[str]
    category: int
    answer: str = ""
    expect_first: str | None = None  # synthetic updates: the text the first hit must hold
    history: str | None = None  # synthetic updates: a superseded value still reachable


@dataclass
class Conversation:
    """A conversation and its questions."""

    name: str
    turns: list[Turn]
    questions: list[Question]
    seqs: dict[str, int] = field(default_factory=dict)  # dia id -> journal seq (after import)


def locomo_dir() -> Path:
    """Where the LoCoMo files are (``LOCOMO_DIR`` or the default beside the repository)."""
    return Path(os.environ.get("LOCOMO_DIR") or DEFAULT_LOCOMO)


def _parse_date(text: str) -> float:
    """``"1:56 pm on 8 May, 2023"`` as UNIX seconds (UTC)."""
    when = datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y")
    return when.replace(tzinfo=UTC).timestamp()


def load_locomo(directory: Path) -> list[Conversation]:
    """Every ``*.json`` conversation in LoCoMo's layout in ``directory``, sorted by name.

    A shared image's caption joins its turn's text, as a reader of the chat would see it;
    category 5 (adversarial, no answer) is left out, as are evidence ids the turns lack.
    """
    conversations = []
    for path in sorted(glob.glob(str(directory / "*.json"))):
        doc = json.loads(Path(path).read_text())
        conv = doc.get("conversation", doc)
        turns: list[Turn] = []
        n = 1
        while f"session_{n}_date_time" in conv:
            base = _parse_date(conv[f"session_{n}_date_time"])
            for i, t in enumerate(conv.get(f"session_{n}") or []):
                text = t["text"]
                if t.get("blip_caption"):
                    text += f" [shares a photo: {t['blip_caption']}]"
                turns.append(Turn(t["dia_id"], t["speaker"], text, base + i))
            n += 1
        ids = {t.dia for t in turns}
        questions = [
            Question(
                q["question"],
                [e.strip() for e in q["evidence"]],
                q["category"],
                str(q.get("answer", "")),
            )
            for q in doc["qa"]
            if q.get("category") in CATEGORIES
            and q["evidence"]
            and all(e.strip() in ids for e in q["evidence"])
        ]
        conversations.append(Conversation(Path(path).stem, turns, questions))
    return conversations


# -- the synthetic set ------------------------------------------------------------------------

_CITIES = [
    "Paris",
    "Berlin",
    "Lisbon",
    "Oslo",
    "Vienna",
    "Madrid",
    "Prague",
    "Dublin",
    "Warsaw",
    "Athens",
    "Rome",
    "Zurich",
]
_EMPLOYERS = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Wonka",
    "Tyrell",
    "Cyberdyne",
]
_PEOPLE = [
    "Alice",
    "Bruno",
    "Chloe",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Luca",
    "Maya",
    "Nils",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
]
_PETS = ["Oscar", "Biscuit", "Pepper", "Luna", "Mango", "Ziggy", "Nala", "Tofu", "Juno", "Pixel"]


def synthetic(seed: int = 0, n_people: int = 20, n_notes: int = 100) -> list[Conversation]:
    """What LoCoMo lacks: knowledge updates, numbers and names.

    * **updates**: ``n_people`` people each say where they live (or work) on day 1..20 and
      that they moved (changed jobs) 3-9 days later; the question asks for the current
      value, which the first hit must hold, and the old one must still be found in history;
    * **numbers**: ``n_notes`` notes that differ only in a 3-digit number; each is asked for
      by its number;
    * **names**: pets' and relatives' names, asked for by the relation.
    """
    rng = random.Random(seed)
    day = 86400.0
    start = datetime(2026, 1, 5, 9, tzinfo=UTC).timestamp()
    convs = []
    # updates: one session per person
    turns: list[Turn] = []
    questions: list[Question] = []
    for i, person in enumerate(_PEOPLE[:n_people]):
        t0 = start + i * day
        if i % 2 == 0:
            old, new = rng.sample(_CITIES, 2)
            said = [f"I live in {old}.", f"I moved to {new} last week, it is lovely."]
            ask = f"Where does {person} live now?"
        else:
            old, new = rng.sample(_EMPLOYERS, 2)
            said = [f"I work at {old}.", f"I started a new job at {new} this week!"]
            ask = f"Where does {person} work now?"
        a, b = f"u{i}:1", f"u{i}:2"
        turns.append(Turn(a, person, said[0], t0))
        turns.append(Turn(f"u{i}:x", person, "Anyway, how was your weekend?", t0 + 60))
        turns.append(Turn(b, person, said[1], t0 + rng.randint(3, 9) * day))
        questions.append(Question(ask, [b], 4, new, expect_first=new, history=old))
    convs.append(
        Conversation("synthetic-updates", sorted(turns, key=lambda t: t.said_at), questions)
    )
    # numbers
    turns, questions = [], []
    numbers = rng.sample(range(100, 1000), n_notes)
    for i, n in enumerate(numbers):
        dia = f"n{n}"
        turns.append(
            Turn(
                dia,
                "Sam",
                f"note {n}: the spare key for shed {n} hangs behind the red door",
                start + i * 600,
            )
        )
        questions.append(Question(f"Where is the spare key for shed {n}?", [dia], 4, str(n)))
    convs.append(Conversation("synthetic-numbers", turns, questions))
    # names
    turns, questions = [], []
    for i, (person, pet) in enumerate(zip(_PEOPLE, _PETS, strict=False)):
        dia = f"p{i}"
        kind = ["dog", "cat", "parrot", "rabbit", "hamster"][i % 5]
        turns.append(
            Turn(
                dia, person, f"My {kind} is called {pet} and he loves the garden.", start + i * 900
            )
        )
        turns.append(Turn(f"p{i}x", person, "The weather was nice today.", start + i * 900 + 60))
        questions.append(Question(f"What is the name of {person}'s {kind}?", [dia], 4, pet))
    convs.append(Conversation("synthetic-names", turns, questions))
    return convs


# -- running ----------------------------------------------------------------------------------


@dataclass
class Result:
    """found@5 / found@10 per category, and the costs."""

    label: str
    found5: dict[str, float]
    found10: dict[str, float]
    counts: dict[str, int]
    query_p50_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        cats = " | ".join(f"{self.found10.get(c, 0):.1%}" for c in CATEGORIES.values())
        return f"| {self.label} | {self.found5['all']:.1%} | {self.found10['all']:.1%} | {cats} |"


def import_all(
    rt: Any, convs: Sequence[Conversation], *, consolidate: bool = True
) -> dict[str, float]:
    """Import every conversation into its own session; returns ingest costs."""
    turns = 0
    start = time.perf_counter()
    for conv in convs:
        messages = [
            {"role": "user", "name": t.speaker, "content": t.text, "created_at": t.said_at}
            for t in conv.turns
        ]
        seqs = rt.import_history(f"bench-{conv.name}", messages)
        conv.seqs = {t.dia: s for t, s in zip(conv.turns, seqs, strict=True)}
        turns += len(conv.turns)
    imported = time.perf_counter() - start
    start = time.perf_counter()
    made = collections.Counter()
    if consolidate:
        for conv in convs:
            made.update(rt.consolidate(f"bench-{conv.name}"))
    return {
        "turns": turns,
        "ingest_turns_per_s": turns / imported if imported else 0.0,
        "consolidate_s": time.perf_counter() - start,
        **{f"made_{k}": float(v) for k, v in made.items()},
    }


def evaluate(
    search: Callable[[str, str], Sequence[Any]], convs: Sequence[Conversation], label: str
) -> Result:
    """found@5/@10 of ``search(session, question)`` over every question."""
    found5: collections.Counter[str] = collections.Counter()
    found10: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    times = []
    for conv in convs:
        for q in conv.questions:
            want = {conv.seqs[e] for e in q.evidence}
            t = time.perf_counter()
            hits = search(f"bench-{conv.name}", q.text)
            times.append((time.perf_counter() - t) * 1000)
            cat = CATEGORIES[q.category]
            for key in ("all", cat):
                counts[key] += 1
                if want <= _sources(hits[:5]):
                    found5[key] += 1
                if want <= _sources(hits[:10]):
                    found10[key] += 1
    return Result(
        label,
        {k: found5[k] / n for k, n in counts.items()},
        {k: found10[k] / n for k, n in counts.items()},
        dict(counts),
        statistics.median(times) if times else 0.0,
    )


def _sources(hits: Iterable[Any]) -> set[int]:
    out: set[int] = set()
    for h in hits:
        if h.kind in ("turn", "fact") and len(h.sources) <= MAX_SOURCES:
            out.update(h.sources)
    return out


def ablation(store_dir: Path, convs: Sequence[Conversation]) -> list[Result]:
    """The same imported store searched with each signal added in turn."""
    from runtime.embed import Embedder
    from runtime.longterm import MemoryStore
    from runtime.longterm.ranking import FusionWeights

    embedder = Embedder.default()
    steps: list[tuple[str, FusionWeights, tuple[str, ...]]] = [
        ("dense only", FusionWeights(lexical=0.0, speaker=0.0, in_period=1.0), ("turn",)),
        ("+ BM25 (turn + context)", FusionWeights(speaker=0.0, in_period=1.0), ("turn",)),
        ("+ speaker", FusionWeights(in_period=1.0), ("turn",)),
        ("+ time", FusionWeights(), ("turn",)),
        ("+ facts", FusionWeights(), ("turn", "fact")),
        ("+ summaries (default)", FusionWeights(), ("turn", "fact", "summary")),
    ]
    results = []
    for label, fusion, kinds in steps:
        with MemoryStore(store_dir, embedder, fusion=fusion, read_only=True) as store:
            results.append(
                evaluate(
                    lambda sid, q, s=store, k=kinds: s.search(
                        q, 10, session=sid, kinds=k, with_global=True, touch=False
                    ),
                    convs,
                    label,
                )
            )
    return results


def check_updates(rt: Any, conv: Conversation) -> dict[str, int]:
    """Synthetic updates: how often the current value ranks first, and the old one is still
    reachable through the first hit's history (``Runtime.memory_history``)."""
    first = reachable = 0
    for q in conv.questions:
        hits = rt.search(q.text, 10, session=f"bench-{conv.name}")
        if hits and q.expect_first and q.expect_first in hits[0].text:
            first += 1
        history = rt.memory_history(hits[0].id) if hits else []
        if q.history and any(q.history in m.text and m.superseded_by for m in history):
            reachable += 1
    return {
        "current_first": first,
        "history_reachable": reachable,
        "questions": len(conv.questions),
    }


def run(locomo: Path | None, *, do_ablation: bool, model: str = "tiny") -> dict[str, Any]:
    """Import, consolidate and evaluate LoCoMo (if ``locomo`` holds it) and the synthetic set."""
    from runtime import Runtime

    report: dict[str, Any] = {}
    sets: list[tuple[str, list[Conversation]]] = [("synthetic", synthetic())]
    if locomo is not None and any(locomo.glob("*.json")):
        sets.insert(0, ("locomo", load_locomo(locomo)))
    else:  # say so: the synthetic set alone reads as a perfect score
        print(
            f"longmem: no LoCoMo files (*.json) in {locomo}: the synthetic set only; set "
            "LOCOMO_DIR or --locomo",
            file=sys.stderr,
        )
    for name, convs in sets:
        with tempfile.TemporaryDirectory() as tmp:
            with Runtime(
                Path(tmp) / "data", model=model, n_ctx=N_CTX, system_prompt=None, idle_suspend_s=0
            ) as rt:
                costs = import_all(rt, convs)
                result = evaluate(lambda sid, q, r=rt: r.search(q, 10, session=sid), convs, name)
                result.extra.update(costs)
                if name == "synthetic":
                    result.extra["updates"] = check_updates(rt, convs[0])
            db = Path(tmp) / "data" / "longterm"
            result.extra["store_bytes_per_turn"] = sum(
                p.stat().st_size for p in db.iterdir() if p.is_file()
            ) / max(1, costs["turns"])
            report[name] = {"result": result.__dict__}
            if do_ablation:
                report[name]["ablation"] = [r.__dict__ for r in ablation(db, convs)]
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    head = "| run | found@5 | found@10 | " + " | ".join(CATEGORIES.values()) + " |"
    rule = "|---" * (3 + len(CATEGORIES)) + "|"
    lines = []
    for name, part in report.items():
        r = Result(**part["result"])
        lines += [f"### {name}", "", head, rule, r.row(), ""]
        ex = r.extra
        lines.append(
            f"ingest {ex['ingest_turns_per_s']:.0f} turns/s, query p50 {r.query_p50_ms:.1f} ms, "
            f"store {ex['store_bytes_per_turn'] / 1024:.1f} KiB/turn, questions {r.counts['all']}, "
            f"consolidation {ex['consolidate_s']:.1f} s"
            + (f", updates {ex['updates']}" if "updates" in ex else "")
        )
        lines.append("")
        if "ablation" in part:
            lines += ["ablation (same store):", "", head, rule]
            lines += [Result(**a).row() for a in part["ablation"]]
            lines.append("")
    return "\n".join(lines)


# -- end-to-end QA (information only: judge memory by retrieval, not by a 135M model) -------


def token_f1(answer: str, gold: str) -> float:
    """SQuAD's token F1 of ``answer`` against ``gold`` (lower-cased words, articles and
    punctuation dropped)."""
    from collections import Counter

    def norm(text: str) -> list[str]:
        words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
        return [w for w in words if w not in ("a", "an", "the")]

    got, want = norm(answer), norm(gold)
    common = sum((Counter(got) & Counter(want)).values())
    if not got or not want or not common:
        return float(got == want)
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def end_to_end(locomo: Path, per_conversation: int, model: str = "smollm2") -> dict[str, Any]:
    """Mean token F1 of ``model``'s answers to ``per_conversation`` questions of each LoCoMo
    conversation (a fixed sample), with the memories retrieval puts into the prompt and
    without them (the KV window only)."""
    from runtime import Runtime

    convs = load_locomo(locomo)
    rng = random.Random(0)
    scores: dict[str, list[float]] = {"with memories": [], "KV window only": []}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Runtime(Path(tmp) / "data", model=model, n_ctx=4096, memory_k=5, idle_suspend_s=0) as rt,
    ):
        import_all(rt, convs)
        for conv in convs:
            sid = f"bench-{conv.name}"
            for q in rng.sample(conv.questions, min(per_conversation, len(conv.questions))):
                for label, use in (("with memories", True), ("KV window only", False)):
                    reply = rt.chat(
                        sid,
                        f"{q.text} Answer in a few words.",
                        max_tokens=24,
                        temperature=0.0,
                        remember=False,
                        use_memory=use,
                    )
                    scores[label].append(token_f1(reply.text, q.answer))
    return {k: statistics.mean(v) if v else 0.0 for k, v in scores.items()} | {
        "questions": len(scores["with memories"]),
        "model": model,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--locomo", type=Path, default=locomo_dir())
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--qa",
        type=int,
        metavar="N",
        help="only the end-to-end QA: N questions per conversation on SmolLM2, token F1",
    )
    args = parser.parse_args(argv)
    if args.qa:
        print(json.dumps(end_to_end(args.locomo, args.qa), indent=1))
        return 0
    report = run(args.locomo, do_ablation=args.ablation)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
