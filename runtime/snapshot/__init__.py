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

or in two phases, for a caller that must not hold the context while it compresses::

    copy = snapshot.copy_state(ctx, seq_id=0, tokens=tokens)  # the context's thread
    snap = copy.encode(session_id="chat-1")                  # any thread
    snapshot.restore(other_ctx, snapshot.read(path), seq_id=1)

One module per concept: :mod:`~runtime.snapshot.format` (struct tables, header, versions),
:mod:`~runtime.snapshot.identity` (:class:`CacheIdentity`), :mod:`~runtime.snapshot.container`
(:class:`Snapshot` in memory), :mod:`~runtime.snapshot.codec` (planes, zstd, digests),
:mod:`~runtime.snapshot.io` (files), :mod:`~runtime.snapshot.live` (capture and restore against
a context: the only one that touches ``llamaffi``, and the only one that imports the others'
context-facing parts; nothing imports it back). The codec's stages (:func:`verify_digests`,
:func:`decompress_frame_into`, :func:`merge_planes`, :func:`parallel_map`) are public so that
a profiler can time them one by one.
"""

from runtime.errors import (
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    RestoreError,
    SnapshotError,
    UnsupportedVersionError,
)
from runtime.snapshot.codec import (
    DEFAULT_CODEC,
    Codec,
    compress_chunks,
    decode,
    decode_into,
    decompress_frame_into,
    encode,
    frame_length,
    merge_planes,
    new_snapshot_id,
    parallel_map,
    shuffle2,
    split_planes,
    stored_payload,
    unshuffle2,
)
from runtime.snapshot.container import (
    Snapshot,
    chunk_digest,
    header_from_buffer,
    read_header,
    verify_digests,
)
from runtime.snapshot.format import (
    BODY_FIELDS_V1,
    BODY_FIELDS_V2,
    CHUNK_DIGEST_LEN,
    DIGEST_LEN,
    FILE_SUFFIX,
    FORMAT_VERSION,
    LAYOUT_FLASH_ATTN,
    LAYOUT_KV_UNIFIED,
    LAYOUT_V_TRANS,
    MAGIC,
    MAX_CHUNK_SIZE,
    MAX_HEADER_LEN,
    MAX_ID_LEN,
    MIN_HEADER_LEN,
    NO_JOURNAL_SEQ,
    READER_SUPPORTED_VERSIONS,
    TYPE_NAME_LEN,
    ChunkEntry,
    CodecId,
    Filter,
    SnapshotHeader,
    StateKind,
    check_prefix,
    count_chunks,
    min_header_len,
)
from runtime.snapshot.identity import CacheIdentity
from runtime.snapshot.io import (
    inspect,
    iter_snapshot_files,
    read,
    verify,
    verify_snapshot,
    write,
)
from runtime.snapshot.live import (
    StateCopy,
    capture,
    check_compatible,
    check_raw_size,
    copy_state,
    identity_of,
    max_state_size,
    restore,
    restore_file,
    seq_positions,
)

__all__ = [
    "BODY_FIELDS_V1",
    "BODY_FIELDS_V2",
    "CHUNK_DIGEST_LEN",
    "DEFAULT_CODEC",
    "DIGEST_LEN",
    "FILE_SUFFIX",
    "FORMAT_VERSION",
    "LAYOUT_FLASH_ATTN",
    "LAYOUT_KV_UNIFIED",
    "LAYOUT_V_TRANS",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_HEADER_LEN",
    "MAX_ID_LEN",
    "MIN_HEADER_LEN",
    "NO_JOURNAL_SEQ",
    "READER_SUPPORTED_VERSIONS",
    "TYPE_NAME_LEN",
    "CacheIdentity",
    "ChunkEntry",
    "Codec",
    "CodecId",
    "CorruptSnapshotError",
    "Filter",
    "IncompatibleSnapshotError",
    "RestoreError",
    "Snapshot",
    "SnapshotError",
    "SnapshotHeader",
    "StateCopy",
    "StateKind",
    "UnsupportedVersionError",
    "capture",
    "check_compatible",
    "check_prefix",
    "check_raw_size",
    "chunk_digest",
    "compress_chunks",
    "copy_state",
    "count_chunks",
    "decode",
    "decode_into",
    "decompress_frame_into",
    "encode",
    "frame_length",
    "header_from_buffer",
    "identity_of",
    "inspect",
    "iter_snapshot_files",
    "max_state_size",
    "merge_planes",
    "min_header_len",
    "new_snapshot_id",
    "parallel_map",
    "read",
    "read_header",
    "restore",
    "restore_file",
    "seq_positions",
    "shuffle2",
    "split_planes",
    "stored_payload",
    "unshuffle2",
    "verify",
    "verify_digests",
    "verify_snapshot",
    "write",
]
