"""How search ranks its candidates: lexical and dense lists fused, then a blend.

    relevance = RRF(BM25 rank, cosine rank) / best possible   (x boosts, x supersession)
    score = w_relevance · relevance + w_recency · 0.5^(age / half_life) + w_importance · importance

where ``age`` runs from when the item was said or last used, whichever is later (see
:class:`FusionWeights`, :class:`ScoringWeights` and docs/long-term-memory.md for the defaults
and why).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import ArgumentError
from runtime.longterm.db import RankRow
from runtime.longterm.items import MemoryItem
from runtime.longterm.lexical import day_label


@dataclass(frozen=True)
class ScoringWeights:
    """Weights of the three retrieval signals (all in [0, 1] before weighting).

    * ``relevance`` multiplies the fused relevance (:class:`FusionWeights`);
    * ``recency`` multiplies ``0.5 ** (age / half_life_s)``, age since said or last used;
    * ``importance`` multiplies the item's importance (0..1, set when added).

    Defaults (1.0, 0.05, 0.05, 7 days): relevance dominates, and recency and importance
    only break near-ties. The fused relevance is flat near the top (an item first in both
    lists scores 1.0, one second in BM25 and tenth in the dense list about 0.84), so 0.05
    each can swap neighbours but never lifts an item over one that matched the query word
    for word (at 0.2 each, an important note outranked the exact text searched for).
    Generative Agents (Park et al. 2023) weights its three signals equally after min-max
    normalising each over the candidates; we do not normalise, so that one stale item cannot
    stretch every other recency to 0 or 1.

    A negative or non-finite weight, or a half-life that is not positive, raises
    :class:`runtime.errors.ArgumentError`.
    """

    relevance: float = 1.0
    recency: float = 0.05
    importance: float = 0.05
    half_life_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        for name in ("relevance", "recency", "importance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ArgumentError(f"weight {name} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.half_life_s) and self.half_life_s > 0):
            raise ArgumentError(f"half_life_s must be positive, got {self.half_life_s}")

    def recency_of(self, accessed: float, now: float) -> float:
        """``0.5 ** (age / half_life)``; an access in the future counts as now."""
        return float(0.5 ** (max(0.0, now - accessed) / self.half_life_s))

    def score(self, similarity: float, recency: float, importance: float) -> float:
        """The weighted sum that ranks hits."""
        return self.relevance * similarity + self.recency * recency + self.importance * importance


@dataclass(frozen=True)
class FusionWeights:
    """How the lexical and the dense candidate lists become one relevance in [0, 1].

    Weighted reciprocal rank fusion (Cormack et al. 2009): an item ranked ``r`` (from 1) in a
    list scores ``w / (k + r)`` there, summed over the lists, divided by the best possible
    sum. BM25 weighs twice the dense list: on names, numbers and codes, which is what
    personal memory is made of, MiniLM is the weaker signal (measured in
    benchmarks/test_bench_longterm.py, docs/long-term-memory.md). ``speaker`` multiplies an
    item's BM25 score and adds to its cosine, before each list is ranked, when the query
    names its speaker; ``in_period`` multiplies the relevance of an item said in the period
    the query names ("in May", "last week"); ``superseded`` multiplies the relevance of an
    item a newer fact replaced (kept, ranked below the current value).
    """

    lexical: float = 2.0
    dense: float = 1.0
    k: float = 60.0
    speaker: float = 0.3
    in_period: float = 1.5
    superseded: float = 0.5

    def __post_init__(self) -> None:
        for name in ("lexical", "dense", "k", "speaker", "in_period", "superseded"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ArgumentError(f"fusion weight {name} must be finite and >= 0, got {value}")
        if self.lexical + self.dense <= 0:
            raise ArgumentError("at least one of the lexical and dense weights must be > 0")


@dataclass(frozen=True)
class Candidates:
    """What the two retrievers found for one query, before fusion.

    ``dense`` maps seq -> cosine (every candidate of either list has one); ``lexical`` maps
    seq -> BM25 score (only the items that share a term with the query); ``exact`` holds the
    items whose own text is the query's, word for word (case, spacing and punctuation aside).
    """

    dense: Mapping[int, float]
    lexical: Mapping[int, float]
    exact: frozenset[int] = frozenset()
    speakers: frozenset[str] = frozenset()
    period: tuple[float, float] | None = None
    use_dense: bool = True
    use_lexical: bool = True


@dataclass(frozen=True)
class Hit:
    """A search result: the item's fields plus how it scored.

    ``similarity`` is the cosine to the query, ``relevance`` the fused relevance in [0, 1],
    ``recency`` the decay since the item was said (or last used), ``score`` the blend.
    """

    id: str
    text: str
    score: float
    similarity: float
    recency: float
    kind: str
    session: str | None
    said_at: float
    stored_at: float
    accessed: float
    importance: float
    meta: dict[str, Any] = field(default_factory=dict)
    speaker: str | None = None
    sources: tuple[int, ...] = ()
    superseded_by: str | None = None
    relevance: float = 0.0

    def render(self) -> str:
        """The hit as a prompt shows it: ``[2023-05-08] Caroline: ...`` (the date it was said,
        its speaker unless the text names it already)."""
        text = self.text
        if self.speaker and not text.startswith(f"{self.speaker}:"):
            text = f"{self.speaker}: {text}"
        note = " (superseded)" if self.superseded_by else ""
        return f"{day_label(self.said_at)} {text}{note}"


def _ranks(
    scores: Mapping[int, float], boosted: frozenset[int], boost: float, mul: bool
) -> dict[int, int]:
    """seq -> rank (from 1) by score, after the speaker boost; equal scores share a rank, so
    identical items fuse to the same relevance."""
    boosted_scores = {}
    for seq, value in scores.items():
        if seq in boosted:
            value = value * (1.0 + boost) if mul else value + boost
        boosted_scores[seq] = value
    ranks: dict[int, int] = {}
    previous: float | None = None
    rank = 0
    for position, (seq, value) in enumerate(
        sorted(boosted_scores.items(), key=lambda kv: -kv[1]), start=1
    ):
        if value != previous:
            rank, previous = position, value
        ranks[seq] = rank
    return ranks


@dataclass(frozen=True, slots=True)
class Scored:
    """How one candidate scored (see :class:`Hit` for the fields); ``accessed`` includes any
    pending access."""

    seq: int
    id: str
    score: float
    similarity: float
    recency: float
    relevance: float
    accessed: float

    def hit(self, item: MemoryItem) -> Hit:
        """The search result of ``item``, the candidate this scored."""
        return Hit(
            id=item.id,
            text=item.text,
            score=self.score,
            similarity=self.similarity,
            recency=self.recency,
            kind=item.kind,
            session=item.session,
            said_at=item.said_at,
            stored_at=item.stored_at,
            accessed=self.accessed,
            importance=item.importance,
            meta=item.meta,
            speaker=item.speaker,
            sources=item.sources,
            superseded_by=item.superseded_by,
            relevance=self.relevance,
        )


def rank(
    rows: Iterable[RankRow],
    found: Candidates,
    weights: ScoringWeights,
    fusion: FusionWeights,
    now: float,
) -> list[Scored]:
    """Fuse, blend and sort the candidates, best first.

    An item whose own text is the query, word for word, and that nothing superseded comes
    first, whatever its score: a turn's lexical text holds the turns before it too (its
    context), so a neighbour that repeats the query's words can outscore the item that says
    them ("note 742", said after "note 745", for the text of "note 745"), and a user who
    searches for what they said must find it. Ties are broken by similarity, then by id, so
    equal scores always come out in one order.
    """
    pool = list(rows)
    by_speaker = frozenset(
        r.seq for r in pool if r.speaker is not None and r.speaker.lower() in found.speakers
    )
    w_lex = fusion.lexical if found.use_lexical else 0.0
    w_dense = fusion.dense if found.use_dense else 0.0
    lex_rank = _ranks(found.lexical, by_speaker, fusion.speaker, True)
    dense_pool = {r.seq: found.dense.get(r.seq, -1.0) for r in pool}
    dense_rank = _ranks(dense_pool, by_speaker, fusion.speaker / 3, False)
    best = (w_lex + w_dense) / (fusion.k + 1)
    scored = []
    for row in pool:
        fused = w_dense / (fusion.k + dense_rank[row.seq])
        if row.seq in lex_rank:
            fused += w_lex / (fusion.k + lex_rank[row.seq])
        relevance = fused / best
        if found.period is not None and found.period[0] <= row.said_at < found.period[1]:
            relevance *= fusion.in_period
        if row.superseded_by is not None:
            relevance *= fusion.superseded
        rec = weights.recency_of(max(row.accessed, row.said_at), now)
        score = weights.score(relevance, rec, row.importance)
        sim = found.dense.get(row.seq, 0.0)
        scored.append(Scored(row.seq, row.id, score, sim, rec, relevance, row.accessed))
    first = {r.seq for r in pool if r.seq in found.exact and r.superseded_by is None}
    scored.sort(key=lambda s: (s.seq not in first, -s.score, -s.similarity, s.id))
    return scored
