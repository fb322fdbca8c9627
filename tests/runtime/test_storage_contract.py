"""The storage interfaces' contracts (runtime.storage), run against every implementation.

The local directory implementations and the server-backed ones (S3 on a real SeaweedFS,
PostgreSQL on a real embedded server, both started once per session by
``tests/runtime/cluster_fixtures.py``) pass the same tests; a server that does not start fails.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import JournalCompactedError
from runtime.journal import Journal
from runtime.storage import BlobStore, JournalBackend, LocalBlobStore
from runtime.storage.postgres import PgJournal
from runtime.storage.s3 import S3BlobStore
from tests.runtime.cluster_fixtures import S3_BUCKET, pg_url, s3_env  # noqa: F401 (fixtures)

KEY_A = "a" * 32
KEY_B = "b" * 32


def _local_blobs(root: Path) -> BlobStore:
    return LocalBlobStore(root / "kv")


def _s3_blobs(root: Path) -> BlobStore:
    # one prefix per test (tmp_path is unique), the same one for a reopen within the test
    return S3BlobStore(f"s3://{S3_BUCKET}/contract/{root.name}")


def _local_journal(root: Path) -> JournalBackend:
    return Journal(root / "journals" / "s.log", fsync=False, segment_entries=4)


def _pg_journal(root: Path, url: str) -> JournalBackend:
    # one session per test (tmp_path is unique), the same one for a reopen within the test
    return PgJournal(url, root.name.replace("_", "-")[:128], segment_entries=4)


BLOB_STORES: dict[str, Callable[[Path], BlobStore]] = {"local": _local_blobs, "s3": _s3_blobs}
#: The server fixture each implementation needs (started on first use, once per session).
SERVERS = {"s3": "s3_env", "postgres": "pg_url"}
#: Each journal factory gets the test's directory and its server's fixture value (or None).
JOURNALS: dict[str, Callable[[Path, Any], JournalBackend]] = {
    "local": lambda root, _server: _local_journal(root),
    "postgres": _pg_journal,
}


@pytest.fixture(params=sorted(BLOB_STORES))
def open_blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], BlobStore]]:
    if request.param in SERVERS:
        request.getfixturevalue(SERVERS[request.param])
    opened: list[BlobStore] = []

    def open_one() -> BlobStore:
        store = BLOB_STORES[request.param](tmp_path)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture(params=sorted(JOURNALS))
def open_journal(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], JournalBackend]]:
    server = request.getfixturevalue(SERVERS[request.param]) if request.param in SERVERS else None
    opened: list[JournalBackend] = []

    def open_one() -> JournalBackend:
        journal = JOURNALS[request.param](tmp_path, server)
        opened.append(journal)
        return journal

    yield open_one
    for journal in opened:
        journal.close()


def _writer(data: bytes) -> Callable[[io.RawIOBase], int]:
    def write(f: io.RawIOBase) -> int:
        f.write(data)
        return len(data)

    return write


# -- BlobStore ---------------------------------------------------------------------------------


def test_a_put_blob_is_there_after_a_reopen(open_blobs: Callable[[], BlobStore]) -> None:
    store = open_blobs()
    assert store.put_all([(KEY_A, _writer(b"hello"))]) == [5]
    assert store.has(KEY_A) and bytes(store.get(KEY_A)) == b"hello"
    store.close()
    again = open_blobs()  # durable on return: a new instance reads it back
    assert bytes(again.get(KEY_A)) == b"hello" and sorted(again.list_keys()) == [KEY_A]


def test_put_all_never_replaces_a_blob(open_blobs: Callable[[], BlobStore]) -> None:
    store = open_blobs()
    store.put_all([(KEY_A, _writer(b"first"))])

    def never(f: io.RawIOBase) -> int:
        raise AssertionError("write called for a stored key")

    assert store.put_all([(KEY_A, never), (KEY_B, _writer(b"second, longer"))]) == [5, 14]
    assert bytes(store.get(KEY_A)) == b"first"
    assert bytes(store.get(KEY_B)) == b"second, longer"
    store.close()
    again = open_blobs()  # every blob of one call durable on return
    assert sorted(again.list_keys()) == sorted([KEY_A, KEY_B])


def test_a_failed_write_stores_no_part_of_its_blob(open_blobs: Callable[[], BlobStore]) -> None:
    store = open_blobs()

    def half(f: io.RawIOBase) -> int:
        f.write(b"half a blo")
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="went away"):
        store.put_all([(KEY_A, _writer(b"whole")), (KEY_B, half)])
    assert not store.has(KEY_B)
    assert not store.has(KEY_A) or bytes(store.get(KEY_A)) == b"whole"
    assert store.put_all([(KEY_B, _writer(b"again"))]) == [5]
    assert bytes(store.get(KEY_B)) == b"again"


def test_missing_blobs_and_manifests_are_not_found(open_blobs: Callable[[], BlobStore]) -> None:
    store = open_blobs()
    assert not store.has(KEY_B) and list(store.list_keys()) == []
    with pytest.raises(FileNotFoundError):
        store.get(KEY_B)
    with pytest.raises(FileNotFoundError):
        store.get_manifest("s", 1, 1 << 20)
    store.delete(KEY_B)  # deleting what is absent is not an error
    store.delete_manifest("s", 1)
    store.delete_session("s")


def test_delete_and_quarantine_remove_a_blob(open_blobs: Callable[[], BlobStore]) -> None:
    store = open_blobs()
    store.put_all([(KEY_A, _writer(b"a")), (KEY_B, _writer(b"b"))])
    store.delete(KEY_A)
    store.quarantine(KEY_B, "damaged in a test")
    store.sync_deletes([KEY_A])
    assert not store.has(KEY_A) and not store.has(KEY_B)
    assert list(store.list_keys()) == []


def test_manifests_switch_atomically_newest_first(open_blobs: Callable[[], BlobStore]) -> None:
    store = open_blobs()
    store.switch_manifest("s", 1, b"one")
    store.switch_manifest("s", 2, b"two")
    store.switch_manifest("t", 1, b"other")
    assert store.sessions() == ["s", "t"]
    assert store.generations("s") == [2, 1]
    assert store.get_manifest("s", 2, 1 << 20) == b"two"
    with pytest.raises(ValueError):
        store.get_manifest("s", 2, 2)  # bounded before it is read
    store.delete_manifest("s", 2)
    store.quarantine_manifest("s", 1, "damaged in a test")
    assert store.generations("s") == []
    store.close()
    again = open_blobs()
    assert again.get_manifest("t", 1, 1 << 20) == b"other"
    again.delete_session("t")
    assert again.generations("t") == [] and "t" not in again.sessions()


def test_session_ids_are_validated(open_blobs: Callable[[], BlobStore]) -> None:
    store = open_blobs()
    for bad in ("../escape", "a/b", ".hidden", "quarantine"):
        with pytest.raises(ValueError):
            store.switch_manifest(bad, 1, b"x")


def test_a_closed_store_refuses_writes(open_blobs: Callable[[], BlobStore]) -> None:
    store = open_blobs()
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.put_all([(KEY_A, _writer(b"x"))])
    store.close()  # twice is fine


# -- JournalBackend ----------------------------------------------------------------------------


def test_appends_are_read_back_in_order_after_a_reopen(
    open_journal: Callable[[], JournalBackend],
) -> None:
    journal = open_journal()
    for i in range(10):
        entry = journal.append("user", f"turn {i}", [i, i + 1], {"i": i}, created=1000.0 + i)
        assert entry.seq == i
    journal.close()
    again = open_journal()
    assert len(again) == 10
    got = list(again.iter_from(6))
    assert [e.seq for e in got] == [6, 7, 8, 9]
    assert [e.text for e in got] == [f"turn {i}" for i in range(6, 10)]
    assert list(got[0].tokens) == [6, 7] and got[0].meta["i"] == 6 and got[0].created == 1006.0


def test_only_sealed_entries_are_dropped(open_journal: Callable[[], JournalBackend]) -> None:
    journal = open_journal()
    for i in range(6):
        journal.append("user", f"turn {i}", [i])
    journal.rotate()  # everything so far is sealed
    journal.append("user", "newest", [99])
    assert journal.drop_segments_before(len(journal)) > 0
    assert len(journal) == 7
    assert [e.text for e in journal.iter_from(6)] == ["newest"]  # the newest stays
    with pytest.raises(JournalCompactedError):
        list(journal.iter_from(0))  # a dropped entry is an error, never a silent skip


def test_a_segment_is_sealed_every_segment_entries(
    open_journal: Callable[[], JournalBackend],
) -> None:
    journal = open_journal()
    for i in range(10):
        journal.append("user", f"turn {i}", [i])
    assert journal.n_segments == 2  # 0-3 and 4-7 sealed; 8-9 in the open segment
    assert journal.drop_segments_before(8) > 0  # retention drops whole sealed segments
    assert journal.first_seq == 8 and len(journal) == 10
    assert [e.text for e in journal.iter_from(8)] == ["turn 8", "turn 9"]
    with pytest.raises(JournalCompactedError):
        journal[3]
    journal.append("user", "after the drop", [10])
    assert journal[10].text == "after the drop"
