"""Incremental KV checkpoints: content-addressed token chunks plus a manifest per session.

A sequence's KV state is cut into fixed ranges of ``chunk_tokens`` positions. Each full range
is a *chunk*: one file in the snapshot format (:mod:`runtime.snapshot`), named by a key that
hashes the cache identity and the token ids and positions of the whole prefix up to the
chunk's end (a hash chain). Equal prefixes therefore give equal keys, so a checkpoint writes
only the chunks that are not yet on disk, and sessions that share a prefix share its files.
The trailing partial range is a small *tail* chunk, keyed the same way. A *manifest* names a
session's chunks in order, the token ids and the journal entry the state follows; it is
written atomically after every chunk it names is durable, and chunks no manifest references
are deleted only after that switch (diskcache's ordering).

Layout::

    <root>/.lock                                   single-writer lock (flock)
    <root>/chunks/<key[:2]>/<key>.kvsnap           chunk and tail files (snapshot format)
    <root>/manifests/<session>/<generation>.kvman  the newest ``keep`` manifests per session
    <root>/manifests/<session>/quarantine/         damaged manifests moved aside
    <root>/quarantine/                             damaged chunks moved aside

Extracting one position range uses only the public API and a scratch sequence, because the
pinned llama.cpp has no range API (upstream PR #25133 is still open)::

    seq_cp(src, tmp, p0, p1); blob = seq_state_get(tmp); seq_rm(tmp)

and restoring is the reverse, chunk by chunk: ``seq_state_set(blob, tmp)`` (which first
empties ``tmp``), ``seq_cp(tmp, target)``, and one ``seq_rm(tmp)`` after the last chunk (the
first chunk goes straight into the target),
with the next chunk decoding on a worker meanwhile. Where the sequence-state layout is one
:mod:`runtime.snapshot.layout` knows (a unified, non-recurrent, non-SWA cache of the pinned
llama.cpp), a first save instead takes one ``seq_state_get`` of the whole sequence and slices
it into chunks byte-identical to the scratch path's; anything else falls back to the scratch
sequence, with the reason logged. ``seq_cp`` shares cells within one KV stream, so
neither direction needs spare cells; it needs a unified cache (``kv_unified=True``), where all
sequences share one stream.

Work is split for a runtime with a background writer, because a llama.cpp context is not
thread-safe: :meth:`ChunkStore.plan_capture` and :meth:`ChunkStore.restore` touch the context
and run on the caller's thread; :meth:`ChunkStore.commit` compresses, writes, fsyncs and
garbage-collects, never touches a context, and may run on another thread.

The format is described in ``docs/snapshot-format.md`` ("Chunked checkpoints").

One module per part, composed by the facade :class:`ChunkStore` (:mod:`~runtime.chunks.store`):
:mod:`~runtime.chunks.keys` (chunk keys and shift lineage), :mod:`~runtime.chunks.manifest`
(manifests and their binary form), :mod:`~runtime.chunks.pending` (planned checkpoints, verify
reports), :mod:`~runtime.chunks.index` (what the store knows without reading a file),
:mod:`~runtime.chunks.capture` (plan and commit), :mod:`~runtime.chunks.restore` (restore),
:mod:`~runtime.chunks.verify` (verify). The files live in a :class:`runtime.storage.BlobStore`
(:class:`runtime.storage.LocalBlobStore` by default), which states what is durable when. The
errors live in :mod:`runtime.errors`.
"""

from runtime.chunks.keys import (
    DEFAULT_CHUNK_TOKENS,
    KEY_BYTES,
    Lineage,
    chunk_keys,
    shift_lineage,
)
from runtime.chunks.manifest import (
    MANIFEST_MAGIC,
    MANIFEST_SUFFIX,
    MANIFEST_SUPPORTED_VERSIONS,
    MANIFEST_VERSION,
    MAX_MANIFEST_BODY,
    ChunkRef,
    Manifest,
)
from runtime.chunks.pending import PendingCheckpoint, PendingChunk, VerifyReport
from runtime.chunks.store import CHUNK_CODEC, DEFAULT_KEEP, ChunkStore
from runtime.errors import ChunkError

__all__ = [
    "CHUNK_CODEC",
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_KEEP",
    "KEY_BYTES",
    "MANIFEST_MAGIC",
    "MANIFEST_SUFFIX",
    "MANIFEST_SUPPORTED_VERSIONS",
    "MANIFEST_VERSION",
    "MAX_MANIFEST_BODY",
    "ChunkError",
    "ChunkRef",
    "ChunkStore",
    "Lineage",
    "Manifest",
    "PendingCheckpoint",
    "PendingChunk",
    "VerifyReport",
    "chunk_keys",
    "shift_lineage",
]
