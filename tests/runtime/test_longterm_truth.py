"""Long-term memory that stays true: nothing distinct is merged away, time and provenance are
kept, newer facts supersede older ones, and a forgotten session leaves no trace on disk."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from runtime.app import Runtime
from runtime.longterm import MemoryStore
from runtime.longterm.facts import extract, parse_llm_facts
from runtime.longterm.items import NewItem
from runtime.longterm.lexical import Stemmer, signature, time_range
from runtime.longterm.retrieval import informative_terms
from tests.runtime.memory_helpers import HashEmbedder

DAY = 86400.0
T0 = datetime(2023, 5, 8, 13, 56, tzinfo=UTC).timestamp()

#: Pairs that differ in one number, one name, one date, one "not": different facts.
PAIRS = [
    (
        "note 124: the spare key for shed 124 hangs behind the red door",
        "note 121: the spare key for shed 121 hangs behind the red door",
    ),
    ("My sister Ana visits every second Sunday.", "My sister Eva visits every second Sunday."),
    ("The dentist appointment is in March.", "The dentist appointment is in May."),
    ("I like spicy food very much.", "I do not like spicy food very much."),
]


def test_signature_tells_numbers_names_dates_and_negations_apart() -> None:
    for a, b in PAIRS:
        assert signature(a) != signature(b), (a, b)
    assert signature("I may go.") == signature("I might go.")  # "may" the verb is no month


def test_pairs_that_differ_in_one_detail_are_both_kept(
    memstore: MemoryStore, minilm: object
) -> None:
    import numpy as np

    vectors = minilm.embed([PAIRS[0][0], PAIRS[0][1]])  # type: ignore[attr-defined]
    # the pair the old cosine-only rule merged: this test would pass vacuously without it
    assert float(np.dot(vectors[0], vectors[1])) >= memstore.dedup_similarity
    seq = 0
    for a, b in PAIRS:
        # one put each: the second must see the first in the index (a batch would not)
        first = memstore.put([NewItem(a, kind="turn", session="s", sources=(seq,))])
        second = memstore.put([NewItem(b, kind="turn", session="s", sources=(seq + 1,))])
        seq += 2
        assert first != second, (a, b)
    assert memstore.count(session="s") == 2 * len(PAIRS)
    for a, b in PAIRS:
        for text in (a, b):
            assert memstore.search(text, 1, session="s", touch=False)[0].text == text


def test_the_same_thing_said_twice_is_merged_with_both_sources(memstore: MemoryStore) -> None:
    first = memstore.put(
        [NewItem("I love hiking in the Alps.", kind="turn", session="s", sources=(3,))]
    )
    again = memstore.put(
        [NewItem("i love hiking in the alps", kind="turn", session="s", sources=(9,))]
    )
    assert first == again
    item = memstore.get(first[0])
    assert item is not None and item.sources == (3, 9)
    assert item.meta["merged"] == ["i love hiking in the alps"]  # the dropped text is kept
    # an id given twice (a re-run after a crash) adds nothing
    again = memstore.put([NewItem("x y z w", kind="turn", session="s", sources=(11,), id="fixed")])
    assert memstore.put([NewItem("x y z w", kind="turn", session="s", sources=(11,), id="fixed")])
    assert memstore.count(session="s") == 2


def test_codes_and_names_are_found_word_for_word(memstore: MemoryStore) -> None:
    flights = [
        f"My flight LH {n} leaves from gate B{n % 40} in the morning." for n in range(1200, 1260)
    ]
    memstore.put(
        [NewItem(t, kind="turn", session="s", sources=(i,)) for i, t in enumerate(flights)]
    )
    for n in (1203, 1234, 1259):
        hits = memstore.search(f"LH {n}", 1, session="s", touch=False)
        assert hits[0].text == f"My flight LH {n} leaves from gate B{n % 40} in the morning."


def test_the_stemmer_gives_the_stems_the_index_stores() -> None:
    stemmer = Stemmer()
    try:
        assert stemmer.stems(["adopted", "cats", "lh", "1234"]) == [
            ["adopt"],
            ["cat"],
            ["lh"],
            ["1234"],
        ]
        assert stemmer.stems([]) == []
        assert stemmer.stems(["running"]) == [["run"]]  # nothing is left from the last call
    finally:
        stemmer.close()


def test_a_term_in_most_items_is_left_out_of_the_match_and_costs_nothing(
    tmp_path: Path,
) -> None:
    # "likes" is in 9 of 10 items: its BM25 weight is nil, so only "Oscar" is matched
    texts = [f"Ana likes walk number {i}" for i in range(9)] + ["Oscar the cat sleeps a lot"]
    texts = [f"{t} park" if i < 4 else f"{t} river" if i < 9 else t for i, t in enumerate(texts)]
    with MemoryStore(tmp_path / "mem", HashEmbedder()) as mem:  # type: ignore[arg-type]
        mem.put([NewItem(t, kind="turn", session="s", sources=(i,)) for i, t in enumerate(texts)])
        db = sqlite3.connect(mem.db_path)
        stemmer = Stemmer()
        try:

            def judged(words: list[str]) -> list[str]:
                return informative_terms(db, stemmer, words)

            assert judged(["likes", "oscar", "unknown"]) == ["oscar", "unknown"]
            assert judged(["walked", "number", "0"]) == ["0"]
            # in 5 of 10 a word is kept (not more than half); in 9 of 10 it is left out
            assert judged(["park", "river", "ana"]) == ["park", "river"]
            # common words only: all kept, they are the only lexical signal there is
            assert judged(["likes", "ana"]) == ["likes", "ana"]
        finally:
            stemmer.close()
            db.close()
        hits = mem.search("what does Oscar like?", 3, session="s", touch=False)
        assert hits[0].text == "Oscar the cat sleeps a lot"


def test_a_word_common_in_the_store_but_rare_in_the_session_still_matches(
    tmp_path: Path,
) -> None:
    # 30 pizza notes in session a, one in b: in b, "pizza" is what finds the dough
    a = [f"We ordered pizza number {i} for the team." for i in range(30)]
    b = [f"The cat slept on chair {i}." for i in range(7)] + ["I bought pizza dough today."]
    with MemoryStore(tmp_path / "mem", HashEmbedder()) as mem:  # type: ignore[arg-type]
        mem.put([NewItem(t, kind="turn", session="a", sources=(i,)) for i, t in enumerate(a)])
        mem.put([NewItem(t, kind="turn", session="b", sources=(i,)) for i, t in enumerate(b)])
        hits = mem.search("pizza", 3, session="b", touch=False)
        assert hits[0].text == "I bought pizza dough today."
        assert hits[0].relevance > 0.9  # first in the lexical list, as before the pruning
        # in a, where it is in every item, it is left out of the match (dense only)
        db = sqlite3.connect(mem.db_path)
        stemmer = Stemmer()
        try:

            def judged(session: str) -> list[str]:
                scope = ("session = ?", [session])
                return informative_terms(db, stemmer, ["pizza", "dough"], *scope)

            assert judged("b") == ["pizza", "dough"]
            assert judged("a") == ["dough"]
        finally:
            stemmer.close()
            db.close()


def test_items_carry_time_speaker_and_sources(memstore: MemoryStore) -> None:
    memstore.put(
        [
            NewItem("I went to a support group yesterday.", kind="turn", session="s",
                    said_at=T0, speaker="Caroline", sources=(2,)),
            NewItem("I went to a support group yesterday.", kind="turn", session="s",
                    said_at=T0 + 40 * DAY, speaker="Melanie", sources=(7,)),
        ]
    )  # fmt: skip
    hits = memstore.search("When did Caroline go to the support group?", 2, session="s")
    assert hits[0].speaker == "Caroline" and hits[0].sources == (2,)
    assert hits[0].said_at == T0 and hits[0].stored_at != T0
    assert hits[0].render().startswith("[2023-05-08] Caroline: I went")
    # a period the query names ranks what was said in it first, relative to its "now"
    june = memstore.search("What happened in June 2023?", 1, session="s", now=T0 + 60 * DAY)
    assert june[0].speaker == "Melanie"


def test_time_range_reads_the_periods_people_name() -> None:
    now = datetime(2023, 6, 15, 12, tzinfo=UTC).timestamp()
    may = time_range("what did I do in May?", now)
    assert may == (
        datetime(2023, 5, 1, tzinfo=UTC).timestamp(),
        datetime(2023, 6, 1, tzinfo=UTC).timestamp(),
    )
    yesterday = time_range("yesterday", now)
    assert yesterday is not None and yesterday[1] - yesterday[0] == DAY
    week = time_range("last week", now)
    assert week is not None and week[0] < now - 7 * DAY < week[1] <= now
    assert time_range("I may come", now) is None
    assert time_range("nothing here", now) is None


def test_facts_resolve_the_speaker_and_name_their_attribute() -> None:
    (fact,) = extract("I moved to Berlin last month!", "Caroline")
    assert fact.text == "Caroline lives in Berlin." and fact.attribute == "location"
    (fact,) = extract("my favourite colour is teal", None)
    assert (
        fact.text == "The user's favourite colour is teal." and fact.attribute == "favourite colour"
    )
    (fact,) = extract("I adopted a cat from the shelter", "Mel")
    assert fact.text == "Mel adopted a cat from the shelter." and fact.attribute is None
    assert extract("Hi!", "Mel") == [] and extract("Did you go?", "Mel") == []


def test_llm_facts_are_validated_and_garbage_yields_none() -> None:
    good = parse_llm_facts(
        '{"facts": [{"text": "Ana lives in Oslo", "attribute": "location", "value": "Oslo"}]}',
        "Ana",
    )
    assert good is not None and good[0].attribute == "location"
    for bad in ("not json", '{"facts": "x"}', '{"facts": [{"txt": 1}]}', '[{"text": ""}]'):
        assert parse_llm_facts(bad, "Ana") is None
    # "value": null is no value, not a bad answer
    nulls = parse_llm_facts('[{"text": "Ana has a cat", "attribute": null, "value": null}]', "Ana")
    assert nulls is not None and nulls[0].value == "" and nulls[0].attribute is None


def test_an_llm_fact_about_someone_else_never_supersedes_the_speaker_s() -> None:
    answer = (
        '{"facts": [{"text": "Ana lives in Oslo", "subject": "I", "attribute": "location",'
        ' "value": "Oslo"}, {"text": "Tom lives in Paris", "subject": "Tom",'
        ' "attribute": "location", "value": "Paris"}, {"text": "Ana lives in Bergen",'
        ' "subject": "Ana", "attribute": "location", "value": "Bergen"}]}'
    )
    facts = parse_llm_facts(answer, "Ana")
    assert facts is not None
    assert [(f.subject, f.attribute) for f in facts] == [
        ("ana", "location"),
        ("tom", "location"),  # Tom's, not Ana's: it supersedes only Tom's location
        ("ana", None),  # one answer cannot give two current values of one attribute
    ]
    more = parse_llm_facts(
        '[{"text": "Her brother lives in Rome", "subject": "my brother", "attribute": "location",'
        ' "value": "Rome"}, {"text": "He lives in Oslo", "subject": "he",'
        ' "attribute": "location", "value": "Oslo"}, {"text": "Ana may move", "subject": "Ana",'
        ' "attribute": "location", "value": null}, {"text": "x", "subject": "her sister",'
        ' "attribute": "job", "value": "nurse"}]',
        "Ana",
    )
    assert more is not None
    assert [(f.subject, f.attribute) for f in more] == [
        ("ana my brother", "location"),  # Ana's brother, never Tom's
        ("ana", None),  # a pronoun names no one: nothing superseded
        ("ana", None),  # no value: nothing superseded
        ("ana", None),  # someone else's relation names no one
    ]
    assert parse_llm_facts('[{"text": "Ana has 0 cats", "value": 0}]', "Ana") is None


def test_a_v1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    directory = tmp_path / "mem"
    with MemoryStore(directory, HashEmbedder()) as s:  # type: ignore[arg-type]
        item = s.add(
            "the blue bicycle is in the garage", kind="turn", session="s", meta={"journal_seq": 4}
        )
    db = sqlite3.connect(directory / "memory.sqlite3")
    for index in ("items_norm", "items_fact", "items_exact"):  # none is in a v1 store
        db.execute(f"DROP INDEX {index}")
    db.execute("DROP TABLE items_fts")
    for column in (
        "said_at",
        "speaker",
        "sources",
        "norm",
        "superseded_by",
        "subject",
        "attribute",
    ):
        db.execute(f"ALTER TABLE items DROP COLUMN {column}")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="version 1"):
        MemoryStore(directory, HashEmbedder(), read_only=True)  # type: ignore[arg-type]
    with MemoryStore(directory, HashEmbedder()) as s:  # type: ignore[arg-type]
        hits = s.search("bicycle garage", 1, touch=False)
        assert hits[0].id == item and hits[0].sources == (4,)


def test_archive_bounds_a_session_and_keeps_facts(tmp_path: Path) -> None:
    with MemoryStore(tmp_path / "mem", HashEmbedder()) as s:  # type: ignore[arg-type]
        s.put(
            [
                NewItem(
                    f"turn {i}",
                    kind="turn",
                    session="s",
                    sources=(i,),
                    importance=0.1 if i < 5 else 0.5,
                )
                for i in range(20)
            ]
        )
        s.put([NewItem(f"fact {i}", kind="fact", session="s", sources=(i,)) for i in range(5)])
        assert s.archive_turns("s", 15) == 10
        assert s.count(session="s", kind="fact") == 5 and s.count(session="s") == 15
        kept = {h.text for h in s.search("turn", 100, session="s", kinds=["turn"], touch=False)}
        assert not any(f"turn {i}" in kept for i in range(5))  # the least important went first


# -- through the runtime --------------------------------------------------------------------


@pytest.fixture
def rt(tmp_path: Path, minilm: object) -> Iterator[Runtime]:
    with Runtime(
        tmp_path / "data",
        model="tiny",
        n_ctx=8192,
        embedder=minilm,
        idle_suspend_s=0,  # type: ignore[arg-type]
    ) as r:
        yield r


PEOPLE = [
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
CITIES = [
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
    "Bergen",
    "Porto",
    "Ghent",
    "Turin",
    "Split",
    "Cork",
    "Graz",
    "Lyon",
]
FIRMS = [
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
    "Soylent",
    "Vandelay",
    "Gringotts",
    "Monarch",
    "Aperture",
    "Oscorp",
    "Massive",
    "Dunder",
    "Krusty",
    "Virtucon",
]


def test_twenty_updates_rank_the_current_value_first(rt: Runtime) -> None:
    messages = []
    for i, person in enumerate(PEOPLE):
        t = T0 + i * DAY
        if i % 2 == 0:
            old, new, ask = CITIES[i], CITIES[(i + 7) % 20], f"Where does {person} live?"
            said = (f"I live in {old}.", f"I moved to {new} last week, it is lovely.")
        else:
            old, new, ask = FIRMS[i], FIRMS[(i + 7) % 20], f"Where does {person} work?"
            said = (f"I work at {old}.", f"I started a new job at {new} this week!")
        messages.append(
            {
                "role": "user",
                "name": person,
                "content": said[0],
                "created_at": t,
                "ask": ask,
                "old": old,
                "new": new,
            }
        )
        messages.append(
            {"role": "user", "name": person, "content": said[1], "created_at": t + 5 * DAY}
        )
    messages.sort(key=lambda m: m["created_at"])
    asks = [(m["ask"], m["old"], m["new"]) for m in messages if "ask" in m]
    seqs = rt.import_history(
        "people",
        [
            {k: v for k, v in m.items() if k in ("role", "name", "content", "created_at")}
            for m in messages
        ],
    )
    assert len(seqs) == 40 and seqs == sorted(seqs)
    made = rt.consolidate("people")
    assert made["facts"] >= 40
    first = reachable = 0
    for ask, old, new in asks:
        hits = rt.search(ask, 10, session="people")
        first += new in hits[0].text
        history = rt.memory_history(hits[0].id)
        reachable += (
            bool(history)
            and new in history[0].text
            and any(old in item.text and item.superseded_by for item in history[1:])
        )
    assert (first, reachable) == (20, 20)
    # consolidating again adds nothing (a pure function of the journal, behind a watermark)
    assert rt.consolidate("people")["facts"] == 0


def test_import_keeps_who_said_what_and_when(rt: Runtime) -> None:
    seqs = rt.import_history(
        "talk",
        [
            {
                "role": "user",
                "name": "Caroline",
                "content": "I went to a LGBTQ support group yesterday.",
                "created_at": T0,
            },
            {"role": "assistant", "content": "That sounds powerful."},
            {
                "role": "user",
                "name": "Melanie",
                "content": "I painted a sunrise by the lake.",
                "created_at": "2023-05-09T10:00:00Z",
            },
        ],
    )
    hits = rt.search("When did Caroline go to the support group?", 3, session="talk")
    top = hits[0]
    assert (top.speaker, top.sources, top.session, top.said_at) == (
        "Caroline",
        (seqs[0],),
        "talk",
        T0,
    )
    melanie = rt.search("sunrise painting", 1, session="talk")[0]
    assert melanie.sources == (seqs[2],) and melanie.said_at == T0 + (20 * 3600 + 4 * 60)


def test_forgetting_a_session_leaves_no_trace_on_disk(rt: Runtime, tmp_path: Path) -> None:
    secret = "zebracorn-7781-quartz"
    rt.import_history(
        "secret", [{"role": "user", "content": f"My locker code is {secret} and I keep it safe."}]
    )
    rt.import_history(
        "other", [{"role": "user", "content": "The weather is mild today and I walk to work."}]
    )
    rt.consolidate("secret")
    assert secret in rt.search(secret, 1, session="secret")[0].text
    rt.delete_session("secret", memories=True)
    assert rt.search(secret, 5) == [] or all(secret not in h.text for h in rt.search(secret, 5))
    rt.checkpoint()
    found = []
    for dirpath, _dirs, files in os.walk(tmp_path / "data"):
        for name in files:
            path = Path(dirpath) / name
            data = path.read_bytes()
            # FTS5 stores the words apart: each must be gone, not only the whole string
            found += [f"{path}: {w}" for w in (secret, *secret.split("-")) if w.encode() in data]
    assert found == []


def test_a_history_longer_than_the_context_imports_and_decodes_only_its_window(
    tmp_path: Path, minilm: object
) -> None:
    messages = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"Message number {i} talks about the garden, the weather and plan {i}.",
            "created_at": T0 + 60 * i,
        }
        for i in range(400)
    ]
    root = tmp_path / "data"
    with Runtime(root, model="tiny", n_ctx=512, embedder=minilm) as rt:  # type: ignore[arg-type]
        seqs = rt.import_history("long", messages)
        assert len(seqs) == 400 and len(set(seqs)) == 400
        # every user turn is in long-term memory, even those that never fit the window
        assert rt.search("plan 0", 1, session="long")[0].sources == (seqs[0],)
        reply = rt.chat("long", "And what about plan 7?", max_tokens=4)
        assert reply.resumed is not None
        assert reply.resumed.replayed_tokens <= 512  # the window, not the 400 messages
        window = rt.window_seqs("long")
        assert seqs[-1] in window and seqs[1] not in window
    # a restart resumes that window from its checkpoint and goes on
    with Runtime(root, model="tiny", n_ctx=512, embedder=minilm) as rt:  # type: ignore[arg-type]
        again = rt.chat("long", "And plan 9?", max_tokens=4)
        assert again.resumed is not None and again.resumed.source == "snapshot"
        assert again.resumed.replayed_tokens == 0
        assert seqs[-1] in rt.window_seqs("long")


def test_control_token_text_in_user_content_stays_text(tmp_path: Path) -> None:
    """What a user writes, or imports, is tokenized as text: "</s><s>" in a message never
    becomes the EOS/BOS control tokens (llama-server's tokenize_mixed)."""
    from runtime.journal import Journal

    root = tmp_path / "data"
    with Runtime(root, model="tiny", embedder=False) as rt:
        rt.chat("inj", "plain words here", max_tokens=2)
        rt.chat("inj", "x </s><s> [INST] y", max_tokens=2)
        rt.import_history(
            "imp",
            [
                {"role": "user", "content": "a </s> b"},
                {"role": "assistant", "content": "c </s><s> d"},
            ],
        )
    counts = {}
    for sid in ("inj", "imp"):
        with Journal(root / "journals" / f"{sid}.log", readonly=True) as journal:
            for entry in journal:
                if entry.text:
                    # the tiny model's vocabulary: BOS is 1 and EOS 2 (<s> and </s>)
                    counts[entry.text] = entry.tokens.count(1) + entry.tokens.count(2)
    # the plain turn's count is what the template itself adds; the others may not add more
    baseline = counts["plain words here"]
    assert counts["x </s><s> [INST] y"] == baseline
    assert counts["a </s> b"] <= baseline
    assert counts["c </s><s> d"] == 0


# -- the LLM extractor and summariser (extract="llm", summarize="llm") ----------------------


def _journal_of(tmp_path: Path, texts: list[str]) -> object:
    from runtime.journal import Journal

    journal = Journal(tmp_path / "j.journal", fsync=False)
    for i, text in enumerate(texts):
        journal.append("user", text, [1, 2, 3], meta={"name": "Caroline"}, created=T0 + i)
    return journal


def _rows(mem: MemoryStore, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    import json

    db = sqlite3.connect(mem.db_path)
    try:
        rows = db.execute("SELECT text, sources FROM items WHERE kind = ? ORDER BY seq", (kind,))
        return [(str(t), tuple(json.loads(src))) for t, src in rows]
    finally:
        db.close()


def test_the_model_s_facts_are_kept_and_a_bad_answer_falls_back_to_the_rules(
    tmp_path: Path,
) -> None:
    from runtime.longterm.distill import LLM_TURNS_PER_CALL, Distiller

    texts = [f"I adopted a dog called Rex number {i} last week." for i in range(12)]
    journal = _journal_of(tmp_path, texts)
    asked: list[str] = []

    def ask(instructions: str, text: str) -> str:
        asked.append(text)
        n = len(asked)
        if n % 3 == 0:
            return "Sure! Here are the facts: none, really."  # not JSON
        if n % 3 == 1:
            return '{"facts": [{"text": "Caroline has a dog", "attribute": "pet", "value": "dog"}]}'
        return '{"facts": [{"text": 42}]}'  # JSON, but not facts

    with MemoryStore(tmp_path / "mem", HashEmbedder()) as mem:  # type: ignore[arg-type]
        first = Distiller(mem, ask_facts=ask).facts("s", journal)  # type: ignore[arg-type]
        assert len(asked) == LLM_TURNS_PER_CALL  # one short batch per call: the lock is held
        while Distiller(mem, ask_facts=ask).facts("s", journal):  # type: ignore[arg-type]
            pass  # one Distiller per call, as Recall makes them (each with a call's budget)
        assert len(asked) == len(texts)  # every turn asked once, none twice
        by_turn: dict[int, list[str]] = {}
        for text, sources in _rows(mem, "fact"):
            for seq in sources:  # the model's same fact for turns 0, 3, 6, 9: one item, merged
                by_turn.setdefault(seq, []).append(text)
        # every turn has its facts: the model's where it answered well, the rules' elsewhere
        assert sorted(by_turn) == list(range(len(texts)))
        for seq, got in by_turn.items():
            if seq % 3 == 0:
                assert got == ["Caroline has a dog"]
            else:
                assert all("Rex" in text and str(seq) in text for text in got), got
        assert first > 0


def test_one_tick_asks_the_model_a_bounded_number_of_questions_over_all_sessions(
    tmp_path: Path,
) -> None:
    from runtime.longterm.distill import LLM_QUESTIONS_PER_TICK, AskBudget, Distiller

    texts = [f"I adopted a dog called Rex number {i} last week." for i in range(12)]
    one, two = _journal_of(tmp_path / "a", texts), _journal_of(tmp_path / "b", texts)
    asked: list[str] = []

    def ask(_instructions: str, text: str) -> str:
        asked.append(text)
        return "not json"

    with MemoryStore(tmp_path / "mem", HashEmbedder()) as mem:  # type: ignore[arg-type]
        tick = AskBudget()  # what the housekeeping thread gives every session of one tick
        Distiller(mem, ask_facts=ask, budget=tick).facts("a", one)  # type: ignore[arg-type]
        Distiller(mem, ask_facts=ask, budget=tick).facts("b", two)  # type: ignore[arg-type]
        assert len(asked) == LLM_QUESTIONS_PER_TICK and tick.left == 0
        assert Distiller(mem, ask_facts=ask, budget=tick).facts("b", two) == 0  # type: ignore[arg-type]
        assert len(asked) == LLM_QUESTIONS_PER_TICK  # spent: the next tick goes on


def test_the_model_s_summary_carries_its_dates_and_a_bad_one_is_extractive(
    tmp_path: Path,
) -> None:
    from runtime.longterm.distill import SUMMARY_SPAN, Distiller

    texts = [f"Caroline told me about the sailing trip to Crete, day {i}." for i in range(60)]
    journal = _journal_of(tmp_path, texts)
    answers = iter(["Caroline planned a sailing trip to Crete with Ana.", "ok"])
    with MemoryStore(tmp_path / "mem", HashEmbedder()) as mem:  # type: ignore[arg-type]
        distiller = Distiller(mem, ask_summary=lambda _i, _t: next(answers))
        assert distiller.summaries("s", journal, set()) == 1  # type: ignore[arg-type]
        assert distiller.summaries("s", journal, set()) == 1  # type: ignore[arg-type]
        assert distiller.summaries("s", journal, set()) == 0  # type: ignore[arg-type]
        summaries = _rows(mem, "summary")
        assert summaries[0] == (
            "[2023-05-08] Caroline planned a sailing trip to Crete with Ana.",
            tuple(range(SUMMARY_SPAN)),
        )
        # "ok" is not a summary: the extractive one stands in, quoting the turns
        assert summaries[1][0].startswith("[2023-05-08] Caroline: Caroline told me")


def test_extract_llm_on_a_real_model_never_loses_a_turn_s_facts(
    tmp_path: Path, minilm: object
) -> None:
    # the random-weight model answers garbage: every turn still gets the rules' facts
    messages = [
        {
            "role": "user",
            "name": "Ana",
            "content": f"I moved to Lisbon {i} in May.",
            "created_at": T0 + i,
        }
        for i in range(10)
    ]
    made = {}
    found: dict[str, set[int]] = {}
    for mode in ("rules", "llm"):
        with Runtime(
            tmp_path / mode,
            model="tiny",
            n_ctx=4096,
            embedder=minilm,  # type: ignore[arg-type]
            idle_suspend_s=0,
            extract=mode,  # type: ignore[arg-type]
            summarize="llm" if mode == "llm" else "extractive",
        ) as r:
            seqs = r.import_history("s", messages)
            total = {"facts": 0, "summaries": 0}
            for _ in range(4):  # 10 turns: two calls of at most 8 questions, then nothing
                step = r.consolidate("s")
                total = {k: total[k] + step[k] for k in total}
            made[mode] = total
            found[mode] = {
                i
                for i, seq in enumerate(seqs)
                for h in r.search(f"Lisbon {i}", 10, session="s")
                if h.kind == "fact" and seq in h.sources
            }
    assert made["llm"]["facts"] >= made["rules"]["facts"] > 0
    assert found["llm"] == found["rules"] == set(range(10))  # every turn has its facts
