"""Writes deferred to the commit (store.write_behind) store what SQLAlchemy's execution stores.

On PostgreSQL a call leg's record and audit lines are queued on the connection and sent, with the
driver's own parameter style, together with the transaction's next round trip (usually the
COMMIT). These tests compare that path with the same statements run through SQLAlchemy, with
hostile values, on SQLite and PostgreSQL; and check that a later statement sees an earlier
deferred write, that a rollback or a failing write commits nothing, and that a decision still
writes its leg exactly once.
"""

from __future__ import annotations

import random
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from forum_bridge.core import Decision, Reason
from forum_bridge.errors import StoreError
from forum_bridge.store import operations as ops
from forum_bridge.store import write_behind
from forum_bridge.store.database import Database

# SQL's, psycopg's and SQLAlchemy's special characters, line breaks, NUL, a lone surrogate,
# characters outside the BMP, and lengths beyond every column.
PIECES = ["'", '"', "\\", "%s", "%(logon)s", "%%", ":logon", "$1", "?", ";", "\r\n", "\x00", "\ud800",
          "\U0001f4de", "é", "--", "/*"]  # fmt: skip

CALLS = text(
    "SELECT node, channel, logon, number, direction, started_at, allowed, reason FROM calls ORDER BY node, channel"
)
AUDIT = text("SELECT at, kind, logon, number, reason, node, actor, detail FROM audit ORDER BY id")


def nasty(rng: random.Random, length: int) -> str:
    """A string of ``length`` pieces and letters."""
    return "".join(rng.choice(PIECES) if rng.random() < 0.4 else rng.choice("abz09") for _ in range(length))


def rows(database: Database) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every call leg and audit line, as stored."""
    with database.engine.connect() as connection:
        return [tuple(r) for r in connection.execute(CALLS)], [tuple(r) for r in connection.execute(AUDIT)]


def write(database: Database, values: list[dict[str, Any]], *, through_sqlalchemy: bool) -> None:
    """Each value set as a leg record and an audit line, one transaction each."""
    for value in values:
        with database.begin() as session:
            if through_sqlalchemy:
                connection = session.connection()
                connection.execute(ops._CALL, value["call"])
                connection.execute(ops._AUDIT, value["audit"])
            else:
                call = value["call"]
                ops.record_call_decision(
                    session,
                    call["node"],
                    call["channel"],
                    call["logon"],
                    call["number"],
                    call["direction"],
                    call["at"],
                    Decision(call["allowed"], Reason(call["reason"])),
                )
                ops.audit(session, **value["audit"])


@pytest.mark.parametrize("seed", [3, 4])
def test_deferred_writes_store_what_sqlalchemy_stores(database_url: str, seed: int) -> None:
    rng = random.Random(seed)
    at = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    values = []
    for i in range(40):
        length = rng.choice([3, 10, 300, 1000])
        values.append(
            {
                "call": {
                    "node": nasty(rng, rng.choice([3, 200])),
                    "channel": f"PJSIP/{i}-" + nasty(rng, length),
                    "logon": nasty(rng, length),
                    "number": nasty(rng, rng.choice([4, 100])),
                    "direction": rng.choice(["outbound", "inbound"]),
                    "at": at + timedelta(microseconds=rng.randrange(10**9)),
                    "allowed": rng.random() < 0.5,
                    "reason": rng.choice([r.value for r in Reason]),
                },
                "audit": {
                    "at": at + timedelta(seconds=i),
                    "kind": rng.choice(["deny", "release"]),
                    "logon": nasty(rng, length),
                    "number": nasty(rng, 20),
                    "reason": nasty(rng, 70),
                    "node": nasty(rng, 5),
                    "actor": nasty(rng, 300),
                    "detail": nasty(rng, length),
                },
            }
        )
    stored = []
    for through_sqlalchemy in (True, False):
        database = Database(database_url)
        try:
            database.upgrade()
            outcome: list[str] = []
            for value in values:
                try:
                    write(database, [value], through_sqlalchemy=through_sqlalchemy)
                    outcome.append("stored")
                except StoreError as exc:  # e.g. NUL on PostgreSQL: refused the same way by both
                    outcome.append(str(exc))
            stored.append((outcome, rows(database)))
            database.downgrade()
        finally:
            database.dispose()
    assert stored[0][0] == stored[1][0]
    assert stored[0][1] == stored[1][1]
    assert any(o == "stored" for o in stored[0][0])


def test_a_later_statement_sees_an_earlier_deferred_write(database_url: str) -> None:
    database = Database(database_url)
    try:
        database.upgrade()
        at = datetime(2026, 12, 3, tzinfo=UTC)
        with database.begin() as session:
            ops.audit(session, at, "deny", logon="a")
            if database.dialect == "postgresql":
                assert write_behind.pending(session.connection()) == 1  # not sent yet
            seen = session.connection().execute(text("SELECT count(*) FROM audit")).scalar()
            assert write_behind.pending(session.connection()) == 0
            assert seen == 1
            ops.audit(session, at, "deny", logon="b")
            ops.audit(session, at, "deny", logon="c")
        assert [r[2] for r in rows(database)[1]] == ["a", "b", "c"]  # in the order they were made
    finally:
        database.dispose()


def test_a_rollback_drops_the_deferred_writes(database_url: str) -> None:
    database = Database(database_url)
    try:
        database.upgrade()
        at = datetime(2026, 12, 3, tzinfo=UTC)

        def failing_caller() -> None:
            with database.begin() as session:
                ops.audit(session, at, "deny", logon="dropped")
                raise RuntimeError("caller failed")

        with pytest.raises(RuntimeError):
            failing_caller()
        # The same pooled connection commits the next transaction without the dropped line.
        with database.begin() as session:
            ops.audit(session, at, "deny", logon="kept")
        assert [r[2] for r in rows(database)[1]] == ["kept"]
    finally:
        database.dispose()


def test_a_failing_deferred_write_is_a_store_error_and_commits_nothing(database_url: str) -> None:
    database = Database(database_url)
    try:
        database.upgrade()
        at = datetime(2026, 12, 3, tzinfo=UTC)
        broken = text("INSERT INTO audit (at, kind) VALUES (:at, NULL)")  # kind is NOT NULL

        def transaction() -> None:
            with database.begin() as session:
                ops.audit(session, at, "deny", logon="before")
                write_behind.defer(session.connection(), broken, {"at": at})

        with pytest.raises(StoreError):
            transaction()
        with database.begin() as session:
            ops.audit(session, at, "deny", logon="after")
        assert [r[2] for r in rows(database)[1]] == ["after"]
    finally:
        database.dispose()


def test_the_connection_set_up_warns_nothing(database_url: str) -> None:
    # SQLAlchemy may catch a warning raised while a connection goes back to its pool; recorded
    # here, a listener with an outdated signature (one warning per transaction) is seen.
    database = Database(database_url)
    try:
        database.upgrade()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n in range(3):
                with database.begin() as session:
                    ops.audit(session, datetime(2026, 12, 3, tzinfo=UTC), "deny", logon=f"w{n}")
        assert [str(w.message) for w in caught] == []
        assert len(rows(database)[1]) == 3
    finally:
        database.dispose()
