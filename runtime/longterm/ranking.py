"""How search ranks its candidates: a blend of relevance, recency and importance.

    score = w_relevance · cosine + w_recency · 0.5^(age / half_life) + w_importance · importance

where ``age`` is the time since the item was last accessed (see :class:`ScoringWeights` and
docs/long-term-memory.md for the defaults and why).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import ArgumentError
from runtime.longterm.db import MemoryItem


@dataclass(frozen=True)
class ScoringWeights:
    """Weights of the three retrieval signals (all in [0, 1] before weighting).

    * ``relevance`` multiplies the cosine similarity to the query;
    * ``recency`` multiplies ``0.5 ** (age / half_life_s)``, age since last access;
    * ``importance`` multiplies the item's importance (0..1, set when added).

    Defaults (1.0, 0.2, 0.2, 7 days): relevance dominates, because the candidate pool comes
    from the vector index anyway and a fresh but off-topic memory is worse than an old
    on-topic one. Recency and importance break near-ties: with MiniLM, paraphrases score about
    0.7–0.9 and unrelated text 0.0–0.2, so 0.2 can reorder close candidates but cannot promote
    an unrelated item above a related one. Generative Agents (Park et al. 2023) weights its
    three signals equally after min-max normalising each over the candidates; we do not
    normalise, so that one stale item cannot stretch every other recency to 0 or 1.

    A negative or non-finite weight, or a half-life that is not positive, raises
    :class:`runtime.errors.ArgumentError`.
    """

    relevance: float = 1.0
    recency: float = 0.2
    importance: float = 0.2
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
class Hit:
    """A search result: the item's fields plus how it scored."""

    id: str
    text: str
    score: float
    similarity: float
    recency: float
    kind: str
    session: str | None
    created: float
    accessed: float
    importance: float
    meta: dict[str, Any] = field(default_factory=dict)


def rank(
    items: Iterable[MemoryItem],
    similarity: Mapping[int, float],
    weights: ScoringWeights,
    now: float,
) -> list[Hit]:
    """Score each item (``similarity`` maps its seq to its cosine) and sort, best first.

    Ties are broken by similarity, then by id, so equal scores always come out in one order.
    """
    hits = []
    for item in items:
        sim = similarity[item.seq]
        rec = weights.recency_of(item.accessed, now)
        hits.append(
            Hit(
                id=item.id,
                text=item.text,
                score=weights.score(sim, rec, item.importance),
                similarity=sim,
                recency=rec,
                kind=item.kind,
                session=item.session,
                created=item.created,
                accessed=item.accessed,
                importance=item.importance,
                meta=item.meta,
            )
        )
    hits.sort(key=lambda h: (-h.score, -h.similarity, h.id))
    return hits
