"""The sequence-state layout of the pinned llama.cpp: the one module that knows it.

``llama_state_seq_get_data`` of a unified KV cache (one stream, no cell extension) writes, all
little-endian (``llama_context::state_seq_get_data`` and ``llama_kv_cache::state_write``)::

    u32 magic (0xaf143cd8)   i32 seq_id   u32 n_stream (1)   u32 cell_count
    cell_count x (i32 pos, u32 n_seq_id (1), i32 seq_id)          in cell order
    u32 v_trans   u32 n_layer
    n_layer x (i32 k_type, u64 k_row, cell_count x k_row bytes)
    v_trans = 0: n_layer x (i32 v_type, u64 v_row, cell_count x v_row bytes)
    v_trans = 1: n_layer x (i32 v_type, u32 v_el, u32 n_embd_v,
                            n_embd_v x (cell_count x v_el bytes))

:func:`parse` checks a blob against that layout down to its last byte; :func:`slice_ranges`
cuts one blob into the blobs llama.cpp would give for position ranges of it (what
``seq_cp(src, tmp, p0, p1); seq_state_get(tmp)`` returns, byte for byte, copied lazily by
:class:`StateSlice`), so a first checkpoint takes one ``seq_state_get`` instead of one scratch
round trip per chunk. Anything else (several streams, a cell extension for M-RoPE or n-gram
models, recurrent or hybrid memory, a layer without V) raises :class:`LayoutError`, and the
caller falls back to the scratch-sequence path.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: ``io_magic`` of llama-context.cpp: the first word of every sequence state.
SEQ_STATE_MAGIC = 0xAF143CD8
_HEAD = struct.Struct("<IiII")  # magic, seq_id, n_stream, cell_count
_CELL_BYTES = 12  # pos, n_seq_id, seq_id
_DATA_HEAD = struct.Struct("<II")  # v_trans, n_layer
_ROW_HEAD = struct.Struct("<iQ")  # type, row size
_TRANS_HEAD = struct.Struct("<iII")  # type, element size, n_embd_v


class LayoutError(ValueError):
    """A sequence state this module does not understand (the caller uses the scratch path)."""


@dataclass(frozen=True)
class Section:
    """One layer's K or V block: its header bytes at ``head``, its data at ``data``.

    ``rows`` x ``row`` bytes, where a row is one cell's (K, or V untransposed) or one V
    channel's ``cells x el`` elements (V transposed)."""

    head: int
    head_len: int
    data: int
    rows: int
    row: int


@dataclass(frozen=True)
class SeqStateLayout:
    """Where everything sits in one sequence state (see the module docstring)."""

    size: int
    n_cells: int
    positions: npt.NDArray[np.int32]  #: per cell, in blob (cell) order
    v_trans: bool
    n_layer: int
    k: tuple[Section, ...]
    v: tuple[Section, ...]
    v_el: int  #: element size of transposed V (0 otherwise)


def parse(blob: npt.NDArray[np.uint8]) -> SeqStateLayout:
    """The layout of ``blob`` (a single-sequence state); :class:`LayoutError` if unknown."""
    size = int(blob.size)
    buf = memoryview(blob.data).cast("B")
    if size < _HEAD.size:
        raise LayoutError(f"{size} bytes: shorter than a sequence state's head")
    magic, _seq, n_stream, cells = _HEAD.unpack_from(buf, 0)
    if magic != SEQ_STATE_MAGIC:
        raise LayoutError(f"magic {magic:#x}: not a sequence state of this llama.cpp")
    if n_stream != 1:
        raise LayoutError(f"{n_stream} KV streams (only a unified cache is understood)")
    if cells == 0:
        if size != _HEAD.size:
            raise LayoutError("an empty state with trailing bytes (recurrent or hybrid memory?)")
        empty = np.empty(0, dtype=np.int32)
        return SeqStateLayout(size, 0, empty, False, 0, (), (), 0)
    off = _HEAD.size
    if off + cells * _CELL_BYTES + _DATA_HEAD.size > size:
        raise LayoutError("cell metadata runs past the end")
    meta = np.frombuffer(blob, dtype="<i4", count=cells * 3, offset=off).reshape(cells, 3)
    if not np.all(meta[:, 1] == 1):
        raise LayoutError("cells with other than one seq id (or a cell extension)")
    positions = meta[:, 0].astype(np.int32)
    off += cells * _CELL_BYTES
    v_trans, n_layer = _DATA_HEAD.unpack_from(buf, off)
    off += _DATA_HEAD.size
    if v_trans not in (0, 1) or not 0 < n_layer <= 4096:
        raise LayoutError(f"v_trans={v_trans}, n_layer={n_layer}: not a KV cache's data")
    k: list[Section] = []
    for _ in range(n_layer):
        off = _row_section(buf, off, size, cells, k)
    v: list[Section] = []
    v_el = 0
    for _ in range(n_layer):
        if v_trans:
            off, v_el = _trans_section(buf, off, size, cells, v, v_el)
        else:
            off = _row_section(buf, off, size, cells, v)
    if off != size:
        raise LayoutError(f"{size - off} bytes after the last layer (another memory type?)")
    return SeqStateLayout(size, cells, positions, bool(v_trans), n_layer, tuple(k), tuple(v), v_el)


