"""Call decisions made together in one transaction (the hook's group commit) answer as alone.

``BridgeService.authorize_group`` decides the calls the FastAGI hook queued meanwhile in one
transaction. Each must get the answer ``authorize`` would have given it asked alone, in the same
order, and the pool must end the same; one decision the database refuses, or whose caller gave
up, must leave the others decided and committed. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import text

from forum_bridge.config import Settings
from forum_bridge.core import Decision, LoggedOn, Reason
from forum_bridge.errors import DecisionAbandoned, ForumBridgeError, StoreError
from forum_bridge.service import BridgeService, CallQuestion, DecisionTicket
from tests.conftest import SettingsFactory

ServiceFactory = Callable[[Settings], BridgeService]
LOGONS = [f"g{i}" for i in range(6)]


def started(make_settings: SettingsFactory, make_service: ServiceFactory, url: str) -> BridgeService:
    service = make_service(make_settings(**{"database.url": url, "licences.count": 3}))
    service.import_subscribers("".join(f"{logon},{500 + i}\n" for i, logon in enumerate(LOGONS)))
    for logon in LOGONS[:5]:  # the last one never logs on
        service.apply(LoggedOn(logon, service.clock(), contact=f"sip:{logon}@127.0.0.1:5060"))
    return service


def questions() -> list[CallQuestion]:
    """New licences, a log-on calling twice, the same leg twice, a full pool, 112, not logged on."""
    return [
        CallQuestion("g0", "600", channel="PJSIP/g0-1"),
        CallQuestion("g1", "600", channel="PJSIP/g1-1"),
        CallQuestion("g0", "601", channel="PJSIP/g0-2"),
        CallQuestion("g0", "601", channel="PJSIP/g0-2"),
        CallQuestion("g2", "600", channel="PJSIP/g2-1"),
        CallQuestion("g3", "600", channel="PJSIP/g3-1"),
        CallQuestion("g4", "112", channel="PJSIP/g4-1"),
        CallQuestion("g5", "600", channel="PJSIP/g5-1"),
        CallQuestion("nobody", "600", channel="PJSIP/nobody-1"),
    ]


def state(
    service: BridgeService,
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], tuple[object, ...]]:
    """Who holds which licence, every call leg's decision, and the pool's row."""
    with service.database.engine.connect() as connection:
        held = [tuple(r) for r in connection.execute(text("SELECT slot, logon FROM licences ORDER BY slot"))]
        calls = [
            tuple(r)
            for r in connection.execute(
                text("SELECT channel, logon, allowed, reason FROM calls ORDER BY channel")
            )
        ]
        pool = tuple(connection.execute(text("SELECT total, used FROM licence_pool")).one())
    return held, calls, pool


def test_a_group_answers_each_call_as_deciding_it_alone_would(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, sqlite_url: str
) -> None:
    together = started(make_settings, make_service, database_url)
    alone = started(make_settings, make_service, f"{sqlite_url[:-3]}-alone.db")
    asked = questions()

    answers = together.authorize_group(asked)
    expected = [alone.authorize(q.logon, q.number, q.direction, channel=q.channel) for q in asked]

    assert answers == expected
    assert state(together) == state(alone)
    reasons = [a.reason for a in answers if isinstance(a, Decision)]
    # The mix the group had to get right: taken, held, the same leg once, full, 112, refused.
    assert {Reason.LICENCE_ACQUIRED, Reason.LICENSED, Reason.EMERGENCY_ONLY, Reason.EMERGENCY} <= set(reasons)
    assert answers[3] == answers[2]  # the same leg asked twice: one decision
    assert state(together)[2] == (3, 3)


def verdict(answer: Decision | ForumBridgeError) -> tuple[bool, Reason] | type[ForumBridgeError]:
    return (answer.allowed, answer.reason) if isinstance(answer, Decision) else type(answer)


def refuse_channel(service: BridgeService, channel: str) -> None:
    """Make the database itself refuse to store the decision of one call leg."""
    with service.database.engine.begin() as connection:
        if service.database.dialect == "sqlite":
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON calls"
                f" WHEN NEW.channel = '{channel}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        else:
            connection.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                f" $$ BEGIN IF NEW.channel = '{channel}' THEN RAISE EXCEPTION 'refused'; END IF;"
                " RETURN NEW; END $$"
            )
            connection.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON calls FOR EACH ROW EXECUTE FUNCTION refuse()"
            )


def test_one_decision_the_database_refuses_leaves_the_others_decided_and_committed(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str
) -> None:
    service = started(make_settings, make_service, database_url)
    refuse_channel(service, "PJSIP/g1-1")
    asked = [
        CallQuestion("g0", "600", channel="PJSIP/g0-1"),
        CallQuestion("g1", "600", channel="PJSIP/g1-1"),
        CallQuestion("g2", "600", channel="PJSIP/g2-1"),
        CallQuestion("g3", "112", channel="PJSIP/g3-1"),
    ]

    answers = service.authorize_group(asked)

    assert [verdict(a) for a in answers] == [
        (True, Reason.LICENCE_ACQUIRED),
        StoreError,
        (True, Reason.LICENCE_ACQUIRED),
        (True, Reason.EMERGENCY),
    ]
    held, calls, pool = state(service)
    assert sorted(logon for _slot, logon in held if logon) == ["g0", "g2"]  # g1's licence rolled back
    assert [c[0] for c in calls] == ["PJSIP/g0-1", "PJSIP/g2-1", "PJSIP/g3-1"]
    assert pool == (3, 2)


def test_a_refused_emergency_call_in_a_group_is_still_let_through(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str
) -> None:
    service = started(make_settings, make_service, database_url)
    refuse_channel(service, "PJSIP/g1-1")

    answers = service.authorize_group(
        [CallQuestion("g0", "600", channel="PJSIP/g0-1"), CallQuestion("g1", "112", channel="PJSIP/g1-1")]
    )

    assert [verdict(a) for a in answers] == [(True, Reason.LICENCE_ACQUIRED), (True, Reason.EMERGENCY)]
    assert state(service)[2] == (3, 1)


def test_a_caller_that_gave_up_takes_no_licence_and_the_others_are_committed(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str
) -> None:
    service = started(make_settings, make_service, database_url)
    patient = DecisionTicket(time.monotonic() + 30, "PJSIP/g0-1")
    gone = DecisionTicket(time.monotonic() + 30, "PJSIP/g1-1")
    expired = DecisionTicket(time.monotonic() - 1, "PJSIP/g2-1")
    assert service.give_up(gone, Decision(False, Reason.BRIDGE_ERROR))
    delivered: list[list[Decision | ForumBridgeError]] = []

    answers = service.authorize_group(
        [
            CallQuestion("g0", "600", channel="PJSIP/g0-1", ticket=patient),
            CallQuestion("g1", "600", channel="PJSIP/g1-1", ticket=gone),
            CallQuestion("g2", "600", channel="PJSIP/g2-1", ticket=expired),
        ],
        delivered.append,
    )

    assert verdict(answers[0]) == (True, Reason.LICENCE_ACQUIRED)
    assert isinstance(answers[1], DecisionAbandoned)  # its caller answered by the fail mode already
    assert isinstance(answers[2], DecisionAbandoned)
    assert delivered == [answers]  # handed on once, before the log lines
    held, calls, _pool = state(service)
    assert [logon for _slot, logon in held if logon] == ["g0"]
    assert [c[0] for c in calls] == ["PJSIP/g0-1"]
    # The leg answered without the database keeps that answer when its AMI event comes.
    assert verdict(service.authorize("g1", "600", channel="PJSIP/g1-1")) == (False, Reason.BRIDGE_ERROR)
    assert state(service)[2] == (3, 1)


def test_a_licence_taken_over_in_a_group_is_seen_by_the_later_calls_of_that_group(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, sqlite_url: str
) -> None:
    # A group reads its calls' facts before deciding them; a reserved log-on that takes over
    # another's licence changes the facts of that other log-on's call later in the same group.
    def prepared(url: str) -> BridgeService:
        service = make_service(make_settings(**{"database.url": url, "licences.count": 1}))
        service.import_subscribers("holder,701\nreserved,702\n")
        for logon in ("holder", "reserved"):
            service.apply(LoggedOn(logon, service.clock(), contact=f"sip:{logon}@127.0.0.1:5060"))
        assert service.authorize("holder", "600", channel="PJSIP/holder-1").reason is Reason.LICENCE_ACQUIRED
        service.set_reserved("reserved", True)
        return service

    together = prepared(database_url)
    alone = prepared(f"{sqlite_url[:-3]}-alone.db")
    asked = [
        CallQuestion("reserved", "600", channel="PJSIP/reserved-1"),
        CallQuestion("holder", "601", channel="PJSIP/holder-2"),
    ]

    answers = together.authorize_group(asked)
    expected = [alone.authorize(q.logon, q.number, q.direction, channel=q.channel) for q in asked]

    assert [verdict(a) for a in answers] == [(True, Reason.LICENCE_ACQUIRED), (False, Reason.EMERGENCY_ONLY)]
    assert answers == expected
    assert state(together) == state(alone)


def test_a_lone_calls_answer_goes_back_before_its_log_line_and_listeners(
    make_settings: SettingsFactory, make_service: ServiceFactory, sqlite_url: str
) -> None:
    """The hook's caller waits for the answer, not for the decision's log line or listeners."""
    service = started(make_settings, make_service, sqlite_url)
    events: list[str] = []
    service.add_listener(lambda record: events.append(f"listener {record.decision.reason.value}"))
    answers = service.authorize_group(
        [CallQuestion("g0", "600", channel="PJSIP/g0-9")],
        lambda answered: events.append(f"answered {verdict(answered[0])}"),
    )
    assert [verdict(answer) for answer in answers] == [(True, Reason.LICENCE_ACQUIRED)]
    assert events == [
        f"answered {(True, Reason.LICENCE_ACQUIRED)}",
        "listener licence_acquired",
    ]
