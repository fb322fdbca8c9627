"""The lexical (FTS5 BM25) side of long-term memory: a turn's context (the turns before it)
finds a reply by the question it answers, and never puts a neighbour above the item whose
own words are the query."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from runtime.longterm import MemoryStore
from runtime.longterm import db as sql
from runtime.longterm.db import DB_NAME, RankRow
from runtime.longterm.items import NewItem
from runtime.longterm.ranking import Candidates, FusionWeights, ScoringWeights, rank

#: A sitting in which every note is answered, the way a chat model answers, by repeating its
#: number: each note's number is then in its own row and in the next two notes' context.
NUMBERS = random.Random(7).sample(range(100, 1000), 30)


def note(n: int) -> str:
    return f"note {n}: the spare key for shed {n} hangs behind the red door"


def sitting() -> list[tuple[str, str]]:
    """(role, text) of each turn: a note, then the assistant's reply to it."""
    return [
        turn for n in NUMBERS for turn in (("user", note(n)), ("assistant", f"Noted: shed {n}."))
    ]


def put_sitting(memstore: MemoryStore, turns: list[tuple[str, str]]) -> None:
    """Store each user turn as the distiller does: one put each, with the up to 3 turns
    before it as its context (``role: text``, as :func:`runtime.longterm.distill.context_of`
    writes it)."""
    for seq, (role, text) in enumerate(turns):
        if role != "user":
            continue
        context = " ".join(f"{r}: {t}" for r, t in turns[max(0, seq - 3) : seq])
        memstore.put([NewItem(text, kind="turn", session="s", sources=(seq,), context=context)])


def test_an_item_outranks_the_neighbours_whose_context_repeats_it(memstore: MemoryStore) -> None:
    # "note 742", said after "note 745", came first for the exact text of "note 745": its
    # lexical text holds 745's words too (the kill -9 loop's failure, without its timing)
    put_sitting(memstore, sitting())
    assert memstore.count(session="s") == len(NUMBERS)
    for n in NUMBERS:
        hits = memstore.search(note(n), 1, session="s", touch=False)
        assert hits[0].text == note(n), (n, hits[0].text)


#: Ana asks, Bob answers without naming what he answers, then they talk of other things.
CHAT = [
    ("Ana", "Have you ever been to Lisbon?"),
    ("Bob", "Yes, twice!"),
    ("Ana", "I am baking bread this weekend."),
    ("Bob", "Our cat knocked a plant off the shelf."),
    ("Ana", "The train to work was late again."),
    ("Bob", "I started learning the guitar."),
    ("Ana", "My sister moved to Porto last spring."),
    ("Bob", "I have been running every morning."),
    ("Ana", "Did you finish the book I lent you?"),
    ("Bob", "Not yet, I am halfway through."),
]


def test_a_reply_is_found_by_the_question_it_answers(tmp_path: Path, minilm: object) -> None:
    found = {}
    for with_context in (True, False):
        with MemoryStore(tmp_path / str(with_context), minilm) as s:  # type: ignore[arg-type]
            for seq, (speaker, text) in enumerate(CHAT):
                before = CHAT[max(0, seq - 3) : seq] if with_context else []
                context = " ".join(f"{who}: {said}" for who, said in before)
                s.put(
                    [
                        NewItem(
                            text,
                            kind="turn",
                            session="s",
                            speaker=speaker,
                            sources=(seq,),
                            context=context,
                        )
                    ]
                )
            hits = s.search("Who has been to Lisbon?", 3, session="s", touch=False)
            found[with_context] = [h.text for h in hits]
    assert "Yes, twice!" in found[True], found
    # without its context the reply is not found: this test would pass vacuously otherwise
    assert "Yes, twice!" not in found[False], found


def test_an_exact_text_comes_first_unless_it_was_superseded() -> None:
    rows = [
        RankRow(1, "a", None, 0.0, 0.0, 0.5, None),  # the query's text, said first
        RankRow(2, "b", None, 0.0, 0.0, 0.5, None),  # a neighbour: first in both lists
        RankRow(3, "c", None, 0.0, 0.0, 0.5, "d"),  # the query's text, superseded
    ]
    found = Candidates(
        dense={1: 0.9, 2: 0.95, 3: 0.9}, lexical={1: 1.0, 2: 2.0, 3: 1.0}, exact=frozenset({1, 3})
    )
    order = [s.seq for s in rank(rows, found, ScoringWeights(), FusionWeights(), now=0.0)]
    assert order[0] == 1 and order.index(3) > order.index(2), order
    plain = Candidates(dense=found.dense, lexical=found.lexical)
    ranked = rank(rows, plain, ScoringWeights(), FusionWeights(), now=0.0)
    assert ranked[0].seq == 2  # without the rule the neighbour's fused score wins


def test_the_exact_lookup_skips_a_query_of_no_words_and_takes_the_newest(
    tmp_path: Path, minilm: object
) -> None:
    directory = tmp_path / "mem"
    with MemoryStore(directory, minilm) as s:  # type: ignore[arg-type]
        s.put([NewItem("?!", kind="turn", session="s")])  # no words: its norm is ""
        for i in range(3):
            s.put([NewItem("The same words.", kind="turn", session=f"s{i}")])
    db = sqlite3.connect(directory / DB_NAME)
    try:
        # a query of no words (emoji, punctuation) pins nothing, not every wordless item
        assert sql.exact_matches(db, "", "", [], 50) == []
        every = sql.exact_matches(db, "the same words", "", [], 50)
        assert len(every) == 3
        assert sql.exact_matches(db, "the same words", "", [], 2) == sorted(every)[-1:-3:-1]
        plan = " ".join(
            str(r[-1])
            for r in db.execute(
                "EXPLAIN QUERY PLAN SELECT seq FROM items WHERE norm = ? ORDER BY seq DESC",
                ("x",),
            )
        )
        assert "items_exact" in plan, plan  # a store-wide lookup is an index search
    finally:
        db.close()
