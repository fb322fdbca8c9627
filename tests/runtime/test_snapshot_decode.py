"""The restore-side decoder: frames decoded in place, digests checked per frame, no-checksum
frames, and the known-answer version 1 files of ``tests/data`` (no libllama)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from runtime import snapshot as S

DATA = Path(__file__).resolve().parents[1] / "data"

IDENTITY = S.CacheIdentity(
    build_number=11312,
    model_fingerprint="cd" * 32,
    n_layer=2,
    n_embd=64,
    n_head=4,
    n_head_kv=2,
    n_seq_max=4,
    type_k="f16",
    type_v="f16",
    flash_attn=False,
    kv_unified=True,
)

ALL_CODECS = [
    S.Codec(level=level, filter=filt, chunk_size=8 << 10, checksum=checksum, threads=threads)
    for level in (-1, 1)
    for filt in S.Filter
    for checksum in (True, False)
    for threads in (1, 2)
]


def raw_blob(n: int = 60_001, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = rng.standard_normal(n // 2).astype(np.float16).view(np.uint8)
    zeros = np.zeros(n - words.size, dtype=np.uint8)  # a run: zstd writes an RLE block for it
    return np.concatenate([words, zeros])


def make(raw: np.ndarray, codec: S.Codec) -> S.Snapshot:
    return S.encode(raw, identity=IDENTITY, tokens=[1, 2, 3], seq_id=0, codec=codec)


def forge(snap: S.Snapshot, i: int, frame: bytes) -> S.Snapshot:
    """``snap`` with chunk ``i`` replaced and its digest recomputed (so only zstd can tell)."""
    chunks = list(snap.chunks)
    chunks[i] = frame
    entries = tuple(S.ChunkEntry(len(c), S.chunk_digest(c)) for c in chunks)
    header = dataclasses.replace(
        snap.header, chunks=entries, compressed_size=sum(e.size for e in entries)
    )
    return S.Snapshot.from_bytes(S.Snapshot(header, tuple(chunks)).to_bytes())


@pytest.mark.parametrize("codec", ALL_CODECS, ids=repr)
def test_round_trip_every_codec(codec: S.Codec) -> None:
    raw = raw_blob()
    snap = make(raw, codec)
    back = S.Snapshot.from_bytes(snap.to_bytes())
    assert np.array_equal(S.decode(back, threads=codec.threads), raw)
    for frame in snap.chunks:
        assert S.frame_length(frame) == len(frame)
        has_checksum = zstandard.get_frame_parameters(bytes(frame)).has_checksum
        assert has_checksum == codec.checksum


def test_frame_length_of_empty_and_rle_frames() -> None:
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
    for data in (b"", b"\0" * 300_000, bytes(range(256)) * 1000):
        frame = cctx.compress(data)
        assert S.frame_length(frame) == len(frame)
    with pytest.raises(zstandard.ZstdError):
        S.frame_length(b"not a zstd frame")


@pytest.mark.parametrize("checksum", [True, False])
def test_frame_not_filling_its_chunk_is_refused(checksum: bool) -> None:
    """Bytes after the frame, or a frame cut inside its checksum, with a valid digest: a
    streaming decode would stop at the full output and miss both."""
    snap = make(raw_blob(), S.Codec(filter=S.Filter.NONE, chunk_size=8 << 10, checksum=checksum))
    frame = bytes(snap.chunks[1])
    variants = [frame + b"\0\0\0\0", frame[:-1]] if checksum else [frame + b"\0"]
    for bad in variants:
        with pytest.raises(S.CorruptSnapshotError) as info:
            S.decode(forge(snap, 1, bad))
        assert info.value.field == "chunk[1].zstd_frame"


def test_forged_block_header_caught_without_content_checksum() -> None:
    codec = S.Codec(level=-1, filter=S.Filter.NONE, chunk_size=8 << 10, checksum=False)
    snap = make(raw_blob(), codec)
    frame = bytearray(snap.chunks[0])
    frame[zstandard.frame_header_size(bytes(frame)) + 1] ^= 0x10  # the first block's size
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.decode(forge(snap, 0, bytes(frame)))
    assert info.value.field.startswith("chunk[0].")


def test_forged_content_caught_by_the_content_checksum() -> None:
    snap = make(raw_blob(), S.Codec(level=-1, filter=S.Filter.NONE, chunk_size=8 << 10))
    frame = bytearray(snap.chunks[0])
    frame[len(frame) // 2] ^= 0xFF  # inside a raw block: only the content checksum sees it
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.decode(forge(snap, 0, bytes(frame)))
    assert info.value.field == "chunk[0].zstd_frame"


@pytest.mark.parametrize("where", [0.3, 0.6, 0.95])
@pytest.mark.parametrize("checksum", [True, False])
def test_deferred_digests_are_checked_while_decoding(
    tmp_path: Path, where: float, checksum: bool
) -> None:
    raw = raw_blob(200_001)
    path = tmp_path / "s.kvsnap"
    codec = S.Codec(level=-1, filter=S.Filter.NONE, chunk_size=8 << 10, checksum=checksum)
    S.write(path, make(raw, codec))
    deferred = S.read(path, mapped=True, defer_digests=True)
    assert np.array_equal(S.decode(deferred), raw)
    del deferred
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))
    deferred = S.read(path, mapped=True, defer_digests=True)  # the header is still intact
    out = np.zeros(raw.size, np.uint8)
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.decode_into(deferred, out)
    assert info.value.field.endswith(".checksum")
    with pytest.raises(S.CorruptSnapshotError):  # and the eager read refuses it at once
        S.read(path, mapped=True)


def test_merge_planes_matches_split() -> None:
    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 3, 1001, 1 << 16):
        src = rng.integers(0, 256, n, dtype=np.uint8)
        low, high = np.empty((n + 1) // 2, np.uint8), np.empty(n // 2, np.uint8)
        S.split_planes(src, low, high)
        back = np.empty(n, np.uint8)
        S.merge_planes(low, high, back)
        assert np.array_equal(back, src)


def _vectors() -> dict[str, dict[str, str]]:
    return json.loads((DATA / "snapshot-v1.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(_vectors()))
def test_known_answer_v1_files(name: str) -> None:
    """Version 1 files written by earlier encoders still read, verify and decode."""
    expect = _vectors()[name]
    path = DATA / f"snapshot-v1-{name}.kvsnap"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expect["file_sha256"]
    header = S.verify(path)
    assert header.version == 1 and header.snapshot_id == f"kat-{name}"
    for snap in (S.read(path), S.read(path, mapped=True, defer_digests=True)):
        assert hashlib.sha256(S.decode(snap).tobytes()).hexdigest() == expect["raw_sha256"]
