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

and restoring is the reverse, chunk by chunk: ``seq_state_set(blob, tmp)``,
``seq_cp(tmp, target)``, ``seq_rm(tmp)``. ``seq_cp`` shares cells within one KV stream, so
neither direction needs spare cells; it needs a unified cache (``kv_unified=True``), where all
sequences share one stream.

Work is split for a runtime with a background writer, because a llama.cpp context is not
thread-safe: :meth:`ChunkStore.plan_capture` and :meth:`ChunkStore.restore` touch the context
and run on the caller's thread; :meth:`ChunkStore.commit` compresses, writes, fsyncs and
garbage-collects, never touches a context, and may run on another thread.

The format is described in ``docs/snapshot-format.md`` ("Chunked checkpoints").
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from runtime import snapshot as snapshot_mod
from runtime.errors import MemoryRuntimeError
from runtime.fsutil import (
    DirLock,
    atomic_write_bytes,
    ensure_dir,
    fsync_dir,
    remove_stale_temps,
)
from runtime.snapshot import CacheIdentity, Codec, CorruptSnapshot, Filter, UnsupportedVersion
from runtime.store import validate_session_id

if TYPE_CHECKING:
    from llamaffi import Context

__all__ = [
    "CHUNK_CODEC",
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_KEEP",
    "MANIFEST_MAGIC",
    "MANIFEST_SUFFIX",
    "ChunkError",
    "ChunkRef",
    "ChunkStore",
    "ChunkStoreError",
    "CorruptChunk",
    "CorruptManifest",
    "Lineage",
    "Manifest",
    "MissingChunk",
    "PendingCheckpoint",
    "PendingChunk",
    "VerifyReport",
    "chunk_keys",
    "shift_lineage",
]

logger = logging.getLogger(__name__)

#: Tokens per chunk unless the store is opened with another ``chunk_tokens`` (LMCache's size).
DEFAULT_CHUNK_TOKENS = 256
#: The codec of chunk files unless the store is given another: zstd level -1, no filter, no
#: zstd content checksum (the chunk table's xxh3-128 still covers every stored byte and is
#: checked before a frame is decoded). It stores KV almost as is (0.98-0.99 of raw) and
#: restores at 0.9-1.4x llama.cpp's raw load, where level 1 with byte planes saves 20% of the
#: bytes for 3.5-4x; see docs/snapshot-format.md ("The codec of chunks").
CHUNK_CODEC = Codec(level=-1, filter=Filter.NONE, checksum=False)
#: Manifests kept per session: the newest, and one to fall back to if it is damaged.
DEFAULT_KEEP = 2
#: 8 bytes, built like the snapshot magic (high bit, CR LF).
MANIFEST_MAGIC = b"\x89KVMAN\r\n"
MANIFEST_VERSION = 1
MANIFEST_SUPPORTED_VERSIONS: frozenset[int] = frozenset({1})
MANIFEST_SUFFIX = ".kvman"
#: Upper bound on a manifest's JSON body (token ids dominate: ~8 bytes per token).
MAX_MANIFEST_BODY = 64 << 20
#: Key length in bytes (BLAKE2b-128, 32 hex digits in file names).
KEY_BYTES = 16

# magic, version, flags (0), body length; then the SHA-256 of the body, then the body.
_MAN_PREFIX = struct.Struct("<8sHHI")
_MAN_HEADER_LEN = _MAN_PREFIX.size + 32
_KEY_RE = re.compile(r"[0-9a-f]{32}")
_GEN_RE = re.compile(r"(\d{12})" + re.escape(MANIFEST_SUFFIX))
_CHUNK_STEP = struct.Struct("<qqq")  # token index start, end, first position
_TOKEN_DTYPE = np.dtype("<i4")

#: ``((start_index, digest_hex), ...)``: what, beyond token ids and positions, the KV of the
#: tokens from ``start_index`` on depends on (see :func:`shift_lineage`). Empty: nothing, the
#: state is what decoding ``tokens`` at their positions gives.
Lineage = tuple[tuple[int, str], ...]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ChunkStoreError(MemoryRuntimeError):
    """Base class of chunk store errors."""


