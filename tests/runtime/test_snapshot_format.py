"""Snapshot header, codec and corruption handling on synthetic payloads (no libllama)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from runtime import snapshot as S
from runtime.errors import ArgumentError, MemoryRuntimeError
from runtime.snapshot import format as snapshot_format

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "snapshot-format.md"

IDENTITY = S.CacheIdentity(
    build_number=11312,
    model_fingerprint="ab" * 32,
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


def synthetic_raw(n: int = 50_001, seed: int = 0) -> np.ndarray:
    """f16-like data with an odd length, so the shuffle's trailing byte is exercised."""
    rng = np.random.default_rng(seed)
    words = rng.standard_normal(n // 2).astype(np.float16).view(np.uint8)
    return np.concatenate([words, np.array([7] * (n - words.size), dtype=np.uint8)])


def make(raw: np.ndarray | None = None, **kwargs: object) -> S.Snapshot:
    defaults: dict[str, object] = {
        "identity": IDENTITY,
        "tokens": list(range(1, 40)),
        "seq_id": 0,
        "pos_min": 0,
        "pos_max": 38,
        "n_ctx": 512,
        "session_id": "sess-1",
        "parent_id": "0123456789abcdef",
        "codec": S.Codec(chunk_size=16 << 10),
    }
    defaults.update(kwargs)
    return S.encode(synthetic_raw() if raw is None else raw, **defaults)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def snap() -> S.Snapshot:
    return make()


@pytest.fixture(scope="module")
def blob(snap: S.Snapshot) -> bytes:
    return snap.to_bytes()


# -- shuffle filter ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 4097])
def test_shuffle_round_trip(n: int) -> None:
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    mid = np.empty_like(src)
    back = np.empty_like(src)
    S.shuffle2(src, mid)
    S.unshuffle2(mid, back)
    assert np.array_equal(back, src)


def test_shuffle_puts_high_bytes_together() -> None:
    src = np.array([0x01, 0xA1, 0x02, 0xA2, 0x03], dtype=np.uint8)
    dst = np.empty_like(src)
    S.shuffle2(src, dst)
    assert dst.tolist() == [0x01, 0x02, 0xA1, 0xA2, 0x03]


# -- byte planes filter -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 4097])
def test_planes_round_trip(n: int) -> None:
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    low = np.empty((n + 1) // 2, np.uint8)
    high = np.empty(n // 2, np.uint8)
    S.split_planes(src, low, high)
    assert np.array_equal(low, src[0::2]) and np.array_equal(high, src[1::2])
    back = np.empty_like(src)
    S.merge_planes(low, high, back)
    assert np.array_equal(back, src)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8 << 10, (8 << 10) + 1, (3 << 13) - 1, 70_001])
def test_planes_chunk_table(n: int) -> None:
    """Two frames per segment: even-offset bytes (ceil(L/2)), then odd-offset (floor(L/2))."""
    chunk_size = 8 << 10
    raw = synthetic_raw(n, seed=n)
    snap = make(raw, codec=S.Codec(filter=S.Filter.PLANES2, chunk_size=chunk_size))
    h = snap.header
    n_segments = -(-n // chunk_size)
    assert len(h.chunks) == len(snap.chunks) == 2 * n_segments == h.n_segments * 2
    assert sum(h.chunk_raw_len(i) for i in range(len(h.chunks))) == n
    for k in range(n_segments):
        seg = raw[k * chunk_size : (k + 1) * chunk_size]
        assert h.chunk_raw_len(2 * k) == (seg.size + 1) // 2
        assert h.chunk_raw_len(2 * k + 1) == seg.size // 2
        assert zstandard.ZstdDecompressor().decompress(snap.chunks[2 * k]) == seg[0::2].tobytes()
        assert (
            zstandard.ZstdDecompressor().decompress(snap.chunks[2 * k + 1]) == seg[1::2].tobytes()
        )
    back = S.Snapshot.from_bytes(snap.to_bytes())
    assert np.array_equal(S.decode(back, threads=2), raw)


@pytest.mark.parametrize("filt", list(S.Filter))
def test_n_chunks_must_match_filter(snap: S.Snapshot, filt: S.Filter) -> None:
    """A chunk table one entry short (or long) for the filter's frames per segment is refused."""
    h = snap.header
    chunks = h.chunks[:-1] if filt is h.filter else h.chunks
    lying = dataclasses.replace(h, filter=filt, chunks=chunks)
    if S.count_chunks(h.raw_size, h.chunk_size, filt) == len(chunks):
        pytest.skip("this filter happens to need that many chunks")
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.SnapshotHeader.unpack(lying.pack())
    assert info.value.field == "n_chunks"


def test_default_codec_is_planes() -> None:
    assert S.DEFAULT_CODEC.filter is S.Filter.PLANES2
    assert snapshot_format._CHUNK_ENTRY.size == 4 + 16


# -- header ---------------------------------------------------------------------------------


def test_header_round_trip(snap: S.Snapshot) -> None:
    packed = snap.header.pack()
    assert len(packed) == snap.header.header_len
    assert S.SnapshotHeader.unpack(packed) == snap.header


def test_body_struct_matches_table() -> None:
    assert 48 + snapshot_format._BODY.size == S.MIN_HEADER_LEN
    assert snapshot_format._BODY.size == 154


def test_docs_describe_every_field() -> None:
    text = DOCS.read_text()
    for name, _code in S.BODY_FIELDS_V1:
        assert re.search(rf"`{name}`", text), f"docs/snapshot-format.md lacks field {name}"
    for name in ("magic", "version", "flags", "header_len", "header_checksum"):
        assert f"`{name}`" in text


@pytest.mark.parametrize("filt", list(S.Filter))
@pytest.mark.parametrize("level", [-1, 1, 3])
def test_payload_round_trip(filt: S.Filter, level: int) -> None:
    raw = synthetic_raw(70_001, seed=abs(level))
    snap = make(raw, codec=S.Codec(level=level, filter=filt, chunk_size=8 << 10, threads=2))
    back = S.Snapshot.from_bytes(snap.to_bytes())
    assert back.header == snap.header
    assert np.array_equal(S.decode(back), raw)


def test_empty_payload_round_trip() -> None:
    snap = make(np.zeros(0, np.uint8), tokens=[], pos_min=-1, pos_max=-1)
    back = S.Snapshot.from_bytes(snap.to_bytes())
    assert back.header.raw_size == 0
    assert S.decode(back).size == 0


def test_context_kind() -> None:
    snap = make(seq_id=-1, pos_min=-1, pos_max=-1)
    assert snap.header.kind is S.StateKind.CONTEXT
    assert S.Snapshot.from_bytes(snap.to_bytes()).header.kind is S.StateKind.CONTEXT


def test_shuffle_and_planes_help_f16() -> None:
    raw = synthetic_raw(400_000)
    plain = make(raw, codec=S.Codec(filter=S.Filter.NONE)).header.compressed_size
    shuffled = make(raw, codec=S.Codec(filter=S.Filter.SHUFFLE2)).header.compressed_size
    planes = make(raw, codec=S.Codec(filter=S.Filter.PLANES2)).header.compressed_size
    assert shuffled < plain and planes < plain


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        make(tokens=[-1])
    with pytest.raises(ValueError):
        make(session_id="x" * 200)
    with pytest.raises(ValueError):
        make(identity=dataclasses.replace(IDENTITY, type_k="a-very-long-type-name"))
    with pytest.raises(ValueError):
        S.Codec(chunk_size=3)


def test_write_read_inspect_verify(tmp_path: Path, snap: S.Snapshot) -> None:
    path = tmp_path / "a.kvsnap"
    size = S.write(path, snap)
    assert size == path.stat().st_size == snap.header.file_size
    assert (path.stat().st_mode & 0o777) == 0o600
    assert S.inspect(path) == snap.header
    assert S.verify(path) == snap.header
    assert np.array_equal(S.decode(S.read(path)), synthetic_raw())
    assert [p.name for p in tmp_path.iterdir()] == ["a.kvsnap"]


# -- versions -------------------------------------------------------------------------------


def _with_version(blob: bytes, version: int) -> bytes:
    return blob[:8] + struct.pack("<H", version) + blob[10:]


@pytest.mark.parametrize("version", [0, 4, 7, 0xFFFF])  # 1, 2 and 3 are read (v3: 2026-12)
def test_unknown_version_refused(blob: bytes, version: int) -> None:
    with pytest.raises(S.UnsupportedVersionError, match=f"version {version}"):
        S.Snapshot.from_bytes(_with_version(blob, version))


def test_unknown_magic_refused(blob: bytes) -> None:
    with pytest.raises(S.CorruptSnapshotError, match="not a KV snapshot") as info:
        S.Snapshot.from_bytes(b"GGSQ" + blob[4:])
    assert info.value.field == "magic"


# -- corruption -------------------------------------------------------------------------------

TYPED = (S.CorruptSnapshotError, S.UnsupportedVersionError)


def test_every_header_byte_flip_is_caught(snap: S.Snapshot, blob: bytes) -> None:
    """Every bit of every header byte: a flip there can never go unnoticed."""
    header_len = snap.header.header_len
    buf = bytearray(blob)
    fields: set[str] = set()
    for offset in range(header_len):
        for bit in range(8):
            buf[offset] ^= 1 << bit
            with pytest.raises(TYPED) as info:
                S.Snapshot.from_bytes(buf)
            fields.add(getattr(info.value, "field", "version"))
            buf[offset] ^= 1 << bit
    assert {"magic", "version", "header_checksum", "flags"} <= fields


def test_payload_byte_flips_are_caught(snap: S.Snapshot, blob: bytes) -> None:
    header_len = snap.header.header_len
    rng = np.random.default_rng(1)
    buf = bytearray(blob)
    for offset in rng.integers(header_len, len(blob), 300):
        buf[offset] ^= 1 << int(rng.integers(8))
        with pytest.raises(S.CorruptSnapshotError) as info:
            S.Snapshot.from_bytes(buf)
        assert info.value.field.endswith(".checksum")
        buf[offset] = blob[offset]


def test_truncation_at_every_header_offset_and_in_payload(snap: S.Snapshot, blob: bytes) -> None:
    header_len = snap.header.header_len
    offsets = list(range(header_len + 1))
    offsets += np.linspace(header_len + 1, len(blob) - 1, 100).astype(int).tolist()
    for n in offsets:
        with pytest.raises(S.CorruptSnapshotError) as info:
            S.Snapshot.from_bytes(blob[:n])
        assert info.value.field in {"file_size", "magic", "header_len"}


def test_trailing_data_refused(blob: bytes) -> None:
    with pytest.raises(S.CorruptSnapshotError, match="trailing data"):
        S.Snapshot.from_bytes(blob + b"\0")


@pytest.mark.parametrize("data", [b"", b"\x89", os.urandom(10), os.urandom(100_000)])
def test_garbage_refused(data: bytes) -> None:
    with pytest.raises(S.CorruptSnapshotError):
        S.Snapshot.from_bytes(data)


def test_garbage_after_magic_refused(blob: bytes) -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        junk = blob[:8] + rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
        with pytest.raises(TYPED):
            S.Snapshot.from_bytes(junk)


def test_valid_header_with_someone_elses_payload(snap: S.Snapshot) -> None:
    other = make(synthetic_raw(seed=9), snapshot_id=snap.snapshot_id, created_ns=0)
    frankenstein = snap.header.pack() + b"".join(bytes(c) for c in other.chunks)
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.Snapshot.from_bytes(frankenstein)
    assert info.value.field in {"chunk[0].checksum", "file_size"}


def test_forged_digest_still_caught_by_zstd(snap: S.Snapshot) -> None:
    """A payload whose table checksum was recomputed is still checked by zstd itself."""
    bad_chunk = bytearray(snap.chunks[0])
    bad_chunk[len(bad_chunk) // 2] ^= 0xFF
    chunks = (bytes(bad_chunk), *snap.chunks[1:])
    entries = tuple(S.ChunkEntry(len(c), S.chunk_digest(c)) for c in chunks)
    forged = S.Snapshot(dataclasses.replace(snap.header, chunks=entries), chunks)
    back = S.Snapshot.from_bytes(forged.to_bytes())
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.decode(back)
    assert info.value.field.startswith("chunk[0].")


def test_errors_are_typed() -> None:
    err = S.CorruptSnapshotError("magic", "x")
    assert isinstance(err, ValueError) and isinstance(err, MemoryRuntimeError)
    inc = S.IncompatibleSnapshotError([("type_k", "q8_0", "f16")])
    assert "type_k" in str(inc) and inc.differences == [("type_k", "q8_0", "f16")]


def test_identity_differences() -> None:
    other = dataclasses.replace(IDENTITY, type_k="q8_0", build_number=1)
    assert IDENTITY.differences(other) == [("build_number", 11312, 1), ("type_k", "f16", "q8_0")]
    assert IDENTITY.differences(other, allow_build_mismatch=True) == [("type_k", "f16", "q8_0")]
    split = dataclasses.replace(IDENTITY, kv_unified=False, n_seq_max=2)
    assert ("n_seq_max", 4, 2) in IDENTITY.differences(split)


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_inspect(tmp_path: Path, snap: S.Snapshot, capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.cli import main

    path = tmp_path / "a.kvsnap"
    S.write(path, snap)
    assert main(["snapshot", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model_fingerprint" in out and "ab" * 32 in out and "planes2" in out
    assert main(["snapshot", "inspect", "--json", "--tokens", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == list(snap.tokens) and info["raw_size"] == snap.header.raw_size


def test_cli_inspect_damaged(
    tmp_path: Path, blob: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime.cli import main

    path = tmp_path / "bad.kvsnap"
    path.write_bytes(blob[:20])
    assert main(["snapshot", "inspect", str(path)]) == 1
    assert "file_size" in capsys.readouterr().err
    # a missing file is a usage error (2), not damage (1)
    assert main(["snapshot", "inspect", str(tmp_path / "missing.kvsnap")]) == 2


def test_cli_verify(tmp_path: Path, snap: S.Snapshot, blob: bytes) -> None:
    good = tmp_path / "s" / "000000000001.kvsnap"
    good.parent.mkdir()
    S.write(good, snap)
    cmd = [sys.executable, "-m", "runtime", "snapshot", "verify"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )

    ok = run(str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert f"OK {good}" in ok.stdout

    bad = tmp_path / "s" / "000000000002.kvsnap"
    damaged = bytearray(blob)
    damaged[-5] ^= 0x40
    bad.write_bytes(bytes(damaged))
    res = run(str(tmp_path))
    assert res.returncode == 1
    assert f"DAMAGED {bad}: field chunk[" in res.stdout and ".checksum" in res.stdout
    assert f"OK {good}" in res.stdout

    res = run(str(good), str(tmp_path / "nope.kvsnap"))
    assert res.returncode == 2 and "no such file" in res.stderr


def test_cli_does_not_load_libllama(tmp_path: Path, snap: S.Snapshot) -> None:
    path = tmp_path / "a.kvsnap"
    S.write(path, snap)
    code = (
        "import sys; from runtime.cli import main; "
        f"rc = main(['snapshot', 'verify', {str(path)!r}]); "
        "maps = open('/proc/self/maps').read(); "
        "assert 'libllama' not in maps and 'libggml' not in maps, 'libllama was loaded'; "
        "assert 'llamaffi._lib' not in sys.modules, 'the library loader was imported'; "
        "sys.exit(rc)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


def test_inspect_reads_header_only(tmp_path: Path, snap: S.Snapshot, blob: bytes) -> None:
    """A damaged payload of the right size: inspect is happy, read and verify are not."""
    header_len = snap.header.header_len
    path = tmp_path / "a.kvsnap"
    path.write_bytes(blob[:header_len] + bytes(len(blob) - header_len))
    assert S.inspect(path) == snap.header
    with pytest.raises(S.CorruptSnapshotError, match="checksum"):
        S.read(path)
    with pytest.raises(S.CorruptSnapshotError, match="checksum"):
        S.verify(path)


def test_verify_runs_zstd(tmp_path: Path, snap: S.Snapshot) -> None:
    """verify() decompresses: a chunk whose table digest was forged still fails, by field."""
    bad_chunk = bytearray(snap.chunks[1])
    bad_chunk[len(bad_chunk) // 2] ^= 0xFF
    chunks = (snap.chunks[0], bytes(bad_chunk), *snap.chunks[2:])
    entries = tuple(S.ChunkEntry(len(c), S.chunk_digest(c)) for c in chunks)
    forged = S.Snapshot(dataclasses.replace(snap.header, chunks=entries), chunks)
    path = tmp_path / "forged.kvsnap"
    S.write(path, forged)
    S.read(path)  # every xxh3-128 digest matches
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.verify(path)
    assert info.value.field.startswith("chunk[1].")


# -- version 2: the journal entry in the header ------------------------------------------------


def test_new_files_are_version_3_and_record_the_journal_seq() -> None:
    raw = synthetic_raw(5_001, seed=4)
    snap = make(raw, journal_seq=41)
    assert snap.header.version == S.FORMAT_VERSION == 3
    back = S.Snapshot.from_bytes(snap.to_bytes())
    assert back.header.journal_seq == 41 and back.header == snap.header
    assert make(raw).header.journal_seq is None  # none given: NO_JOURNAL_SEQ on disk
    assert S.Snapshot.from_bytes(make(raw).to_bytes()).header.journal_seq is None
    assert S.SnapshotHeader.unpack(make(raw, journal_seq=-1).header.pack()).journal_seq == -1


def test_version_1_headers_still_pack_and_read() -> None:
    snap = make(synthetic_raw(5_001, seed=5))
    v1 = dataclasses.replace(snap.header, version=1)
    packed = v1.pack()
    assert len(packed) == v1.header_len == snap.header.header_len - 8  # no journal_seq
    back = S.SnapshotHeader.unpack(packed)
    assert back.version == 1 and back.journal_seq is None and back == v1
    with pytest.raises(S.SnapshotError, match="version 1 header cannot record"):
        dataclasses.replace(v1, journal_seq=3).pack()


def test_v2_journal_seq_below_minus_one_is_corrupt() -> None:
    header = make(synthetic_raw(5_001, seed=6), journal_seq=7).header
    forged = dataclasses.replace(header, journal_seq=-5)
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.SnapshotHeader.unpack(forged.pack())
    assert info.value.field == "journal_seq"


def test_docs_describe_the_v2_field() -> None:
    text = DOCS.read_text()
    for name, _code in S.BODY_FIELDS_V2:
        assert re.search(rf"`{name}`", text), f"docs/snapshot-format.md lacks field {name}"
    assert snapshot_format._BODY_V2.size == snapshot_format._BODY.size + 8


# -- version 3: stored segments -----------------------------------------------------------------

STORED = S.Codec(
    level=0, filter=S.Filter.NONE, checksum=False, chunk_size=4096, codec_id=S.CodecId.STORED
)


def test_a_stored_snapshot_holds_the_raw_bytes_and_reads_back() -> None:
    raw = synthetic_raw(10_001, seed=8)
    snap = make(raw, codec=STORED)
    assert snap.header.codec is S.CodecId.STORED and len(snap.header.chunks) == 3
    data = snap.to_bytes()
    assert data[snap.header.header_len :] == raw.tobytes()  # the payload is the state itself
    back = S.Snapshot.from_bytes(data)
    assert back.header == snap.header
    assert S.decode(back).tobytes() == raw.tobytes()
    deferred = S.Snapshot.from_buffer(memoryview(data), defer_digests=True)
    view = S.stored_payload(deferred, memoryview(data))
    assert view is not None and view.tobytes() == raw.tobytes() and not view.flags.writeable
    assert S.stored_payload(make(raw), memoryview(make(raw).to_bytes())) is None  # zstd


def test_a_damaged_stored_segment_never_comes_back() -> None:
    raw = synthetic_raw(10_001, seed=9)
    snap = make(raw, codec=STORED)
    data = bytearray(snap.to_bytes())
    data[snap.header.header_len + 5_000] ^= 0x10  # inside segment 1
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.Snapshot.from_bytes(bytes(data))
    assert info.value.field == "chunk[1].checksum"
    deferred = S.Snapshot.from_buffer(memoryview(bytes(data)), defer_digests=True)
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.stored_payload(deferred, memoryview(bytes(data)))
    assert info.value.field == "chunk[1].checksum"
    # the digests are checked on the bytes handed out, whatever was parsed or checked before
    clean = S.Snapshot.from_bytes(snap.to_bytes())
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.stored_payload(clean, memoryview(bytes(data)))
    assert info.value.field == "chunk[1].checksum"
    with pytest.raises(S.CorruptSnapshotError):
        S.stored_payload(clean, memoryview(bytes(data))[:-1])
    out = np.empty(raw.size, dtype=np.uint8)
    with pytest.raises(S.CorruptSnapshotError):
        S.decode_into(deferred, out)


@pytest.mark.parametrize(
    "change",
    [
        {"version": 2},  # version 2 readers know no stored codec
        {"filter": S.Filter.SHUFFLE2},  # a stored segment is the state as it is
    ],
)
def test_a_stored_header_must_be_version_3_and_unfiltered(change: dict[str, object]) -> None:
    header = make(synthetic_raw(10_001, seed=10), codec=STORED).header
    forged = dataclasses.replace(header, **change)  # type: ignore[arg-type]
    with pytest.raises(S.CorruptSnapshotError) as info:
        S.SnapshotHeader.unpack(forged.pack())
    assert info.value.field == "codec"


def test_a_stored_codec_takes_no_filter() -> None:
    with pytest.raises(ArgumentError):
        S.Codec(filter=S.Filter.PLANES2, codec_id=S.CodecId.STORED)


def test_the_docs_name_the_versions_written_and_read() -> None:
    text = " ".join(DOCS.read_text().split())
    *older, newest = sorted(S.READER_SUPPORTED_VERSIONS)
    read = f"{', '.join(map(str, older))} and {newest}"
    assert f"Writers write version {S.FORMAT_VERSION}; readers read versions {read}" in text
