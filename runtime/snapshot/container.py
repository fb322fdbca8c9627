"""A snapshot in memory: the header plus its compressed chunks (:class:`Snapshot`), read from
a file or a buffer with every length and digest checked."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import xxhash

from runtime.errors import CorruptSnapshotError
from runtime.snapshot.format import HEADER_PREFIX, SnapshotHeader, check_prefix

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


def chunk_digest(frame: bytes | memoryview) -> bytes:
    """The chunk table digest of one compressed frame: xxh3-128, 16 bytes."""
    return xxhash.xxh3_128_digest(frame)


def verify_digests(
    header: SnapshotHeader, chunks: Sequence[bytes | memoryview], source: str | None
) -> None:
    # On the calling thread: python-xxhash holds the GIL, so a pool would not run the hashes
    # in parallel, and xxh3 needs only ~0.3 ms for a 20 MB payload anyway.
    for i, chunk in enumerate(chunks):
        check_digest(header, i, chunk, source)


def check_digest(
    header: SnapshotHeader, i: int, chunk: bytes | memoryview, source: str | None
) -> None:
    if chunk_digest(chunk) != header.chunks[i].digest:
        raise CorruptSnapshotError(
            f"chunk[{i}].checksum",
            f"xxh3-128 of chunk {i} (of {len(header.chunks)}) does not match the header",
            source=source,
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
            raise CorruptSnapshotError(
                "file_size",
                f"file ended after {got} of {file_size} bytes (changed while being read)",
                source=source,
            )
        return cls.from_view(header, view, source)

    @classmethod
    def from_buffer(
        cls, data: memoryview, *, source: str | None = None, defer_digests: bool = False
    ) -> Snapshot:
        """Parse and verify a whole snapshot file held in ``data``; chunks are views into it.

        ``defer_digests=True`` leaves the chunk digests to :func:`decode_into`, which checks
        each frame just before decoding it (see :func:`runtime.snapshot.read`); such a
        snapshot must not be used for anything but decoding.
        """
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        header = header_from_buffer(view, source=source)
        return cls.from_view(header, view, source, defer=defer_digests)

    @classmethod
    def from_view(
        cls, header: SnapshotHeader, view: memoryview, source: str | None, *, defer: bool = False
    ) -> Snapshot:
        """Slice the chunks out of a whole-file ``view`` whose size was checked; verify them
        (``defer``: leave that to :func:`decode_into`, see :class:`DeferredSnapshot`)."""
        chunks: list[memoryview] = []
        offset = header.header_len
        for entry in header.chunks:
            chunks.append(view[offset : offset + entry.size])
            offset += entry.size
        if defer:
            return DeferredSnapshot(header=header, chunks=tuple(chunks))
        verify_digests(header, chunks, source)
        return cls(header=header, chunks=tuple(chunks))

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, *, source: str | None = None
    ) -> Snapshot:
        """Parse and verify a snapshot held in memory (without copying it)."""
        return cls.from_buffer(memoryview(data), source=source)


@dataclass(frozen=True, eq=False)
class DeferredSnapshot(Snapshot):
    """A snapshot whose header is verified but whose chunk digests are not yet: made only by
    ``read(..., defer_digests=True)``; :func:`decode_into` checks each frame's digest right
    before decoding it, so its bytes travel from the page cache once, not twice."""


def header_from_buffer(view: memoryview, *, source: str | None = None) -> SnapshotHeader:
    """Parse and validate only the header of a whole snapshot file held in ``view`` (its
    size is checked against the header; the payload is not read)."""
    header_len = check_prefix(bytes(view[: HEADER_PREFIX.size]), source=source)
    _check_header_fits(header_len, len(view), source)
    header = SnapshotHeader.unpack(view[:header_len], source=source)
    _check_file_size(header, len(view), source)
    return header


def _check_header_fits(header_len: int, file_size: int, source: str | None) -> None:
    if header_len > file_size:
        raise CorruptSnapshotError(
            "file_size",
            f"file is {file_size} bytes but the header alone claims {header_len}",
            source=source,
        )


def _check_file_size(header: SnapshotHeader, file_size: int, source: str | None) -> None:
    if header.file_size != file_size:
        raise CorruptSnapshotError(
            "file_size",
            f"file is {file_size} bytes, header says {header.file_size} "
            f"({'truncated' if file_size < header.file_size else 'trailing data'})",
            source=source,
        )


def _read_header_bytes(f: BinaryIO, file_size: int, source: str | None) -> bytes:
    """Read the prefix, check it, then read the rest of the header (not yet verified)."""
    prefix = f.read(HEADER_PREFIX.size)
    header_len = check_prefix(prefix, source=source)
    _check_header_fits(header_len, file_size, source)
    return prefix + f.read(header_len - HEADER_PREFIX.size)


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
