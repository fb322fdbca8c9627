"""A search's candidates: what each retriever finds inside the search's scope.

Two retrievers run: dense (cosine over the vector index, :mod:`runtime.longterm.index`) and
lexical (SQLite FTS5 BM25 over each item's text and context). An item only the lexical one
found gets its cosine from its stored embedding, so that every candidate has both scores.
The speakers a query names and the period it names go with them to
:func:`runtime.longterm.ranking.rank`, which fuses and blends.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from runtime.arguments import stored_text
from runtime.embed.embedder import TextEmbedder
from runtime.errors import ArgumentError
from runtime.longterm import db as sql
from runtime.longterm.db import FloatArray
from runtime.longterm.index import StoreIndex
from runtime.longterm.items import KINDS, to_epoch
from runtime.longterm.lexical import (
    Stemmer,
    match_expression,
    normalise,
    query_terms,
    time_range,
    words,
)
from runtime.longterm.ranking import Candidates, FusionWeights, Hit, ScoringWeights, rank


@dataclass(frozen=True)
class Query:
    """A checked search: its text, embedding and content words, how many hits, when it is
    asked, and the WHERE conditions (and arguments) of its scope."""

    text: str
    k: int
    stamp: float
    vector: FloatArray
    terms: list[str]
    where: str
    args: list[Any]

    @classmethod
    def parse(
        cls,
        query: str,
        k: int,
        *,
        session: str | None,
        kinds: Iterable[str] | None,
        now: float | datetime | None,
        global_only: bool,
        with_global: bool,
        current_only: bool,
        embedder: TextEmbedder,
        tenant: str | None = None,
    ) -> Query:
        """Check the arguments of :meth:`runtime.longterm.store.MemoryStore.search` and embed
        the query with ``embedder``."""
        text = stored_text(query)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ArgumentError(f"k must be a positive int, got {k!r}")
        kind_list = None if kinds is None else sorted(set(kinds))
        if kind_list is not None and not set(kind_list) <= set(KINDS):
            raise ArgumentError(f"kinds must be drawn from {KINDS}, got {kind_list}")
        stamp = to_epoch(now)
        where, args = scope(
            session,
            kind_list,
            global_only=global_only,
            with_global=with_global,
            current_only=current_only,
            tenant=tenant,
        )
        vector = embedder.embed([text])[0]
        return cls(text, k, stamp, vector, query_terms(text), where, args)


class Speakers:
    """The stored speakers' names (lower-cased), read from SQLite once and kept until
    :meth:`forget` (an add that names a speaker). The caller holds the store's lock."""

    def __init__(self) -> None:
        self._names: frozenset[str] | None = None

    def forget(self) -> None:
        """Drop the cached names: the next :meth:`named` reads them again."""
        self._names = None

    def named(self, db: sqlite3.Connection, terms: list[str]) -> frozenset[str]:
        """The stored speakers (lower-cased) whose name is one of the query's words."""
        if self._names is None:
            rows = db.execute("SELECT DISTINCT speaker FROM items WHERE speaker IS NOT NULL")
            self._names = frozenset(" ".join(words(str(r[0]))) for r in rows)
        return frozenset(name for name in self._names if name in terms)


def scope(
    session: str | None,
    kinds: Sequence[str] | None,
    *,
    global_only: bool,
    with_global: bool,
    current_only: bool,
    tenant: str | None = None,
) -> tuple[str, list[Any]]:
    """The WHERE conditions and their arguments of a search's scope
    (:func:`runtime.longterm.db.scope_clause`; ``current_only``: nothing superseded)."""
    where, args = sql.scope_clause(
        session, kinds, global_only=global_only, with_global=with_global, tenant=tenant
    )
    if current_only:
        where = " AND ".join(c for c in (where, "superseded_by IS NULL") if c)
    return where, args


