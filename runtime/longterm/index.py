"""The life cycle of a memory store's derived index: open, replay, rebuild, save.

SQLite (:mod:`runtime.longterm.db`) is the source of truth; the hnswlib index
(:mod:`runtime.longterm.hnsw`) is a cache of its vectors. The index is updated after each
commit and saved every ``save_every`` changes and on close. On open the saved index is
validated and loaded, its capacity bounded by what SQLite ever held (hnswlib PR #677), and
every item newer than the highest sequence number it contains (and every delete newer than
its last tombstone) is replayed from SQLite. A missing, corrupt or foreign index is rebuilt
from SQLite with a warning; it never stops the store from opening.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.errors import IndexFileError
from runtime.fsutil import persist_error
from runtime.longterm import db as sql
from runtime.longterm.hnsw import FloatArray, HnswIndex, IndexParams
from runtime.longterm.manifest import remove_unreferenced_blobs

logger = logging.getLogger(__name__)

#: Filtered searches whose allowed set is at most this size scan it exactly in numpy.
EXACT_FILTER_LIMIT = 8192
#: Allowed sets (a session's items, say) whose vectors are kept in memory between searches,
#: until the next add or delete: at most this many, each at most EXACT_FILTER_LIMIT rows.
SCAN_CACHE = 4

_ScanKey = tuple[str, tuple[object, ...]]
_Scan = tuple[npt.NDArray[np.int64], FloatArray]


class StoreIndex:
    """The index of one store directory and how far it covers SQLite.

    Constructing one opens it: the saved index is loaded and what it lacks replayed, or it
    is rebuilt from SQLite (:attr:`recovered` says why). ``max_seq`` and ``max_tomb`` are the
    highest item and tombstone the index holds; ``dirty`` counts the changes since the last
    save. ``on_save`` runs first in every save (the store writes its pending access times
    there). The caller serialises every call (the store's lock) and passes its open
    connection to the ones that read SQLite.
    """

    hnsw: HnswIndex

    def __init__(
        self,
        db: sqlite3.Connection,
        directory: Path,
        params: IndexParams,
        *,
        store_id: bytes,
        save_every: int,
        read_only: bool,
        on_save: Callable[[], None],
    ) -> None:
        self.directory = directory
        self.params = params
        self.store_id = store_id
        self.save_every = save_every
        self.read_only = read_only
        self._on_save = on_save
        self.max_seq = 0
        self.max_tomb = 0
        self.dirty = 0
        self._scans: dict[
            tuple[str, tuple[object, ...]], tuple[npt.NDArray[np.int64], FloatArray]
        ] = {}
        self._save_retry_at = 0  # after a failed periodic save: retry at this many changes
        self.recovered = ""  # why the index was rebuilt on open ("" if it was not)
        self._open(db)

    def __len__(self) -> int:
        """Items in the index (not marked deleted)."""
        return len(self.hnsw)

    def figures(self) -> dict[str, int]:
        """The index's size and settings, and its changes not saved yet (for ``stats``)."""
        index = self.hnsw
        return {
            "index_live": len(index),
            "index_slots": index.slots,
            "index_capacity": index.max_elements,
            "index_M": index.params.M,
            "index_ef_search": index.params.ef_search,
            "unsaved_changes": self.dirty,
        }

    # -- opening --------------------------------------------------------------------------------

    def _open(self, db: sqlite3.Connection) -> None:
        """Load the saved index and replay what it lacks, or rebuild it from SQLite."""
        try:
            # hnswlib PR #677: bound what the saved index claims by what SQLite holds, before
            # hnswlib's loader allocates for it
            index, manifest = HnswIndex.load(
                self.directory,
                self.params,
                store_id=self.store_id,
                max_slots=sql.ever_inserted(db),
            )
        except IndexFileError as exc:
            self.recovered = str(exc)
            level = logging.INFO if str(exc) == "no index manifest" else logging.WARNING
            logger.log(level, "rebuilding the index of %s from SQLite: %s", self.directory, exc)
            self.rebuild(db)
            return
        self.hnsw = index
        self.max_seq, self.max_tomb = manifest.max_seq, manifest.max_tomb
        replayed = self._replay(db)
        count = sql.count(db)
        if len(index) != count:
            self.recovered = f"index has {len(index)} items after replay, SQLite has {count}"
            logger.warning("rebuilding the index of %s: %s", self.directory, self.recovered)
            self.rebuild(db)
            return
        if replayed:
            logger.info("replayed %d changes into the index of %s", replayed, self.directory)
        if not self.read_only:
            remove_unreferenced_blobs(self.directory, keep=manifest.blob_name)
            self.maybe_save(db)

    def _replay(self, db: sqlite3.Connection) -> int:
        """Apply items and deletes newer than the saved index; returns how many."""
        done = 0
        where = ("WHERE seq > ?", (self.max_seq,))
        for seqs, vectors in sql.iter_embeddings(db, self.params.dim, *where):
            self.hnsw.add(vectors, seqs)
            self.max_seq = max(self.max_seq, int(seqs[-1]))
            done += len(seqs)
        for op, seq in db.execute(
            "SELECT op, seq FROM tombstones WHERE op > ? ORDER BY op", (self.max_tomb,)
        ):
            self.hnsw.mark_deleted(seq)
            self.max_tomb = op
            done += 1
        self.dirty += done
        return done

    def rebuild(self, db: sqlite3.Connection) -> None:
        """Build the index afresh from every item in SQLite (and save it unless read-only)."""
        self._scans.clear()
        count = sql.count(db)
        index = HnswIndex(self.params, capacity=max(1024, int(count * 1.25)))
        self.max_seq = 0
        for seqs, vectors in sql.iter_embeddings(db, self.params.dim, "", ()):
            index.add(vectors, seqs)
            self.max_seq = max(self.max_seq, int(seqs[-1]))
        row = db.execute("SELECT MAX(op) FROM tombstones").fetchone()
        self.max_tomb = int(row[0] or 0)
        self.hnsw = index
        self.dirty = 0
        if not self.read_only:
            self.save(db)

    # -- changes --------------------------------------------------------------------------------

    def added(self, vectors: FloatArray, seqs: Sequence[int]) -> None:
        """Index items just committed to SQLite under ``seqs``."""
        self._scans.clear()
        self.hnsw.add(vectors, seqs)
        self.max_seq = max(self.max_seq, max(seqs))
        self.dirty += len(seqs)

    def deleted(self, seq: int, op: int | None) -> None:
        """Drop an item just deleted from SQLite; ``op`` is its tombstone's number."""
        self._scans.clear()
        self.hnsw.mark_deleted(seq)
        self.max_tomb = int(op or self.max_tomb)
        self.dirty += 1

    def apply(
        self, added: Sequence[tuple[int, bytes]], deleted: Sequence[tuple[int, int | None]]
    ) -> None:
        """Index what a replica's pull committed: new rows (seq, float32 embedding bytes)
        and deletes (seq, tombstone number)."""
        if added:
            vectors = sql.decode_vectors([v for _, v in added], self.params.dim)
            self.added(vectors, [seq for seq, _ in added])
        for seq, op in deleted:
            self.deleted(seq, op)

    # -- queries --------------------------------------------------------------------------------

    def candidates(
        self,
        db: sqlite3.Connection,
        vector: FloatArray,
        pool: int,
        *,
        where: str = "",
        args: Sequence[object] = (),
    ) -> dict[int, float]:
        """seq -> cosine for up to ``pool`` candidates among the items ``where`` allows
        (an SQL condition on ``items``, see :func:`runtime.longterm.db.scope_clause`).

        Unfiltered, the graph answers. Filtered, SQLite lists the allowed items: at most
        :data:`EXACT_FILTER_LIMIT` of them are scanned exactly, more go to the graph walk
        with the filter.
        """
        if not where:
            labels, sims = self.hnsw.query(vector, pool)
            return dict(zip(labels, sims, strict=True))
        key = (where, tuple(args))
        scan = self._scans.get(key)
        if scan is None:
            allowed = [r[0] for r in db.execute(f"SELECT seq FROM items WHERE {where}", key[1])]
            if len(allowed) <= EXACT_FILTER_LIMIT:
                scan = self._load_scan(db, key)
        if scan is not None:
            # small sets: exact scan beats the graph walk and never misses
            seqs, matrix = scan
            exact = matrix @ vector
            top = np.argsort(-exact, kind="stable")[:pool]
            return {int(seqs[i]): float(exact[i]) for i in top}
        allowed_set = frozenset(allowed)
        labels, sims = self.hnsw.query(vector, pool, filter=allowed_set.__contains__)
        return dict(zip(labels, sims, strict=True))

    def _load_scan(self, db: sqlite3.Connection, key: _ScanKey) -> _Scan:
        """The allowed items' seqs and vectors, read once and kept until the next change
        (at most SCAN_CACHE sets of at most EXACT_FILTER_LIMIT rows: bounded memory)."""
        seqs: list[int] = []
        parts: list[FloatArray] = []
        for chunk, vectors in sql.iter_embeddings(db, self.params.dim, f"WHERE {key[0]}", key[1]):
            seqs += chunk
            parts.append(vectors)
        matrix = np.concatenate(parts) if parts else np.zeros((0, self.params.dim), np.float32)
        scan = (np.asarray(seqs, dtype=np.int64), matrix)
        if len(self._scans) >= SCAN_CACHE:
            self._scans.pop(next(iter(self._scans)))
        self._scans[key] = scan
        return scan

    # -- saving ---------------------------------------------------------------------------------

    def save(self, db: sqlite3.Connection) -> None:
        """Publish the index now, then drop the tombstones it has applied."""
        self._on_save()
        try:
            self.hnsw.save(
                self.directory,
                store_id=self.store_id,
                max_seq=self.max_seq,
                max_tomb=self.max_tomb,
            )
        except OSError as exc:
            raise persist_error(
                exc, self.directory, "could not save the index (SQLite still has every item)"
            ) from exc
        # tombstones up to max_tomb are now in the saved index; keep the table bounded
        with sql.transaction(db) as tx:
            tx.execute("DELETE FROM tombstones WHERE op <= ?", (self.max_tomb,))
        self.dirty = 0

    def maybe_save(self, db: sqlite3.Connection) -> None:
        """Save every ``save_every`` changes; a failure there never fails a write.

        The change is committed to SQLite already (and is replayed into the index on the next
        open), so a periodic save that fails (a full disk) is logged and retried
        ``save_every`` changes later instead of being raised from an acknowledged add.
        """
        if self.dirty < max(self.save_every, self._save_retry_at):
            return
        try:
            self.save(db)
        except (OSError, RuntimeError, sqlite3.Error) as exc:
            self._save_retry_at = self.dirty + self.save_every
            logger.warning(
                "could not save the index of %s (%s); committed items are safe in SQLite and "
                "are replayed on the next open; retrying after %d more changes",
                self.directory,
                exc,
                self.save_every,
            )
        else:
            self._save_retry_at = 0
