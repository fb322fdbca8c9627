"""The persisted hnswlib index: recall, growth, delete/reuse, locking, file validation."""

from __future__ import annotations

import hashlib
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import IndexFileError
from runtime.longterm.hnsw import HnswIndex, IndexParams
from runtime.longterm.manifest import HNSW_HEADER, MANIFEST_NAME, Manifest

STORE = b"S" * 16


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def saved(tmp_path: Path, n: int = 200, dim: int = 16) -> tuple[HnswIndex, np.ndarray]:
    index = HnswIndex(IndexParams(dim=dim, M=8), capacity=16)
    data = unit(n, dim, 0)
    index.add(data, range(1, n + 1))
    index.save(tmp_path, store_id=STORE, max_seq=n, max_tomb=0)
    return index, data


def load(tmp_path: Path, dim: int = 16) -> tuple[HnswIndex, Manifest]:
    return HnswIndex.load(tmp_path, IndexParams(dim=dim, M=8), store_id=STORE)


def blob_path(tmp_path: Path) -> Path:
    (blob,) = tmp_path.glob("index-*.hnsw")
    return blob


@pytest.mark.slow
def test_recall_at_10_on_20k_random_vectors_at_default_ef() -> None:
    dim = 384
    data, queries = unit(20_000, dim, 1), unit(200, dim, 2)
    index = HnswIndex(IndexParams(dim=dim), capacity=20_000)
    index.add(data, range(20_000))
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    found = [index.query(q, 10)[0] for q in queries]
    recall = np.mean(
        [len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)]
    )
    assert recall >= 0.95, recall


def test_round_trip_and_query(tmp_path: Path) -> None:
    _, data = saved(tmp_path)
    loaded, manifest = load(tmp_path)
    assert (manifest.max_seq, manifest.live, manifest.slots) == (200, 200, 200)
    assert len(loaded) == 200
    labels, sims = loaded.query(data[41], 3)
    assert labels[0] == 42 and sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims == sorted(sims, reverse=True)


def test_growth_by_resize(tmp_path: Path) -> None:
    index = HnswIndex(IndexParams(dim=8, M=8), capacity=4)
    data = unit(100, 8, 3)
    for i in range(0, 100, 7):
        index.add(data[i : i + 7], range(i, min(i + 7, 100)))
    assert len(index) == 100 and index.max_elements >= 100
    assert index.query(data[99], 1)[0] == [99]


def test_deleted_slots_are_reused(tmp_path: Path) -> None:
    index = HnswIndex(IndexParams(dim=8, M=8), capacity=50)
    data = unit(80, 8, 4)
    index.add(data[:50], range(50))
    for label in range(20):
        assert index.mark_deleted(label)
    assert not index.mark_deleted(0)  # already deleted
    assert not index.mark_deleted(999)  # never there
    index.add(data[50:70], range(50, 70))
    assert (len(index), index.slots, index.max_elements) == (50, 50, 50)
    assert 0 not in index.query(data[0], 50)[0]


def test_query_with_filter_and_small_index() -> None:
    index = HnswIndex(IndexParams(dim=8, M=8))
    assert index.query(unit(1, 8, 5)[0], 5) == ([], [])
    data = unit(30, 8, 6)
    index.add(data, range(30))
    labels, _ = index.query(data[3], 10, filter=lambda label: label % 2 == 1)
    assert labels and all(label % 2 == 1 for label in labels)
    assert len(index.query(data[3], 100)[0]) == 30


def test_add_validates_input() -> None:
    index = HnswIndex(IndexParams(dim=8, M=8))
    with pytest.raises(ValueError):
        index.add(unit(2, 4, 0), [1, 2])
    with pytest.raises(ValueError):
        index.add(unit(2, 8, 0), [1])
    bad = unit(1, 8, 0)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError):
        index.add(bad, [1])
    with pytest.raises(ValueError):
        IndexParams(dim=8, space="hamming")


