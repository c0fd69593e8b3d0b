"""The decision path's pipelines sent through libpq directly (``store.libpq_pipeline``).

They must answer what psycopg's own cursor answers for the same statement and values, prepare
each statement once per connection, leave the connection usable after any error, survive their
prepared statements being dropped, and let other threads run while they wait for the server.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import threading
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import pq

from forum_bridge.errors import StoreError
from forum_bridge.store import libpq_pipeline
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from tests.conftest import wait_until

pytestmark = pytest.mark.postgres

_VALUES = (
    "SELECT %(t)s::text, %(i)s::bigint, %(n)s::int, %(b)s::boolean, %(at)s::timestamptz,"
    " %(none)s::text, %(l)s::text[], %(t)s = %(t)s"
)
_OURS = "SELECT count(*) FROM pg_prepared_statements WHERE starts_with(name, 'fb_')"


def libpq_url(url: str) -> str:
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


@pytest.fixture
def database(postgres_url: str, databases: list[Database]) -> Database:
    """The bridge's own database on PostgreSQL, its schema made."""
    database = Database(postgres_url)
    databases.append(database)
    database.upgrade()
    return database


@pytest.fixture
def connection(postgres_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(libpq_url(postgres_url), prepare_threshold=None) as connection:
        yield connection


@pytest.mark.parametrize(
    "values",
    [
        {"t": "o'k %s %(t)s $1 ;--", "i": 2**40, "n": -7, "b": True, "none": None, "l": ["a", "b,c", '"']},
        {"t": "é \U0001f4de\r\n", "i": 0, "n": 2**31 - 1, "b": False, "none": None, "l": []},
    ],
)
def test_rows_are_what_psycopgs_own_cursor_returns(
    connection: psycopg.Connection, values: dict[str, object]
) -> None:
    values = {**values, "at": datetime(2026, 12, 3, 8, 0, 0, 123456, tzinfo=UTC)}
    expected = connection.execute(_VALUES, values).fetchone()
    connection.rollback()
    rows = libpq_pipeline.first_rows(connection, [(_VALUES, values), ("SELECT 1 WHERE false", {})])
    assert rows == [expected, None]
    assert connection.pgconn.transaction_status == pq.TransactionStatus.INTRANS  # it opened one


def test_a_statement_is_prepared_once_per_connection(connection: psycopg.Connection) -> None:
    for number in range(7):
        rows = libpq_pipeline.first_rows(connection, [("SELECT %(n)s::int + 1", {"n": number})])
        assert rows == [(number + 1,)]
    assert connection.execute(_OURS).fetchone() == (1,)


def test_a_value_psycopg_refuses_sends_nothing(connection: psycopg.Connection) -> None:
    with pytest.raises(psycopg.DataError):
        libpq_pipeline.first_rows(connection, [("SELECT 1", {}), ("SELECT %(t)s::text", {"t": "a\x00b"})])
    # Nothing went out: no transaction was opened and the connection is out of pipeline mode.
    assert connection.pgconn.transaction_status == pq.TransactionStatus.IDLE
    assert connection.pgconn.pipeline_status == pq.PipelineStatus.OFF
    assert libpq_pipeline.first_rows(connection, [("SELECT %(t)s::text", {"t": "ab"})]) == [("ab",)]


def test_an_error_skips_the_rest_and_the_first_error_is_raised(connection: psycopg.Connection) -> None:
    connection.execute("CREATE TABLE seen (n int)")
    connection.commit()
    insert = "INSERT INTO seen VALUES (%(n)s)"
    with pytest.raises(psycopg.errors.DivisionByZero):
        libpq_pipeline.first_rows(
            connection,
            [(insert, {"n": 1}), ("SELECT 1 / %(zero)s", {"zero": 0}), (insert, {"n": 2}), ("COMMIT", {})],
        )
    assert connection.pgconn.transaction_status == pq.TransactionStatus.INERROR  # COMMIT skipped too
    connection.rollback()
    assert connection.execute("SELECT count(*) FROM seen").fetchone() == (0,)
    libpq_pipeline.first_rows(connection, [(insert, {"n": 3}), ("COMMIT", {})])
    assert connection.execute("SELECT array_agg(n) FROM seen").fetchone() == ([3],)


def test_statements_dropped_by_deallocate_all_are_prepared_again(connection: psycopg.Connection) -> None:
    statement = ("SELECT %(n)s::int * 2", {"n": 21})
    assert libpq_pipeline.first_rows(connection, [statement, ("COMMIT", {})]) == [(42,), None]
    connection.execute("DEALLOCATE ALL")
    connection.commit()
    with pytest.raises(psycopg.errors.InvalidSqlStatementName):
        libpq_pipeline.first_rows(connection, [statement])
    connection.rollback()
    assert libpq_pipeline.first_rows(connection, [statement]) == [(42,)]


def test_another_thread_runs_while_a_pipeline_waits_for_the_server(
    connection: psycopg.Connection, postgres_url: str
) -> None:
    """The hook's event loop shares the process with the threads deciding calls: a pipeline
    waiting on a lock must not hold the interpreter. If it did, this thread could not see the
    wait and release the lock; the waiting one gives up after 20 s (lock_timeout) and fails."""
    with psycopg.connect(libpq_url(postgres_url), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(4242)")
        connection.execute("SET lock_timeout = '20s'")
        connection.commit()
        outcome: list[object] = []

        def wait_for_the_lock() -> None:
            try:
                outcome.append(
                    libpq_pipeline.first_rows(
                        connection, [("SELECT pg_advisory_xact_lock(%(k)s)", {"k": 4242})]
                    )
                )
            except psycopg.Error as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait_for_the_lock)
        waiter.start()
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        wait_until(lambda: holder.execute(waiting).fetchone() == (1,), what="the pipeline waits for the lock")
        assert not outcome
        holder.execute("SELECT pg_advisory_unlock(4242)")
        waiter.join(10)
    assert outcome == [[("",)]]


def test_a_read_transactions_rollback_keeps_the_decision_paths_statements(database: Database) -> None:
    """A rollback (every read transaction ends with one) must not drop the prepared statements:
    decisions go on working, and the connection holds each statement once."""
    counts = set()
    for _ in range(6):
        with database.begin() as session:
            facts = ops.decision_facts(session, "node1", "u1", "")
            assert not facts.state.managed
        with database.read() as session:
            counts.add(session.connection().exec_driver_sql(_OURS).scalar_one())
    assert len(counts) == 1 and counts.pop() >= 1


def test_a_dropped_statement_fails_one_transaction_only(database: Database) -> None:
    with database.begin() as session:
        ops.decision_facts(session, "node1", "u1", "")
        session.connection().exec_driver_sql("DEALLOCATE ALL")
    with pytest.raises(StoreError), database.begin() as session:
        ops.decision_facts(session, "node1", "u1", "")
    with database.begin() as session:
        assert not ops.decision_facts(session, "node1", "u1", "").state.managed


def test_a_statement_sent_twice_in_one_pipeline_is_prepared_once(connection: psycopg.Connection) -> None:
    statement = "SELECT %(n)s::int * 10"
    rows = libpq_pipeline.first_rows(connection, [(statement, {"n": n}) for n in range(4)])
    assert rows == [(0,), (10,), (20,), (30,)]
    assert connection.execute(_OURS).fetchone() == (1,)


def test_prepared_statements_stay_bounded(
    connection: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(libpq_pipeline, "PREPARED_LIMIT", 3)
    for n in range(6):
        statement = f"SELECT %(n)s::int + {n}"
        assert libpq_pipeline.first_rows(connection, [(statement, {"n": 1})]) == [(n + 1,)]
    assert connection.execute(_OURS).fetchone() == (3,)


def test_a_connection_numbered_above_1024_works(postgres_url: str) -> None:
    """A busy bridge holds more than 1,024 descriptors (hook clients, status pollers); select()
    cannot watch one numbered above that, so waiting for the server must not use it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 2048, (
        f"the test needs 2,048 descriptors (hard limit {hard})"
    )
    resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    filler = []
    try:
        while len(filler) < 1100:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        with psycopg.connect(libpq_url(postgres_url), prepare_threshold=None) as connection:
            assert connection.pgconn.socket > 1024
            rows = libpq_pipeline.first_rows(connection, [("SELECT %(n)s::int", {"n": 5}), ("COMMIT", {})])
            assert rows == [(5,), None]
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_pipeline_that_fails_midway_leaves_no_broken_connection_behind(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for the server failed with results unread: that connection could serve nothing
    else, so it is closed and the next transaction gets a working one."""

    def broken_wait(fd: int, events: int) -> int:
        raise OSError("poll failed")

    monkeypatch.setattr(libpq_pipeline, "_wait", broken_wait)
    # The rollback that follows meets the closed connection: a StoreError, as for any
    # connection lost in the middle of a transaction.
    with pytest.raises(StoreError, match="connection is closed"), database.begin() as session:
        ops.decision_facts(session, "node1", "u1", "")
    monkeypatch.undo()
    with database.begin() as session:
        assert not ops.decision_facts(session, "node1", "u1", "").state.managed


def test_a_closed_connection_is_not_kept_alive(postgres_url: str) -> None:
    """What the module remembers per connection goes with the connection: a bridge that
    reconnects for weeks must not keep every connection it ever used."""
    connection = psycopg.connect(libpq_url(postgres_url), prepare_threshold=None)
    libpq_pipeline.first_rows(connection, [("SELECT %(n)s::int", {"n": 1}), ("COMMIT", {})])
    connection.close()
    gone = weakref.ref(connection)
    del connection
    gc.collect()
    assert gone() is None
