"""Former home of the persisted hnswlib index; it now lives in :mod:`runtime.longterm`.

:mod:`runtime.longterm.hnsw` holds :class:`HnswIndex` and :class:`IndexParams`,
:mod:`runtime.longterm.manifest` the file format and its checks. Every name this module
defined is re-exported here, so ``from runtime.index import ...`` keeps working.
"""

from __future__ import annotations

from runtime.errors import HnswIndexError, IndexFileError
from runtime.longterm.hnsw import FloatArray, HnswIndex, IndexParams, LabelArray
from runtime.longterm.manifest import (
    HNSW_HEADER,
    MAGIC,
    MANIFEST,
    MANIFEST_NAME,
    MAX_ELEMENTS_LIMIT,
    SPACES,
    SUPPORTED_VERSIONS,
    VERSION,
    Manifest,
    capacity_bound,
    remove_unreferenced_blobs,
    validate_hnsw_blob,
)

__all__ = [
    "HNSW_HEADER",
    "MAGIC",
    "MANIFEST",
    "MANIFEST_NAME",
    "MAX_ELEMENTS_LIMIT",
    "SPACES",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "FloatArray",
    "HnswIndex",
    "HnswIndexError",
    "IndexFileError",
    "IndexParams",
    "LabelArray",
    "Manifest",
    "capacity_bound",
    "remove_unreferenced_blobs",
    "validate_hnsw_blob",
]
