"""A persisted hnswlib index: a rebuildable cache of the vectors held in SQLite.

On disk the index is two kinds of file in the store directory:

* ``index-<16 hex>.hnsw``: hnswlib's own ``save_index`` output, written under a temp name,
  fsynced and renamed; never modified afterwards;
* ``index.manifest``: a fixed little-endian header (:data:`MANIFEST`) naming the current blob
  with its size and sha256, plus the store id, dimension, counts and the highest item
  sequence number (and tombstone number) the blob contains; CRC32 over the header.

Saving writes the new blob under a new name, switches the manifest in one atomic step, and
only then deletes old blobs, so a crash at any point leaves a manifest that points at a
complete blob (or no manifest at all).

Loading validates the manifest, the blob's size and sha256, and every field of hnswlib's own
blob header, walking its link lists against the file size, *before* hnswlib sees the file:
hnswlib's loader trusts its header (hnswlib PR #677: a bad ``max_elements`` overflows the
heap). Any failure raises :class:`IndexFileError`; the caller rebuilds from SQLite.

hnswlib is not safe for concurrent add and query, so every call into it holds one lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import DiskFullError, PersistError
from runtime.errors import HnswIndexError as HnswIndexError  # re-exported: its old home
from runtime.errors import IndexFileError as IndexFileError
from runtime.fsutil import TMP_PREFIX, atomic_write_bytes, fsync_dir, open_nofollow, sha256_fd

log = logging.getLogger(__name__)

MANIFEST_NAME = "index.manifest"
MAGIC = b"LFHNSWM\x00"
VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
SPACES: dict[str, int] = {"cosine": 1, "ip": 2, "l2": 3}
_BLOB_RE = re.compile(r"^index-[0-9a-f]{16}\.hnsw$")

# One table for the manifest's layout (little-endian); the CRC32 of these bytes follows.
MANIFEST = struct.Struct(
    "<8s"  # magic
    "I"  # version
    "I"  # dim
    "I"  # space code
    "I"  # M
    "I"  # ef_construction
    "I"  # reserved (0)
    "Q"  # max_seq: highest item sequence number in the blob
    "Q"  # max_tomb: highest tombstone number applied to the blob
    "Q"  # live: labels not marked deleted
    "Q"  # slots: hnswlib's cur_element_count (live + deleted)
    "Q"  # max_elements
    "Q"  # blob size in bytes
    "16s"  # store id (uuid bytes)
    "32s"  # blob sha256
    "32s"  # blob file name, NUL padded
)
_CRC = struct.Struct("<I")

# hnswlib's saveIndex header (hnswalg.h, v0.8.0): size_t/int/tableint/double, little-endian
HNSW_HEADER = struct.Struct(
    "<Q"  # offsetLevel0_
    "Q"  # max_elements_
    "Q"  # cur_element_count
    "Q"  # size_data_per_element_
    "Q"  # label_offset_
    "Q"  # offsetData_
    "i"  # maxlevel_
    "I"  # enterpoint_node_
    "Q"  # maxM_
    "Q"  # maxM0_
    "Q"  # M_
    "d"  # mult_
    "Q"  # ef_construction_
)
_U32 = struct.Struct("<I")
_NO_ENTRY = 0xFFFFFFFF
_MAX_LEVEL = 64
#: A sanity cap on max_elements accepted from a file: far above any store this runtime makes.
MAX_ELEMENTS_LIMIT = 1 << 32


def capacity_bound(items: int) -> int:
    """The largest capacity a saved index of at most ``items`` slots may claim.

    :meth:`HnswIndex.add` grows to ``max(needed, 2 * capacity, 1024)`` and a rebuild sizes
    ``1.25 * count``, so an honest index never claims more than twice its slots (or 1024);
    the rest is headroom. hnswlib PR #677: its loader allocates whatever the file claims.
    """
    return 2 * max(0, items) + 2048


FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class IndexParams:
    """hnswlib parameters. ``ef_search`` is the query-time beam width (raised to ``k``).

    Defaults (M=32, ef_construction=200, ef_search=512) reach recall@10 ≥ 0.95 on 20k random
    384-d unit vectors, the hardest case (real text embeddings cluster, and recall more at a
    lower ef). A query then costs a few milliseconds, still well below the cost of embedding
    the query text; see docs/long-term-memory.md for the measurements.
    """

    dim: int
    space: str = "cosine"
    M: int = 32
    ef_construction: int = 200
    ef_search: int = 512

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {sorted(SPACES)}, got {self.space!r}")
        if not 0 < self.dim <= 65536:
            raise ValueError(f"dim must be in 1..65536, got {self.dim}")
        if not 2 <= self.M <= 256:
            raise ValueError(f"M must be in 2..256, got {self.M}")
        if self.ef_construction < 1 or self.ef_search < 1:
            raise ValueError("ef_construction and ef_search must be positive")


@dataclass(frozen=True)
class Manifest:
    """The decoded ``index.manifest``."""

    dim: int
    space: str
    M: int
    ef_construction: int
    max_seq: int
    max_tomb: int
    live: int
    slots: int
    max_elements: int
    blob_size: int
    store_id: bytes
    blob_sha256: bytes
    blob_name: str

    def to_bytes(self) -> bytes:
        """Encode with the CRC32 trailer."""
        dim, space, m, efc, *counts_and_ids, name = astuple(self)
        body = MANIFEST.pack(
            MAGIC,
            VERSION,
            dim,
            SPACES[space],
            m,
            efc,
            0,  # reserved
            *counts_and_ids,  # max_seq .. blob_sha256, in field order
            name.encode("ascii").ljust(32, b"\0"),
        )
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Decode and check magic, version, CRC and field ranges; raise :class:`IndexFileError`."""
        if len(data) != MANIFEST.size + _CRC.size:
            raise IndexFileError(f"manifest is {len(data)} bytes, expected {MANIFEST.size + 4}")
        body = data[: MANIFEST.size]
        (crc,) = _CRC.unpack_from(data, MANIFEST.size)
        fields = MANIFEST.unpack(body)
        if fields[0] != MAGIC:
            raise IndexFileError("manifest has a bad magic number")
        if fields[1] not in SUPPORTED_VERSIONS:
            raise IndexFileError(f"manifest version {fields[1]} is not supported")
        if zlib.crc32(body) != crc:
            raise IndexFileError("manifest checksum mismatch")
        _magic, _version, dim, space, m, efc, _reserved, *counts_and_ids, name = fields
        spaces = {v: k for k, v in SPACES.items()}
        blob_name = name.rstrip(b"\0").decode("ascii", "replace")
        if space not in spaces or not _BLOB_RE.match(blob_name):
            raise IndexFileError("manifest has a bad space code or blob name")
        out = cls(*(dim, spaces[space], m, efc, *counts_and_ids, blob_name))
        if not out.live <= out.slots <= out.max_elements <= MAX_ELEMENTS_LIMIT:
            raise IndexFileError(
                f"manifest counts are inconsistent: {out.live}/{out.slots}/{out.max_elements}"
            )
        return out