def informative_terms(
    db: sqlite3.Connection,
    stemmer: Stemmer,
    terms: list[str],
    where: str = "",
    args: Sequence[Any] = (),
) -> list[str]:
    """The query terms worth a BM25 match among the items ``where`` allows.

    A term whose every stem occurs in more than half of those items is left out of the
    MATCH when another term stays (the dense side still reads it). Its inverse document
    frequency ``log((N - n + 0.5) / (n + 0.5))`` is below 0, which FTS5 floors at 1e-6, yet
    fusion is by rank, so its matches would crowd the list the rarer words rank ("what does
    Oscar like?" among notes that all say "likes"), and building it walks most of a large
    index (a user's own name in a one-user store). A query of common words only keeps them
    all: then they are the only lexical signal ("beta" in one of two notes). FTS5's own
    counts (through ``fts5vocab``, no scan) clear most terms; one they flag is counted
    inside a scope that holds half the store or more (up to just over half of it), since a
    word common in the store may be rare in this session; in a smaller scope it is kept.
    """
    if not terms:
        return []
    stems = stemmer.stems(terms)
    total, frequency = sql.document_frequencies(db, [s for group in stems for s in group])
    kept: list[str] = []
    scope_size: int | None = None
    for term, group in zip(terms, stems, strict=True):
        if not group or any(2 * frequency.get(stem, 0) <= total for stem in group):
            kept.append(term)  # not common in the store (a session's own word is kept too)
            continue
        if scope_size is None:
            scope_size = sql.count_where(db, where, args) if where else total
        if scope_size == total:
            continue  # the scope is the whole store: the counts above are its own
        if 2 * scope_size < total:
            # a small scope in a large store: counting would walk the word's whole posting
            # list for few matches, the same walk the lexical search makes; keep the word
            kept.append(term)
            continue
        need = scope_size // 2 + 1  # more than half the scope
        if sql.count_matches(db, match_expression([term]), where, args, limit=need) < need:
            kept.append(term)
    return kept or list(terms)


def gather(
    db: sqlite3.Connection,
    index: StoreIndex,
    query: Query,
    *,
    dim: int,
    fusion: FusionWeights,
    speakers: Speakers,
    stemmer: Stemmer,
) -> Candidates:
    """Up to ``max(4 * query.k, 50)`` candidates of each retriever for ``query`` among the
    items its scope allows (embeddings ``dim`` wide)."""
    pool = max(4 * query.k, 50)
    vector, terms, where, args = query.vector, query.terms, query.where, query.args
    dense = index.candidates(db, vector, pool, where=where, args=args)
    lexical: dict[int, float] = {}
    informative = informative_terms(db, stemmer, terms, where, args) if fusion.lexical > 0 else []
    if informative:
        expression = match_expression(informative)
        lexical = dict(sql.lexical_candidates(db, expression, pool, where, args))
    # the items whose own words are the query's, however the lists ranked them
    exact = (
        sql.exact_matches(db, normalise(query.text), where, args, pool)
        if fusion.lexical > 0  # a word-for-word match is a lexical signal
        else []
    )
    missing = [seq for seq in dict.fromkeys([*lexical, *exact]) if seq not in dense]
    dense = {**dense, **sql.cosines(db, dim, missing, vector)}
    return Candidates(
        dense=dense,
        lexical=lexical,
        exact=frozenset(exact),
        speakers=speakers.named(db, terms),
        period=time_range(query.text, query.stamp) if fusion.in_period != 1.0 else None,
        use_dense=fusion.dense > 0,
        use_lexical=fusion.lexical > 0,
    )


class Retriever:
    """Runs a :class:`Query` over a store of ``dim``-wide embeddings: gathers the candidates,
    ranks them. Holds the stored speakers' names (:class:`Speakers`); the caller holds the
    store's lock around every call."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.speakers = Speakers()
        self.stemmer = Stemmer()

    def close(self) -> None:
        """Release the stemmer's in-memory table."""
        self.stemmer.close()

    def search(
        self,
        db: sqlite3.Connection,
        index: StoreIndex,
        query: Query,
        weights: ScoringWeights,
        fusion: FusionWeights,
        latest: Callable[[str, float], float],
    ) -> list[Hit]:
        """The ``query.k`` best hits, best first; ``latest(id, accessed)`` adds an item's
        pending access. Ranking reads a few columns of each candidate; the whole row is read
        for the hits only."""
        found = gather(
            db,
            index,
            query,
            dim=self.dim,
            fusion=fusion,
            speakers=self.speakers,
            stemmer=self.stemmer,
        )
        seqs = set(found.dense) | set(found.lexical)
        if not seqs:
            return []
        # a label SQLite no longer has (a stale index) simply drops out
        rows = [
            dataclasses.replace(row, accessed=latest(row.id, row.accessed))
            for row in sql.rank_rows(db, sorted(seqs))
        ]
        best = rank(rows, found, weights, fusion, query.stamp)[: query.k]
        items = {item.seq: item for item in sql.items_by_seq(db, [s.seq for s in best])}
        return [s.hit(items[s.seq]) for s in best if s.seq in items]
