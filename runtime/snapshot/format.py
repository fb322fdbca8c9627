"""The snapshot file format: the struct tables, the header and its binary form, versions.

The layout is described field by field in ``docs/snapshot-format.md``; the tables here are
the single source of truth. Version 2 adds ``journal_seq`` to the fixed body; version 3
(written now) adds the stored codec. Older files still read (:data:`READER_SUPPORTED_VERSIONS`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import CorruptSnapshotError, SnapshotError, UnsupportedVersionError
from runtime.snapshot.identity import CacheIdentity

logger = logging.getLogger(__name__)

#: 8 bytes; the high bit catches 7-bit transports, the CR/LF pair catches newline translation.
MAGIC = b"\x89KVSNP\r\n"
#: The version this module writes (2 adds ``journal_seq`` to the body, 3 the stored codec).
FORMAT_VERSION = 3
#: The versions this module reads; anything else is refused with :class:`UnsupportedVersionError`.
READER_SUPPORTED_VERSIONS: frozenset[int] = frozenset({1, 2, 3})
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
HEADER_PREFIX = struct.Struct("<8sHHI")
_CHECKSUM_OFFSET = HEADER_PREFIX.size
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
#: Version 2 appends the journal entry the state follows (``journal_seq``; see
#: :data:`NO_JOURNAL_SEQ`) to the v1 body.
BODY_FIELDS_V2: tuple[tuple[str, str], ...] = (*BODY_FIELDS_V1, ("journal_seq", "q"))
_BODY = struct.Struct("<" + "".join(code for _, code in BODY_FIELDS_V1))
_BODY_V2 = struct.Struct("<" + "".join(code for _, code in BODY_FIELDS_V2))
#: The fixed body, and its field table, of each readable version.
_BODIES: dict[int, tuple[struct.Struct, tuple[tuple[str, str], ...]]] = {
    1: (_BODY, BODY_FIELDS_V1),
    2: (_BODY_V2, BODY_FIELDS_V2),
    3: (_BODY_V2, BODY_FIELDS_V2),
}
#: ``journal_seq`` of a v2 header that follows no journal entry (a snapshot made elsewhere).
NO_JOURNAL_SEQ = -(1 << 63)
#: One chunk table entry: compressed size, xxh3-128 of the compressed bytes.
_CHUNK_ENTRY = struct.Struct(f"<I{CHUNK_DIGEST_LEN}s")
_TOKEN_DTYPE = np.dtype("<i4")

#: Size of the smallest header (version 1, without ids, chunks or tokens).
MIN_HEADER_LEN = _BODY_OFFSET + _BODY.size


def min_header_len(version: int) -> int:
    """Size of a header of ``version`` without ids, chunks or tokens."""
    return _BODY_OFFSET + _BODIES[version][0].size


# layout bits
LAYOUT_FLASH_ATTN = 1
LAYOUT_V_TRANS = 2
LAYOUT_KV_UNIFIED = 4
_LAYOUT_KNOWN = LAYOUT_FLASH_ATTN | LAYOUT_V_TRANS | LAYOUT_KV_UNIFIED

ZSTD_MIN_LEVEL = -(1 << 17)
ZSTD_MAX_LEVEL = 22


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
    """The compressor: zstd frames, or each segment's bytes as they are (``STORED``: chunks of
    KV, which zstd does not shrink; docs/snapshot-format.md, "The codec of chunks")."""

    ZSTD = 1
    STORED = 2


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
    #: The journal entry the state follows (version 2; None in version 1 files, where the
    #: session runtime put it into ``snapshot_id`` instead).
    journal_seq: int | None = None

    @property
    def n_tokens(self) -> int:
        """Number of token ids stored in the header."""
        return len(self.tokens)

    @property
    def header_len(self) -> int:
        """Length of the packed header in bytes."""
        return (
            min_header_len(self.version)
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
            "journal_seq": self.journal_seq,
            "session_id": self.session_id,
            "parent_id": self.parent_id,
            "codec": self.codec.name.lower(),
            "level": self.level if self.codec is CodecId.ZSTD else None,
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
        body_struct, _ = _BODIES[self.version]
        extra: tuple[int, ...] = ()
        if self.version >= 2:
            extra = (NO_JOURNAL_SEQ if self.journal_seq is None else self.journal_seq,)
        elif self.journal_seq is not None:
            raise SnapshotError("a version 1 header cannot record journal_seq")
        body = body_struct.pack(
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
            *extra,
        )
        table = b"".join(_CHUNK_ENTRY.pack(c.size, c.digest) for c in self.chunks)
        tokens = np.asarray(self.tokens, dtype=_TOKEN_DTYPE).tobytes()
        rest = body + b"".join(ids) + table + tokens
        prefix = HEADER_PREFIX.pack(MAGIC, self.version, 0, _BODY_OFFSET + len(rest))
        digest = hashlib.sha256(prefix + rest).digest()
        return prefix + digest + rest

    @classmethod
    def unpack(cls, buf: bytes | memoryview, *, source: str | None = None) -> SnapshotHeader:
        """Parse and validate a complete header (``buf`` is exactly ``header_len`` bytes).

        Raises :class:`CorruptSnapshotError` or :class:`UnsupportedVersionError`; never trusts
        a field before the checksum over the whole header has been verified.
        """
        header_len = check_prefix(bytes(buf[: HEADER_PREFIX.size]), source=source)
        if len(buf) != header_len:
            msg = f"have {len(buf)} header bytes, expected {header_len}"
            raise CorruptSnapshotError("header_len", msg, source=source)
        stored = bytes(buf[_CHECKSUM_OFFSET:_BODY_OFFSET])
        h = hashlib.sha256(buf[:_CHECKSUM_OFFSET])
        h.update(buf[_BODY_OFFSET:])
        if h.digest() != stored:
            msg = "header SHA-256 does not match; the header is damaged"
            raise CorruptSnapshotError("header_checksum", msg, source=source)
        version = HEADER_PREFIX.unpack_from(buf)[1]
        return _parse_body(buf, header_len, version, source)


def _format_time_ns(ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1_000_000_000))
    except (OverflowError, OSError, ValueError):
        return f"invalid ({ns} ns)"


def check_prefix(prefix: bytes, *, source: str | None = None) -> int:
    """Validate the 16-byte prefix (magic, version, flags, header length); return the length."""
    if len(prefix) < HEADER_PREFIX.size:
        raise CorruptSnapshotError(
            "file_size",
            f"{len(prefix)} bytes is too short for a snapshot (the prefix alone is "
            f"{HEADER_PREFIX.size} bytes)",
            source=source,
        )
    magic, version, flags, header_len = HEADER_PREFIX.unpack(prefix[: HEADER_PREFIX.size])
    if magic != MAGIC:
        msg = f"bad magic {magic!r}: not a KV snapshot"
        raise CorruptSnapshotError("magic", msg, source=source)
    if version not in READER_SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(version, supported=READER_SUPPORTED_VERSIONS, source=source)
    if flags != 0:
        msg = f"reserved flags are {flags:#x}, expected 0"
        raise CorruptSnapshotError("flags", msg, source=source)
    low = min_header_len(version)
    if not low <= header_len <= MAX_HEADER_LEN:
        raise CorruptSnapshotError(
            "header_len",
            f"header length {header_len} outside [{low}, {MAX_HEADER_LEN}]",
            source=source,
        )
    return int(header_len)


def _parse_body(
    buf: bytes | memoryview, header_len: int, version: int, source: str | None
) -> SnapshotHeader:
    def bad(field: str, message: str) -> CorruptSnapshotError:
        return CorruptSnapshotError(field, message, source=source)

    body_struct, fields = _BODIES[version]
    values = dict(
        zip(
            (name for name, _ in fields),
            body_struct.unpack_from(buf, _BODY_OFFSET),
            strict=True,
        )
    )
    journal_seq: int | None = values.get("journal_seq", NO_JOURNAL_SEQ)
    if journal_seq == NO_JOURNAL_SEQ:
        journal_seq = None
    elif journal_seq is not None and journal_seq < -1:
        raise bad("journal_seq", f"journal seq {journal_seq} is below -1")
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
        msg = f"{n_chunks} chunks do not fit {raw_size} bytes in segments of {chunk_size}"
        raise bad("n_chunks", f"{msg} with filter {filt.name.lower()}")
    id_lens = (values["snapshot_id_len"], values["session_id_len"], values["parent_id_len"])
    if max(id_lens) > MAX_ID_LEN:
        raise bad("id_len", f"an id is longer than {MAX_ID_LEN} bytes")
    expected_len = (
        min_header_len(version)
        + sum(id_lens)
        + n_chunks * _CHUNK_ENTRY.size
        + values["n_tokens"] * _TOKEN_DTYPE.itemsize
    )
    if expected_len != header_len:
        raise bad("header_len", f"fields add up to {expected_len} bytes, header says {header_len}")

    offset = min_header_len(version)
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
    if codec is CodecId.STORED and (
        version < 3
        or filt is not Filter.NONE
        or any(c.size != min(chunk_size, raw_size - i * chunk_size) for i, c in enumerate(chunks))
    ):
        raise bad("codec", "stored chunks are version 3, unfiltered segments of raw length")
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
        version=version,
        codec=codec,
        journal_seq=journal_seq,
    )
