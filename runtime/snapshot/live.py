"""Snapshots against a live llama.cpp context: capture, restore, the per-context facts
(identity, state-size bound). The only module of the package that touches ``llamaffi``."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from runtime.errors import (
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    MemoryRuntimeError,
    RestoreError,
)
from runtime.snapshot.codec import DEFAULT_CODEC, Codec, decode, encode
from runtime.snapshot.container import Snapshot
from runtime.snapshot.format import SnapshotHeader, StateKind
from runtime.snapshot.identity import CacheIdentity
from runtime.snapshot.io import read

if TYPE_CHECKING:
    from llamaffi import Context

from runtime.errors import ArgumentError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Per-context facts: computed once per context, never per call
# --------------------------------------------------------------------------------------------

_facts_lock = threading.Lock()
_state_bounds: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

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


def identity_of(ctx: Context) -> CacheIdentity:
    """The :class:`CacheIdentity` of ``ctx``, computed on first use and cached per context."""
    return CacheIdentity.from_context(ctx)


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
    """Refuse (:class:`CorruptSnapshotError`, field ``raw_size``) a header claiming more than
    ``bound`` bytes of state (see :func:`max_state_size`): checked before any allocation."""
    if header.raw_size > bound:
        raise CorruptSnapshotError(
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
        raise ArgumentError(f"seq_id {seq_id} out of range [-1, {ctx.n_seq_max})")


def seq_positions(ctx: Context, seq_id: int) -> tuple[int, int]:
    """``(pos_min, pos_max)`` of a sequence as a header records them: ``(-1, -1)`` for an
    empty sequence or a whole-context state (which has no single range)."""
    if seq_id < 0:
        return -1, -1
    pos_min, pos_max = ctx.memory.pos_min(seq_id), ctx.memory.pos_max(seq_id)
    if pos_min < 0 or pos_max < 0:
        return -1, -1
    return pos_min, pos_max


@dataclass(frozen=True, eq=False)
class StateCopy:
    """A sequence's state copied out of a context, not yet encoded: the first phase of a
    capture. Taking it is the only step that touches the context (one memcpy-speed copy);
    :meth:`encode` compresses and checksums it on any thread, after the context moved on."""

    raw: npt.NDArray[np.uint8]
    identity: CacheIdentity
    tokens: tuple[int, ...]
    seq_id: int
    pos_min: int
    pos_max: int
    n_ctx: int

    def encode(
        self,
        *,
        session_id: str = "",
        parent_id: str = "",
        snapshot_id: str | None = None,
        codec: Codec = DEFAULT_CODEC,
        journal_seq: int | None = None,
    ) -> Snapshot:
        """The second phase: compress the copy into a :class:`Snapshot` (never touches a
        context). ``journal_seq`` records the journal entry the state follows (version 2)."""
        snap = encode(
            self.raw,
            identity=self.identity,
            tokens=self.tokens,
            seq_id=self.seq_id,
            pos_min=self.pos_min,
            pos_max=self.pos_max,
            n_ctx=self.n_ctx,
            session_id=session_id,
            snapshot_id=snapshot_id,
            parent_id=parent_id,
            codec=codec,
            journal_seq=journal_seq,
        )
        logger.debug(
            "encoded seq %d: %d raw -> %d compressed bytes",
            self.seq_id,
            snap.header.raw_size,
            snap.header.compressed_size,
        )
        return snap


def copy_state(
    ctx: Context, seq_id: int, tokens: Sequence[int] | npt.NDArray[np.integer[Any]]
) -> StateCopy:
    """Copy sequence ``seq_id`` of ``ctx`` out now, with what its header will need (the
    context's thread); encode it later with :meth:`StateCopy.encode` (any thread)."""
    _check_live_seq(ctx, seq_id)
    pos_min, pos_max = seq_positions(ctx, seq_id)
    return StateCopy(
        raw=ctx.seq_state_get(seq_id),
        identity=identity_of(ctx),
        tokens=tuple(int(t) for t in tokens),
        seq_id=seq_id,
        pos_min=pos_min,
        pos_max=pos_max,
        n_ctx=ctx.n_ctx,
    )


def capture(
    ctx: Context,
    seq_id: int,
    tokens: Sequence[int] | npt.NDArray[np.integer[Any]],
    *,
    session_id: str = "",
    parent_id: str = "",
    snapshot_id: str | None = None,
    codec: Codec = DEFAULT_CODEC,
    journal_seq: int | None = None,
) -> Snapshot:
    """Snapshot sequence ``seq_id`` of ``ctx`` together with its token ids (both phases at
    once: :func:`copy_state`, then :meth:`StateCopy.encode`).

    ``tokens`` are stored in the header so that the snapshot alone is enough to re-prefill.
    ``snapshot_id`` defaults to a random id; callers may put their own meaning in it.
    ``journal_seq`` records the journal entry the state follows (format version 2).
    """
    return copy_state(ctx, seq_id, tokens).encode(
        session_id=session_id,
        parent_id=parent_id,
        snapshot_id=snapshot_id,
        codec=codec,
        journal_seq=journal_seq,
    )


def check_compatible(
    ctx: Context, snapshot: Snapshot | SnapshotHeader, *, allow_build_mismatch: bool = False
) -> None:
    """Raise :class:`IncompatibleSnapshotError` unless ``snapshot`` fits ``ctx``.

    Compared: llama.cpp build number (unless ``allow_build_mismatch``), model fingerprint,
    geometry, ``type_k``/``type_v``, flash-attention (the V layout), ``kv_unified`` and, for a
    non-unified cache, ``n_seq_max``.
    """
    header = snapshot.header if isinstance(snapshot, Snapshot) else snapshot
    target = identity_of(ctx)
    diffs = header.identity.differences(target, allow_build_mismatch=allow_build_mismatch)
    if diffs:
        raise IncompatibleSnapshotError(diffs)


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

    Compatibility is checked first (:class:`IncompatibleSnapshotError`, nothing touched). A
    llama.cpp build other than this one is refused unless ``allow_build_mismatch=True``: the
    blob format may change between builds. If the restore fails after the sequence was
    touched, the sequence is cleared (never half-filled) and :class:`RestoreError` is raised.
    """
    header = snapshot.header
    target = header.seq_id if seq_id is None else seq_id
    if header.kind is StateKind.CONTEXT and target != -1:
        raise IncompatibleSnapshotError([("kind", "context", f"seq {target}")])
    if header.kind is StateKind.SEQUENCE and target == -1:
        raise IncompatibleSnapshotError([("kind", "sequence", "context")])
    _check_live_seq(ctx, target)
    check_compatible(ctx, header, allow_build_mismatch=allow_build_mismatch)
    # Bound before allocating: a header with a valid checksum can still claim 1 TiB.
    check_raw_size(header, max_state_size(ctx))
    raw = decode(snapshot, threads=threads)
    try:
        # llama.cpp #27068: a failed restore can leave cells behind; llamaffi's
        # seq_state_set clears the sequence itself when llama.cpp refuses the blob
        ctx.seq_state_set(raw, target)
    except MemoryRuntimeError:
        raise
    except Exception as exc:
        raise RestoreError(f"llama.cpp refused the snapshot: {exc}") from exc
    got = seq_positions(ctx, target)
    if got != (header.pos_min, header.pos_max):
        _clear(ctx, target)  # llama.cpp took it, but not as the header says: never keep it
        raise RestoreError(
            f"restored seq {target} holds positions {got}, snapshot says "
            f"{(header.pos_min, header.pos_max)}"
        )
    logger.debug("restored snapshot %s into seq %d", header.snapshot_id, target)


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
