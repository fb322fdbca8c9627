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
:class:`StateSlice`), and :class:`JoinPlan` places such blobs in the one blob of their union
(:func:`assemble` joins decoded ones; a restore decodes chunks straight into it). Anything
else (several streams, a cell extension for M-RoPE or n-gram models, recurrent or hybrid
memory, a layer without V) raises :class:`LayoutError`, and the caller falls back to the
scratch-sequence path.
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


class JoinPlan:
    """Where every byte of a run of chunk states goes in the one state of their union.

    Built from the first chunk's layout (``template``) and every chunk's cell count, so the
    chunks can be decoded straight into their places in the joined buffer, in any order and
    on any thread: :meth:`pieces` gives chunk ``i``'s destinations in its own byte order (its
    headers go to a small per-chunk buffer instead, which :meth:`check` compares with the
    template's). :meth:`finish` writes the joined headers and the target seq id. Raises
    :class:`LayoutError` when a chunk cannot have the template's shape.
    """

    def __init__(self, template: SeqStateLayout, counts: Sequence[int]) -> None:
        if not counts or template.n_cells == 0 or counts[0] != template.n_cells:
            raise LayoutError("nothing to join, or the template is not the first chunk")
        if any(c <= 0 for c in counts):
            raise LayoutError("a chunk without cells")
        self.template = template
        self.counts = tuple(int(c) for c in counts)
        self.starts = tuple(int(x) for x in np.cumsum((0, *self.counts[:-1])))
        self.n_cells = sum(self.counts)
        self._sections = _sections(template)
        if not template.v_trans:
            self._per_cell = sum(s.row for s, _ in self._sections)
        else:
            self._per_cell = sum(s.row for s in template.k) + sum(s.rows for s in template.v) * (
                template.v_el
            )
        self._fixed = _HEAD.size + _DATA_HEAD.size + sum(s.head_len for s, _ in self._sections)
        #: header bytes of a chunk (its head, data head and section heads), in blob order
        self.head_bytes = self._fixed
        self.size = self.chunk_size(self.n_cells)
        offsets, off = [], _HEAD.size + self.n_cells * _CELL_BYTES + _DATA_HEAD.size
        for s, by_cell in self._sections:
            off += s.head_len
            offsets.append(off)
            off += self.n_cells * (s.row if by_cell else s.rows * template.v_el)
        self._data = tuple(offsets)

    def chunk_size(self, n_cells: int) -> int:
        """The size of a state of ``n_cells`` cells of the template's shape."""
        return self._fixed + n_cells * (_CELL_BYTES + self._per_cell)

    def pieces(
        self, out: npt.NDArray[np.uint8], i: int, heads: npt.NDArray[np.uint8]
    ) -> list[npt.NDArray[np.uint8]]:
        """Chunk ``i``'s destinations, in its byte order, covering :meth:`chunk_size` bytes:
        views of ``out`` (its cells and rows; a transposed V layer is a 2-D strided view of
        its channels) and of ``heads`` (``head_bytes``: its headers, for :meth:`check`)."""
        if out.size != self.size or heads.size != self.head_bytes:
            raise LayoutError("the joined or the head buffer has the wrong size")
        n, c = self.counts[i], self.starts[i]
        el = self.template.v_el
        meta = _HEAD.size + c * _CELL_BYTES
        h = _HEAD.size + _DATA_HEAD.size
        got = [heads[: _HEAD.size], out[meta : meta + n * _CELL_BYTES]]
        got.append(heads[_HEAD.size : h])
        for (s, by_cell), data in zip(self._sections, self._data, strict=True):
            got.append(heads[h : h + s.head_len])
            h += s.head_len
            if by_cell:
                got.append(out[data + c * s.row : data + (c + n) * s.row])
            else:
                channels = out[data : data + s.rows * self.n_cells * el].reshape(s.rows, -1)
                got.append(channels[:, c * el : (c + n) * el])
        return got

    def place(self, blob: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8], i: int) -> bytes:
        """Copy chunk ``i``'s decoded state ``blob`` into ``out``; return its header bytes."""
        if blob.size != self.chunk_size(self.counts[i]):
            raise LayoutError(f"chunk {i} holds {blob.size} bytes, its shape needs more or less")
        heads = np.empty(self.head_bytes, dtype=np.uint8)
        off = 0
        for piece in self.pieces(out, i, heads):
            piece[...] = blob[off : off + piece.size].reshape(piece.shape)
            off += piece.size
        return heads.tobytes()

    def check(self, i: int, heads: bytes, template_heads: bytes) -> None:
        """:class:`LayoutError` unless chunk ``i``'s headers are a sequence state of its cell
        count with the template's layers (``template_heads``: the first chunk's)."""
        magic, _seq, n_stream, cells = _HEAD.unpack_from(heads, 0)
        if (magic, n_stream, cells) != (SEQ_STATE_MAGIC, 1, self.counts[i]):
            raise LayoutError(f"chunk {i}: not a one-stream state of {self.counts[i]} cells")
        if heads[_HEAD.size :] != template_heads[_HEAD.size :]:
            raise LayoutError(f"chunk {i} disagrees with the first on a layer's type or size")

    def finish(
        self, out: npt.NDArray[np.uint8], template_heads: bytes, *, seq_id: int
    ) -> npt.NDArray[np.uint8]:
        """Write the joined state's headers and ``seq_id`` into every cell; return ``out``.

        :class:`LayoutError` if a cell has other than one seq id."""
        out[: _HEAD.size] = np.frombuffer(_head(seq_id, self.n_cells), dtype=np.uint8)
        meta = out[_HEAD.size : _HEAD.size + self.n_cells * _CELL_BYTES]
        cells = meta.view("<i4").reshape(self.n_cells, 3)
        if not np.all(cells[:, 1] == 1):
            raise LayoutError("cells with other than one seq id")
        cells[:, 2] = seq_id
        off, h = _HEAD.size + self.n_cells * _CELL_BYTES, _HEAD.size
        out[off : off + _DATA_HEAD.size] = np.frombuffer(
            template_heads[h : h + _DATA_HEAD.size], dtype=np.uint8
        )
        h += _DATA_HEAD.size
        for (s, _), data in zip(self._sections, self._data, strict=True):
            out[data - s.head_len : data] = np.frombuffer(
                template_heads[h : h + s.head_len], dtype=np.uint8
            )
            h += s.head_len
        return out


def assemble(
    blobs: Sequence[npt.NDArray[np.uint8]],
    layouts: Sequence[SeqStateLayout],
    *,
    seq_id: int,
) -> npt.NDArray[np.uint8]:
    """The one state of the union of ``blobs``' cells, in their order, for ``seq_id``: what
    llama.cpp writes for a sequence whose cells are those of the blobs, one after another.

    :class:`LayoutError` when the blobs disagree on the cache's shape (types, rows, layers)."""
    if not blobs:
        raise LayoutError("nothing to assemble")
    plan = JoinPlan(layouts[0], [lay.n_cells for lay in layouts])
    out = np.empty(plan.size, dtype=np.uint8)
    first = plan.place(blobs[0], out, 0)
    for i, blob in enumerate(blobs):
        plan.check(i, first if i == 0 else plan.place(blob, out, i), first)
    return plan.finish(out, first, seq_id=seq_id)
