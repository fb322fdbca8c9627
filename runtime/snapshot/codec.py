"""The payload codec: byte planes or a 2-byte shuffle, chunked zstd frames with digests, and
parallel workers (zstd and numpy release the GIL)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import zstandard

from runtime.errors import ArgumentError, CorruptSnapshotError
from runtime.snapshot.container import (
    DeferredSnapshot,
    Snapshot,
    check_digest,
    chunk_digest,
    verify_digests,
)
from runtime.snapshot.format import (
    DIGEST_LEN,
    MAX_CHUNK_SIZE,
    MAX_HEADER_LEN,
    MAX_ID_LEN,
    TYPE_NAME_LEN,
    ZSTD_MAX_LEVEL,
    ZSTD_MIN_LEVEL,
    ChunkEntry,
    CodecId,
    Filter,
    SnapshotHeader,
    StateKind,
)
from runtime.snapshot.identity import CacheIdentity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Codec:
    """How the payload is compressed. Decoding needs only what the header records."""

    level: int = 1
    filter: Filter = Filter.PLANES2
    chunk_size: int = 1 << 20
    #: Worker threads for (de)compression and hashing; 0 means ``min(4, os.cpu_count())``.
    threads: int = 0
    #: Whether each zstd frame carries its xxh64 content checksum, which zstd verifies while
    #: decoding. The chunk table's xxh3-128 digests cover every stored byte either way (they
    #: are checked before a frame is decoded); the content checksum also guards the decoder
    #: itself, for about half the time of a level -1 decode. Decoding needs no setting: a
    #: frame says whether it has one.
    checksum: bool = True
    #: ``CodecId.STORED``: each segment as it is, with its digest (no filter; level unused).
    codec_id: CodecId = CodecId.ZSTD

    def __post_init__(self) -> None:
        if not ZSTD_MIN_LEVEL <= self.level <= ZSTD_MAX_LEVEL:
            raise ArgumentError(f"zstd level {self.level} out of range")
        if self.codec_id is CodecId.STORED and self.filter is not Filter.NONE:
            raise ArgumentError("stored chunks take no filter")
        if not (2 <= self.chunk_size <= MAX_CHUNK_SIZE and self.chunk_size % 2 == 0):
            raise ArgumentError(f"chunk_size must be even and in [2, {MAX_CHUNK_SIZE}]")
        if self.threads < 0:
            raise ArgumentError("threads must be >= 0")


#: The default codec; see docs/snapshot-format.md ("Choosing the codec") for the measurements.
DEFAULT_CODEC = Codec()


_executor_lock = threading.Lock()
_executors: dict[int, concurrent.futures.ThreadPoolExecutor] = {}

T = TypeVar("T")


def _n_threads(threads: int) -> int:
    return threads if threads > 0 else max(1, min(4, os.cpu_count() or 1))


def parallel_map(fn: Callable[[int], T], n: int, threads: int) -> list[T]:
    """Run ``fn(i)`` for ``i`` in ``range(n)``, on a shared pool when it is worth it.

    zstd and numpy's copy loops release the GIL, so threads scale on real cores.
    """
    workers = _n_threads(threads)
    if workers == 1 or n <= 1:
        return [fn(i) for i in range(n)]
    with _executor_lock:
        pool = _executors.get(workers)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="kvsnap")
            _executors[workers] = pool
    return list(pool.map(fn, range(n)))


def shuffle2(src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8]) -> None:
    """Byte-plane split: ``dst`` = all even bytes of ``src``, then all odd bytes.

    For little-endian 16-bit data (f16/bf16 KV) the second half holds the sign/exponent bytes,
    which zstd's entropy coder compresses far better when they sit together. An odd trailing
    byte is copied as is.
    """
    n = src.size
    half = n // 2
    if half:
        words = src[: 2 * half].view("<u2")
        np.copyto(dst[:half], words, casting="unsafe")
        np.right_shift(words, 8, out=dst[half : 2 * half], casting="unsafe")
    if n % 2:
        dst[n - 1] = src[n - 1]


def unshuffle2(src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8]) -> None:
    """Inverse of :func:`shuffle2` (arithmetic form: a strided byte copy is ~8x slower)."""
    n = src.size
    half = n // 2
    if half:
        words = dst[: 2 * half].view("<u2")
        np.left_shift(src[half : 2 * half], 8, out=words, dtype="<u2")
        np.bitwise_or(words, src[:half], out=words)
    if n % 2:
        dst[n - 1] = src[n - 1]


def split_planes(
    src: npt.NDArray[np.uint8], low: npt.NDArray[np.uint8], high: npt.NDArray[np.uint8]
) -> None:
    """Byte planes: ``low`` = the even-offset bytes of ``src``, ``high`` = the odd ones.

    ``low`` holds ``ceil(n/2)`` bytes (an odd final byte ends it), ``high`` ``floor(n/2)``.
    """
    n = src.size
    half = n // 2
    if half:
        words = src[: 2 * half].view("<u2")
        np.copyto(low[:half], words, casting="unsafe")
        np.right_shift(words, 8, out=high[:half], casting="unsafe")
    if n % 2:
        low[half] = src[n - 1]


def merge_planes(
    low: npt.NDArray[np.uint8], high: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8]
) -> None:
    """Inverse of :func:`split_planes`, written straight into ``dst`` (u16 arithmetic form).

    The high plane is widened by a plain cast (``copyto``, unbuffered), shifted in place and
    or-ed with the low plane: ~15% faster than a ``left_shift`` with a ``dtype`` (a buffered
    casting loop), and a strided byte copy is ~3x slower than either.
    """
    n = dst.size
    half = n // 2
    if half:
        words = dst[: 2 * half].view("<u2")
        np.copyto(words, high[:half], casting="safe")
        words <<= 8
        np.bitwise_or(words, low[:half], out=words, casting="unsafe")
    if n % 2:
        dst[n - 1] = low[half]


def _as_u8(raw: Any) -> npt.NDArray[np.uint8]:
    arr = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return arr


class WorkerState(threading.local):
    """Per-thread zstd contexts and one segment-sized scratch buffer.

    One instance lives for one encode/decode call, so the scratch is freed with it rather than
    pinned in every pool thread.
    """

    def __init__(self, level: int, scratch_size: int, checksum: bool = True) -> None:
        self.level = level
        self.scratch_size = scratch_size
        self.checksum = checksum
        self._cctx: zstandard.ZstdCompressor | None = None
        self._dctx: zstandard.ZstdDecompressor | None = None
        self._scratch: npt.NDArray[np.uint8] | None = None

    @property
    def cctx(self) -> zstandard.ZstdCompressor:
        if self._cctx is None:
            self._cctx = zstandard.ZstdCompressor(
                level=self.level, write_checksum=self.checksum, write_content_size=True
            )
        return self._cctx

    @property
    def dctx(self) -> zstandard.ZstdDecompressor:
        if self._dctx is None:
            self._dctx = zstandard.ZstdDecompressor()
        return self._dctx

    @property
    def scratch(self) -> npt.NDArray[np.uint8]:
        if self._scratch is None:
            self._scratch = np.empty(self.scratch_size, dtype=np.uint8)
        return self._scratch


def _compress_segment(seg: npt.NDArray[np.uint8], filt: Filter, state: WorkerState) -> list[bytes]:
    """Filter one segment and compress it into its frame(s), in chunk table order."""
    cctx = state.cctx
    if filt is Filter.NONE:
        return [cctx.compress(seg.data)]
    work = state.scratch[: seg.size]
    if filt is Filter.SHUFFLE2:
        shuffle2(seg, work)
        return [cctx.compress(work.data)]
    n_low = (seg.size + 1) // 2
    low, high = work[:n_low], work[n_low:]
    split_planes(seg, low, high)
    return [cctx.compress(low.data), cctx.compress(high.data)]


def compress_chunks(raw: Any, codec: Codec) -> tuple[list[bytes | memoryview], list[ChunkEntry]]:
    """Compress ``raw`` (any contiguous buffer) into independent zstd frames (or store it).

    The blob is cut into ``codec.chunk_size`` segments; each becomes one frame, or two with
    :attr:`Filter.PLANES2`, with its content size and (``codec.checksum``) an xxh64 content
    checksum. Memory: the input, one segment-sized scratch buffer per worker and the
    compressed output. A :attr:`CodecId.STORED` codec returns views of ``raw`` itself.
    """
    data = _as_u8(raw)
    size = codec.chunk_size
    n_segments = -(-data.size // size)
    if codec.codec_id is CodecId.STORED:  # views of ``raw``, not copies
        views: list[bytes | memoryview] = [data[k * size :][:size].data for k in range(n_segments)]
        return views, [ChunkEntry(len(f), chunk_digest(f)) for f in views]
    state = WorkerState(codec.level, min(size, data.size), codec.checksum)

    def work(k: int) -> list[tuple[bytes, ChunkEntry]]:
        frames = _compress_segment(data[k * size : (k + 1) * size], codec.filter, state)
        return [(f, ChunkEntry(len(f), chunk_digest(f))) for f in frames]

    results = [pair for seg in parallel_map(work, n_segments, codec.threads) for pair in seg]
    return [frame for frame, _ in results], [entry for _, entry in results]


def check_frame(
    header: SnapshotHeader, i: int, chunk: bytes | memoryview, source: str | None
) -> None:
    """Check chunk ``i``'s zstd frame header declares exactly the raw length we expect (a
    stored chunk's length was checked with the header)."""
    if header.codec is CodecId.STORED:
        return
    try:
        declared = zstandard.frame_content_size(chunk)
    except zstandard.ZstdError as exc:
        raise CorruptSnapshotError(f"chunk[{i}].zstd_frame", str(exc), source=source) from None
    if declared != header.chunk_raw_len(i):
        raise CorruptSnapshotError(
            f"chunk[{i}].raw_size",
            f"frame declares {declared} bytes, header expects {header.chunk_raw_len(i)}",
            source=source,
        )


