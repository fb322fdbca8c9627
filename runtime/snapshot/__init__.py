"""KV snapshots: a versioned, checksummed, zstd-compressed file format for llama.cpp state.

A snapshot is one sequence's (or a whole context's) KV state, as returned by
``llama_state_seq_get_data``, wrapped in a header that ties it to the exact model, cache layout
and llama.cpp build that produced it. The layout is described field by field in
``docs/snapshot-format.md``; the struct tables below are the single source of truth.

Integrity is checked in layers, each before the next is trusted:

1. magic, then the version against :data:`READER_SUPPORTED_VERSIONS`;
2. the header length against :data:`MAX_HEADER_LEN` and the file size, before it is read;
3. the header's SHA-256, before any other field is used;
4. every length and count in the header against each other and against the file size;
5. each compressed chunk's xxh3-128 digest before it is decompressed;
6. each zstd frame's declared content size (and its xxh64 content checksum where the frame
   has one), while decompressing;
7. at restore, the cache identity (model fingerprint, geometry, cache types, V layout, build)
   against the target context, before llama.cpp sees a byte.

Typical use::

    snap = snapshot.capture(ctx, seq_id=0, tokens=tokens, session_id="chat-1")
    snapshot.write(path, snap)
    snapshot.restore(other_ctx, snapshot.read(path), seq_id=1)

One module per concept: :mod:`~runtime.snapshot.format` (struct tables, header, versions),
:mod:`~runtime.snapshot.identity` (:class:`CacheIdentity`), :mod:`~runtime.snapshot.container`
(:class:`Snapshot` in memory), :mod:`~runtime.snapshot.codec` (planes, zstd, digests),
:mod:`~runtime.snapshot.io` (files), :mod:`~runtime.snapshot.live` (capture and restore against
a context: the only one that touches ``llamaffi``).
"""

import zstandard as zstandard

from runtime.errors import (
    CorruptSnapshot,
    CorruptSnapshotError,
    IncompatibleSnapshot,
    IncompatibleSnapshotError,
    RestoreError,
    SnapshotError,
    UnsupportedVersion,
    UnsupportedVersionError,
)
from runtime.snapshot.codec import (
    DEFAULT_CODEC,
    Codec,
    compress_chunks,
    decode,
    decode_into,
    encode,
    merge_planes,
    new_snapshot_id,
    shuffle2,
    split_planes,
    unshuffle2,
)
from runtime.snapshot.codec import (
    _decompress_into as _decompress_into,
)
from runtime.snapshot.codec import (
    _frame_length as _frame_length,
)
from runtime.snapshot.codec import (
    _parallel_map as _parallel_map,
)
from runtime.snapshot.container import Snapshot, chunk_digest, read_header
from runtime.snapshot.container import _verify_digests as _verify_digests
from runtime.snapshot.format import (
    _BODY as _BODY,
)
from runtime.snapshot.format import (
    _BODY_V2 as _BODY_V2,
)
from runtime.snapshot.format import (
    _CHUNK_ENTRY as _CHUNK_ENTRY,
)
from runtime.snapshot.format import (
    BODY_FIELDS_V1,
    BODY_FIELDS_V2,
    FILE_SUFFIX,
    FORMAT_VERSION,
    MAGIC,
    MAX_CHUNK_SIZE,
    MAX_HEADER_LEN,
    MAX_ID_LEN,
    MIN_HEADER_LEN,
    NO_JOURNAL_SEQ,
    READER_SUPPORTED_VERSIONS,
    ChunkEntry,
    CodecId,
    Filter,
    SnapshotHeader,
    StateKind,
    check_prefix,
    count_chunks,
    min_header_len,
)

# the earlier module's other public constants, still importable from here
from runtime.snapshot.format import CHUNK_DIGEST_LEN as CHUNK_DIGEST_LEN
from runtime.snapshot.format import DIGEST_LEN as DIGEST_LEN
from runtime.snapshot.format import LAYOUT_FLASH_ATTN as LAYOUT_FLASH_ATTN
from runtime.snapshot.format import LAYOUT_KV_UNIFIED as LAYOUT_KV_UNIFIED
from runtime.snapshot.format import LAYOUT_V_TRANS as LAYOUT_V_TRANS
from runtime.snapshot.format import TYPE_NAME_LEN as TYPE_NAME_LEN
from runtime.snapshot.identity import CacheIdentity
from runtime.snapshot.io import inspect, iter_snapshot_files, read, verify, write
from runtime.snapshot.live import (
    capture,
    check_compatible,
    check_raw_size,
    identity_of,
    max_state_size,
    restore,
    restore_file,
    seq_positions,
)

__all__ = [
    "BODY_FIELDS_V1",
    "BODY_FIELDS_V2",
    "DEFAULT_CODEC",
    "FILE_SUFFIX",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_HEADER_LEN",
    "MAX_ID_LEN",
    "MIN_HEADER_LEN",
    "NO_JOURNAL_SEQ",
    "READER_SUPPORTED_VERSIONS",
    "CacheIdentity",
    "ChunkEntry",
    "Codec",
    "CodecId",
    "CorruptSnapshot",
    "CorruptSnapshotError",
    "Filter",
    "IncompatibleSnapshot",
    "IncompatibleSnapshotError",
    "RestoreError",
    "Snapshot",
    "SnapshotError",
    "SnapshotHeader",
    "StateKind",
    "UnsupportedVersion",
    "UnsupportedVersionError",
    "capture",
    "check_compatible",
    "check_prefix",
    "check_raw_size",
    "chunk_digest",
    "compress_chunks",
    "count_chunks",
    "decode",
    "decode_into",
    "encode",
    "identity_of",
    "inspect",
    "iter_snapshot_files",
    "max_state_size",
    "merge_planes",
    "min_header_len",
    "new_snapshot_id",
    "read",
    "read_header",
    "restore",
    "restore_file",
    "seq_positions",
    "shuffle2",
    "split_planes",
    "unshuffle2",
    "verify",
    "write",
]
