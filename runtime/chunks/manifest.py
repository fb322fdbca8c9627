"""Manifests: one checkpoint of a session (its chunks in order, the tail, the tokens, the
identity) and their binary form."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from runtime.chunks.keys import KEY_RE, Lineage, chunk_keys
from runtime.errors import CorruptSnapshotError
from runtime.snapshot import CacheIdentity
from runtime.storage import MANIFEST_SUFFIX as MANIFEST_SUFFIX

#: 8 bytes, built like the snapshot magic (high bit, CR LF).
MANIFEST_MAGIC = b"\x89KVMAN\r\n"
MANIFEST_VERSION = 1
MANIFEST_SUPPORTED_VERSIONS: frozenset[int] = frozenset({1})
#: Upper bound on a manifest's JSON body (token ids dominate: ~8 bytes per token).
MAX_MANIFEST_BODY = 64 << 20

# magic, version, flags (0), body length; then the SHA-256 of the body, then the body.
_MAN_PREFIX = struct.Struct("<8sHHI")
MANIFEST_HEADER_LEN = _MAN_PREFIX.size + 32


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a manifest: its key and the token indices ``[start, end)`` it holds."""

    key: str
    start: int
    end: int
    raw_size: int
    file_size: int

    def to_json(self) -> list[Any]:
        """The compact JSON form: ``[key, start, end, raw_size, file_size]``."""
        return [self.key, self.start, self.end, self.raw_size, self.file_size]

    @classmethod
    def from_json(cls, value: Any, *, source: str | None = None) -> ChunkRef:
        """Parse :meth:`to_json`'s form: :class:`CorruptSnapshotError` (a ValueError) for a
        bad key or range, ValueError/TypeError for anything that is not five values."""
        key, start, end, raw, size = value
        if not (isinstance(key, str) and KEY_RE.fullmatch(key)):
            raise CorruptSnapshotError(
                "chunks", f"bad chunk key {key!r}", source=source, what="manifest"
            )
        ints = (start, end, raw, size)
        if not all(type(v) is int and v >= 0 for v in ints) or end <= start:
            raise CorruptSnapshotError(
                "chunks", f"bad chunk range {value!r}", source=source, what="manifest"
            )
        return cls(key, start, end, raw, size)