def frame_length(chunk: bytes | memoryview) -> int:
    """The length of the zstd frame that starts ``chunk``, from its frame and block headers.

    Lets the reader check that a frame fills its chunk exactly (content checksum included)
    before it decodes the frame straight into its destination: a streaming decode stops once
    the output is full and would not notice missing checksum bytes. Raises
    :class:`zstandard.ZstdError` for a malformed frame header.
    """
    mv = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
    offset = zstandard.frame_header_size(mv)
    has_checksum = len(mv) > 4 and bool(mv[4] & 0x04)  # frame header descriptor, bit 2
    size = len(mv)
    while offset + 3 <= size:
        word = mv[offset] | (mv[offset + 1] << 8) | (mv[offset + 2] << 16)
        last, kind, length = word & 1, (word >> 1) & 3, word >> 3
        offset += 3 + (1 if kind == 1 else length)  # kind 1 (RLE): one byte, repeated
        if kind == 3:
            raise zstandard.ZstdError("reserved zstd block type")
        if last:
            return offset + (4 if has_checksum else 0)
    raise zstandard.ZstdError("the zstd frame has no last block")


def decompress_frame_into(
    header: SnapshotHeader,
    i: int,
    chunk: bytes | memoryview,
    dst: npt.NDArray[np.uint8],
    dctx: zstandard.ZstdDecompressor,
    source: str | None,
) -> None:
    """Decompress chunk ``i`` straight into ``dst`` (exactly its raw length), with no
    intermediate buffer; zstd verifies the content checksum, and the frame must fill the
    chunk exactly and decode to exactly ``dst.size`` bytes."""
    expected = header.chunk_raw_len(i)
    if dst.size != expected:
        raise ArgumentError(f"chunk {i} decodes to {expected} bytes, not {dst.size}")
    got = 0
    try:
        if frame_length(chunk) != len(chunk):
            raise CorruptSnapshotError(
                f"chunk[{i}].zstd_frame", "the zstd frame does not fill its chunk", source=source
            )
        # the whole frame is the input and the output fits it: zstd decodes in one pass
        reader = dctx.stream_reader(chunk, read_size=len(chunk), read_across_frames=False)
        while got < expected:
            n = reader.readinto(dst[got:])
            if not n:
                break
            got += n
        trailing = reader.read(1)
    except zstandard.ZstdError as exc:
        raise CorruptSnapshotError(f"chunk[{i}].zstd_frame", str(exc), source=source) from None
    if got != expected or trailing:
        raise CorruptSnapshotError(
            f"chunk[{i}].raw_size",
            f"decompressed to {got}{'+' if trailing else ''} bytes, expected {expected}",
            source=source,
        )


