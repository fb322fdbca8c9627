"""Long-term memory: embedded items in SQLite plus a derived hnswlib index, one module per part.

* :mod:`runtime.longterm.store`: :class:`MemoryStore`, the one object an application opens;
* :mod:`runtime.longterm.db`: ``memory.sqlite3``, the source of truth: schema, transactions;
* :mod:`runtime.longterm.index`: the derived index's life cycle (open, replay, rebuild, save)
  and filtered candidate queries;
* :mod:`runtime.longterm.hnsw`: the hnswlib index itself, its save and its checked load;
* :mod:`runtime.longterm.manifest`: the index files' format and the checks they pass before
  hnswlib reads them (a bound on the capacity they may claim among them);
* :mod:`runtime.longterm.ranking`: the relevance/recency/importance blend.
"""

from __future__ import annotations

from runtime.longterm.db import MemoryItem
from runtime.longterm.ranking import Hit, ScoringWeights
from runtime.longterm.store import MemoryStore

__all__ = ["Hit", "MemoryItem", "MemoryStore", "ScoringWeights"]
