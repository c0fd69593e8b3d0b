"""``forum-bridge status`` on PostgreSQL reads through libpq alone (store.libpq), not psycopg.

Importing psycopg was most of the command's time with 10,000 subscribers. The plain connection must
give the status reader the same rows psycopg gives (types, order, NULL, repeated column names),
refuse what the server refuses as a one-line StoreError, read one snapshot, and step aside for
psycopg when there is no libpq.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
import pytest

from forum_bridge.cli import status_text
from forum_bridge.config import Settings
from forum_bridge.core import LoggedOn
from forum_bridge.errors import StoreError
from forum_bridge.service import BridgeService
from forum_bridge.store import libpq
from forum_bridge.store.status_query import Reader, open_reader, status_document
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.postgres


def _reader(connection: object) -> Reader:
    return Reader(connection, "postgresql", (libpq.PqError,), lambda text: text)


def test_rows_come_back_as_psycopg_gives_them(postgres_url: str) -> None:
    connection = libpq.connect(postgres_url, connect_timeout=10)
    assert connection is not None, "libpq must be found on this host"
    try:
        sql = (
            "SELECT v.n, v.t, v.b, v.z, v.n AS n FROM (VALUES (2, 'zwei', true, NULL::text),"
            " (1, 'e''i\"n\u00e9', false, 'x'), (3, '', NULL::boolean, NULL)) AS v(n, t, b, z)"
            " WHERE v.t <> ? ORDER BY v.n DESC"
        )
        got = _reader(connection).rows(sql, ["no such text"])
        with psycopg.connect(postgres_url) as reference:
            expected = reference.execute(sql.replace("?", "%s"), ("no such text",)).fetchall()
        assert got == expected
        assert [type(v) for v in got[1]] == [int, str, bool, type(None), int]
        assert _reader(connection).rows("SELECT 1 WHERE false") == []
        # Parameters of every kind the status reader passes, compared on the server.
        row = _reader(connection).rows(
            "SELECT ?::timestamptz = '2026-11-24 08:00:00+00'::timestamptz, ?::int + 1, ?::text IS NULL, ?::text",
            [datetime(2026, 11, 24, 8, 0, tzinfo=UTC), 41, None, "100%_ /"],
        )
        assert row == [(True, 42, True, "100%_ /")]
    finally:
        connection.close()


def test_a_refused_statement_is_one_store_error_line(postgres_url: str) -> None:
    connection = libpq.connect(postgres_url, connect_timeout=10)
    assert connection is not None
    try:
        with pytest.raises(StoreError) as caught:
            _reader(connection).rows("SELECT * FROM no_such_table")
        assert "no_such_table" in str(caught.value)
        assert len(str(caught.value).splitlines()) == 1
    finally:
        connection.close()
    with pytest.raises(libpq.PqError):
        libpq.connect("postgresql://nobody@127.0.0.1:1/none", connect_timeout=2)


def test_the_reader_sees_one_snapshot_and_never_writes(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as writer:
        writer.execute("CREATE TABLE t (n integer)")
        writer.execute("INSERT INTO t VALUES (1)")
        connection = libpq.connect(postgres_url, connect_timeout=10)
        assert connection is not None
        try:
            reader = _reader(connection)
            assert reader.rows("SELECT count(*) FROM t") == [(1,)]
            writer.execute("INSERT INTO t VALUES (2)")
            assert reader.rows("SELECT count(*) FROM t") == [(1,)]  # the same snapshot
            with pytest.raises(StoreError):
                reader.rows("SELECT n FROM t FOR UPDATE")  # read only: refused
        finally:
            connection.close()


def test_without_libpq_the_status_is_read_through_psycopg(
    make_settings: SettingsFactory,
    make_service: Callable[[Settings], BridgeService],
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = make_service(make_settings(database__url=postgres_url, licences__count=2))
    service.import_subscribers("21-desk,21\n22-soft,22\n")
    service.apply(LoggedOn("21-desk", service.clock(), contact="sip:21-desk@192.0.2.21:5060"))
    now = service.clock()
    documents = []
    texts: list[str] = []
    for found in (True, False):
        if not found:
            monkeypatch.setattr(libpq, "_load", lambda: None)
        with open_reader(postgres_url, lambda text: text) as reader:
            assert reader is not None
            assert isinstance(reader._connection, libpq.Connection) is found
            documents.append(status_document(reader, node="pbx1", now=now))
            texts.append(status_text(reader, "pbx1", now))
    assert documents[0] == documents[1]
    assert texts[0] == texts[1]  # status --json's text, the listing written by the server
    assert [s["state"] for s in documents[0]["subscribers"]] == ["logged_on", "logged_off"]
