"""Long-term memory inside the runtime: :class:`Recall`.

One part with one ingest path: retrieval for a prompt, the ingestion of the journal's user
turns behind a watermark (the only way a turn reaches long-term memory), and the
remember/search/forget/embed calls. It holds the memory store and the embedder; it never
touches the llama.cpp context.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.app.turn import MemoryUsed
from runtime.arguments import MAX_EMBED_TEXTS, check_int, check_text
from runtime.embed.embedder import Embeddings
from runtime.errors import RuntimeArgumentError
from runtime.layout import memory_scope, tenant_of
from runtime.longterm.distill import Ask, AskBudget, Distiller
from runtime.session import Session
from runtime.storage import JournalBackend

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from runtime.embed import TextEmbedder
    from runtime.longterm import Hit, MemoryItem
    from runtime.storage import MemoryBackend, MemoryLog

__all__ = ["CachedEmbedder", "Recall"]

logger = logging.getLogger(__name__)

#: A memory less similar than ``min_similarity`` still reaches the prompt when its fused
#: relevance is at least this (it matched the query's names or numbers word for word).
LEXICAL_RELEVANCE = 0.75


class CachedEmbedder:
    """A small LRU in front of the embedder: a turn embeds the user's text once for retrieval
    and reuses it for the memory write and the near-duplicate check."""

    def __init__(self, inner: TextEmbedder, size: int = 64) -> None:
        self.inner = inner
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()
        #: the inner embedder's stats for the last call (None when every text was cached,
        #: so nothing new was truncated), read by the store's truncation warning
        self.last_stats: object | None = None

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def max_length(self) -> int | None:
        """The inner embedder's token limit, if it has one (for truncation warnings)."""
        return getattr(self.inner, "max_length", None)

    def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        import numpy as np

        with self._lock:  # one embed at a time: the cache cannot change under a call
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
            fresh: dict[str, Any] = {}
            self.last_stats = None
            if missing:
                fresh = dict(zip(missing, self.inner.embed(missing), strict=True))
                self.last_stats = getattr(self.inner, "last_stats", None)
            rows = [fresh[t] if t in fresh else self._cache[t] for t in texts]
            for text, vec in fresh.items():
                self._cache[text] = vec
            for t in texts:
                self._cache.move_to_end(t)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return np.stack(rows).astype(np.float32, copy=False)


