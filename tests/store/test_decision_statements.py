"""The call-decision statements run on the driver connection read and store what SQLAlchemy does.

The hook's decision reads a log-on's facts (:func:`ops.decision_facts`) and stores the leg's
decision (:func:`ops.record_call_decision`) on the session's driver connection, without
SQLAlchemy's execution layer (on PostgreSQL in libpq's pipeline mode, on SQLite on the sqlite3
cursor). These tests run the same statements through SQLAlchemy and compare, with hostile values
(quotes, parameter markers of every style, NUL, lone surrogates, over-long values), on both
databases; and check that a driver error is a StoreError that commits nothing.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from forum_bridge.core import Decision, Reason
from forum_bridge.errors import StoreError
from forum_bridge.store import operations as ops
from forum_bridge.store import write_behind
from forum_bridge.store.database import Database
from forum_bridge.store.models import CallRow, LicenceRow, ProfileRow, RegistrationRow, SubscriberRow, stored

PIECES = ["'", '"', "\\", "%s", "%(logon)s", "%%", ":logon", ":channel", "$1", "?", ";", "\r\n", "\x00",
          "\ud800", "\U0001f4de", "é", "--", "/*"]  # fmt: skip
AT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def nasty(rng: random.Random, length: int) -> str:
    """A string of ``length`` pieces and letters."""
    return "".join(rng.choice(PIECES) if rng.random() < 0.4 else rng.choice("abz09") for _ in range(length))


def facts_through_sqlalchemy(database: Database, node: str, logon: str, channel: str) -> ops.DecisionFacts:
    """What :func:`ops.decision_facts` must answer, by the same statement run through SQLAlchemy."""
    with database.read() as session:
        row = (
            session.connection().execute(ops._FACTS, {"logon": logon, "node": node, "channel": channel}).one()
        )
    managed, failed, reserved, registered, held, allowed, reason = row
    state = ops.LogonState(
        managed=bool(managed),
        logged_on=bool(registered) and bool(managed),
        last_logon_failed=bool(failed),
        holds_licence=held is not None,
    )
    earlier = Decision(bool(allowed), Reason(reason)) if allowed is not None and reason else None
    return ops.DecisionFacts(state, earlier, bool(reserved))


@pytest.mark.parametrize("seed", [11, 12])
def test_the_facts_read_on_the_driver_match_sqlalchemy(database_url: str, seed: int) -> None:
    rng = random.Random(seed)
    database = Database(database_url)
    try:
        database.upgrade()
        node = nasty(rng, 6)
        logons: list[str] = []
        channels: list[str] = []
        with database.transaction() as session:
            session.add(ProfileRow(name="hostile", keepalive_seconds=60))
            session.flush()
            stored_logons: set[str] = set()
            for i in range(40):
                logon = nasty(rng, rng.choice([2, 8, 200]))
                fitted = stored(SubscriberRow.logon, logon)
                if fitted in stored_logons:
                    continue
                stored_logons.add(fitted)
                logons.append(logon)
                session.add(
                    SubscriberRow(
                        logon=logon,
                        number=str(1000 + i),
                        profile="hostile",
                        last_logon_failed=rng.random() < 0.3,
                        created_at=AT,
                        reserved=rng.random() < 0.3,
                    )
                )
                session.flush()  # the subscriber first: the licence row refers to it
                if rng.random() < 0.6:
                    session.add(
                        RegistrationRow(
                            node=node, logon=logon, contact=f"sip:{i}@x", registered_at=AT, last_seen=AT
                        )
                    )
                if rng.random() < 0.5:
                    session.add(LicenceRow(slot=i + 1, logon=fitted, since=AT, node=node))
                channel = f"PJSIP/{nasty(rng, rng.choice([3, 300]))}-{i}"
                channels.append(channel)
                if rng.random() < 0.5:
                    session.add(
                        CallRow(
                            node=node,
                            channel=channel,
                            logon=logon,
                            number="600",
                            direction="outbound",
                            started_at=AT,
                            allowed=rng.random() < 0.5,
                            reason=rng.choice([r.value for r in Reason]),
                        )
                    )
        # Stored ones, unknown ones, and over-long variants (fitted to the stored value or not).
        questions = [(logon, channel) for logon, channel in zip(logons, channels, strict=True)]
        questions += [(nasty(rng, 5), nasty(rng, 9)) for _ in range(10)]
        questions += [(logon + "tail", channel) for logon, channel in questions[:10]]
        questions += [(logon, "") for logon, _channel in questions[:10]]
        compared = 0
        for logon, channel in questions:
            expected = facts_through_sqlalchemy(database, node, logon, channel)
            with database.begin() as session:
                got = ops.decision_facts(session, node, logon, channel)
            assert got == expected, (logon, channel)
            compared += expected.state.managed or expected.earlier is not None
        assert compared > 20  # the comparison covered stored rows, not only misses
    finally:
        database.dispose()


def test_a_leg_recorded_on_the_driver_is_read_back_as_sqlalchemy_stored_it(database_url: str) -> None:
    rng = random.Random(5)
    database = Database(database_url)
    try:
        database.upgrade()
        for i in range(30):
            node, logon, channel = nasty(rng, 4), nasty(rng, rng.choice([5, 200])), nasty(rng, 300) + str(i)
            decision = Decision(rng.random() < 0.5, rng.choice(list(Reason)))
            at = AT + timedelta(microseconds=rng.randrange(10**9))
            with database.begin() as session:
                ops.record_call_decision(
                    session, node, channel, logon, nasty(rng, 80), "outbound", at, decision
                )
            with database.begin() as session:
                assert ops.decision_facts(session, node, channel=channel, logon=logon).earlier == decision
            assert facts_through_sqlalchemy(database, node, logon, channel).earlier == decision
            with database.read() as session:
                started = session.get(CallRow, (stored(CallRow.node, node), stored(CallRow.channel, channel)))
                assert started is not None and started.started_at == at
    finally:
        database.dispose()


def test_a_driver_error_is_a_store_error_and_commits_nothing(database_url: str) -> None:
    database = Database(database_url)
    try:
        database.upgrade()
        decision = Decision(True, Reason.LICENSED)

        def transaction(values: dict[str, Any]) -> None:
            with database.begin() as session:
                ops.record_call_decision(session, "n", "PJSIP/a-1", "a", "600", "outbound", AT, decision)
                # The same statement, with a value its column refuses (NOT NULL), on the driver.
                connection = session.connection()
                if database.dialect == "sqlite":
                    write_behind.run_on_driver(connection, ops._CALL, values, fetch=False)
                else:
                    connection.execute(ops._CALL, values)

        broken = {"node": "n", "channel": "PJSIP/b-1", "logon": "b", "number": "600", "direction": "outbound",
                  "at": AT, "allowed": True, "reason": None}  # fmt: skip
        with pytest.raises(StoreError):
            transaction(broken)
        with database.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM calls")).scalar() == 0
    finally:
        database.dispose()


def test_a_begin_refused_by_a_locked_sqlite_database_is_a_store_error(sqlite_url: str) -> None:
    """SQLite's BEGIN runs on the driver: the lock held by another process still ends as StoreError."""
    import sqlite3

    database = Database(sqlite_url)
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        database.upgrade()
        with database.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA busy_timeout=50")  # the pooled connection gives up soon
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"), database.begin() as session:
            ops.decision_facts(session, "n", "a", "PJSIP/a-1")
        holder.execute("ROLLBACK")
        with database.begin() as session:  # the same pooled connection works again
            assert not ops.decision_facts(session, "n", "a", "PJSIP/a-1").state.managed
    finally:
        holder.close()
        database.dispose()


