"""Long-term memory: embedded items in SQLite plus a derived hnswlib index, one module per part.

* :mod:`runtime.longterm.store`: :class:`MemoryStore`, the one object an application opens;
* :mod:`runtime.longterm.schema`: opening ``memory.sqlite3``, the source of truth: its schema,
  the upgrade of older versions, its meta table;
* :mod:`runtime.longterm.db`: what is said through the connection: rows, transactions,
  inserts and queries, batched access times;
* :mod:`runtime.longterm.links`: how items relate: merges, supersession, watermarks;
* :mod:`runtime.longterm.forget`: deletes, the bound on a session's turns, the scrub after;
* :mod:`runtime.longterm.failures`: SQLite's errors as the runtime's;
* :mod:`runtime.longterm.index`: the derived index's life cycle (open, replay, rebuild, save)
  and filtered candidate queries;
* :mod:`runtime.longterm.hnsw`: the hnswlib index itself, its save and its checked load;
* :mod:`runtime.longterm.manifest`: the index files' format and the checks they pass before
  hnswlib reads them (a bound on the capacity they may claim among them);
* :mod:`runtime.longterm.retrieval`: a search's candidates (dense, lexical, named speakers);
* :mod:`runtime.longterm.ranking`: the relevance/recency/importance blend;
* :mod:`runtime.longterm.lexical` (terms, identity and time in a text),
  :mod:`runtime.longterm.facts` (facts from turns) and :mod:`runtime.longterm.distill` (what
  is derived from the journal).
"""

from __future__ import annotations

from runtime.longterm.items import MemoryItem
from runtime.longterm.ranking import Hit, ScoringWeights
from runtime.longterm.store import MemoryStore

__all__ = ["Hit", "MemoryItem", "MemoryStore", "ScoringWeights"]