def decode_segment(
    header: SnapshotHeader,
    k: int,
    chunks: Sequence[bytes | memoryview],
    dst: npt.NDArray[np.uint8],
    state: WorkerState,
    source: str | None,
    digests: bool = False,
) -> None:
    """Decompress segment ``k``'s frame(s) and un-filter them into ``dst`` (its raw bytes).

    Without a filter zstd writes straight into ``dst``. With one, the frames go into this
    worker's segment-sized scratch buffer (reused, so nothing is allocated per segment) and the
    un-filter step writes ``dst``: one pass over the bytes either way. ``digests``: check each
    frame's xxh3-128 first (a snapshot read with ``defer_digests``), while its bytes are in
    cache for zstd.
    """
    filt = header.filter
    if digests:
        per = filt.frames_per_segment
        for i in range(per * k, per * (k + 1)):
            check_digest(header, i, chunks[i], source)
    if header.codec is CodecId.STORED:  # its length was checked with the header
        dst[:] = np.frombuffer(chunks[k], dtype=np.uint8)
        return
    dctx = state.dctx
    if filt is Filter.NONE:
        decompress_frame_into(header, k, chunks[k], dst, dctx, source)
        return
    work = state.scratch[: dst.size]
    if filt is Filter.PLANES2:
        n_low = header.chunk_raw_len(2 * k)
        low, high = work[:n_low], work[n_low:]
        decompress_frame_into(header, 2 * k, chunks[2 * k], low, dctx, source)
        decompress_frame_into(header, 2 * k + 1, chunks[2 * k + 1], high, dctx, source)
        merge_planes(low, high, dst)
        return
    decompress_frame_into(header, k, chunks[k], work, dctx, source)
    unshuffle2(work, dst)