class Recall:
    """Long-term memory for the runtime: what a prompt recalls and what a turn leaves behind.

    Built with everything it needs: the store (``None``: long-term memory is off, every call
    is a no-op or refuses) and the retrieval settings. Not thread-safe on its own: the
    runtime calls it under its lock.

    Args:
        store: the long-term memory store, or ``None``.
        embedder: the store's (cached) embedder, or ``None``.
        memory_k: memories put into a prompt at most.
        min_similarity: memories less similar than this to the user's text are left out.
        dedup_similarity: a new turn this similar to a stored memory, naming the same
            numbers, names and negations, is merged into it (its source kept).
        max_items: bound on a session's items (0: none); the lowest-value raw turns are
            archived first (they stay in the journal), never facts or summaries.
        ask_facts, ask_summary: the loaded model asked for a turn's facts and for a
            summary (``extract="llm"``, ``summarize="llm"``); ``None``: the rules.
    """

    def __init__(
        self,
        store: MemoryBackend | None,
        embedder: CachedEmbedder | None,
        *,
        memory_k: int,
        min_similarity: float,
        dedup_similarity: float,
        max_items: int = 0,
        ask_facts: Ask | None = None,
        ask_summary: Ask | None = None,
    ) -> None:
        self.store = store
        self.max_items = max_items
        self.ask_facts = ask_facts
        self.ask_summary = ask_summary
        self._embedder = embedder
        self.memory_k = memory_k
        self.min_similarity = min_similarity
        self.dedup_similarity = dedup_similarity
        #: ingests that failed (the turn itself was safe in the journal)
        self.ingest_failures = 0
        self._retrieval_ms: deque[float] = deque(maxlen=512)

    @classmethod
    def open(
        cls,
        directory: Path,
        embedder: TextEmbedder | bool | None,
        *,
        say: Callable[[str], None],
        memory_k: int,
        min_similarity: float,
        dedup_similarity: float,
        max_items: int = 0,
        ask_facts: Ask | None = None,
        ask_summary: Ask | None = None,
        shared: MemoryLog | None = None,
    ) -> Recall:
        """Open the store in ``directory`` with ``embedder`` (``None``: the default
        all-MiniLM-L6-v2; ``False``: no long-term memory); ``shared``: the store is this
        node's replica of that log (``db=``)."""
        store: MemoryStore | None = None
        cached: CachedEmbedder | None = None
        if embedder is not False:
            from runtime.longterm import MemoryStore

            inner: TextEmbedder
            if embedder is None or isinstance(embedder, bool):
                from runtime.embed import Embedder

                say("loading the embedder (all-MiniLM-L6-v2; exported to ONNX on first use)")
                inner = Embedder.default()
            else:
                inner = embedder
            cached = CachedEmbedder(inner)
            start = time.perf_counter()
            store = MemoryStore(directory, cached, dedup_similarity=dedup_similarity, shared=shared)
            took = time.perf_counter() - start
            if took > 1.0:
                say(f"long-term memory opened in {took:.1f} s (index rebuilt or replayed)")
        return cls(
            store,
            cached,
            memory_k=memory_k,
            min_similarity=min_similarity,
            dedup_similarity=dedup_similarity,
            max_items=max_items,
            ask_facts=ask_facts,
            ask_summary=ask_summary,
        )

    @property
    def enabled(self) -> bool:
        """Whether long-term memory is on."""
        return self.store is not None

    # -- a turn ---------------------------------------------------------------------------------

    def retrieve(self, session: Session, text: str, now: float | None = None) -> list[MemoryUsed]:
        """Memories for this turn: this session's and global ones, minus the turns the window
        holds already; each rendered with its date (``[2023-05-08] Caroline: ...``)."""
        if self.store is None or self.memory_k == 0:
            return []
        start = time.perf_counter()
        in_window = session.window_seqs()
        k = self.memory_k
        chosen: list[Hit] = []
        covered: set[int] = set()  # the journal entries the chosen memories came from
        for hit in self.store.search(
            text,
            2 * k + len(in_window),
            session=session.session_id,
            with_global=True,
            now=now,
            touch=False,
        ):
            if hit.sources and set(hit.sources) <= in_window | covered:
                # the model sees these turns in its KV already, or a memory chosen already
                # came from them (a turn and the fact distilled from it say one thing)
                continue
            if hit.similarity >= self.min_similarity or hit.relevance >= LEXICAL_RELEVANCE:
                chosen.append(hit)
                covered.update(hit.sources)
            if len(chosen) == k:
                break
        if chosen:
            self.store.touch([h.id for h in chosen])
        self._retrieval_ms.append((time.perf_counter() - start) * 1000)
        return [
            MemoryUsed(
                h.id,
                h.text,
                h.score,
                h.similarity,
                h.session,
                h.kind,
                rendered=h.render(),
                said_at=h.said_at,
                speaker=h.speaker,
                sources=h.sources,
            )
            for h in chosen
        ]

    @property
    def retrieval_ms(self) -> Sequence[float]:
        """Recent retrieval latencies (milliseconds)."""
        return self._retrieval_ms

    def catch_up(self, session: Session) -> None:
        """:meth:`ingest`, but a failure (disk full, damaged store) never fails a turn that is
        already durable in the journal: the next call catches up."""
        self.catch_up_journal(session.session_id, session.journal)

    def catch_up_journal(self, session_id: str, journal: JournalBackend) -> None:
        """:meth:`catch_up` from a journal (of a session that is not resident)."""
        try:
            self.ingest_journal(session_id, journal)
        except Exception as exc:
            self.ingest_failures += 1
            logger.warning(
                "session %s: long-term memory write failed (%s); it catches up later",
                session_id,
                exc,
            )

    def ingest(self, session: Session) -> int:
        """:meth:`ingest_journal` of a resident session."""
        return self.ingest_journal(session.session_id, session.journal)

    def ingest_journal(self, sid: str, journal: JournalBackend) -> int:
        """Add the session's journalled user turns that long-term memory lacks (crash-safe);
        returns how many turns were ingested.

        A watermark in the store (``turns:<id>``: the last journal seq ingested), written in
        the transaction of the turn items it covers, keeps this to the new entries, so a crash
        leaves both or neither; with ``db=`` it is shared like the items, so a node that takes
        a session over ingests only what no node did. Each turn item is also named by its
        session and journal seq, so a re-add is a no-op. A turn that says what a stored item
        says is merged into it (sources kept; see :meth:`runtime.longterm.MemoryStore.put`),
        never dropped. Each item carries its speaker (an imported message's ``name``), the
        time it was said and, for the lexical index only, the turns just before it in the
        same sitting.
        """
        if self.store is None:
            return 0
        key = f"turns:{sid}"
        first = self.store.watermark(key) + 1
        if first == 0:  # nothing ingested: retention dropped only what had been
            first = journal.first_seq
        last = len(journal) - 1
        if first > last:
            return 0
        return Distiller(self.store).turns(sid, journal, first, last, mark=key)

    def consolidate(self, session: Session, budget: AskBudget | None = None) -> dict[str, int]:
        """The background work on one session's memories (the housekeeping thread runs it,
        never a turn): distil facts from its new turns, summarise what has left its KV
        window, and bound it to ``max_items``. Returns how many facts, summaries and
        archived turns it made. ``budget``: the questions to the model this call may ask
        (shared by a tick's sessions; ``None``: one call's worth)."""
        return self.consolidate_journal(
            session.session_id, session.journal, session.window_seqs(), budget
        )

    def consolidate_journal(
        self,
        sid: str,
        journal: JournalBackend,
        window: set[int],
        budget: AskBudget | None = None,
    ) -> dict[str, int]:
        """:meth:`consolidate` from a journal and the entries the KV window holds."""
        if self.store is None:
            return {"facts": 0, "summaries": 0, "archived": 0}
        distiller = Distiller(
            self.store, ask_facts=self.ask_facts, ask_summary=self.ask_summary, budget=budget
        )
        done = {
            "facts": distiller.facts(sid, journal),
            "summaries": distiller.summaries(sid, journal, window),
            "archived": 0,
        }
        if self.max_items:
            done["archived"] = self.store.archive_turns(sid, self.max_items)
        return done

    def settle(self, sessions: Sequence[Session]) -> None:
        """Consolidate ``sessions``: what journal retention may then drop is covered by
        long-term memory on disk."""
        for session in sessions:
            self.consolidate(session)

    def durable_mark(self, session_id: str) -> int | None:
        """The last journal seq that long-term memory holds durably: ingested and distilled
        into facts and summaries; journal retention drops nothing after it. ``None`` when
        long-term memory is off, so nothing bounds retention."""
        if self.store is None:
            return None
        return min(
            self.store.watermark(f"{name}:{session_id}") for name in ("turns", "facts", "summary")
        )

    def forget_session(self, session_id: str, *, memories: bool) -> int:
        """A session was deleted: drop its watermarks and (``memories``) its memories; how
        many memories went."""
        if self.store is None:
            return 0
        if memories:
            return self.store.delete_session(session_id)
        self.store.forget_marks(session_id)
        return 0

    # -- the API ----------------------------------------------------------------------------------

    def remember(
        self,
        text: str,
        *,
        session: str | None = None,
        kind: str = "fact",
        importance: float = 0.5,
        meta: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> str:
        """Store a long-term memory directly (``session=None``: global, or ``tenant``'s own)."""
        if self.store is None:
            raise RuntimeArgumentError("memory", "long-term memory is off (embedder=False)")
        scope = memory_scope(session, tenant)
        return self.store.add(
            check_text(text), kind=kind, session=scope, importance=importance, meta=meta
        )

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        session: str | None = None,
        now: float | None = None,
        current_only: bool = False,
        tenant: str | None = None,
    ) -> list[Hit]:
        """Search long-term memory (all sessions, or one and its global memories; with
        ``tenant``, that tenant's only)."""
        if self.store is None:
            return []
        check_int("k", k, 1, 1000)
        memory_scope(session, tenant)
        return self.store.search(
            check_text(query),
            k,
            session=session,
            with_global=session is not None,
            now=now,
            touch=False,
            current_only=current_only,
            tenant=tenant,
        )

    def lineage(self, item_id: str, tenant: str | None = None) -> list[MemoryItem]:
        """What an item's subject/attribute held over time, newest first (see
        :meth:`runtime.longterm.MemoryStore.lineage`); empty for an item not ``tenant``'s."""
        if self.store is None or not self._owned(item_id, tenant):
            return []
        return self.store.lineage(item_id)

    def forget(self, item_id: str, tenant: str | None = None) -> bool:
        """Delete one long-term memory; False if there was none with this id (of ``tenant``)."""
        if self.store is None or not self._owned(item_id, tenant):
            return False
        # the turns watermark covers every ingested turn: a forgotten one never comes back
        return self.store.delete(item_id)

    def _owned(self, item_id: str, tenant: str | None) -> bool:
        """Whether ``tenant`` may see the item (any item when ``tenant`` is None)."""
        if tenant is None:
            return True
        item = self.store.get(item_id) if self.store is not None else None
        return item is not None and item.session is not None and tenant_of(item.session) == tenant

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts with the runtime's embedder (L2-normalised rows), with the tokens it
        read (from its ``last_stats``; under the runtime's lock, so they are this call's)."""
        if self._embedder is None:
            raise RuntimeArgumentError("embedder", "long-term memory is off (embedder=False)")
        items = [check_text(t) for t in texts]
        if not items:
            raise RuntimeArgumentError("input", "at least one text is needed")
        if len(items) > MAX_EMBED_TEXTS:
            raise RuntimeArgumentError("input", f"at most {MAX_EMBED_TEXTS} texts per call")
        inner = self._embedder.inner
        vectors = inner.embed(items)
        stats = getattr(inner, "last_stats", None)
        tokens = getattr(stats, "tokens", None)
        return Embeddings(vectors, int(tokens) if tokens is not None else None)

    def embedder_info(self) -> tuple[str, int] | None:
        """``(model id, dimensions)`` of the embedder, or ``None`` when memory is off."""
        if self._embedder is None:
            return None
        return self._embedder.model_id, self._embedder.dim

    def items(self) -> int | None:
        """Items in the store (``None`` when memory is off)."""
        if self.store is None:
            return None
        items = self.store.stats().get("items")
        return int(items) if items is not None else None

    def close(self) -> None:
        """Close the store."""
        if self.store is not None:
            self.store.close()