def validate_hnsw_blob(
    fd: int, size: int, *, dim: int, M: int, slots: int, max_elements: int
) -> None:
    """Check hnswlib's blob header and link-list framing against what we expect and the size.

    This is everything ``HierarchicalNSW::loadIndex`` trusts, so a file that passes cannot make
    it allocate from a bad ``max_elements`` (PR #677) or read past the end.
    """
    if size < HNSW_HEADER.size:
        raise IndexFileError(f"hnsw blob is {size} bytes, shorter than its header")
    (
        off0,
        max_el,
        cur,
        per_el,
        label_off,
        data_off,
        maxlevel,
        entry,
        max_m,
        max_m0,
        m,
        mult,
        _efc,
    ) = HNSW_HEADER.unpack(os.pread(fd, HNSW_HEADER.size, 0))
    links0 = max_m0 * 4 + 4  # neighbour ids + the linklistsizeint
    expected = {
        "offsetLevel0": (off0, 0),
        "cur_element_count": (cur, slots),
        "max_elements": (max_el, max_elements),
        "M": (m, M),
        "maxM": (max_m, M),
        "maxM0": (max_m0, 2 * M),
        "offsetData": (data_off, links0),
        "label_offset": (label_off, links0 + 4 * dim),
        "size_data_per_element": (per_el, links0 + 4 * dim + 8),
    }
    for field, (got, want) in expected.items():
        if got != want:
            raise IndexFileError(f"hnsw blob header field {field} is {got}, expected {want}")
    if not (0.0 < mult < 10.0):
        raise IndexFileError(f"hnsw blob has a bad level multiplier {mult}")
    if cur == 0:
        if entry != _NO_ENTRY and entry != 0:
            raise IndexFileError("empty hnsw blob has an entry point")
    elif entry >= cur or not 0 <= maxlevel < _MAX_LEVEL:
        raise IndexFileError(f"hnsw blob has a bad entry point {entry} or level {maxlevel}")
    level0_end = HNSW_HEADER.size + cur * per_el
    if level0_end > size:
        raise IndexFileError(f"hnsw blob is truncated: level-0 data ends at {level0_end} > {size}")
    if cur:
        _check_level0(fd, cur=cur, per_el=per_el, max_m0=max_m0)
    tail = os.pread(fd, size - level0_end, level0_end)
    levels = _check_upper_levels(tail, level0_end, cur=cur, max_m=max_m, maxlevel=maxlevel)
    # hnswlib starts every search at the entry point on maxlevel: it must really live there
    if cur and (levels.get(entry, 0) != maxlevel or max(levels.values(), default=0) != maxlevel):
        raise IndexFileError(f"hnsw blob entry point {entry} is not on the top level {maxlevel}")


