"""Chunk keys: a hash chain over the cache identity, token ids and positions, and the
lineage that window shifts add to it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import ArgumentError
from runtime.snapshot import CacheIdentity

#: Tokens per chunk unless the store is opened with another ``chunk_tokens`` (LMCache's size).
DEFAULT_CHUNK_TOKENS = 256
#: Key length in bytes (BLAKE2b-128, 32 hex digits in file names).
KEY_BYTES = 16

#: What a chunk key looks like (the blob stores check names against it).
KEY_RE = re.compile(r"[0-9a-f]{32}")
_CHUNK_STEP = struct.Struct("<qqq")  # token index start, end, first position
_TOKEN_DTYPE = np.dtype("<i4")

#: ``((start_index, digest_hex), ...)``: what, beyond token ids and positions, the KV of the
#: tokens from ``start_index`` on depends on (see :func:`shift_lineage`). Empty: nothing, the
#: state is what decoding ``tokens`` at their positions gives.
Lineage = tuple[tuple[int, str], ...]


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
        raise ArgumentError("keep must be >= 0")
    h = hashlib.blake2b(b"shift/1\0", digest_size=KEY_BYTES)
    for at, digest in lineage:
        h.update(_CHUNK_STEP.pack(at, 0, 0) + bytes.fromhex(digest))
    h.update(_CHUNK_STEP.pack(keep, len(discarded), 0))
    h.update(np.ascontiguousarray(discarded, dtype=_TOKEN_DTYPE).tobytes())
    kept = tuple((at, d) for at, d in lineage if at < keep)
    return (*kept, (keep, h.hexdigest()))