def decode_into(
    snapshot: Snapshot,
    out: npt.NDArray[np.uint8],
    *,
    threads: int = 0,
    source: str | None = None,
) -> None:
    """Decompress (and un-filter) ``snapshot``'s payload into ``out`` (``raw_size`` bytes).

    Every frame's declared content size is checked before anything is decompressed; zstd
    verifies each frame's content checksum (when it has one), and each output length is checked
    exactly. A snapshot read with ``defer_digests=True`` has each frame's xxh3-128 checked here,
    just before the frame is decoded, so nothing in ``out`` is ever unverified once this
    returns. Each worker owns whole segments (both planes), so no two workers write the same
    bytes.
    """
    header = snapshot.header
    digests = isinstance(snapshot, DeferredSnapshot)
    if out.size != header.raw_size:
        raise ArgumentError(f"output buffer is {out.size} bytes, snapshot needs {header.raw_size}")
    for i, chunk in enumerate(snapshot.chunks):
        check_frame(header, i, chunk, source)
    state = WorkerState(0, min(header.chunk_size, header.raw_size))

    def work(k: int) -> None:
        start = k * header.chunk_size
        dst = out[start : start + header.segment_len(k)]
        decode_segment(header, k, snapshot.chunks, dst, state, source, digests)

    parallel_map(work, header.n_segments, threads)