@dataclass(frozen=True)
class Manifest:
    """One checkpoint of a session: the chunks in order, the tail, the tokens, the identity.

    ``journal_seq`` is the journal entry the KV state follows. Owns its binary form
    (:meth:`to_bytes`, :meth:`from_bytes`): a 48-byte prefix (magic, version, flags, body
    length, SHA-256 of the body) and a JSON body.
    """

    session_id: str
    generation: int
    journal_seq: int
    identity: CacheIdentity
    chunk_tokens: int
    pos_min: int
    tokens: tuple[int, ...]
    chunks: tuple[ChunkRef, ...]  #: full chunks, in position order
    tail: ChunkRef | None  #: the trailing partial range, if any
    lineage: Lineage = ()
    scope: str = ""
    created_ns: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def refs(self) -> tuple[ChunkRef, ...]:
        """Every chunk the manifest names, the tail last."""
        return self.chunks + ((self.tail,) if self.tail else ())

    @property
    def keys(self) -> frozenset[str]:
        """The keys of :attr:`refs`."""
        return frozenset(ref.key for ref in self.refs)

    @property
    def n_tokens(self) -> int:
        """Tokens (cells) the checkpoint holds."""
        return len(self.tokens)

    @property
    def raw_size(self) -> int:
        """Sum of the chunks' llama.cpp state sizes."""
        return sum(ref.raw_size for ref in self.refs)

    @property
    def file_size(self) -> int:
        """Sum of the chunks' file sizes (shared chunks counted in full)."""
        return sum(ref.file_size for ref in self.refs)

    def to_bytes(self) -> bytes:
        """Serialise: prefix, body checksum, JSON body."""
        body = json.dumps(
            {
                "session_id": self.session_id,
                "generation": self.generation,
                "journal_seq": self.journal_seq,
                "identity": dataclasses.asdict(self.identity),
                "chunk_tokens": self.chunk_tokens,
                "pos_min": self.pos_min,
                "tokens": list(self.tokens),
                "chunks": [ref.to_json() for ref in self.chunks],
                "tail": self.tail.to_json() if self.tail else None,
                "lineage": [list(entry) for entry in self.lineage],
                "scope": self.scope,
                "created_ns": self.created_ns,
                "meta": self.meta,
            },
            separators=(",", ":"),
        ).encode()
        prefix = _MAN_PREFIX.pack(MANIFEST_MAGIC, MANIFEST_VERSION, 0, len(body))
        return prefix + hashlib.sha256(body).digest() + body

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str | None = None) -> Manifest:
        """Parse and validate a manifest file's bytes (:class:`CorruptSnapshotError` on
        damage)."""

        def bad(name: str, message: str) -> CorruptSnapshotError:
            return CorruptSnapshotError(name, message, source=source, what="manifest")

        if len(data) < MANIFEST_HEADER_LEN:
            raise bad("file_size", f"{len(data)} bytes is too short for a manifest")
        magic, version, flags, body_len = _MAN_PREFIX.unpack_from(data)
        if magic != MANIFEST_MAGIC:
            raise bad("magic", f"bad magic {magic!r}: not a KV manifest")
        if version not in MANIFEST_SUPPORTED_VERSIONS:
            raise bad("version", f"unsupported manifest version {version}")
        if flags:
            raise bad("flags", f"reserved flags are {flags:#x}, expected 0")
        if body_len > MAX_MANIFEST_BODY or MANIFEST_HEADER_LEN + body_len != len(data):
            raise bad("file_size", f"file is {len(data)} bytes, body length says {body_len}")
        body = data[MANIFEST_HEADER_LEN:]
        if hashlib.sha256(body).digest() != data[_MAN_PREFIX.size : MANIFEST_HEADER_LEN]:
            raise bad("checksum", "body SHA-256 does not match")
        try:
            obj = json.loads(body)
            return cls._from_obj(obj, source=source)
        except CorruptSnapshotError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise bad("body", f"{type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_obj(cls, obj: dict[str, Any], *, source: str | None = None) -> Manifest:
        ident = CacheIdentity(**obj["identity"])
        tokens = tuple(int(t) for t in obj["tokens"])
        chunks = tuple(ChunkRef.from_json(v, source=source) for v in obj["chunks"])
        raw_tail = obj["tail"]
        tail = ChunkRef.from_json(raw_tail, source=source) if raw_tail is not None else None
        lineage = tuple((int(at), str(d)) for at, d in obj["lineage"])
        man = cls(
            session_id=str(obj["session_id"]),
            generation=int(obj["generation"]),
            journal_seq=int(obj["journal_seq"]),
            identity=ident,
            chunk_tokens=int(obj["chunk_tokens"]),
            pos_min=int(obj["pos_min"]),
            tokens=tokens,
            chunks=chunks,
            tail=tail,
            lineage=lineage,
            scope=str(obj["scope"]),
            created_ns=int(obj["created_ns"]),
            meta=dict(obj["meta"]),
        )
        man._check(source)
        return man

    def _check(self, source: str | None = None) -> None:
        """The refs must tile ``[0, n_tokens)`` and their keys must follow from the tokens
        (:class:`CorruptSnapshotError` otherwise)."""
        expected = chunk_keys(
            self.identity,
            self.tokens,
            self.pos_min,
            chunk_tokens=self.chunk_tokens,
            lineage=self.lineage,
            scope=self.scope,
        )
        got = [(ref.key, ref.start, ref.end) for ref in self.refs]
        if got != expected:
            raise CorruptSnapshotError(
                "chunks",
                "chunk keys or ranges do not follow from the tokens",
                source=source,
                what="manifest",
            )
        if self.tail is not None and self.tail.end - self.tail.start >= self.chunk_tokens:
            raise CorruptSnapshotError(
                "tail", "the tail is a full chunk", source=source, what="manifest"
            )
