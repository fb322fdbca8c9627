"""The files of a persisted hnswlib index, and the checks they pass before hnswlib reads them.

On disk the index is two kinds of file in the store directory:

* ``index-<16 hex>.hnsw``: hnswlib's own ``save_index`` output, written under a temp name,
  fsynced and renamed; never modified afterwards;
* ``index.manifest``: a fixed little-endian header (:data:`MANIFEST`) naming the current blob
  with its size and sha256, plus the store id, dimension, counts and the highest item
  sequence number (and tombstone number) the blob contains; CRC32 over the header.

Loading validates the manifest, the blob's size and sha256, and every field of hnswlib's own
blob header, walking its link lists against the file size, *before* hnswlib sees the file:
hnswlib's loader trusts its header (hnswlib PR #677: a bad ``max_elements`` overflows the
heap). Any failure raises :class:`runtime.errors.IndexFileError`; the caller rebuilds from
SQLite. Writing and loading the files is :class:`runtime.longterm.hnsw.HnswIndex`'s job.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zlib
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np

from runtime.errors import IndexFileError

MANIFEST_NAME = "index.manifest"
MAGIC = b"LFHNSWM\x00"
VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
SPACES: dict[str, int] = {"cosine": 1, "ip": 2, "l2": 3}
BLOB_RE = re.compile(r"^index-[0-9a-f]{16}\.hnsw$")

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

    :meth:`runtime.longterm.hnsw.HnswIndex.add` grows to ``max(needed, 2 * capacity, 1024)``
    and a rebuild sizes ``1.25 * count``, so an honest index never claims more than twice
    its slots (or 1024); the rest is headroom. hnswlib PR #677: its loader allocates
    whatever the file claims.
    """
    return 2 * max(0, items) + 2048


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
        if space not in spaces or not BLOB_RE.match(blob_name):
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


def check_capacity(m: Manifest, max_slots: int) -> None:
    """Refuse a manifest claiming more than the store can hold (``max_slots`` items at most).

    hnswlib PR #677: a checksummed manifest can still claim a huge capacity, and hnswlib's
    loader allocates whatever it claims.
    """
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
        if child.name != keep and BLOB_RE.match(child.name):
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
                removed += 1
    return removed