def _row_section(buf: memoryview, off: int, size: int, cells: int, out: list[Section]) -> int:
    if off + _ROW_HEAD.size > size:
        raise LayoutError("a layer header runs past the end")
    _type, row = _ROW_HEAD.unpack_from(buf, off)
    row = int(row)
    data = off + _ROW_HEAD.size
    if row == 0 or data + cells * row > size:
        raise LayoutError(f"a layer of {cells} rows of {row} bytes runs past the end")
    out.append(Section(off, _ROW_HEAD.size, data, cells, row))
    return data + cells * row


def _trans_section(
    buf: memoryview, off: int, size: int, cells: int, out: list[Section], v_el: int
) -> tuple[int, int]:
    if off + _TRANS_HEAD.size > size:
        raise LayoutError("a V layer header runs past the end")
    _type, el, n_embd = (int(x) for x in _TRANS_HEAD.unpack_from(buf, off))
    data = off + _TRANS_HEAD.size
    if el == 0 or n_embd == 0 or (v_el and el != v_el) or data + n_embd * cells * el > size:
        raise LayoutError(f"a transposed V layer of {n_embd} x {cells} x {el} does not fit")
    out.append(Section(off, _TRANS_HEAD.size, data, n_embd, cells * el))
    return data + n_embd * cells * el, el


def _head(seq_id: int, cells: int) -> bytes:
    return _HEAD.pack(SEQ_STATE_MAGIC, seq_id, 1, cells)


def _sections(lay: SeqStateLayout) -> list[tuple[Section, bool]]:
    """Every data section in blob order, with whether its rows are cells (else V channels)."""
    return [(s, True) for s in lay.k] + [(s, not lay.v_trans) for s in lay.v]


def slice_ranges(
    blob: npt.NDArray[np.uint8],
    lay: SeqStateLayout,
    ranges: Sequence[tuple[int, int]],
    *,
    seq_id: int,
) -> list[StateSlice]:
    """For each position range ``[p0, p1)``, the state of just those cells, as llama.cpp
    writes it for a sequence ``seq_id`` holding them (cells keep their blob order), cut
    lazily: a :class:`StateSlice` copies its bytes out of ``blob`` when asked.

    :class:`LayoutError` when a range holds no cell."""
    out = []
    for p0, p1 in ranges:
        sel = np.flatnonzero((lay.positions >= p0) & (lay.positions < p1))
        if sel.size == 0:
            raise LayoutError(f"no cell holds a position in [{p0}, {p1})")
        out.append(StateSlice(blob, lay, sel, seq_id))
    return out


class StateSlice:
    """The state of some cells of ``blob`` (see :func:`slice_ranges`), not copied yet:
    :meth:`copy_into` writes it into a caller's buffer (a writer's reused scratch), so a
    first checkpoint holds the one state of the sequence rather than a second copy of it."""

    def __init__(
        self,
        blob: npt.NDArray[np.uint8],
        lay: SeqStateLayout,
        sel: npt.NDArray[np.intp],
        seq_id: int,
    ) -> None:
        self.blob, self.lay, self.seq_id = blob, lay, seq_id
        n = self.n_cells = int(sel.size)
        a, b = int(sel[0]), int(sel[-1]) + 1
        self.take: slice | npt.NDArray[np.intp] = slice(a, b) if b - a == n else sel
        size = _HEAD.size + n * _CELL_BYTES + _DATA_HEAD.size
        for s, by_cell in _sections(lay):
            size += s.head_len + (n * s.row if by_cell else s.rows * n * lay.v_el)
        self.size = size

    def materialize(self) -> npt.NDArray[np.uint8]:
        """The slice as a new array."""
        return self.copy_into(np.empty(self.size, dtype=np.uint8))

    def copy_into(self, out: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """Write the slice into ``out`` (exactly :attr:`size` bytes); return ``out``."""
        if out.size != self.size:
            raise LayoutError(f"a slice of {self.size} bytes into a buffer of {out.size}")
        blob, lay, n, take, seq_id = self.blob, self.lay, self.n_cells, self.take, self.seq_id
        out[: _HEAD.size] = np.frombuffer(_head(seq_id, n), dtype=np.uint8)
        off = _HEAD.size
        meta = np.frombuffer(blob, dtype="<i4", count=lay.n_cells * 3, offset=_HEAD.size)
        cells = out[off : off + n * _CELL_BYTES].view("<i4").reshape(n, 3)
        cells[:] = meta.reshape(lay.n_cells, 3)[take]
        cells[:, 2] = seq_id
        off += n * _CELL_BYTES
        data_head = _HEAD.size + lay.n_cells * _CELL_BYTES
        out[off : off + _DATA_HEAD.size] = blob[data_head : data_head + _DATA_HEAD.size]
        off += _DATA_HEAD.size
        for s, by_cell in _sections(lay):
            out[off : off + s.head_len] = blob[s.head : s.head + s.head_len]
            off += s.head_len
            src = blob[s.data : s.data + s.rows * s.row]
            part: npt.NDArray[np.uint8]
            dst: npt.NDArray[np.uint8]
            if by_cell:
                part = src.reshape(s.rows, s.row)[take]
                dst = out[off : off + n * s.row].reshape(n, s.row)
            else:  # V transposed: per channel, the selected cells' elements
                el = lay.v_el
                part = src.reshape(s.rows, lay.n_cells, el)[:, take, :]
                dst = out[off : off + s.rows * n * el].reshape(s.rows, n, el)
            dst[...] = part
            off += dst.size
        return out
