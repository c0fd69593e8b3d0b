"""A call's licence claimed with the COMMIT (PostgreSQL) stores what the claim before the commit stored.

On PostgreSQL a call of a log-on without a reservation sends its claim (pool row, licence row, usage
line, audit line, the leg's decision) in the same round trip as the COMMIT, and the answer is read
after it; a release's count-out of the pool's row travels with its COMMIT too. These tests run the
same decisions and releases through that path and through the one it replaced (the claim sent and
read before the commit), with hostile numbers and channels, a pool that runs full, reserved
log-ons and legs seen twice, and compare every answer and every row; and check that a claim whose
transaction fails or is abandoned commits nothing. On SQLite both runs take the one path SQLite
has, so the comparison holds there too.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import text

from forum_bridge.config import load_settings
from forum_bridge.core import Decision, Direction, LoggedOn, Reason
from forum_bridge.decision_gate import DecisionTicket
from forum_bridge.errors import DecisionAbandoned, StoreError
from forum_bridge.service import BridgeService, CallQuestion, _settled
from forum_bridge.store import operations as ops
from forum_bridge.store import write_behind
from forum_bridge.store.database import Database
from tests.conftest import FakeClock

# SQL's, psycopg's and SQLAlchemy's special characters, line breaks, NUL (PostgreSQL refuses it:
# the whole decision must then fail on both paths), a lone surrogate, and over-long values.
PIECES = ["'", '"', "\\", "%s", "%(logon)s", "%%", ":logon", ":channel", "$1", "?", ";", "\r\n", "\x00",
          "\ud800", "\U0001f4de", "é", "--", "/*", "slot "]  # fmt: skip

TABLES = {
    "audit": "SELECT at, kind, logon, number, reason, node, actor, detail FROM audit ORDER BY id",
    "calls": "SELECT node, channel, logon, number, direction, started_at, allowed, reason FROM calls"
    " ORDER BY node, channel",
    "licences": "SELECT slot, logon, since, node FROM licences ORDER BY slot",
    "pool": "SELECT total, used, reserved, reserved_used, warned FROM licence_pool",
    "usage": "SELECT at, used, total FROM licence_usage ORDER BY id",
}
LOGONS = [f"p{n}" for n in range(8)]
RESERVED = "lift"


def nasty(rng: random.Random, length: int) -> str:
    """A string of ``length`` pieces and letters; the NUL only now and then."""
    pieces = PIECES if rng.random() < 0.1 else [p for p in PIECES if p != "\x00"]
    return "".join(rng.choice(pieces) if rng.random() < 0.4 else rng.choice("abz09") for _ in range(length))


def snapshot(database: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the licence path writes, as stored."""
    with database.engine.connect() as connection:
        return {name: [tuple(r) for r in connection.execute(text(sql))] for name, sql in TABLES.items()}


def service_on(url: str, clock: FakeClock, licences: int = 4) -> BridgeService:
    """A fresh schema with the test's log-ons, all logged on, and a started service."""
    database = Database(url)
    database.upgrade()
    settings = load_settings(
        environ={}, overrides={"database.url": url, "licences.count": licences, "node.name": "pbx1"}
    )
    service = BridgeService(settings, database, clock=clock)
    service.start()
    service.add_subscriber(RESERVED, "90", reserved=True)
    for n, logon in enumerate(LOGONS):
        service.add_subscriber(logon, f"2{n}")
    for logon in [RESERVED, *LOGONS]:
        service.apply(LoggedOn(logon, at=clock(), contact=f"sip:{logon}@127.0.0.1:5060"))
    return service


