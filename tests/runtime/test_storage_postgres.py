"""PgJournal beyond the shared contract: schema checks, failed appends, order across nodes, the
range read, on a real embedded PostgreSQL (tests/runtime/cluster_fixtures.py)."""

# ruff: noqa: F811 (pg_url is a fixture imported from cluster_fixtures)

from __future__ import annotations

import threading

import psycopg
import pytest

from runtime.errors import JournalError
from runtime.storage.pgdb import SCHEMA_VERSION, connect
from runtime.storage.postgres import PgJournal
from tests.runtime.cluster_fixtures import pg_url  # noqa: F401 (fixture)


def test_tables_are_created_on_first_use_and_the_version_is_recorded(pg_url: str) -> None:
    with PgJournal(pg_url, "first-use"):
        pass
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT version FROM llamaffi_schema WHERE component = 'journal'"
        ).fetchone()
        assert row == (SCHEMA_VERSION,)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_another_schema_version_is_refused_on_open(pg_url: str) -> None:
    with PgJournal(pg_url, "versioned"):
        pass
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE llamaffi_schema SET version = 999 WHERE component = 'journal'")
        try:
            with pytest.raises(JournalError, match="version 999"):
                PgJournal(pg_url, "versioned")
        finally:
            conn.execute(
                "UPDATE llamaffi_schema SET version = %s WHERE component = 'journal'",
                (SCHEMA_VERSION,),
            )


def test_the_journal_connection_commits_synchronously(pg_url: str) -> None:
    conn = connect(pg_url)
    try:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    finally:
        conn.close()


def test_two_nodes_appending_to_one_session_get_one_gapless_order(pg_url: str) -> None:
    journals = [PgJournal(pg_url, "two-nodes") for _ in range(2)]
    seqs: list[list[int]] = [[], []]

    def run(i: int) -> None:
        for n in range(25):
            seqs[i].append(journals[i].append("user", f"node {i} turn {n}", [i, n]).seq)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(seqs[0] + seqs[1]) == list(range(50))
        entries = list(journals[0])
        assert [e.seq for e in entries] == list(range(50))
        for e in entries:  # each entry carries its exact tokens
            node, n = e.tokens
            assert e.text == f"node {node} turn {n}"
    finally:
        for j in journals:
            j.close()


def test_a_resume_reads_only_what_it_replays(pg_url: str) -> None:
    with PgJournal(pg_url, "range-read") as journal:
        for i in range(200):
            journal.append("user", f"turn {i}", [i])
        assert [e.seq for e in journal.iter_from(197)] == [197, 198, 199]
    with psycopg.connect(pg_url) as conn:
        conn.execute("ANALYZE llamaffi_journal")
        conn.execute("SET enable_seqscan = off")  # the plan a large table gets
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT payload FROM llamaffi_journal "
                "WHERE session = 'range-read' AND seq >= 197 ORDER BY seq"
            ).fetchall()
        )
    # the primary key bounds the scan to the replayed range (no filter over the whole session)
    assert "llamaffi_journal_pkey" in plan
    assert "Index Cond: ((session = 'range-read'::text) AND (seq >= 197))" in plan


def test_a_connection_is_bounded_and_kept_alive_unless_the_url_says_otherwise(
    pg_url: str,
) -> None:
    conn = connect(pg_url)
    try:
        params = psycopg.conninfo.conninfo_to_dict(conn.info.dsn)
        assert params["connect_timeout"] == "5" and params["keepalives"] == "1"
        assert params["keepalives_idle"] == "30"
    finally:
        conn.close()
    own = psycopg.conninfo.make_conninfo(pg_url, connect_timeout=9)
    conn = connect(own)
    try:
        assert psycopg.conninfo.conninfo_to_dict(conn.info.dsn)["connect_timeout"] == "9"
    finally:
        conn.close()