def stored_payload(
    snapshot: Snapshot, file_view: memoryview, source: str | None = None
) -> npt.NDArray[np.uint8] | None:
    """The raw state of a :attr:`CodecId.STORED` snapshot as a read-only array over the bytes
    of ``file_view`` (its whole file): no copy, and every segment's digest checked on those
    very bytes first. None for a compressed snapshot (decode it)."""
    h = snapshot.header
    if h.codec is not CodecId.STORED:
        return None
    if len(file_view) != h.file_size:
        raise CorruptSnapshotError("file_size", f"{len(file_view)} bytes, not {h.file_size}")
    raw = np.frombuffer(file_view, dtype=np.uint8, count=h.raw_size, offset=h.header_len)
    size = h.chunk_size
    verify_digests(h, [raw[k * size : (k + 1) * size].data for k in range(h.n_segments)], source)
    return raw


def decode(snapshot: Snapshot, *, threads: int = 0) -> npt.NDArray[np.uint8]:
    """Return the raw llama.cpp state blob of ``snapshot`` as a new uint8 array."""
    out = np.empty(snapshot.header.raw_size, dtype=np.uint8)
    decode_into(snapshot, out, threads=threads)
    return out


def new_snapshot_id() -> str:
    """A fresh random snapshot id (16 hex digits)."""
    return secrets.token_hex(8)


def encode(
    raw: Any,
    *,
    identity: CacheIdentity,
    tokens: Sequence[int] | npt.NDArray[np.integer[Any]],
    seq_id: int,
    pos_min: int = -1,
    pos_max: int = -1,
    n_ctx: int = 0,
    session_id: str = "",
    parent_id: str = "",
    snapshot_id: str | None = None,
    created_ns: int | None = None,
    codec: Codec = DEFAULT_CODEC,
    journal_seq: int | None = None,
) -> Snapshot:
    """Build a snapshot from a raw state blob (``raw``: any contiguous bytes-like or array).

    :func:`capture` calls this with a live context's blob; tests call it with synthetic data.
    ``journal_seq`` is the journal entry the state follows (header field of version 2).
    """
    if journal_seq is not None and journal_seq < -1:
        raise ArgumentError(f"journal_seq must be >= -1, got {journal_seq}")
    for name, value in (("session_id", session_id), ("parent_id", parent_id)):
        if len(value.encode()) > MAX_ID_LEN:
            raise ArgumentError(f"{name} is longer than {MAX_ID_LEN} bytes")
    sid = snapshot_id if snapshot_id is not None else new_snapshot_id()
    if len(sid.encode()) > MAX_ID_LEN:
        raise ArgumentError(f"snapshot_id is longer than {MAX_ID_LEN} bytes")
    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if tok.size and (int(tok.min()) < 0 or int(tok.max()) > np.iinfo(np.int32).max):
        raise ArgumentError("token ids must be in [0, 2**31)")
    for name in ("type_k", "type_v"):
        value = getattr(identity, name)
        if not value or not value.isascii() or len(value) > TYPE_NAME_LEN:
            raise ArgumentError(f"{name} {value!r} is not a short ASCII ggml type name")
    if len(bytes.fromhex(identity.model_fingerprint)) != DIGEST_LEN:
        raise ArgumentError("model_fingerprint must be a sha256 hex digest")
    data = _as_u8(raw)
    frames, entries = compress_chunks(data, codec)
    header = SnapshotHeader(
        identity=identity,
        kind=StateKind.CONTEXT if seq_id == -1 else StateKind.SEQUENCE,
        seq_id=seq_id,
        n_ctx=n_ctx,
        pos_min=pos_min,
        pos_max=pos_max,
        created_ns=time.time_ns() if created_ns is None else created_ns,
        snapshot_id=sid,
        session_id=session_id,
        parent_id=parent_id,
        level=codec.level,
        filter=codec.filter,
        codec=codec.codec_id,
        chunk_size=codec.chunk_size,
        raw_size=int(data.size),
        compressed_size=sum(e.size for e in entries),
        chunks=tuple(entries),
        tokens=tuple(int(t) for t in tok.tolist()),
        journal_seq=journal_seq,
    )
    if header.header_len > MAX_HEADER_LEN:
        raise ArgumentError(f"too many tokens for one header ({tok.size})")
    return Snapshot(header=header, chunks=tuple(frames))