def test_a_decision_uses_cached_plans_only_until_its_commit(postgres_url: str) -> None:
    """PostgreSQL: a decision's key lookups run with the plan kept for a prepared statement instead
    of being planned at each execution (the connections' default, which the batches need); the
    setting ends with the decision's transaction."""
    database = Database(postgres_url)
    try:
        database.upgrade()
        # psycopg prepares a statement on its fifth execution; PostgreSQL then plans it for its
        # values five times (plan_cache_mode auto) before it settles on the kept plan.
        for i in range(20):
            with database.begin() as session:
                ops.decision_facts(session, "n", f"u{i}", f"PJSIP/u{i}-1")
                connection = session.connection()
                mode = connection.exec_driver_sql("SHOW plan_cache_mode").scalar()
                assert mode == "auto"
            with database.begin() as session:
                assert (
                    session.connection().exec_driver_sql("SHOW plan_cache_mode").scalar()
                    == "force_custom_plan"
                )
                plans = (
                    session.connection()
                    .exec_driver_sql(
                        "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                        " WHERE statement LIKE '%%FROM registrations r WHERE r.logon%%'"
                        " AND statement NOT LIKE '%%pg_prepared_statements%%'"
                    )
                    .all()
                )
        with database.begin() as session:  # a group of decisions, the same way
            ops.group_facts(session, "n", [("a", "PJSIP/a-1"), ("b", "PJSIP/b-1")])
            assert session.connection().exec_driver_sql("SHOW plan_cache_mode").scalar() == "auto"
        assert len(plans) == 1
        generic, custom = plans[0]
        assert custom == 5 and generic >= 5, (generic, custom)  # then no longer planned per execution
    finally:
        database.dispose()
