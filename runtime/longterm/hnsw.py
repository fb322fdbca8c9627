"""The hnswlib index itself: growth, reuse of deleted slots, queries, and its save and load.

Labels are the SQLite item sequence numbers. Saving writes the new blob under a new name,
switches the manifest (:mod:`runtime.longterm.manifest`) in one atomic step, and only then
deletes old blobs, so a crash at any point leaves a manifest that points at a complete blob
(or no manifest at all). Loading checks everything on one open file descriptor first.

hnswlib is not safe for concurrent add and query, so every call into it holds one lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import ArgumentError, DiskFullError, IndexFileError, PersistError
from runtime.fsutil import TMP_PREFIX, atomic_write_bytes, fsync_dir, open_nofollow, sha256_fd
from runtime.longterm.manifest import (
    MANIFEST_NAME,
    SPACES,
    Manifest,
    check_capacity,
    remove_unreferenced_blobs,
    validate_hnsw_blob,
)

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class IndexParams:
    """hnswlib parameters. ``ef_search`` is the query-time beam width (raised to ``k``).

    Defaults (M=32, ef_construction=200, ef_search=512) reach recall@10 ≥ 0.95 on 20k random
    384-d unit vectors, the hardest case (real text embeddings cluster, and recall more at a
    lower ef). A query then costs a few milliseconds, still well below the cost of embedding
    the query text; see docs/long-term-memory.md for the measurements. Values out of range
    raise :class:`runtime.errors.ArgumentError`.
    """

    dim: int
    space: str = "cosine"
    M: int = 32
    ef_construction: int = 200
    ef_search: int = 512

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ArgumentError(f"space must be one of {sorted(SPACES)}, got {self.space!r}")
        if not 0 < self.dim <= 65536:
            raise ArgumentError(f"dim must be in 1..65536, got {self.dim}")
        if not 2 <= self.M <= 256:
            raise ArgumentError(f"M must be in 2..256, got {self.M}")
        if self.ef_construction < 1 or self.ef_search < 1:
            raise ArgumentError("ef_construction and ef_search must be positive")


class HnswIndex:
    """An hnswlib index with a lock, growth by ``resize_index`` and reuse of deleted slots.

    Labels are the SQLite item sequence numbers (uint64). Similarities returned by
    :meth:`query` are ``1 - distance`` (the cosine for the cosine space).
    """

    def __init__(self, params: IndexParams, *, capacity: int = 1024, _raw: Any = None) -> None:
        """Create an empty index with room for ``capacity`` items (it grows as needed)."""
        import hnswlib

        self.params = params
        self._lock = threading.RLock()
        if _raw is None:
            _raw = hnswlib.Index(space=params.space, dim=params.dim)
            _raw.init_index(
                max_elements=max(1, capacity),
                M=params.M,
                ef_construction=params.ef_construction,
                allow_replace_deleted=True,
            )
        self._index = _raw
        self._live = 0
        self._index.set_ef(params.ef_search)

    # -- counts ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Items not marked deleted."""
        return self._live

    @property
    def slots(self) -> int:
        """Slots in use, deleted ones included (hnswlib's ``element_count``)."""
        with self._lock:
            return int(self._index.element_count)

    @property
    def max_elements(self) -> int:
        """Current capacity."""
        with self._lock:
            return int(self._index.max_elements)

    # -- mutation -------------------------------------------------------------------------------

    def add(self, vectors: FloatArray, labels: Sequence[int] | LabelArray) -> None:
        """Add vectors under new labels, reusing deleted slots first and growing if needed.

        Vectors of the wrong shape, a label count that does not match, or NaN/infinity raise
        :class:`runtime.errors.ArgumentError`.
        """
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(labels, dtype=np.uint64)
        if data.ndim != 2 or data.shape[1] != self.params.dim:
            raise ArgumentError(f"vectors must be (n, {self.params.dim}), got {data.shape}")
        if ids.shape != (data.shape[0],):
            raise ArgumentError(f"{ids.shape[0]} labels for {data.shape[0]} vectors")
        if not np.isfinite(data).all():
            raise ArgumentError("vectors contain NaN or infinity")
        if not len(ids):
            return
        with self._lock:
            slots = int(self._index.element_count)
            deleted = slots - self._live
            needed = slots + max(0, len(ids) - deleted)
            capacity = int(self._index.max_elements)
            if needed > capacity:
                new_capacity = max(needed, capacity * 2, 1024)
                logger.debug("growing hnsw index %d -> %d", capacity, new_capacity)
                self._index.resize_index(new_capacity)
            self._index.add_items(data, ids, replace_deleted=True)
            self._live += len(ids)

    def mark_deleted(self, label: int) -> bool:
        """Mark ``label`` deleted (its slot is reused by a later add); False if absent."""
        with self._lock:
            try:
                self._index.mark_deleted(int(label))
            except RuntimeError:  # "Label not found" or already deleted
                return False
            self._live -= 1
            return True

    # -- query ----------------------------------------------------------------------------------

    def query(
        self,
        vector: FloatArray,
        k: int,
        *,
        filter: Callable[[int], bool] | None = None,
        ef: int | None = None,
    ) -> tuple[list[int], list[float]]:
        """The ``k`` nearest labels to one vector with their similarities, best first.

        Returns fewer than ``k`` when the index (or the filter) has fewer items. A vector of
        the wrong width raises :class:`runtime.errors.ArgumentError`.
        """
        q = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.params.dim:
            raise ArgumentError(f"query must have {self.params.dim} values, got {q.shape[1]}")
        with self._lock:
            k = min(k, self._live)
            if k <= 0:
                return [], []
            slots = int(self._index.element_count)
            ef_now = max(ef or self.params.ef_search, k)
            try:
                while True:
                    self._index.set_ef(ef_now)
                    try:
                        # one thread: a Python filter callback must not run on hnswlib's pool
                        labels, dist = self._index.knn_query(q, k=k, num_threads=1, filter=filter)
                        return [int(x) for x in labels[0]], [float(1.0 - d) for d in dist[0]]
                    except RuntimeError:
                        # hnswlib found fewer than k: the beam was too narrow for the deleted
                        # slots or the filter. Widen it; asking for fewer would drop real hits.
                        if ef_now >= slots:
                            break
                        ef_now = min(slots, ef_now * 4)
            finally:
                self._index.set_ef(self.params.ef_search)
            # a beam over every slot still came up short: fewer than k items pass the filter
            # (or deletions split the graph); scan the live items exactly
            return self._exact(q[0], k, filter)

    def _exact(
        self, q: FloatArray, k: int, filter: Callable[[int], bool] | None
    ) -> tuple[list[int], list[float]]:
        """Brute-force top ``k`` over the live labels passing ``filter``; hold the lock."""
        labels: list[int] = []
        rows: list[FloatArray] = []
        for label in self._index.get_ids_list():
            if filter is not None and not filter(int(label)):
                continue
            try:
                (vec,) = self._index.get_items([int(label)], return_type="numpy")
            except RuntimeError:  # marked deleted: hnswlib keeps the label until its slot is reused
                continue
            labels.append(int(label))
            rows.append(np.asarray(vec, dtype=np.float32))
        if not labels:
            return [], []
        data = np.stack(rows)
        if self.params.space == "l2":
            sims = 1.0 - ((data - q) ** 2).sum(axis=1)
        elif self.params.space == "cosine":  # hnswlib stores cosine vectors normalised
            sims = data @ (q / max(float(np.linalg.norm(q)), 1e-30))
        else:
            sims = data @ q
        order = np.argsort(-sims, kind="stable")[:k]
        return [labels[i] for i in order], [float(sims[i]) for i in order]

    # -- persistence ----------------------------------------------------------------------------

    def save(
        self, directory: str | os.PathLike[str], *, store_id: bytes, max_seq: int, max_tomb: int
    ) -> Manifest:
        """Publish the index: new blob under a new name, then the manifest, then prune.

        Returns the manifest written. The caller must hold the directory's write lock.
        """
        d = Path(directory)
        blob_name = f"index-{secrets.token_hex(8)}.hnsw"
        tmp = d / f"{TMP_PREFIX}{blob_name}"
        try:
            # create it 0600 (and never through a link) before hnswlib opens it: its ofstream
            # would create it with the umask's mode, readable by others for a moment
            os.close(open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            with self._lock:
                self._index.save_index(str(tmp))
                live, slots, max_el = (
                    self._live,
                    int(self._index.element_count),
                    int(self._index.max_elements),
                )
            fd = open_nofollow(tmp, os.O_RDWR)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
                sha = sha256_fd(fd, size)
                self._check_saved(fd, size, tmp, slots=slots, max_elements=max_el)
            finally:
                os.close(fd)
            os.replace(tmp, d / blob_name)
            fsync_dir(d)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        manifest = Manifest(
            dim=self.params.dim,
            space=self.params.space,
            M=self.params.M,
            ef_construction=self.params.ef_construction,
            max_seq=max_seq,
            max_tomb=max_tomb,
            live=live,
            slots=slots,
            max_elements=max_el,
            blob_size=size,
            store_id=store_id,
            blob_sha256=sha,
            blob_name=blob_name,
        )
        atomic_write_bytes(d / MANIFEST_NAME, manifest.to_bytes())
        remove_unreferenced_blobs(d, keep=blob_name)
        return manifest

    def _check_saved(
        self, fd: int, size: int, path: Path, *, slots: int, max_elements: int
    ) -> None:
        """hnswlib's ofstream does not report a failed write (a full disk): check the blob."""
        try:
            validate_hnsw_blob(
                fd,
                size,
                dim=self.params.dim,
                M=self.params.M,
                slots=slots,
                max_elements=max_elements,
            )
        except IndexFileError as exc:
            st = os.statvfs(fd)
            if st.f_bavail * st.f_frsize < (1 << 20):
                raise DiskFullError(
                    errno.ENOSPC, f"disk full: hnswlib wrote an incomplete index ({exc})", str(path)
                ) from exc
            raise PersistError(
                errno.EIO, f"hnswlib wrote an unreadable index ({exc})", str(path)
            ) from exc

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        params: IndexParams,
        *,
        store_id: bytes,
        max_slots: int | None = None,
    ) -> tuple[HnswIndex, Manifest]:
        """Validate and load the index saved in ``directory``; raise :class:`IndexFileError`.

        Every check (manifest, store id, parameters, blob size, sha256, hnswlib header and
        framing) runs on one open file descriptor, and hnswlib then reads that same file
        through ``/proc/self/fd``, so the file cannot change between the checks and the load.

        ``max_slots`` is what the source of truth says the index can hold at most (the store's
        highest item number ever): a manifest claiming more slots, or a capacity above
        :func:`~runtime.longterm.manifest.capacity_bound` of it, is refused before hnswlib
        allocates anything for it.
        """
        import hnswlib

        d = Path(directory)
        try:
            raw = (d / MANIFEST_NAME).read_bytes()
        except FileNotFoundError:
            raise IndexFileError("no index manifest") from None
        except OSError as exc:
            raise IndexFileError(f"cannot read the index manifest: {exc}") from exc
        m = Manifest.from_bytes(raw)
        if m.store_id != store_id:
            raise IndexFileError("index files belong to another store")
        if max_slots is not None:
            check_capacity(m, max_slots)
        mismatched = [
            f"{name} {got} != {want}"
            for name, got, want in (
                ("dim", m.dim, params.dim),
                ("space", m.space, params.space),
                ("M", m.M, params.M),
            )
            if got != want
        ]
        if mismatched:
            raise IndexFileError(f"index parameters differ: {', '.join(mismatched)}")
        try:
            fd = os.open(d / m.blob_name, os.O_RDONLY)
        except OSError as exc:
            raise IndexFileError(f"cannot open {m.blob_name}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            if size != m.blob_size:
                raise IndexFileError(f"{m.blob_name} is {size} bytes, manifest says {m.blob_size}")
            if sha256_fd(fd, size) != m.blob_sha256:
                raise IndexFileError(f"{m.blob_name} checksum mismatch")
            validate_hnsw_blob(
                fd, size, dim=params.dim, M=params.M, slots=m.slots, max_elements=m.max_elements
            )
            proc_path = f"/proc/self/fd/{fd}"
            path = proc_path if os.path.exists(proc_path) else str(d / m.blob_name)
            index = hnswlib.Index(space=params.space, dim=params.dim)
            try:
                index.load_index(path, max_elements=m.max_elements, allow_replace_deleted=True)
            except RuntimeError as exc:
                raise IndexFileError(f"hnswlib could not load {m.blob_name}: {exc}") from exc
        finally:
            os.close(fd)
        if int(index.element_count) != m.slots:
            raise IndexFileError(f"loaded {index.element_count} slots, manifest says {m.slots}")
        out = cls(params, _raw=index)
        out._live = m.live
        return out, m