def scenario(service: BridgeService, clock: FakeClock, seed: int) -> list[str]:
    """Random calls (some legs asked twice, some in groups), releases and log-offs; each answer."""
    rng = random.Random(seed)
    answers: list[str] = []
    channels: list[str] = []
    for step in range(60):
        clock.advance(1)
        logon = rng.choice([RESERVED, *LOGONS, *LOGONS])
        roll = rng.random()
        try:
            if roll < 0.5:
                if channels and rng.random() < 0.2:
                    channel = rng.choice(channels)  # the same leg again: one decision
                else:
                    channel = (
                        "" if rng.random() < 0.2 else f"PJSIP/{step}-" + nasty(rng, rng.choice([3, 40, 300]))
                    )
                    channels.append(channel)
                number = nasty(rng, rng.choice([3, 20, 100]))
                answer = service.authorize(logon, number, channel=channel)
                answers.append(f"authorize {answer.allowed} {answer.reason.value}")
            elif roll < 0.65:
                questions = [
                    CallQuestion(
                        rng.choice(LOGONS),
                        nasty(rng, 5),
                        Direction.OUTBOUND,
                        f"PJSIP/g{step}-{i}-" + nasty(rng, 4),
                    )
                    for i in range(rng.choice([2, 3]))
                ]
                group = service.authorize_group(questions)
                answers.append("group " + ",".join(
                    f"{a.allowed} {a.reason.value}" if not isinstance(a, Exception) else type(a).__name__
                    for a in group
                ))  # fmt: skip
            else:
                with service.database.transaction() as session:
                    slot = ops.release(session, logon, clock(), "logoff", service.node)
                answers.append(f"release {slot}")
        except StoreError as exc:
            answers.append(f"error {exc}")
    return answers


def run(
    url: str,
    clock_start: FakeClock,
    seed: int,
    *,
    with_commit: bool,
    monkeypatch: Any,
    through_sqlalchemy: bool = False,
) -> Any:
    clock = FakeClock()
    clock.now = clock_start.now
    with monkeypatch.context() as patch:
        if not with_commit:
            patch.setattr(ops, "claims_with_commit", lambda session: False)
            patch.setattr(ops, "flush_pool", _flush_now(ops.flush_pool))
        if through_sqlalchemy:
            patch.setattr(write_behind, "run_on_driver", _through_sqlalchemy)
        service = service_on(url, clock)
        try:
            answers = scenario(service, clock, seed)
            rows = snapshot(service.database)
            with service.database.transaction() as session:  # the pool's row is exact afterwards
                counted = ops.pool_counts(session)
            assert rows["pool"][0][:4] == (
                counted.total,
                counted.used,
                counted.reserved,
                counted.reserved_used,
            )
            assert counted.used == sum(1 for r in rows["licences"] if r[1] is not None)
            service.database.downgrade()
        finally:
            service.database.dispose()
    return answers, rows


def _through_sqlalchemy(connection: Any, statement: Any, values: dict[str, Any], *, fetch: bool) -> Any:
    """What write_behind.run_on_driver replaced: the statement through SQLAlchemy's execution."""
    result = connection.execute(statement, values)
    return result.first() if fetch else None


def _flush_now(flush: Any) -> Any:
    def flush_now(session: Any, *, with_commit: bool = False) -> None:
        flush(session)  # the count-out sent before the commit, as before

    return flush_now