def _check_level0(fd: int, *, cur: int, per_el: int, max_m0: int) -> None:
    """Every level-0 neighbour count is at most maxM0 and every neighbour id is below cur."""
    rows_per_read = max(1, (8 << 20) // per_el)  # bounded memory: 8 MiB at a time
    for first in range(0, cur, rows_per_read):
        rows = min(rows_per_read, cur - first)
        raw = os.pread(fd, rows * per_el, HNSW_HEADER.size + first * per_el)
        if len(raw) != rows * per_el:
            raise IndexFileError("hnsw blob is truncated in its level-0 data")
        table = np.frombuffer(raw, dtype="<u4").reshape(rows, per_el // 4)
        counts = table[:, 0] & 0xFFFF  # linklistsizeint: count in the low 16 bits, flags above
        if int(counts.max()) > max_m0:
            raise IndexFileError(f"hnsw blob has a level-0 neighbour count above {max_m0}")
        used = np.arange(max_m0)[None, :] < counts[:, None]
        if bool((table[:, 1 : 1 + max_m0][used] >= cur).any()):
            raise IndexFileError("hnsw blob has a level-0 neighbour id out of range")


def _check_upper_levels(
    tail: bytes, base: int, *, cur: int, max_m: int, maxlevel: int
) -> dict[int, int]:
    """Walk the per-element link lists (``tail`` starts at file offset ``base``).

    Returns {element: level} for the elements above level 0.
    """
    per_level = max_m * 4 + 4
    size = len(tail)
    levels: dict[int, int] = {}
    pos = 0
    for i in range(cur):
        if pos + 4 > size:
            raise IndexFileError(f"hnsw blob is truncated in the link list of element {i}")
        (n,) = _U32.unpack_from(tail, pos)
        pos += 4
        if n == 0:
            continue
        if n % per_level or n // per_level > max(maxlevel, 0) or pos + n > size:
            raise IndexFileError(
                f"hnsw blob has a bad link list size {n} at offset {base + pos - 4}"
            )
        block = np.frombuffer(tail, dtype="<u4", count=n // 4, offset=pos).reshape(-1, max_m + 1)
        counts = block[:, 0] & 0xFFFF
        if int(counts.max()) > max_m:
            raise IndexFileError(f"hnsw blob has a neighbour count above {max_m} (element {i})")
        used = np.arange(max_m)[None, :] < counts[:, None]
        if bool((block[:, 1:][used] >= cur).any()):
            raise IndexFileError(f"hnsw blob has a neighbour id out of range (element {i})")
        levels[i] = n // per_level
        pos += n
    if pos != size:
        raise IndexFileError(
            f"hnsw blob framing ends at {base + pos}, but the file has {base + size} bytes"
        )
    return levels


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
        """Add vectors under new labels, reusing deleted slots first and growing if needed."""
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(labels, dtype=np.uint64)
        if data.ndim != 2 or data.shape[1] != self.params.dim:
            raise ValueError(f"vectors must be (n, {self.params.dim}), got {data.shape}")
        if ids.shape != (data.shape[0],):
            raise ValueError(f"{ids.shape[0]} labels for {data.shape[0]} vectors")
        if not np.isfinite(data).all():
            raise ValueError("vectors contain NaN or infinity")
        if not len(ids):
            return
        with self._lock:
            slots = int(self._index.element_count)
            deleted = slots - self._live
            needed = slots + max(0, len(ids) - deleted)
            capacity = int(self._index.max_elements)
            if needed > capacity:
                new_capacity = max(needed, capacity * 2, 1024)
                log.debug("growing hnsw index %d -> %d", capacity, new_capacity)
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

        Returns fewer than ``k`` when the index (or the filter) has fewer items.
        """
        q = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.params.dim:
            raise ValueError(f"query must have {self.params.dim} values, got {q.shape[1]}")
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
        :func:`capacity_bound` of it, is refused before hnswlib allocates anything for it.
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
            _check_capacity(m, max_slots)
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


def _check_capacity(m: Manifest, max_slots: int) -> None:
    """hnswlib PR #677: a checksummed manifest can still claim a huge capacity; refuse it."""
    if m.slots > max_slots:
        raise IndexFileError(
            f"index claims {m.slots} slots, but the store has only ever held {max_slots} items"
        )
    bound = capacity_bound(max_slots)
    if m.max_elements > bound:
        raise IndexFileError(
            f"index claims a capacity of {m.max_elements} for at most {max_slots} items "
            f"(bound {bound}); not allocating it"
        )


def remove_unreferenced_blobs(directory: str | os.PathLike[str], *, keep: str | None) -> int:
    """Delete ``index-*.hnsw`` files other than ``keep``; hold the write lock. Returns count."""
    removed = 0
    for child in Path(directory).glob("index-*.hnsw"):
        if child.name != keep and _BLOB_RE.match(child.name):
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
                removed += 1
    return removed