class ChunkError(ChunkStoreError, ValueError):
    """A manifest cannot be restored: a chunk it names is missing or damaged.

    ``key`` names the chunk; the caller falls back to an older manifest or to the journal.
    The target sequence has been left empty.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"chunk {key}: {message}")


class MissingChunk(ChunkError):
    """A chunk named by a manifest is not in the store."""


class CorruptChunk(ChunkError):
    """A chunk file failed an integrity check (``field`` names it) or does not fit its slot."""

    def __init__(self, key: str, field: str, message: str) -> None:
        self.field = field
        super().__init__(key, f"{field}: {message}")


class CorruptManifest(ChunkStoreError, ValueError):
    """A manifest file failed an integrity check; ``field`` names the check."""

    def __init__(self, field: str, message: str, *, source: str | None = None) -> None:
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}corrupt manifest ({field}): {message}")


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _identity_bytes(identity: CacheIdentity, chunk_tokens: int, scope: str) -> bytes:
    fields = dataclasses.asdict(identity)
    if identity.kv_unified:
        fields.pop("n_seq_max")  # one stream for all sequences: the count does not matter
    fields["chunk_tokens"] = chunk_tokens
    fields["scope"] = scope
    return json.dumps(fields, sort_keys=True).encode()


def chunk_keys(
    identity: CacheIdentity,
    tokens: Sequence[int] | npt.NDArray[np.integer[Any]],
    pos_min: int,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    lineage: Lineage = (),
    scope: str = "",
) -> list[tuple[str, int, int]]:
    """``(key, start, end)`` of each chunk of ``tokens`` (token indices; the tail included).

    ``key_j = BLAKE2b-128(key_{j-1} || start, end, first position || token ids of the chunk
    || lineage entries that start inside it)``, seeded with the cache identity, the chunk size
    and ``scope``. So a key depends on every token id and position up to the chunk's end.
    """
    tok = np.ascontiguousarray(tokens, dtype=_TOKEN_DTYPE).reshape(-1)
    prev = hashlib.blake2b(
        b"kvchunk/1\0" + _identity_bytes(identity, chunk_tokens, scope), digest_size=KEY_BYTES
    ).digest()
    out: list[tuple[str, int, int]] = []
    for start in range(0, tok.size, chunk_tokens):
        end = min(start + chunk_tokens, tok.size)
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
        h.update(_CHUNK_STEP.pack(start, end, pos_min + start))
        h.update(tok[start:end].tobytes())
        for at, digest in lineage:
            if start <= at < end:
                h.update(_CHUNK_STEP.pack(at, 0, 0) + bytes.fromhex(digest))
        prev = h.digest()
        out.append((prev.hex(), start, end))
    return out


def shift_lineage(lineage: Lineage, keep: int, discarded: Sequence[int]) -> Lineage:
    """The lineage after a window shift that dropped ``discarded`` (window offsets from
    ``keep`` on) and moved the tokens after them down to ``keep``.

    The KV of the tokens before ``keep`` is unchanged, so their chunks keep their keys. The
    KV of the tokens from ``keep`` on now depends on what was dropped (their keys were
    computed with it in context, and RoPE was shifted), so their keys must differ from any
    chunk of a fresh prefill of the same tokens: the new entry hashes the dropped tokens and
    every earlier entry. Call it with exactly what the session did (``seq_rm(keep, keep+d)``,
    ``seq_add(keep+d, -1, -d)``), and pass the result to every later
    :meth:`ChunkStore.plan_capture` of the session; it is stored in each manifest.
    """
    if keep < 0:
        raise ValueError("keep must be >= 0")
    h = hashlib.blake2b(b"shift/1\0", digest_size=KEY_BYTES)
    for at, digest in lineage:
        h.update(_CHUNK_STEP.pack(at, 0, 0) + bytes.fromhex(digest))
    h.update(_CHUNK_STEP.pack(keep, len(discarded), 0))
    h.update(np.ascontiguousarray(discarded, dtype=_TOKEN_DTYPE).tobytes())
    kept = tuple((at, d) for at, d in lineage if at < keep)
    return (*kept, (keep, h.hexdigest()))


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


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
    def from_json(cls, value: Any) -> ChunkRef:
        """Parse :meth:`to_json`'s form (raises ValueError/TypeError on anything else)."""
        key, start, end, raw, size = value
        if not (isinstance(key, str) and _KEY_RE.fullmatch(key)):
            raise ValueError(f"bad chunk key {key!r}")
        ints = (start, end, raw, size)
        if not all(type(v) is int and v >= 0 for v in ints) or end <= start:
            raise ValueError(f"bad chunk range {value!r}")
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
        """Parse and validate a manifest file's bytes (:class:`CorruptManifest` on damage)."""

        def bad(name: str, message: str) -> CorruptManifest:
            return CorruptManifest(name, message, source=source)

        if len(data) < _MAN_HEADER_LEN:
            raise bad("file_size", f"{len(data)} bytes is too short for a manifest")
        magic, version, flags, body_len = _MAN_PREFIX.unpack_from(data)
        if magic != MANIFEST_MAGIC:
            raise bad("magic", f"bad magic {magic!r}: not a KV manifest")
        if version not in MANIFEST_SUPPORTED_VERSIONS:
            raise bad("version", f"unsupported manifest version {version}")
        if flags:
            raise bad("flags", f"reserved flags are {flags:#x}, expected 0")
        if body_len > MAX_MANIFEST_BODY or _MAN_HEADER_LEN + body_len != len(data):
            raise bad("file_size", f"file is {len(data)} bytes, body length says {body_len}")
        body = data[_MAN_HEADER_LEN:]
        if hashlib.sha256(body).digest() != data[_MAN_PREFIX.size : _MAN_HEADER_LEN]:
            raise bad("checksum", "body SHA-256 does not match")
        try:
            obj = json.loads(body)
            return cls._from_obj(obj)
        except (ValueError, TypeError, KeyError) as exc:
            raise bad("body", f"{type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_obj(cls, obj: dict[str, Any]) -> Manifest:
        ident = CacheIdentity(**obj["identity"])
        tokens = tuple(int(t) for t in obj["tokens"])
        chunks = tuple(ChunkRef.from_json(v) for v in obj["chunks"])
        tail = ChunkRef.from_json(obj["tail"]) if obj["tail"] is not None else None
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
        man._check()
        return man

    def _check(self) -> None:
        """The refs must tile ``[0, n_tokens)`` and their keys must follow from the tokens."""
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
            raise ValueError("chunk keys or ranges do not follow from the tokens")
        if self.tail is not None and self.tail.end - self.tail.start >= self.chunk_tokens:
            raise ValueError("the tail is a full chunk")


# --------------------------------------------------------------------------------------------
# Pending checkpoints (made on the caller's thread, committed on the writer's)
# --------------------------------------------------------------------------------------------


@dataclass
class PendingChunk:
    """One chunk of a planned checkpoint; ``raw`` is None when the chunk is already durable."""

    key: str
    start: int
    end: int
    pos0: int  #: first position
    raw: npt.NDArray[np.uint8] | None
    raw_size: int = 0  #: known for durable chunks from the store's index
    file_size: int = 0


@dataclass
class PendingCheckpoint:
    """What :meth:`ChunkStore.plan_capture` copied out of the context; plain data only."""

    session_id: str
    journal_seq: int
    identity: CacheIdentity
    n_ctx: int
    chunk_tokens: int
    pos_min: int
    tokens: tuple[int, ...]
    chunks: list[PendingChunk]  #: every full chunk and the tail (last), in order
    lineage: Lineage
    scope: str
    meta: dict[str, Any]
    created_ns: int
    pin_id: int = 0
    done: bool = False

    @property
    def copied_bytes(self) -> int:
        """llama.cpp state bytes copied out of the context for this checkpoint."""
        return sum(c.raw.size for c in self.chunks if c.raw is not None)

    @property
    def new_chunks(self) -> int:
        """Chunks (tail included) that this checkpoint will write."""
        return sum(1 for c in self.chunks if c.raw is not None)


@dataclass
class VerifyReport:
    """What :meth:`ChunkStore.verify` found; ``ok`` when nothing is damaged or missing."""

    manifests: int = 0
    chunks: int = 0
    damaged_manifests: list[tuple[str, str]] = field(default_factory=list)  #: (path, why)
    damaged_chunks: list[tuple[str, str]] = field(default_factory=list)  #: (key, why)
    missing: list[tuple[str, str]] = field(default_factory=list)  #: (manifest path, key)
    orphans: list[str] = field(default_factory=list)  #: keys no manifest references

    @property
    def ok(self) -> bool:
        """No damaged manifest or chunk and no missing chunk (orphans are harmless)."""
        return not (self.damaged_manifests or self.damaged_chunks or self.missing)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class ChunkStore:
    """Chunked, deduplicated, crash-safe KV checkpoints under ``root``.

    Args:
        root: the store directory (created with mode 0700).
        chunk_tokens: positions per chunk (the key depends on it).
        level: zstd level of chunk files, with the byte-plane filter (``Codec(level=level)``);
            ``None`` (default) means :data:`CHUNK_CODEC`.
        codec: the whole codec of chunk files (overrides ``level``).
        keep: manifests kept per session (at least 1; 2 lets a damaged newest fall back).
        dedup: ``"global"`` (default) shares chunks of equal prefixes across sessions;
            ``"session"`` keys chunks per session (see docs: "Dedup and bit-exactness").
        readonly: no lock, no writing, no quarantine, no temp-file cleanup.
        lock: take ``<root>/.lock`` (set False when the caller already holds a lock that
            covers this directory).
        threads: worker threads decoding chunks ahead of the caller during :meth:`restore`;
            1 decodes on the caller's thread, between the llama.cpp calls. 0 (default): one
            per CPU but one (kept for the caller's llama.cpp calls), at most 4; so 1 on a
            2-core machine, where the pipeline measured slower (docs: "The codec of chunks").

    Thread safety: :meth:`commit` may run on one writer thread while :meth:`plan_capture` and
    :meth:`restore` run on the caller's thread; the shared index is guarded by a lock, and
    chunks named by a planned but uncommitted checkpoint are pinned against garbage
    collection. Only one process may write a directory (the lock enforces it).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        level: int | None = None,
        codec: Codec | None = None,
        keep: int = DEFAULT_KEEP,
        dedup: Literal["global", "session"] = "global",
        readonly: bool = False,
        lock: bool = True,
        threads: int = 0,
    ) -> None:
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        if keep < 1:
            raise ValueError("keep must be at least 1")
        if dedup not in ("global", "session"):
            raise ValueError("dedup must be 'global' or 'session'")
        self.root = Path(root)
        self.chunk_tokens = chunk_tokens
        if codec is None:
            codec = CHUNK_CODEC if level is None else Codec(level=level)
        self.codec = codec
        self.keep = keep
        self.dedup = dedup
        self.readonly = readonly
        self.threads = threads if threads > 0 else max(1, min(4, (os.cpu_count() or 1) - 1))
        self._lock = threading.RLock()
        self._commit_lock = threading.Lock()
        self._dirlock: DirLock | None = None
        self._closed = False
        #: key -> (raw_size, file_size) of every chunk file on disk
        self._chunks: dict[str, tuple[int, int]] = {}
        #: session -> {generation: keys} of every manifest on disk
        self._refs: dict[str, dict[int, frozenset[str]]] = {}
        self._pins: dict[int, frozenset[str]] = {}
        self._next_pin = 1
        self._counters = {"written_bytes": 0, "written_files": 0, "gc_files": 0}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if not readonly:
            ensure_dir(self.root)
            if lock:
                self._dirlock = DirLock(self.root).acquire()
            self._remove_temps()
        self._load_index()

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock; safe to call twice."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._dirlock is not None:
            self._dirlock.release()
            self._dirlock = None

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writable(self) -> None:
        if self.readonly:
            raise ChunkStoreError(f"chunk store {self.root} was opened read-only")
        if self._closed:
            raise ChunkStoreError(f"chunk store {self.root} is closed")

    # -- paths and index --------------------------------------------------------------------

    @property
    def chunk_dir(self) -> Path:
        """``<root>/chunks``."""
        return self.root / "chunks"

    @property
    def manifest_dir(self) -> Path:
        """``<root>/manifests``."""
        return self.root / "manifests"

    def chunk_path(self, key: str) -> Path:
        """Where chunk ``key`` lives."""
        return self.chunk_dir / key[:2] / f"{key}{snapshot_mod.FILE_SUFFIX}"

    def _session_manifest_dir(self, session_id: str) -> Path:
        return self.manifest_dir / validate_session_id(session_id)

    def _remove_temps(self) -> None:
        removed = 0
        for directory in (*self._chunk_subdirs(), *self._manifest_subdirs()):
            removed += remove_stale_temps(directory)
        if removed:
            logger.warning("removed %d temp file(s) left by an interrupted write", removed)

    def _chunk_subdirs(self) -> list[Path]:
        if not self.chunk_dir.is_dir():
            return []
        return sorted(p for p in self.chunk_dir.iterdir() if p.is_dir())

    def _manifest_subdirs(self) -> list[Path]:
        if not self.manifest_dir.is_dir():
            return []
        return sorted(p for p in self.manifest_dir.iterdir() if p.is_dir())

    def _iter_chunk_files(self) -> Iterable[tuple[str, Path]]:
        suffix = snapshot_mod.FILE_SUFFIX
        for sub in self._chunk_subdirs():
            for p in sub.iterdir():
                key = p.name[: -len(suffix)] if p.name.endswith(suffix) else ""
                if _KEY_RE.fullmatch(key) and p.is_file():
                    yield key, p

    def _load_index(self) -> None:
        """Scan chunk headers (sizes) and manifests (references) once, at open."""
        chunks: dict[str, tuple[int, int]] = {}
        for key, path in self._iter_chunk_files():
            try:
                header = snapshot_mod.inspect(path)
            except (CorruptSnapshot, UnsupportedVersion, OSError) as exc:
                logger.warning("chunk %s is unreadable (%s); it counts as absent", key, exc)
                continue
            chunks[key] = (header.raw_size, header.file_size)
        refs: dict[str, dict[int, frozenset[str]]] = {}
        for session in self.sessions():
            for generation, path in self._generations(session):
                try:
                    man = self._read_manifest(path)
                except (CorruptManifest, OSError):
                    # keep its generation number reserved; its chunks cannot be known
                    refs.setdefault(session, {})[generation] = frozenset()
                    continue
                refs.setdefault(session, {})[generation] = man.keys
        with self._lock:
            self._chunks = chunks
            self._refs = refs

    def sessions(self) -> list[str]:
        """Session ids that have a manifest directory, sorted."""
        out = []
        for p in self._manifest_subdirs():
            try:
                out.append(validate_session_id(p.name))
            except ValueError:
                continue
        return out

    def _generations(self, session_id: str) -> list[tuple[int, Path]]:
        directory = self._session_manifest_dir(session_id)
        if not directory.is_dir():
            return []
        found = []
        for child in directory.iterdir():
            match = _GEN_RE.fullmatch(child.name)
            if match and child.is_file():
                found.append((int(match.group(1)), child))
        return sorted(found, reverse=True)

    @staticmethod
    def _read_manifest(path: Path) -> Manifest:
        source = os.fspath(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _MAN_HEADER_LEN + MAX_MANIFEST_BODY:
                raise CorruptManifest("file_size", f"{size} bytes is too large", source=source)
            data = f.read(size)
        man = Manifest.from_bytes(data, source=source)
        expected = _GEN_RE.fullmatch(path.name)
        if expected is None or int(expected.group(1)) != man.generation:
            raise CorruptManifest("generation", "file name and body disagree", source=source)
        if man.session_id != path.parent.name:
            raise CorruptManifest("session_id", "directory and body disagree", source=source)
        return man

    # -- capture (caller thread) ------------------------------------------------------------

    def _scope(self, session_id: str) -> str:
        return f"session:{session_id}" if self.dedup == "session" else ""

    def plan_capture(
        self,
        ctx: Context,
        seq_id: int,
        tokens: Sequence[int],
        *,
        scratch_seq: int,
        session_id: str,
        journal_seq: int,
        meta: dict[str, Any] | None = None,
        lineage: Lineage = (),
    ) -> PendingCheckpoint:
        """CALLER THREAD: copy out the chunks of ``seq_id`` that the store does not hold yet.

        ``tokens`` are the ids of the sequence's cells in position order (positions
        ``pos_min .. pos_min + len(tokens) - 1``); ``lineage`` describes window shifts
        (:func:`shift_lineage`). Only new chunks and the tail are copied, through
        ``scratch_seq`` (which must be empty and is left empty); nothing is compressed or
        written, and no file is touched. Pass the result to :meth:`commit` (any thread), or to
        :meth:`discard` if it will not be committed.
        """
        self._require_writable()
        validate_session_id(session_id)
        mem = ctx.memory
        if not ctx.kv_unified:
            raise ChunkStoreError("chunked checkpoints need a unified KV cache (kv_unified=True)")
        if scratch_seq == seq_id:
            raise ValueError("scratch_seq must differ from seq_id")
        if mem.pos_max(scratch_seq) != -1:
            raise ValueError(f"scratch seq {scratch_seq} is not empty")
        tok = tuple(int(t) for t in tokens)
        pos_min, pos_max = mem.pos_min(seq_id), mem.pos_max(seq_id)
        n = len(tok)
        if (pos_max - pos_min + 1 if pos_max >= 0 else 0) != n:
            raise ValueError(
                f"seq {seq_id} holds positions [{pos_min}, {pos_max}], not {n} tokens: pass "
                "the ids of its cells in position order"
            )
        pos_min = max(pos_min, 0)
        identity = snapshot_mod.identity_of(ctx)
        scope = self._scope(session_id)
        keys = chunk_keys(
            identity, tok, pos_min, chunk_tokens=self.chunk_tokens, lineage=lineage, scope=scope
        )
        with self._lock:
            durable = {key: self._chunks.get(key) for key, _, _ in keys}
            pin = self._next_pin
            self._next_pin += 1
            self._pins[pin] = frozenset(key for key, _, _ in keys)
        pending: list[PendingChunk] = []
        try:
            for key, start, end in keys:
                known = durable[key]
                p0 = pos_min + start
                if known is not None:
                    pending.append(PendingChunk(key, start, end, p0, None, *known))
                    continue
                mem.seq_cp(seq_id, scratch_seq, p0, pos_min + end)
                try:
                    raw = ctx.seq_state_get(scratch_seq)
                finally:
                    mem.seq_rm(scratch_seq, -1, -1)
                pending.append(PendingChunk(key, start, end, p0, raw, int(raw.size)))
        except BaseException:
            self._unpin(pin)
            raise
        return PendingCheckpoint(
            session_id=session_id,
            journal_seq=journal_seq,
            identity=identity,
            n_ctx=ctx.n_ctx,
            chunk_tokens=self.chunk_tokens,
            pos_min=pos_min,
            tokens=tok,
            chunks=pending,
            lineage=tuple(lineage),
            scope=scope,
            meta=dict(meta or {}),
            created_ns=time.time_ns(),
            pin_id=pin,
        )

    def discard(self, pending: PendingCheckpoint) -> None:
        """Drop a planned checkpoint without committing it (releases its pins)."""
        pending.done = True
        self._unpin(pending.pin_id)

    def _unpin(self, pin: int) -> None:
        with self._lock:
            self._pins.pop(pin, None)

    # -- commit (any thread) ----------------------------------------------------------------

    def commit(self, pending: PendingCheckpoint) -> Manifest:
        """ANY THREAD: write the new chunks, then the manifest, then collect garbage.

        Each new chunk is compressed and published atomically (temp file, fsync, rename, fsync
        of the directory); the manifest is written the same way only after every chunk it
        names is durable; old manifests beyond ``keep`` and chunks no manifest references are
        deleted only after that. Never touches a llama.cpp context. On any error nothing that
        an existing manifest references is touched, and :class:`OSError` propagates.
        """
        self._require_writable()
        if pending.done:
            raise ChunkStoreError("this checkpoint was already committed or discarded")
        try:
            with self._commit_lock:
                refs = [self._write_chunk(pending, c) for c in pending.chunks]
                return self._publish(pending, refs)
        finally:
            pending.done = True
            self._unpin(pending.pin_id)

    def _write_chunk(self, pending: PendingCheckpoint, chunk: PendingChunk) -> ChunkRef:
        path = self.chunk_path(chunk.key)
        if chunk.raw is None:
            with self._lock:
                known = self._chunks.get(chunk.key)
            if known is None or not path.is_file():
                raise MissingChunk(chunk.key, "vanished before the checkpoint was committed")
            return ChunkRef(chunk.key, chunk.start, chunk.end, *known)
        with self._lock:
            known = self._chunks.get(chunk.key)
        if known is not None and path.is_file():  # written by another checkpoint meanwhile
            return ChunkRef(chunk.key, chunk.start, chunk.end, *known)
        n = chunk.end - chunk.start
        snap = snapshot_mod.encode(
            chunk.raw,
            identity=pending.identity,
            tokens=pending.tokens[chunk.start : chunk.end],
            seq_id=0,
            pos_min=chunk.pos0,
            pos_max=chunk.pos0 + n - 1,
            n_ctx=pending.n_ctx,
            snapshot_id=chunk.key,
            codec=self.codec,
        )
        ensure_dir(path.parent)
        size = snapshot_mod.write(path, snap)
        with self._lock:
            self._chunks[chunk.key] = (snap.header.raw_size, size)
            self._counters["written_bytes"] += size
            self._counters["written_files"] += 1
        chunk.raw = None  # the copy is on disk now; let it go
        return ChunkRef(chunk.key, chunk.start, chunk.end, snap.header.raw_size, size)

    def _publish(self, pending: PendingCheckpoint, refs: list[ChunkRef]) -> Manifest:
        session = pending.session_id
        directory = ensure_dir(self._session_manifest_dir(session))
        with self._lock:
            gens = self._refs.get(session, {})
            generation = max(gens, default=0) + 1
        tail = refs[-1] if refs and refs[-1].end - refs[-1].start < pending.chunk_tokens else None
        man = Manifest(
            session_id=session,
            generation=generation,
            journal_seq=pending.journal_seq,
            identity=pending.identity,
            chunk_tokens=pending.chunk_tokens,
            pos_min=pending.pos_min,
            tokens=pending.tokens,
            chunks=tuple(refs[:-1] if tail else refs),
            tail=tail,
            lineage=pending.lineage,
            scope=pending.scope,
            created_ns=pending.created_ns,
            meta=pending.meta,
        )
        data = man.to_bytes()
        atomic_write_bytes(directory / f"{generation:012d}{MANIFEST_SUFFIX}", data)
        with self._lock:
            self._refs.setdefault(session, {})[generation] = man.keys
            self._counters["written_bytes"] += len(data)
            self._counters["written_files"] += 1
        logger.debug(
            "session %s: manifest %d, %d chunks (%d new)",
            session,
            generation,
            len(refs),
            pending.new_chunks,
        )
        self._prune_manifests(session)
        self.collect_garbage()
        return man

    def _prune_manifests(self, session_id: str) -> None:
        directory = self._session_manifest_dir(session_id)
        removed = False
        for generation, path in self._generations(session_id)[self.keep :]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed = True
            with self._lock:
                self._refs.get(session_id, {}).pop(generation, None)
        if removed:
            fsync_dir(directory)

    def _live_keys(self) -> set[str]:
        live: set[str] = set()
        for gens in self._refs.values():
            for keys in gens.values():
                live |= keys
        for keys in self._pins.values():
            live |= keys
        return live

    def collect_garbage(self) -> list[str]:
        """Delete chunk files that no manifest on disk and no pending checkpoint references.

        Only ever called after a manifest switch is durable, so a crash at any point leaves
        every chunk a manifest names in place (at worst, orphans that the next call removes).
        """
        self._require_writable()
        removed: list[str] = []
        dirs: set[Path] = set()
        with self._lock:  # held across the unlinks: a plan must not see a chunk being deleted
            live = self._live_keys()
            for key in [k for k in self._chunks if k not in live]:
                path = self.chunk_path(key)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                dirs.add(path.parent)
                del self._chunks[key]
                removed.append(key)
            self._counters["gc_files"] += len(removed)
        for directory in dirs:
            fsync_dir(directory)
        return removed

    # -- reading ----------------------------------------------------------------------------

    def manifests(self, session_id: str) -> list[Manifest]:
        """The session's readable manifests, newest first (damaged ones are quarantined)."""
        out = []
        for _, path in self._generations(session_id):
            try:
                out.append(self._read_manifest(path))
            except CorruptManifest as exc:
                logger.warning("skipping damaged manifest: %s", exc)
                if not self.readonly and not self._closed:
                    self._quarantine_manifest(path, f"{exc.field}: {exc}")
            except FileNotFoundError:
                continue
        return out

    def latest(self, session_id: str) -> Manifest | None:
        """The session's newest readable manifest (its chunks are checked at restore)."""
        found = self.manifests(session_id)
        return found[0] if found else None

    def _quarantine_manifest(self, path: Path, reason: str) -> None:
        qdir = ensure_dir(path.parent / "quarantine")
        target = qdir / f"{path.name}.{time.time_ns()}"
        os.replace(path, target)
        atomic_write_bytes(target.with_name(target.name + ".reason"), f"{reason}\n".encode())
        fsync_dir(path.parent)
        match = _GEN_RE.fullmatch(path.name)
        with self._lock:
            if match:
                # keep the generation number reserved so a new manifest never reuses it
                self._refs.setdefault(path.parent.name, {})[int(match.group(1))] = frozenset()

    def _quarantine_chunk(self, key: str, reason: str) -> None:
        if self.readonly or self._closed:
            return
        path = self.chunk_path(key)
        qdir = ensure_dir(self.root / "quarantine")
        with self._lock:
            self._chunks.pop(key, None)  # the next checkpoint copies it again
            try:
                os.replace(path, qdir / f"{path.name}.{time.time_ns()}")
            except FileNotFoundError:
                return
        atomic_write_bytes(qdir / f"{key}.reason", f"{reason}\n".encode())
        fsync_dir(path.parent)

    # -- restore (caller thread) ------------------------------------------------------------

    def _load_chunk(self, manifest: Manifest, ref: ChunkRef) -> npt.NDArray[np.uint8]:
        """Read, verify and decode one chunk (on a worker thread; never touches a context)."""
        path = self.chunk_path(ref.key)
        try:
            # lives only for this call; the digests are checked frame by frame by decode_into
            snap = snapshot_mod.read(path, mapped=True, defer_digests=True)
        except FileNotFoundError:
            raise MissingChunk(ref.key, f"{path} does not exist") from None
        except (CorruptSnapshot, UnsupportedVersion) as exc:
            raise CorruptChunk(ref.key, getattr(exc, "field", "version"), str(exc)) from None
        h = snap.header
        n = ref.end - ref.start
        expect_pos = (manifest.pos_min + ref.start, manifest.pos_min + ref.end - 1)
        if h.snapshot_id != ref.key:
            raise CorruptChunk(ref.key, "snapshot_id", f"file holds chunk {h.snapshot_id!r}")
        if h.identity != manifest.identity:
            raise CorruptChunk(ref.key, "identity", "cache identity differs from the manifest")
        if (h.pos_min, h.pos_max) != expect_pos or h.n_tokens != n:
            raise CorruptChunk(
                ref.key, "pos_range", f"holds {(h.pos_min, h.pos_max)}, expected {expect_pos}"
            )
        if h.tokens != manifest.tokens[ref.start : ref.end]:
            raise CorruptChunk(ref.key, "tokens", "token ids differ from the manifest's")
        if h.raw_size != ref.raw_size:
            raise CorruptChunk(ref.key, "raw_size", f"{h.raw_size} != {ref.raw_size}")
        out = np.empty(h.raw_size, dtype=np.uint8)
        try:
            snapshot_mod.decode_into(snap, out, threads=1, source=os.fspath(path))
        except CorruptSnapshot as exc:
            raise CorruptChunk(ref.key, exc.field, str(exc)) from None
        return out

    def restore(
        self,
        ctx: Context,
        manifest: Manifest,
        seq_id: int,
        *,
        scratch_seq: int,
        allow_build_mismatch: bool = False,
    ) -> list[int]:
        """CALLER THREAD: rebuild ``seq_id`` from ``manifest``; return its token ids.

        ``seq_id`` is emptied first. Chunks are read through a memory map, checked (identity,
        positions and token ids against the manifest; the xxh3-128 of each frame just before
        zstd decodes it straight into the chunk's buffer; zstd's content checksums where the
        frames have them) and handed to llama.cpp one by one: ``seq_state_set(chunk,
        scratch)``, ``seq_cp(scratch, seq_id)``, ``seq_rm(scratch)``. With ``threads > 1``
        worker threads decode up to ``threads + 1`` chunks ahead of this thread. No byte
        reaches llama.cpp before it is verified.

        Raises :class:`snapshot.IncompatibleSnapshot` (nothing touched) for another model or
        cache layout; :class:`MissingChunk` / :class:`CorruptChunk` (damaged chunks are
        quarantined) or :class:`snapshot.RestoreError` otherwise, with ``seq_id`` and
        ``scratch_seq`` left empty. The caller then tries an older manifest or the journal.
        """
        mem = ctx.memory
        if scratch_seq == seq_id:
            raise ValueError("scratch_seq must differ from seq_id")
        if not ctx.kv_unified:
            raise ChunkStoreError("chunked checkpoints need a unified KV cache (kv_unified=True)")
        target = snapshot_mod.identity_of(ctx)
        diffs = manifest.identity.differences(target, allow_build_mismatch=allow_build_mismatch)
        if diffs:
            raise snapshot_mod.IncompatibleSnapshot(diffs)
        if mem.pos_max(scratch_seq) != -1:
            raise ValueError(f"scratch seq {scratch_seq} is not empty")
        mem.seq_rm(seq_id, -1, -1)
        refs = manifest.refs
        try:
            self._restore_refs(ctx, manifest, refs, seq_id, scratch_seq)
            got = (mem.pos_min(seq_id), mem.pos_max(seq_id))
            expect = (-1, -1)
            if refs:
                expect = (manifest.pos_min, manifest.pos_min + manifest.n_tokens - 1)
            if got != expect:
                raise snapshot_mod.RestoreError(
                    f"restored seq {seq_id} holds positions {got}, manifest says {expect}"
                )
        except BaseException as exc:
            # llama.cpp #27068: a failed restore can leave cells behind; empty both seqs.
            for seq in (scratch_seq, seq_id):
                with contextlib.suppress(Exception):
                    mem.seq_rm(seq, -1, -1)
            if isinstance(exc, CorruptChunk):
                self._quarantine_chunk(exc.key, str(exc))
            if isinstance(exc, Exception) and not isinstance(exc, MemoryRuntimeError):
                raise snapshot_mod.RestoreError(f"llama.cpp refused a chunk: {exc}") from exc
            raise
        logger.debug(
            "restored session %s manifest %d into seq %d (%d chunks)",
            manifest.session_id,
            manifest.generation,
            seq_id,
            len(refs),
        )
        return list(manifest.tokens)

    def _restore_refs(
        self,
        ctx: Context,
        manifest: Manifest,
        refs: Sequence[ChunkRef],
        seq_id: int,
        scratch_seq: int,
    ) -> None:
        mem = ctx.memory
        if len(refs) <= 1 or self.threads == 1:
            for ref in refs:
                self._set_chunk(ctx, self._load_chunk(manifest, ref), seq_id, scratch_seq)
            return
        with self._lock:
            if self._pool is None:  # one pool per store: starting threads per restore shows
                self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, "kvchunk")
            pool = self._pool
        # Decoding runs ``ahead`` chunks in front of this thread, which only hands finished
        # chunks to llama.cpp (a ctypes call, so the GIL is free for the workers meanwhile).
        ahead = self.threads + 1
        futures = collections.deque(
            pool.submit(self._load_chunk, manifest, ref) for ref in refs[:ahead]
        )
        try:
            for i in range(len(refs)):
                raw = futures.popleft().result()
                if i + ahead < len(refs):
                    futures.append(pool.submit(self._load_chunk, manifest, refs[i + ahead]))
                self._set_chunk(ctx, raw, seq_id, scratch_seq)
        finally:
            for pending in futures:
                if not pending.cancel():
                    with contextlib.suppress(Exception):
                        pending.result()  # let a running decode finish before we return
        del mem

    @staticmethod
    def _set_chunk(ctx: Context, raw: npt.NDArray[np.uint8], seq_id: int, scratch: int) -> None:
        ctx.seq_state_set(raw, scratch)
        ctx.memory.seq_cp(scratch, seq_id, -1, -1)
        ctx.memory.seq_rm(scratch, -1, -1)

    def restore_latest(
        self,
        ctx: Context,
        session_id: str,
        seq_id: int,
        *,
        scratch_seq: int,
        allow_build_mismatch: bool = False,
    ) -> Manifest | None:
        """Restore the newest manifest that restores, falling back to older ones on a
        missing or damaged chunk; None (``seq_id`` empty) when none does."""
        for man in self.manifests(session_id):
            try:
                self.restore(
                    ctx,
                    man,
                    seq_id,
                    scratch_seq=scratch_seq,
                    allow_build_mismatch=allow_build_mismatch,
                )
            except ChunkError as exc:
                logger.warning(
                    "session %s: manifest %d does not restore (%s); trying an older one",
                    session_id,
                    man.generation,
                    exc,
                )
                continue
            return man
        return None

    # -- maintenance ------------------------------------------------------------------------

    def delete_session(self, session_id: str) -> None:
        """Delete the session's manifests, then the chunks nothing else references."""
        self._require_writable()
        directory = self._session_manifest_dir(session_id)
        with self._commit_lock:
            if directory.is_dir():
                for path in sorted(directory.rglob("*"), reverse=True):
                    if path.is_dir():
                        path.rmdir()
                    else:
                        path.unlink()
                directory.rmdir()
                fsync_dir(self.manifest_dir)
            with self._lock:
                self._refs.pop(session_id, None)
            self.collect_garbage()

    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check every manifest, every chunk and every reference (works read-only).

        ``deep`` decompresses every chunk (zstd checksums) rather than checking headers and
        digests only. Orphans (chunks no manifest names) are listed, not treated as damage.
        """
        report = VerifyReport()
        referenced: dict[str, list[str]] = {}
        for session in self.sessions():
            for _, path in self._generations(session):
                report.manifests += 1
                try:
                    man = self._read_manifest(path)
                except (CorruptManifest, OSError) as exc:
                    report.damaged_manifests.append((os.fspath(path), str(exc)))
                    continue
                for key in man.keys:
                    referenced.setdefault(key, []).append(os.fspath(path))
        on_disk: set[str] = set()
        for key, path in self._iter_chunk_files():
            report.chunks += 1
            on_disk.add(key)
            try:
                header = snapshot_mod.verify(path) if deep else snapshot_mod.read(path).header
            except (CorruptSnapshot, UnsupportedVersion, OSError) as exc:
                report.damaged_chunks.append((key, str(exc)))
                continue
            if header.snapshot_id != key:
                report.damaged_chunks.append((key, f"file holds chunk {header.snapshot_id!r}"))
        for key, users in sorted(referenced.items()):
            if key not in on_disk:
                report.missing.extend((user, key) for user in users)
        report.orphans = sorted(on_disk - set(referenced))
        return report

    def stats(self) -> dict[str, int]:
        """Bytes on disk, logical bytes of every session's newest manifest, dedup savings.

        ``chunk_bytes``: chunk files on disk; ``logical_bytes``: the sum over sessions of
        their newest manifest's chunk file sizes (what separate snapshots would store);
        ``dedup_saved_bytes``: the newest manifests' bytes that shared chunks save;
        ``written_bytes``/``written_files``/``gc_files``: counters since open.
        """
        with self._lock:
            chunk_bytes = sum(size for _, size in self._chunks.values())
            sizes = {k: size for k, (_, size) in self._chunks.items()}
            newest = [gens[max(gens)] for gens in self._refs.values() if gens]
            counters = dict(self._counters)
            n_chunks = len(self._chunks)
        logical = sum(sizes.get(k, 0) for keys in newest for k in keys)
        unique = set().union(*newest) if newest else set()
        unique_bytes = sum(sizes.get(k, 0) for k in unique)
        return {
            "chunks": n_chunks,
            "chunk_bytes": chunk_bytes,
            "sessions": len(newest),
            "logical_bytes": logical,
            "dedup_saved_bytes": logical - unique_bytes,
            **counters,
        }