@pytest.mark.parametrize("seed", [11, 12])
def test_claims_with_the_commit_store_what_claims_before_it_stored(
    database_url: str, clock: FakeClock, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = run(database_url, clock, seed, with_commit=False, monkeypatch=monkeypatch)
    after = run(database_url, clock, seed, with_commit=True, monkeypatch=monkeypatch)
    assert_same_answers_and_rows(before, after)


def assert_same_answers_and_rows(before: Any, after: Any) -> None:
    """Two runs of :func:`scenario` gave the same answers and left the same rows."""
    assert after[0] == before[0]
    for table in TABLES:
        assert after[1][table] == before[1][table], table
    answers = " ".join(before[0])
    # The scenario reached what it is meant to compare: grants, a full pool, releases, and a NUL.
    assert "licence_acquired" in answers and "emergency_only" in answers and "release 1" in answers


@pytest.mark.parametrize("seed", [11, 12])
def test_sqlite_licence_statements_on_the_driver_store_what_sqlalchemy_stored(
    sqlite_url: str, clock: FakeClock, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite runs a claim's statements (the pool's row, the licence row, the usage and audit lines)
    on the sqlite3 cursor: the same random calls through SQLAlchemy's execution give the same
    answers and the same rows, hostile values and a pool that runs full included."""
    before = run(sqlite_url, clock, seed, with_commit=True, monkeypatch=monkeypatch, through_sqlalchemy=True)
    after = run(sqlite_url, clock, seed, with_commit=True, monkeypatch=monkeypatch)
    assert_same_answers_and_rows(before, after)
    assert any(len(row[2]) > 100 or "'" in row[3] for row in after[1]["audit"])  # hostile values stored


def test_the_claim_travels_with_the_commit_on_postgresql(postgres_url: str, clock: FakeClock) -> None:
    service = service_on(postgres_url, clock)
    try:
        database = service.database
        with database.begin() as session:
            facts = ops.decision_facts(session, service.node, LOGONS[1], "PJSIP/a-2")
            assert not facts.state.holds_licence
            wanted = Decision(True, Reason.LICENCE_ACQUIRED, takes_licence=True)
            decision = service._apply_decision(
                session, LOGONS[1], "600", Direction.OUTBOUND, wanted, clock(), False, "PJSIP/a-2"
            )
            assert write_behind.pending(session.connection()) == 2  # the pool row's lock and the claim
            with database.engine.connect() as other:  # nothing sent: nothing taken, nothing locked
                held = other.execute(text("SELECT count(*) FROM licences WHERE logon = :l"), {"l": LOGONS[1]})
                assert held.scalar() == 0
                other.execute(text("SELECT used FROM licence_pool FOR UPDATE NOWAIT")).scalar()
                other.rollback()
            assert decision.allowed is False  # reads as the denial until settled
        settled = _settled(decision)
        assert settled == wanted
        calls = snapshot(database)["calls"]
        assert [(c[1], c[6], c[7]) for c in calls] == [("PJSIP/a-2", True, "licence_acquired")]
    finally:
        service.database.dispose()


REFUSE_ACQUIRE = {
    "sqlite": [
        "CREATE TRIGGER refuse_acquire BEFORE INSERT ON audit WHEN NEW.kind = 'acquire'"
        " BEGIN SELECT RAISE(ABORT, 'acquire refused by the test'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_acquire() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN IF NEW.kind = 'acquire' THEN RAISE EXCEPTION 'acquire refused by the test'; END IF;"
        " RETURN NEW; END$$",
        "CREATE TRIGGER refuse_acquire BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION refuse_acquire()",
    ],
}


def test_a_failing_claim_commits_nothing(database_url: str, clock: FakeClock) -> None:
    service = service_on(database_url, clock)
    database = service.database
    try:
        with database.engine.begin() as connection:
            for statement in REFUSE_ACQUIRE[database.dialect]:
                connection.execute(text(statement))
        before = snapshot(database)
        # The claim's own audit line fails: the claim, the pool's row, the usage line and the leg's
        # record are all refused with it, and the caller gets a StoreError.
        with pytest.raises(StoreError, match="acquire refused by the test"):
            service.authorize(LOGONS[0], "600", channel="PJSIP/refused-1")
        assert snapshot(database) == before
        with database.engine.begin() as connection:
            connection.execute(
                text(
                    "DROP TRIGGER refuse_acquire" + (" ON audit" if database.dialect == "postgresql" else "")
                )
            )
        answer = service.authorize(LOGONS[0], "600", channel="PJSIP/refused-1")
        assert answer.reason is Reason.LICENCE_ACQUIRED  # the leg was never decided: decided now
        after = snapshot(database)
        assert after["pool"][0][1] == 1 == sum(1 for r in after["licences"] if r[1] is not None)
    finally:
        database.dispose()


def test_an_abandoned_decision_takes_no_licence(database_url: str, clock: FakeClock) -> None:
    service = service_on(database_url, clock)
    try:
        before = snapshot(service.database)
        ticket = DecisionTicket(deadline=0.0)  # its caller stopped waiting long ago
        with pytest.raises(DecisionAbandoned):
            service.authorize(LOGONS[0], "600", channel="PJSIP/late-1", ticket=ticket)
        assert snapshot(service.database) == before
    finally:
        service.database.dispose()


def test_write_behind_listens_only_on_postgresql(sqlite_url: str, postgres_url: str) -> None:
    for url, listening in ((sqlite_url, False), (postgres_url, True)):
        database = Database(url)
        try:
            assert bool(database.engine.dispatch.before_cursor_execute) is listening
            assert bool(database.engine.dispatch.commit) is listening
        finally:
            database.dispose()
