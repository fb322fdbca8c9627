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
6. each zstd frame's declared content size and xxh64 content checksum, while decompressing;
7. at restore, the cache identity (model fingerprint, geometry, cache types, V layout, build)
   against the target context, before llama.cpp sees a byte.

Typical use::

    snap = snapshot.capture(ctx, seq_id=0, tokens=tokens, session_id="chat-1")
    snapshot.write(path, snap)
    snapshot.restore(other_ctx, snapshot.read(path), seq_id=1)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import hashlib
import io
import logging
import mmap
import os
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from runtime.errors import MemoryRuntimeError
from runtime.fsutil import atomic_writer

if TYPE_CHECKING:
    from llamaffi import Context

__all__ = [
    "DEFAULT_CODEC",
    "FILE_SUFFIX",
    "FORMAT_VERSION",
    "MAGIC",
    "READER_SUPPORTED_VERSIONS",
    "CacheIdentity",
    "Codec",
    "CorruptSnapshot",
    "Filter",
    "IncompatibleSnapshot",
    "RestoreError",
    "Snapshot",
    "SnapshotError",
    "SnapshotHeader",
    "StateKind",
    "UnsupportedVersion",
    "capture",
    "decode",
    "encode",
    "identity_of",
    "inspect",
    "max_state_size",
    "read",
    "restore",
    "restore_file",
    "verify",
    "write",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Constants and the struct tables (little-endian, no padding)
# --------------------------------------------------------------------------------------------

#: 8 bytes; the high bit catches 7-bit transports, the CR/LF pair catches newline translation.
MAGIC = b"\x89KVSNP\r\n"
#: The version this module writes.
FORMAT_VERSION = 1
#: The versions this module reads; anything else is refused with :class:`UnsupportedVersion`.
READER_SUPPORTED_VERSIONS: frozenset[int] = frozenset({1})
#: File name suffix used by the store and the CLI's directory walk.
FILE_SUFFIX = ".kvsnap"

#: Upper bound on the header length (the token ids dominate: 16 MiB is ~4M tokens).
MAX_HEADER_LEN = 16 << 20
#: Upper bound on a chunk's raw size.
MAX_CHUNK_SIZE = 256 << 20
#: Upper bound on the UTF-8 length of snapshot, session and parent ids.
MAX_ID_LEN = 128
#: Width of the NUL-padded ggml type name fields.
TYPE_NAME_LEN = 16

#: SHA-256: the header checksum and the model fingerprint.
DIGEST_LEN = 32
#: xxh3-128: each compressed chunk's digest in the chunk table (docs: "Why xxh3-128").
CHUNK_DIGEST_LEN = 16

# Fixed prefix: magic, version, flags (reserved, 0), header_len; then the header checksum.
_PREFIX = struct.Struct("<8sHHI")
_CHECKSUM_OFFSET = _PREFIX.size
_BODY_OFFSET = _CHECKSUM_OFFSET + DIGEST_LEN

#: The fixed body of the v1 header, in file order: (field name, struct code).
BODY_FIELDS_V1: tuple[tuple[str, str], ...] = (
    ("build_number", "I"),
    ("model_fingerprint", "32s"),
    ("n_layer", "I"),
    ("n_embd", "I"),
    ("n_head", "I"),
    ("n_head_kv", "I"),
    ("n_seq_max", "I"),
    ("type_k", f"{TYPE_NAME_LEN}s"),
    ("type_v", f"{TYPE_NAME_LEN}s"),
    ("layout", "I"),
    ("kind", "B"),
    ("codec", "B"),
    ("filter", "B"),
    ("level", "b"),
    ("seq_id", "i"),
    ("n_ctx", "I"),
    ("pos_min", "i"),
    ("pos_max", "i"),
    ("created_ns", "q"),
    ("chunk_size", "I"),
    ("n_chunks", "I"),
    ("raw_size", "Q"),
    ("compressed_size", "Q"),
    ("n_tokens", "I"),
    ("snapshot_id_len", "H"),
    ("session_id_len", "H"),
    ("parent_id_len", "H"),
)
_BODY = struct.Struct("<" + "".join(code for _, code in BODY_FIELDS_V1))
#: One chunk table entry: compressed size, xxh3-128 of the compressed bytes.
_CHUNK_ENTRY = struct.Struct(f"<I{CHUNK_DIGEST_LEN}s")
_TOKEN_DTYPE = np.dtype("<i4")

#: Size of a header without ids, chunks or tokens.
MIN_HEADER_LEN = _BODY_OFFSET + _BODY.size

# layout bits
LAYOUT_FLASH_ATTN = 1
LAYOUT_V_TRANS = 2
LAYOUT_KV_UNIFIED = 4
_LAYOUT_KNOWN = LAYOUT_FLASH_ATTN | LAYOUT_V_TRANS | LAYOUT_KV_UNIFIED

_ZSTD_MIN_LEVEL = -(1 << 17)
_ZSTD_MAX_LEVEL = 22


class StateKind(enum.IntEnum):
    """What the payload holds."""

    SEQUENCE = 0  #: one sequence (``seq_id >= 0``)
    CONTEXT = 1  #: every sequence of the context (``seq_id == -1``)


class Filter(enum.IntEnum):
    """The reversible byte filter applied to each ``chunk_size`` segment before zstd."""

    NONE = 0
    #: 2-byte shuffle: all low bytes of the chunk's 16-bit words, then all high bytes, in one
    #: frame per segment.
    SHUFFLE2 = 1
    #: Byte planes: each segment becomes two frames, its even-offset bytes, then its odd ones.
    PLANES2 = 2

    @property
    def frames_per_segment(self) -> int:
        """How many zstd frames (chunk table entries) one segment of the raw blob becomes."""
        return 2 if self is Filter.PLANES2 else 1


def count_chunks(raw_size: int, chunk_size: int, filt: Filter) -> int:
    """The number of chunk table entries for ``raw_size`` bytes cut into ``chunk_size`` pieces."""
    return -(-raw_size // chunk_size) * filt.frames_per_segment


class CodecId(enum.IntEnum):
    """The compressor; only zstd exists."""

    ZSTD = 1


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class SnapshotError(MemoryRuntimeError):
    """Base class of snapshot errors."""


class CorruptSnapshot(SnapshotError, ValueError):
    """A snapshot failed an integrity check; ``field`` names the check that failed."""

    def __init__(self, field: str, message: str, *, source: str | None = None) -> None:
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}corrupt snapshot ({field}): {message}")


class UnsupportedVersion(SnapshotError, ValueError):
    """The file is a snapshot, but of a format version this reader does not know."""

    field = "version"

    def __init__(self, version: int, *, source: str | None = None) -> None:
        self.version = version
        self.source = source
        where = f"{source}: " if source else ""
        supported = ", ".join(str(v) for v in sorted(READER_SUPPORTED_VERSIONS))
        super().__init__(
            f"{where}unsupported snapshot format version {version} (this reader supports "
            f"{supported}); upgrade the runtime to read it"
        )


class IncompatibleSnapshot(SnapshotError, ValueError):
    """The snapshot belongs to another model, cache layout or build than the target context.

    ``differences`` lists ``(field, snapshot value, context value)`` for each mismatch.
    """

    def __init__(self, differences: Sequence[tuple[str, object, object]]) -> None:
        self.differences = list(differences)
        detail = "; ".join(f"{f}: snapshot {s!r} != context {c!r}" for f, s, c in differences)
        super().__init__(f"snapshot does not fit this context: {detail}")


class RestoreError(SnapshotError, RuntimeError):
    """llama.cpp refused a snapshot that passed every check; the sequence was cleared."""


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheIdentity:
    """Everything that decides whether a KV blob can be loaded into a context."""

    build_number: int
    model_fingerprint: str  #: sha256 hex of the GGUF file
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_seq_max: int
    type_k: str
    type_v: str
    flash_attn: bool
    kv_unified: bool

    @property
    def v_trans(self) -> bool:
        """Whether V is stored transposed (llama.cpp does so when flash attention is off)."""
        return not self.flash_attn

    @classmethod
    def from_context(cls, ctx: Context) -> CacheIdentity:
        """The identity of a live context (and its model and llama.cpp build).

        Computed once per context and cached (:func:`identity_of`): none of it can change
        while the context lives.
        """
        return identity_of(ctx)

    @classmethod
    def _compute(cls, ctx: Context) -> CacheIdentity:
        model = ctx.model
        return cls(
            build_number=_build_number(),
            model_fingerprint=str(model.fingerprint),
            n_layer=int(model.n_layer),
            n_embd=int(model.n_embd),
            n_head=int(model.n_head),
            n_head_kv=int(model.n_head_kv),
            n_seq_max=int(ctx.n_seq_max),
            type_k=str(ctx.type_k),
            type_v=str(ctx.type_v),
            flash_attn=bool(ctx.flash_attn),
            kv_unified=bool(ctx.kv_unified),
        )

    def differences(
        self, target: CacheIdentity, *, allow_build_mismatch: bool = False
    ) -> list[tuple[str, object, object]]:
        """List ``(field, self value, target value)`` for every field that must match.

        ``n_seq_max`` only matters for a non-unified cache (one KV stream per sequence).
        """
        names = [
            "model_fingerprint",
            "n_layer",
            "n_embd",
            "n_head",
            "n_head_kv",
            "type_k",
            "type_v",
            "flash_attn",
            "kv_unified",
        ]
        if not allow_build_mismatch:
            names.insert(0, "build_number")
        if not (self.kv_unified and target.kv_unified):
            names.append("n_seq_max")
        out: list[tuple[str, object, object]] = []
        for name in names:
            mine, theirs = getattr(self, name), getattr(target, name)
            if mine != theirs:
                out.append((name, mine, theirs))
        return out


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

    def __post_init__(self) -> None:
        if not _ZSTD_MIN_LEVEL <= self.level <= _ZSTD_MAX_LEVEL:
            raise ValueError(f"zstd level {self.level} out of range")
        if not (2 <= self.chunk_size <= MAX_CHUNK_SIZE and self.chunk_size % 2 == 0):
            raise ValueError(f"chunk_size must be even and in [2, {MAX_CHUNK_SIZE}]")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")


#: The default codec; see docs/snapshot-format.md ("Choosing the codec") for the measurements.
DEFAULT_CODEC = Codec()


@dataclass(frozen=True)
class ChunkEntry:
    """One compressed chunk (zstd frame): its size in the file and the xxh3-128 of its bytes."""

    size: int
    digest: bytes


@dataclass(frozen=True)
class SnapshotHeader:
    """The decoded header; owns its binary form (:meth:`pack`, :meth:`unpack`)."""

    identity: CacheIdentity
    kind: StateKind
    seq_id: int
    n_ctx: int
    pos_min: int
    pos_max: int
    created_ns: int
    snapshot_id: str
    session_id: str
    parent_id: str
    level: int
    filter: Filter
    chunk_size: int
    raw_size: int
    compressed_size: int
    chunks: tuple[ChunkEntry, ...]
    tokens: tuple[int, ...]
    version: int = FORMAT_VERSION
    codec: CodecId = CodecId.ZSTD

    @property
    def n_tokens(self) -> int:
        """Number of token ids stored in the header."""
        return len(self.tokens)

    @property
    def header_len(self) -> int:
        """Length of the packed header in bytes."""
        return (
            MIN_HEADER_LEN
            + sum(len(s.encode()) for s in (self.snapshot_id, self.session_id, self.parent_id))
            + len(self.chunks) * _CHUNK_ENTRY.size
            + len(self.tokens) * _TOKEN_DTYPE.itemsize
        )

    @property
    def file_size(self) -> int:
        """Size of the whole snapshot file."""
        return self.header_len + self.compressed_size

    @property
    def n_segments(self) -> int:
        """Number of ``chunk_size`` segments the raw blob is cut into."""
        return -(-self.raw_size // self.chunk_size)

    def segment_len(self, segment: int) -> int:
        """Raw length of segment ``segment`` (only the last one may be shorter)."""
        return min(self.chunk_size, self.raw_size - segment * self.chunk_size)

    def chunk_raw_len(self, index: int) -> int:
        """Raw (decompressed) length of chunk ``index``.

        With :attr:`Filter.PLANES2`, chunk ``2k`` is segment ``k``'s even-offset bytes
        (``ceil(L/2)``) and chunk ``2k + 1`` its odd-offset bytes (``floor(L/2)``).
        """
        per = self.filter.frames_per_segment
        length = self.segment_len(index // per)
        if per == 1:
            return length
        return (length + 1) // 2 if index % 2 == 0 else length // 2

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (token ids summarised) for ``inspect`` and logs."""
        ident = dataclasses.asdict(self.identity)
        return {
            "version": self.version,
            **ident,
            "v_trans": self.identity.v_trans,
            "kind": self.kind.name.lower(),
            "seq_id": self.seq_id,
            "n_ctx": self.n_ctx,
            "pos_min": self.pos_min,
            "pos_max": self.pos_max,
            "n_tokens": self.n_tokens,
            "created": _format_time_ns(self.created_ns),
            "snapshot_id": self.snapshot_id,
            "session_id": self.session_id,
            "parent_id": self.parent_id,
            "codec": self.codec.name.lower(),
            "level": self.level,
            "filter": self.filter.name.lower(),
            "chunk_size": self.chunk_size,
            "n_chunks": len(self.chunks),
            "raw_size": self.raw_size,
            "compressed_size": self.compressed_size,
            "header_len": self.header_len,
            "file_size": self.file_size,
            "ratio": round(self.raw_size / self.file_size, 4) if self.file_size else None,
        }

    # -- binary form ---------------------------------------------------------------------

    def pack(self) -> bytes:
        """Serialise the header (prefix, checksum, body, ids, chunk table, tokens)."""
        ident = self.identity
        ids = [s.encode() for s in (self.snapshot_id, self.session_id, self.parent_id)]
        layout = (
            (LAYOUT_FLASH_ATTN if ident.flash_attn else 0)
            | (LAYOUT_V_TRANS if ident.v_trans else 0)
            | (LAYOUT_KV_UNIFIED if ident.kv_unified else 0)
        )
        body = _BODY.pack(
            ident.build_number,
            bytes.fromhex(ident.model_fingerprint),
            ident.n_layer,
            ident.n_embd,
            ident.n_head,
            ident.n_head_kv,
            ident.n_seq_max,
            ident.type_k.encode("ascii"),
            ident.type_v.encode("ascii"),
            layout,
            int(self.kind),
            int(self.codec),
            int(self.filter),
            self.level,
            self.seq_id,
            self.n_ctx,
            self.pos_min,
            self.pos_max,
            self.created_ns,
            self.chunk_size,
            len(self.chunks),
            self.raw_size,
            self.compressed_size,
            len(self.tokens),
            *(len(b) for b in ids),
        )
        table = b"".join(_CHUNK_ENTRY.pack(c.size, c.digest) for c in self.chunks)
        tokens = np.asarray(self.tokens, dtype=_TOKEN_DTYPE).tobytes()
        rest = body + b"".join(ids) + table + tokens
        prefix = _PREFIX.pack(MAGIC, self.version, 0, _BODY_OFFSET + len(rest))
        digest = hashlib.sha256(prefix + rest).digest()
        return prefix + digest + rest

    @classmethod
    def unpack(cls, buf: bytes | memoryview, *, source: str | None = None) -> SnapshotHeader:
        """Parse and validate a complete header (``buf`` is exactly ``header_len`` bytes).

        Raises :class:`CorruptSnapshot` or :class:`UnsupportedVersion`; never trusts a field
        before the checksum over the whole header has been verified.
        """
        header_len = check_prefix(bytes(buf[: _PREFIX.size]), source=source)
        if len(buf) != header_len:
            raise CorruptSnapshot(
                "header_len", f"have {len(buf)} header bytes, expected {header_len}", source=source
            )
        stored = bytes(buf[_CHECKSUM_OFFSET:_BODY_OFFSET])
        h = hashlib.sha256(buf[:_CHECKSUM_OFFSET])
        h.update(buf[_BODY_OFFSET:])
        if h.digest() != stored:
            raise CorruptSnapshot(
                "header_checksum",
                "header SHA-256 does not match; the header is damaged",
                source=source,
            )
        return _parse_body_v1(buf, header_len, source)


def _format_time_ns(ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1_000_000_000))
    except (OverflowError, OSError, ValueError):
        return f"invalid ({ns} ns)"


def check_prefix(prefix: bytes, *, source: str | None = None) -> int:
    """Validate the 16-byte prefix (magic, version, flags, header length); return the length."""
    if len(prefix) < _PREFIX.size:
        raise CorruptSnapshot(
            "file_size",
            f"{len(prefix)} bytes is too short for a snapshot (the prefix alone is "
            f"{_PREFIX.size} bytes)",
            source=source,
        )
    magic, version, flags, header_len = _PREFIX.unpack(prefix[: _PREFIX.size])
    if magic != MAGIC:
        raise CorruptSnapshot("magic", f"bad magic {magic!r}: not a KV snapshot", source=source)
    if version not in READER_SUPPORTED_VERSIONS:
        raise UnsupportedVersion(version, source=source)
    if flags != 0:
        raise CorruptSnapshot("flags", f"reserved flags are {flags:#x}, expected 0", source=source)
    if not MIN_HEADER_LEN <= header_len <= MAX_HEADER_LEN:
        raise CorruptSnapshot(
            "header_len",
            f"header length {header_len} outside [{MIN_HEADER_LEN}, {MAX_HEADER_LEN}]",
            source=source,
        )
    return int(header_len)


def _parse_body_v1(buf: bytes | memoryview, header_len: int, source: str | None) -> SnapshotHeader:
    def bad(field: str, message: str) -> CorruptSnapshot:
        return CorruptSnapshot(field, message, source=source)

    values = dict(
        zip(
            (name for name, _ in BODY_FIELDS_V1),
            _BODY.unpack_from(buf, _BODY_OFFSET),
            strict=True,
        )
    )
    layout = values["layout"]
    if layout & ~_LAYOUT_KNOWN:
        raise bad("layout", f"unknown layout bits {layout:#x}")
    flash_attn = bool(layout & LAYOUT_FLASH_ATTN)
    if bool(layout & LAYOUT_V_TRANS) == flash_attn:
        raise bad("layout", "V-transposed must be the opposite of flash-attention")
    try:
        kind = StateKind(values["kind"])
    except ValueError:
        raise bad("kind", f"unknown state kind {values['kind']}") from None
    try:
        codec = CodecId(values["codec"])
    except ValueError:
        raise bad("codec", f"unknown codec {values['codec']}") from None
    try:
        filt = Filter(values["filter"])
    except ValueError:
        raise bad("filter", f"unknown filter {values['filter']}") from None
    seq_id = values["seq_id"]
    if (kind is StateKind.CONTEXT) != (seq_id == -1) or seq_id < -1:
        raise bad("seq_id", f"seq id {seq_id} does not fit state kind {kind.name.lower()}")
    pos_min, pos_max = values["pos_min"], values["pos_max"]
    if not ((pos_min == pos_max == -1) or (0 <= pos_min <= pos_max)):
        raise bad("pos_range", f"bad position range [{pos_min}, {pos_max}]")
    chunk_size, n_chunks, raw_size = values["chunk_size"], values["n_chunks"], values["raw_size"]
    if not (2 <= chunk_size <= MAX_CHUNK_SIZE and chunk_size % 2 == 0):
        raise bad("chunk_size", f"chunk size {chunk_size} is not an even size <= {MAX_CHUNK_SIZE}")
    if n_chunks != count_chunks(raw_size, chunk_size, filt):
        raise bad(
            "n_chunks",
            f"{n_chunks} chunks do not fit {raw_size} bytes in segments of {chunk_size} "
            f"with filter {filt.name.lower()}",
        )
    id_lens = (values["snapshot_id_len"], values["session_id_len"], values["parent_id_len"])
    if max(id_lens) > MAX_ID_LEN:
        raise bad("id_len", f"an id is longer than {MAX_ID_LEN} bytes")
    expected_len = (
        MIN_HEADER_LEN
        + sum(id_lens)
        + n_chunks * _CHUNK_ENTRY.size
        + values["n_tokens"] * _TOKEN_DTYPE.itemsize
    )
    if expected_len != header_len:
        raise bad("header_len", f"fields add up to {expected_len} bytes, header says {header_len}")

    offset = MIN_HEADER_LEN
    ids: list[str] = []
    for name, length in zip(("snapshot_id", "session_id", "parent_id"), id_lens, strict=True):
        try:
            ids.append(bytes(buf[offset : offset + length]).decode("utf-8"))
        except UnicodeDecodeError:
            raise bad(name, "not valid UTF-8") from None
        offset += length
    chunks = tuple(
        ChunkEntry(size, digest)
        for size, digest in _CHUNK_ENTRY.iter_unpack(
            buf[offset : offset + n_chunks * _CHUNK_ENTRY.size]
        )
    )
    offset += n_chunks * _CHUNK_ENTRY.size
    if any(c.size == 0 for c in chunks):
        raise bad("chunk_table", "a chunk has size 0")
    if sum(c.size for c in chunks) != values["compressed_size"]:
        raise bad("compressed_size", "does not equal the sum of the chunk table")
    tokens_arr = np.frombuffer(buf, dtype=_TOKEN_DTYPE, count=values["n_tokens"], offset=offset)
    if tokens_arr.size and int(tokens_arr.min()) < 0:
        raise bad("tokens", "negative token id")

    type_names = []
    for name in ("type_k", "type_v"):
        raw_name = values[name].rstrip(b"\0")
        if not raw_name or not raw_name.isascii() or b"\0" in raw_name:
            raise bad(name, f"bad ggml type name {values[name]!r}")
        type_names.append(raw_name.decode("ascii"))
    identity = CacheIdentity(
        build_number=values["build_number"],
        model_fingerprint=values["model_fingerprint"].hex(),
        n_layer=values["n_layer"],
        n_embd=values["n_embd"],
        n_head=values["n_head"],
        n_head_kv=values["n_head_kv"],
        n_seq_max=values["n_seq_max"],
        type_k=type_names[0],
        type_v=type_names[1],
        flash_attn=flash_attn,
        kv_unified=bool(layout & LAYOUT_KV_UNIFIED),
    )
    return SnapshotHeader(
        identity=identity,
        kind=kind,
        seq_id=seq_id,
        n_ctx=values["n_ctx"],
        pos_min=pos_min,
        pos_max=pos_max,
        created_ns=values["created_ns"],
        snapshot_id=ids[0],
        session_id=ids[1],
        parent_id=ids[2],
        level=values["level"],
        filter=filt,
        chunk_size=chunk_size,
        raw_size=raw_size,
        compressed_size=values["compressed_size"],
        chunks=chunks,
        tokens=tuple(tokens_arr.tolist()),
        version=FORMAT_VERSION,
        codec=codec,
    )


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A header plus its compressed payload (one buffer per chunk), held in memory.

    A snapshot made by :func:`capture` or :func:`encode`, or returned by :func:`read`, has had
    every checksum computed or verified; :func:`restore` only decompresses it.
    """

    header: SnapshotHeader
    chunks: tuple[bytes | memoryview, ...]

    @property
    def tokens(self) -> tuple[int, ...]:
        """The token ids the state was built from (enough to re-prefill)."""
        return self.header.tokens

    @property
    def seq_id(self) -> int:
        """The sequence the state was captured from (-1 for a whole context)."""
        return self.header.seq_id

    @property
    def snapshot_id(self) -> str:
        """This snapshot's random id."""
        return self.header.snapshot_id

    def write_to(self, f: BinaryIO) -> int:
        """Write header and payload to ``f``; return the number of bytes written."""
        f.write(self.header.pack())
        for chunk in self.chunks:
            f.write(chunk)
        return self.header.file_size

    def to_bytes(self) -> bytes:
        """The whole file as bytes."""
        buf = io.BytesIO()
        self.write_to(buf)
        return buf.getvalue()

    @classmethod
    def read_from(
        cls, f: BinaryIO, file_size: int, *, source: str | None = None, threads: int = 0
    ) -> Snapshot:
        """Read a snapshot of ``file_size`` bytes from ``f`` and verify every checksum.

        ``threads`` is accepted for compatibility; the digests are checked on this thread.
        The header is read and fully validated first (a damaged header on a large file fails
        before the payload is read); then the file goes into one buffer and the chunks are
        views into it, so the payload is copied once, from the page cache.
        """
        packed = _read_header_bytes(f, file_size, source)
        header = SnapshotHeader.unpack(packed, source=source)
        _check_file_size(header, file_size, source)
        # np.empty, not bytearray: the buffer is overwritten at once, so skip the zero fill.
        view = np.empty(file_size, dtype=np.uint8).data
        view[: len(packed)] = packed
        got = len(packed) + _readinto_full(f, view[len(packed) :])
        if got != file_size:
            raise CorruptSnapshot(
                "file_size",
                f"file ended after {got} of {file_size} bytes (changed while being read)",
                source=source,
            )
        return cls._from_view(header, view, source)

    @classmethod
    def from_buffer(cls, data: memoryview, *, source: str | None = None) -> Snapshot:
        """Parse and verify a whole snapshot file held in ``data``; chunks are views into it."""
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        header_len = check_prefix(bytes(view[: _PREFIX.size]), source=source)
        _check_header_fits(header_len, len(view), source)
        header = SnapshotHeader.unpack(view[:header_len], source=source)
        _check_file_size(header, len(view), source)
        return cls._from_view(header, view, source)

    @classmethod
    def _from_view(
        cls, header: SnapshotHeader, view: memoryview, source: str | None, *, defer: bool = False
    ) -> Snapshot:
        """Slice the chunks out of a whole-file ``view`` whose size was checked; verify them
        (``defer``: leave that to :func:`decode_into`, see :class:`_DeferredSnapshot`)."""
        chunks: list[memoryview] = []
        offset = header.header_len
        for entry in header.chunks:
            chunks.append(view[offset : offset + entry.size])
            offset += entry.size
        if defer:
            return _DeferredSnapshot(header=header, chunks=tuple(chunks))
        _verify_digests(header, chunks, source)
        return cls(header=header, chunks=tuple(chunks))

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, *, source: str | None = None
    ) -> Snapshot:
        """Parse and verify a snapshot held in memory (without copying it)."""
        return cls.from_buffer(memoryview(data), source=source)


@dataclass(frozen=True, eq=False)
class _DeferredSnapshot(Snapshot):
    """A snapshot whose header is verified but whose chunk digests are not yet: made only by
    ``read(..., defer_digests=True)``; :func:`decode_into` checks each frame's digest right
    before decoding it, so its bytes travel from the page cache once, not twice."""


def _check_header_fits(header_len: int, file_size: int, source: str | None) -> None:
    if header_len > file_size:
        raise CorruptSnapshot(
            "file_size",
            f"file is {file_size} bytes but the header alone claims {header_len}",
            source=source,
        )


def _check_file_size(header: SnapshotHeader, file_size: int, source: str | None) -> None:
    if header.file_size != file_size:
        raise CorruptSnapshot(
            "file_size",
            f"file is {file_size} bytes, header says {header.file_size} "
            f"({'truncated' if file_size < header.file_size else 'trailing data'})",
            source=source,
        )


def _read_header_bytes(f: BinaryIO, file_size: int, source: str | None) -> bytes:
    """Read the prefix, check it, then read the rest of the header (not yet verified)."""
    prefix = f.read(_PREFIX.size)
    header_len = check_prefix(prefix, source=source)
    _check_header_fits(header_len, file_size, source)
    return prefix + f.read(header_len - _PREFIX.size)


def read_header(f: BinaryIO, file_size: int, *, source: str | None = None) -> SnapshotHeader:
    """Read and validate the header at ``f``'s position; check it against ``file_size``."""
    header = SnapshotHeader.unpack(_read_header_bytes(f, file_size, source), source=source)
    _check_file_size(header, file_size, source)
    return header


def _readinto_full(f: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


# --------------------------------------------------------------------------------------------
# Codec: byte planes or 2-byte shuffle, chunked zstd frames, parallel workers
# --------------------------------------------------------------------------------------------

_executor_lock = threading.Lock()
_executors: dict[int, concurrent.futures.ThreadPoolExecutor] = {}

T = TypeVar("T")


def _n_threads(threads: int) -> int:
    return threads if threads > 0 else max(1, min(4, os.cpu_count() or 1))


def _parallel_map(fn: Callable[[int], T], n: int, threads: int) -> list[T]:
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


def chunk_digest(frame: bytes | memoryview) -> bytes:
    """The chunk table digest of one compressed frame: xxh3-128, 16 bytes."""
    return xxhash.xxh3_128_digest(frame)


class _WorkerState(threading.local):
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


def _compress_segment(seg: npt.NDArray[np.uint8], filt: Filter, state: _WorkerState) -> list[bytes]:
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


def compress_chunks(raw: Any, codec: Codec) -> tuple[list[bytes], list[ChunkEntry]]:
    """Compress ``raw`` (any contiguous buffer) into independent zstd frames.

    The blob is cut into ``codec.chunk_size`` segments; each becomes one frame, or two with
    :attr:`Filter.PLANES2`. Each frame records its content size and an xxh64 content checksum.
    Memory: the input, one segment-sized scratch buffer per worker and the compressed output.
    """
    data = _as_u8(raw)
    size = codec.chunk_size
    n_segments = -(-data.size // size)
    state = _WorkerState(codec.level, min(size, data.size), codec.checksum)

    def work(k: int) -> list[tuple[bytes, ChunkEntry]]:
        frames = _compress_segment(data[k * size : (k + 1) * size], codec.filter, state)
        return [(f, ChunkEntry(len(f), chunk_digest(f))) for f in frames]

    results = [pair for seg in _parallel_map(work, n_segments, codec.threads) for pair in seg]
    return [frame for frame, _ in results], [entry for _, entry in results]


def _verify_digests(
    header: SnapshotHeader, chunks: Sequence[bytes | memoryview], source: str | None
) -> None:
    # On the calling thread: python-xxhash holds the GIL, so a pool would not run the hashes
    # in parallel, and xxh3 needs only ~0.3 ms for a 20 MB payload anyway.
    for i, chunk in enumerate(chunks):
        _check_digest(header, i, chunk, source)


def _check_digest(
    header: SnapshotHeader, i: int, chunk: bytes | memoryview, source: str | None
) -> None:
    if chunk_digest(chunk) != header.chunks[i].digest:
        raise CorruptSnapshot(
            f"chunk[{i}].checksum",
            f"xxh3-128 of compressed chunk {i} (of {len(header.chunks)}) does not match the header",
            source=source,
        )


def _check_frame(
    header: SnapshotHeader, i: int, chunk: bytes | memoryview, source: str | None
) -> None:
    """Check chunk ``i``'s zstd frame header declares exactly the raw length we expect."""
    try:
        declared = zstandard.frame_content_size(chunk)
    except zstandard.ZstdError as exc:
        raise CorruptSnapshot(f"chunk[{i}].zstd_frame", str(exc), source=source) from None
    if declared != header.chunk_raw_len(i):
        raise CorruptSnapshot(
            f"chunk[{i}].raw_size",
            f"frame declares {declared} bytes, header expects {header.chunk_raw_len(i)}",
            source=source,
        )


def _frame_length(chunk: bytes | memoryview) -> int:
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


def _decompress_into(
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
        raise ValueError(f"chunk {i} decodes to {expected} bytes, not {dst.size}")
    got = 0
    try:
        if _frame_length(chunk) != len(chunk):
            raise CorruptSnapshot(
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
        raise CorruptSnapshot(f"chunk[{i}].zstd_frame", str(exc), source=source) from None
    if got != expected or trailing:
        raise CorruptSnapshot(
            f"chunk[{i}].raw_size",
            f"decompressed to {got}{'+' if trailing else ''} bytes, expected {expected}",
            source=source,
        )


def _decode_segment(
    header: SnapshotHeader,
    k: int,
    chunks: Sequence[bytes | memoryview],
    dst: npt.NDArray[np.uint8],
    state: _WorkerState,
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
    dctx = state.dctx
    if digests:
        per = filt.frames_per_segment
        for i in range(per * k, per * (k + 1)):
            _check_digest(header, i, chunks[i], source)
    if filt is Filter.NONE:
        _decompress_into(header, k, chunks[k], dst, dctx, source)
        return
    work = state.scratch[: dst.size]
    if filt is Filter.PLANES2:
        n_low = header.chunk_raw_len(2 * k)
        low, high = work[:n_low], work[n_low:]
        _decompress_into(header, 2 * k, chunks[2 * k], low, dctx, source)
        _decompress_into(header, 2 * k + 1, chunks[2 * k + 1], high, dctx, source)
        merge_planes(low, high, dst)
        return
    _decompress_into(header, k, chunks[k], work, dctx, source)
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
    digests = isinstance(snapshot, _DeferredSnapshot)
    if out.size != header.raw_size:
        raise ValueError(f"output buffer is {out.size} bytes, snapshot needs {header.raw_size}")
    for i, chunk in enumerate(snapshot.chunks):
        _check_frame(header, i, chunk, source)
    state = _WorkerState(0, min(header.chunk_size, header.raw_size))

    def work(k: int) -> None:
        start = k * header.chunk_size
        dst = out[start : start + header.segment_len(k)]
        _decode_segment(header, k, snapshot.chunks, dst, state, source, digests)

    _parallel_map(work, header.n_segments, threads)


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
) -> Snapshot:
    """Build a snapshot from a raw state blob (``raw``: any contiguous bytes-like or array).

    :func:`capture` calls this with a live context's blob; tests call it with synthetic data.
    """
    for name, value in (("session_id", session_id), ("parent_id", parent_id)):
        if len(value.encode()) > MAX_ID_LEN:
            raise ValueError(f"{name} is longer than {MAX_ID_LEN} bytes")
    sid = snapshot_id if snapshot_id is not None else new_snapshot_id()
    if len(sid.encode()) > MAX_ID_LEN:
        raise ValueError(f"snapshot_id is longer than {MAX_ID_LEN} bytes")
    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if tok.size and (int(tok.min()) < 0 or int(tok.max()) > np.iinfo(np.int32).max):
        raise ValueError("token ids must be in [0, 2**31)")
    for name in ("type_k", "type_v"):
        value = getattr(identity, name)
        if not value or not value.isascii() or len(value) > TYPE_NAME_LEN:
            raise ValueError(f"{name} {value!r} is not a short ASCII ggml type name")
    if len(bytes.fromhex(identity.model_fingerprint)) != DIGEST_LEN:
        raise ValueError("model_fingerprint must be a sha256 hex digest")
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
        chunk_size=codec.chunk_size,
        raw_size=int(data.size),
        compressed_size=sum(e.size for e in entries),
        chunks=tuple(entries),
        tokens=tuple(int(t) for t in tok.tolist()),
    )
    if header.header_len > MAX_HEADER_LEN:
        raise ValueError(f"too many tokens for one header ({tok.size})")
    return Snapshot(header=header, chunks=tuple(frames))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write(path: str | os.PathLike[str], snapshot: Snapshot) -> int:
    """Write ``snapshot`` to ``path`` atomically and durably (mode 0600); return its size.

    The data goes to a temp file in the same directory, is fsynced and renamed over ``path``,
    and the directory is fsynced; on any error ``path`` is left as it was.
    """
    with atomic_writer(path) as f:
        size = snapshot.write_to(f)
    logger.debug("wrote snapshot %s (%d bytes) to %s", snapshot.snapshot_id, size, path)
    return size


def read(
    path: str | os.PathLike[str],
    *,
    threads: int = 0,
    mapped: bool = False,
    defer_digests: bool = False,
) -> Snapshot:
    """Read ``path`` and verify the header and every payload checksum.

    ``threads`` is accepted for compatibility and unused: the digests are checked on this
    thread (see :meth:`Snapshot.read_from`).

    ``mapped=True`` maps the file instead of copying it (not prefaulted: ``MAP_POPULATE``
    measured slower than the kernel's fault-around while the digests read the pages, 8 ms
    against 5.5 ms for 92 MB of chunk files):
    the chunks are then views of the page cache, which saves one copy of the file. Use it
    only for snapshots that do not outlive the call that reads them (:func:`restore_file`),
    because a file truncated by someone else while it is mapped raises SIGBUS on access.
    Files this module writes are never changed in place (they are replaced by rename).

    ``defer_digests=True`` (with ``mapped=True``) leaves the chunk digests to :func:`decode`
    / :func:`decode_into` / :func:`restore`, which check each frame just before decoding it:
    every byte is still verified before it is used, but it is read from the page cache once
    instead of twice. The chunks of such a snapshot must not be used for anything but decoding.

    Raises :class:`CorruptSnapshot` (with ``field``), :class:`UnsupportedVersion`, or
    :class:`OSError` if the file cannot be opened.
    """
    source = os.fspath(path)
    # Unbuffered: the payload is read straight into its final buffer, no copy in between.
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if not mapped or size < MIN_HEADER_LEN:  # mmap cannot map an empty file
            return Snapshot.read_from(f, size, source=source, threads=threads)
        # Check the header before mapping, so a damaged large file fails before the payload
        # is touched, exactly as with read_from.
        header = read_header(f, size, source=source)
        mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    view = memoryview(mm)
    if bytes(view[: header.header_len]) != header.pack():
        raise CorruptSnapshot("file_size", "file changed while being read", source=source)
    return Snapshot._from_view(header, view, source, defer=defer_digests)


def restore_file(
    ctx: Context,
    path: str | os.PathLike[str],
    seq_id: int | None = None,
    *,
    allow_build_mismatch: bool = False,
    threads: int = 0,
) -> SnapshotHeader:
    """``restore(ctx, read(path), seq_id)`` through a memory map: the fast path.

    The snapshot lives only for this call, so the mapping (see :func:`read`) is dropped
    before it returns. Every check of :func:`read` and :func:`restore` applies. Returns the
    header.
    """
    # the digests are checked frame by frame while decoding, before llama.cpp sees a byte
    snap = read(path, mapped=True, defer_digests=True)
    try:
        restore(ctx, snap, seq_id, allow_build_mismatch=allow_build_mismatch, threads=threads)
        return snap.header
    finally:
        del snap


def inspect(path: str | os.PathLike[str]) -> SnapshotHeader:
    """Read and validate only the header of ``path`` (the payload is not read)."""
    source = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return read_header(f, size, source=source)


def verify(path: str | os.PathLike[str], *, threads: int = 0) -> SnapshotHeader:
    """Check everything that can be checked without a context: header, checksums, frames.

    Decompresses each chunk (discarding the output) so zstd's content checksums and the
    declared sizes are verified too. Returns the header on success.
    """
    snap = read(path)
    source = os.fspath(path)
    header = snap.header
    for i, chunk in enumerate(snap.chunks):
        _check_frame(header, i, chunk, source)
    state = _WorkerState(0, min(header.chunk_size, header.raw_size))

    def work(k: int) -> None:
        dst = np.empty(header.segment_len(k), np.uint8)  # one segment per worker at a time
        _decode_segment(header, k, snap.chunks, dst, state, source)

    _parallel_map(work, header.n_segments, threads)
    return snap.header


def iter_snapshot_files(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Every ``*.kvsnap`` file under ``directory`` (recursively), sorted; temp files skipped."""
    for p in sorted(Path(directory).rglob(f"*{FILE_SUFFIX}")):
        if p.is_file() and not p.name.startswith("."):
            yield p


# --------------------------------------------------------------------------------------------
# Per-context facts: computed once per context, never per call
# --------------------------------------------------------------------------------------------

_facts_lock = threading.Lock()
_identities: weakref.WeakKeyDictionary[Any, CacheIdentity] = weakref.WeakKeyDictionary()
_state_bounds: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_build: list[int] = []

#: Bytes per element of each KV cache type, as (numerator, denominator): block size over
#: elements per block (ggml's ``type_size / blck_size``). Unknown types count as f32, the
#: widest type a KV cache can have, so the bound stays an upper bound.
_KV_TYPE_BYTES: dict[str, tuple[int, int]] = {
    "f32": (4, 1),
    "f16": (2, 1),
    "bf16": (2, 1),
    "q8_0": (34, 32),
    "q5_1": (24, 32),
    "q5_0": (22, 32),
    "q4_1": (20, 32),
    "q4_0": (18, 32),
    "iq4_nl": (18, 32),
}


def _build_number() -> int:
    # llamaffi.build_info() parses the build string on every call; one process has one build.
    if not _build:
        import llamaffi

        _build.append(int(llamaffi.build_info()["build_number"]))
    return _build[0]


def identity_of(ctx: Context) -> CacheIdentity:
    """The :class:`CacheIdentity` of ``ctx``, computed on first use and cached per context."""
    with _facts_lock:
        found = _identities.get(ctx)
    if found is None:
        found = CacheIdentity._compute(ctx)
        with _facts_lock:
            _identities[ctx] = found
    return found


def _row_bytes(type_name: str, width: int) -> int:
    num, den = _KV_TYPE_BYTES.get(type_name, (4, 1))
    return -(-width * num // den)


def _head_dims(ctx: Context) -> tuple[int, int]:
    """K and V head sizes: the GGUF's ``<arch>.attention.key_length``/``value_length`` when
    present (models whose head size is not ``n_embd / n_head``), else ``n_embd / n_head``."""
    model = ctx.model
    default = int(model.n_embd) // max(1, int(model.n_head))
    arch = model.meta_val_str("general.architecture") or ""
    dims = []
    for name in ("key_length", "value_length"):
        value = model.meta_val_str(f"{arch}.attention.{name}") if arch else None
        try:
            dims.append(max(default, int(value)) if value else default)
        except ValueError:
            dims.append(default)
    return dims[0], dims[1]


def max_state_size(ctx: Context) -> int:
    """An upper bound on the bytes of any sequence state ``ctx`` can produce or take.

    ``cells * (n_layer * (K row + V row) + per-cell metadata) + fixed overhead``, where
    ``cells`` is what one KV stream can hold (``n_ctx`` for a unified cache), a row is
    ``n_head_kv * head size`` elements of the cache type, the per-cell metadata (position,
    seq count, cell extension, seq ids) is at most ``16 + 4 * n_seq_max`` bytes, and the
    fixed part (stream, layer and type headers) at most ``64 KiB + 64 * n_layer * n_seq_max``.
    It is computed once per context. llama.cpp cannot take a larger blob, so the reader refuses
    a header whose ``raw_size`` exceeds it before allocating or decompressing anything.
    """
    with _facts_lock:
        found = _state_bounds.get(ctx)
    if found is not None:
        return found
    model = ctx.model
    n_layer, n_head_kv, n_seq = int(model.n_layer), int(model.n_head_kv), int(ctx.n_seq_max)
    head_k, head_v = _head_dims(ctx)
    n_ctx = int(ctx.n_ctx)
    cells = n_ctx
    if not ctx.kv_unified:  # llama.cpp pads each stream to 256 cells (n_ctx_seq)
        per_stream = -(-n_ctx // n_seq)
        cells = max(n_ctx, -(-per_stream // 256) * 256)
    per_cell = (
        n_layer
        * (_row_bytes(ctx.type_k, n_head_kv * head_k) + _row_bytes(ctx.type_v, n_head_kv * head_v))
        + 16
        + 4 * n_seq
    )
    bound = cells * per_cell + (64 << 10) + 64 * n_layer * n_seq
    with _facts_lock:
        _state_bounds[ctx] = bound
    return bound


def check_raw_size(header: SnapshotHeader, bound: int, *, source: str | None = None) -> None:
    """Refuse (:class:`CorruptSnapshot`, field ``raw_size``) a header claiming more than
    ``bound`` bytes of state (see :func:`max_state_size`): checked before any allocation."""
    if header.raw_size > bound:
        raise CorruptSnapshot(
            "raw_size",
            f"header claims {header.raw_size} bytes of state; this context's states are at "
            f"most {bound} bytes",
            source=source,
        )


# --------------------------------------------------------------------------------------------
# Live contexts
# --------------------------------------------------------------------------------------------


def _check_live_seq(ctx: Context, seq_id: int) -> None:
    # -1 is a whole-context state (kind CONTEXT): every sequence at once.
    if not -1 <= seq_id < ctx.n_seq_max:
        raise ValueError(f"seq_id {seq_id} out of range [-1, {ctx.n_seq_max})")


def capture(
    ctx: Context,
    seq_id: int,
    tokens: Sequence[int] | npt.NDArray[np.integer[Any]],
    *,
    session_id: str = "",
    parent_id: str = "",
    snapshot_id: str | None = None,
    codec: Codec = DEFAULT_CODEC,
) -> Snapshot:
    """Snapshot sequence ``seq_id`` of ``ctx`` together with its token ids.

    ``tokens`` are stored in the header so that the snapshot alone is enough to re-prefill.
    ``snapshot_id`` defaults to a random id; callers may put their own meaning in it.
    """
    _check_live_seq(ctx, seq_id)
    identity = CacheIdentity.from_context(ctx)
    pos_min = pos_max = -1
    if seq_id >= 0:  # a whole-context state has no single position range
        pos_min, pos_max = ctx.memory.pos_min(seq_id), ctx.memory.pos_max(seq_id)
    if pos_min < 0 or pos_max < 0:
        pos_min = pos_max = -1
    raw = ctx.seq_state_get(seq_id)
    snap = encode(
        raw,
        identity=identity,
        tokens=tokens,
        seq_id=seq_id,
        pos_min=pos_min,
        pos_max=pos_max,
        n_ctx=ctx.n_ctx,
        session_id=session_id,
        snapshot_id=snapshot_id,
        parent_id=parent_id,
        codec=codec,
    )
    logger.debug(
        "captured seq %d: %d raw -> %d compressed bytes",
        seq_id,
        snap.header.raw_size,
        snap.header.compressed_size,
    )
    return snap


def check_compatible(
    ctx: Context, snapshot: Snapshot | SnapshotHeader, *, allow_build_mismatch: bool = False
) -> None:
    """Raise :class:`IncompatibleSnapshot` unless ``snapshot`` fits ``ctx``.

    Compared: llama.cpp build number (unless ``allow_build_mismatch``), model fingerprint,
    geometry, ``type_k``/``type_v``, flash-attention (the V layout), ``kv_unified`` and, for a
    non-unified cache, ``n_seq_max``.
    """
    header = snapshot.header if isinstance(snapshot, Snapshot) else snapshot
    target = CacheIdentity.from_context(ctx)
    diffs = header.identity.differences(target, allow_build_mismatch=allow_build_mismatch)
    if diffs:
        raise IncompatibleSnapshot(diffs)


def _clear(ctx: Context, seq_id: int) -> None:
    try:
        ctx.memory.seq_rm(seq_id, -1, -1)
    except Exception:  # the original error matters more; log this one
        logger.exception("could not clear seq %d after a failed restore", seq_id)


def restore(
    ctx: Context,
    snapshot: Snapshot,
    seq_id: int | None = None,
    *,
    allow_build_mismatch: bool = False,
    threads: int = 0,
) -> None:
    """Load ``snapshot`` into sequence ``seq_id`` of ``ctx`` (default: the captured seq id).

    Compatibility is checked first (:class:`IncompatibleSnapshot`, nothing touched). A
    llama.cpp build other than this one is refused unless ``allow_build_mismatch=True``: the
    blob format may change between builds. If the restore fails after the sequence was
    touched, the sequence is cleared (never half-filled) and :class:`RestoreError` is raised.
    """
    header = snapshot.header
    target = header.seq_id if seq_id is None else seq_id
    if header.kind is StateKind.CONTEXT and target != -1:
        raise IncompatibleSnapshot([("kind", "context", f"seq {target}")])
    if header.kind is StateKind.SEQUENCE and target == -1:
        raise IncompatibleSnapshot([("kind", "sequence", "context")])
    _check_live_seq(ctx, target)
    check_compatible(ctx, header, allow_build_mismatch=allow_build_mismatch)
    # Bound before allocating: a header with a valid checksum can still claim 1 TiB.
    check_raw_size(header, max_state_size(ctx))
    raw = decode(snapshot, threads=threads)
    # llama.cpp #27068: a failed restore can leave cells behind, so every failure past this
    # point clears the sequence before the error propagates.
    try:
        ctx.seq_state_set(raw, target)
        got = (-1, -1)
        if target >= 0:
            got = (ctx.memory.pos_min(target), ctx.memory.pos_max(target))
        if got != (header.pos_min, header.pos_max):
            raise RestoreError(
                f"restored seq {target} holds positions {got}, snapshot says "
                f"{(header.pos_min, header.pos_max)}"
            )
    except RestoreError:
        _clear(ctx, target)
        raise
    except BaseException as exc:
        _clear(ctx, target)
        if isinstance(exc, Exception) and not isinstance(exc, MemoryRuntimeError):
            raise RestoreError(f"llama.cpp refused the snapshot: {exc}") from exc
        raise
    logger.debug("restored snapshot %s into seq %d", header.snapshot_id, target)