def test_concurrent_add_and_query_are_serialised() -> None:
    index = HnswIndex(IndexParams(dim=16, M=8), capacity=8)
    data = unit(2000, 16, 7)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(0, 2000, 10):
                index.add(data[i : i + 10], range(i, i + 10))
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            for i in range(300):
                index.query(data[i], 5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 2000


def test_save_leaves_one_blob_and_no_temps(tmp_path: Path) -> None:
    index, _ = saved(tmp_path)
    index.save(tmp_path, store_id=STORE, max_seq=200, max_tomb=0)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and MANIFEST_NAME in names
    assert blob_path(tmp_path).stat().st_mode & 0o777 == 0o600


# -- validation before hnswlib's loader -------------------------------------------------------


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(IndexFileError, match="no index manifest"):
        load(tmp_path)
    saved(tmp_path)
    blob_path(tmp_path).unlink()
    with pytest.raises(IndexFileError, match="cannot open"):
        load(tmp_path)


@pytest.mark.parametrize("cut", [0, 10, 95, 1000, -1])
def test_truncated_blob(tmp_path: Path, cut: int) -> None:
    saved(tmp_path)
    blob = blob_path(tmp_path)
    data = blob.read_bytes()
    blob.write_bytes(data[:cut])
    with pytest.raises(IndexFileError):
        load(tmp_path)


def test_flipped_byte_in_blob_and_manifest(tmp_path: Path) -> None:
    saved(tmp_path)
    blob = blob_path(tmp_path)
    data = bytearray(blob.read_bytes())
    data[500] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum"):
        load(tmp_path)
    data[500] ^= 1
    blob.write_bytes(bytes(data))
    load(tmp_path)
    manifest = bytearray((tmp_path / MANIFEST_NAME).read_bytes())
    for offset in (0, 9, 40, len(manifest) - 1):
        damaged = bytearray(manifest)
        damaged[offset] ^= 0x10
        (tmp_path / MANIFEST_NAME).write_bytes(bytes(damaged))
        with pytest.raises(IndexFileError):
            load(tmp_path)


def test_foreign_store_and_wrong_dimension(tmp_path: Path) -> None:
    saved(tmp_path)
    with pytest.raises(IndexFileError, match="another store"):
        HnswIndex.load(tmp_path, IndexParams(dim=16, M=8), store_id=b"T" * 16)
    with pytest.raises(IndexFileError, match="dim"):
        load(tmp_path, dim=32)


def _reseal(tmp_path: Path, blob: bytes) -> None:
    """Rewrite blob + manifest so that size and sha256 match: only the deep checks remain."""
    path = blob_path(tmp_path)
    path.write_bytes(blob)
    m = Manifest.from_bytes((tmp_path / MANIFEST_NAME).read_bytes())
    fields = {**m.__dict__, "blob_size": len(blob), "blob_sha256": hashlib.sha256(blob).digest()}
    (tmp_path / MANIFEST_NAME).write_bytes(Manifest(**fields).to_bytes())


def test_hnswlib_header_lying_about_max_elements_is_rejected(tmp_path: Path) -> None:
    # hnswlib PR #677: a max_elements below cur_element_count overflows the heap on load
    saved(tmp_path)
    blob = bytearray(blob_path(tmp_path).read_bytes())
    struct.pack_into("<Q", blob, 8, 3)
    _reseal(tmp_path, bytes(blob))
    with pytest.raises(IndexFileError, match="max_elements"):
        load(tmp_path)


@pytest.mark.parametrize("offset", [0, 16, 24, 32, 52, 56, 64, 72])
def test_hnswlib_header_fields_are_checked(tmp_path: Path, offset: int) -> None:
    saved(tmp_path)
    blob = bytearray(blob_path(tmp_path).read_bytes())
    assert offset < HNSW_HEADER.size
    blob[offset] ^= 0x05
    _reseal(tmp_path, bytes(blob))
    with pytest.raises(IndexFileError):
        load(tmp_path)


def test_bad_link_list_size_is_rejected(tmp_path: Path) -> None:
    saved(tmp_path)
    blob = bytearray(blob_path(tmp_path).read_bytes())
    per_el = struct.unpack_from("<Q", blob, 24)[0]
    pos = HNSW_HEADER.size + 200 * per_el
    struct.pack_into("<I", blob, pos, 0xFFFFFF00)
    _reseal(tmp_path, bytes(blob))
    with pytest.raises(IndexFileError, match="link list"):
        load(tmp_path)


def test_trailing_garbage_is_rejected(tmp_path: Path) -> None:
    saved(tmp_path)
    _reseal(tmp_path, blob_path(tmp_path).read_bytes() + b"\0" * 8)
    with pytest.raises(IndexFileError, match="framing"):
        load(tmp_path)


def test_query_returns_every_allowed_item_when_the_filter_allows_fewer_than_k() -> None:
    # the old loop halved k on each hnswlib RuntimeError: 7 allowed, k=10 gave only 5
    index = HnswIndex(IndexParams(dim=8, M=8))
    data = unit(100, 8, 7)
    index.add(data, range(100))
    allowed = {3, 17, 29, 41, 55, 68, 90}
    labels, sims = index.query(data[3], 10, filter=allowed.__contains__)
    assert set(labels) == allowed
    assert labels[0] == 3 and sims == sorted(sims, reverse=True)


def test_query_finds_every_live_item_among_many_deleted_at_a_narrow_beam() -> None:
    index = HnswIndex(IndexParams(dim=8, M=4, ef_search=1))
    data = unit(300, 8, 8)
    index.add(data, range(300))
    for label in range(290):
        index.mark_deleted(label)
    labels, sims = index.query(data[295], 10)
    assert sorted(labels) == list(range(290, 300))
    assert labels[0] == 295 and sims[0] == pytest.approx(1.0, abs=1e-5)
    assert index.query(data[295], 10, filter=lambda label: label >= 298)[0] in (
        [298, 299],
        [299, 298],
    )


def test_manifest_round_trips_every_field() -> None:
    m = Manifest(
        16, "ip", 8, 100, 5, 6, 7, 8, 9, 10, b"s" * 16, b"h" * 32, "index-0123456789abcdef.hnsw"
    )
    assert Manifest.from_bytes(m.to_bytes()) == m
