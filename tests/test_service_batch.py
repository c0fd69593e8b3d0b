"""apply_batch (one transaction for many events), the failure digest, counts() and the keepalive clock
judged as of what has been applied; on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event

from forum_bridge.batching import DIGEST_INDIVIDUAL, DIGEST_WINDOW_SECONDS, SUMMARY_KIND
from forum_bridge.config import Settings
from forum_bridge.core import CallEnded, CallStarted, Direction, Keepalive, LoggedOff, LoggedOn, LogonFailed
from forum_bridge.core.events import Event
from forum_bridge.service import BridgeService
from tests.conftest import FakeClock, SettingsFactory

ServiceFactory = Callable[[Settings], BridgeService]
LOGONS = ["21-desk", "21-soft", "22-desk", "23-desk", "trunk-a", "nobody"]
MANAGED = LOGONS[:4]


def provision(service: BridgeService) -> None:
    service.set_profile("short", 30)
    service.add_subscriber("21-desk", "21")
    service.add_subscriber("21-soft", "21")
    service.add_subscriber("22-desk", "22", "short")
    service.add_subscriber("23-desk", "23")


def random_events(rng: random.Random, clock: FakeClock, count: int) -> list[Event]:
    """A random but plausible stream: registrations, refreshes, log-offs, failures, calls."""
    events: list[Event] = []
    channel = 0
    for _ in range(count):
        clock.advance(rng.choice([0, 0, 1, 5]))
        logon = rng.choice(LOGONS)
        contact = f"sip:{logon}@127.0.0.1:{rng.choice([5060, 5061])}"
        kind = rng.random()
        if kind < 0.3:
            events.append(LoggedOn(logon, clock(), contact=contact, source="127.0.0.1:5060", user_agent="UA"))
        elif kind < 0.55:
            # Half of them confirmed REGISTERs (which may lift a block), some confirmed late.
            confirmed = rng.random() < 0.5
            at = clock() - timedelta(seconds=rng.choice([0, 0, 3])) if confirmed else clock()
            events.append(Keepalive(logon, at, source="127.0.0.1:5060", clears_block=confirmed))
        elif kind < 0.7:
            events.append(LoggedOff(logon, clock(), contact=rng.choice([contact, ""]), reason="logoff"))
        elif kind < 0.8:
            events.append(LogonFailed(logon, clock(), source="198.51.100.7:5060", reason="wrong_password"))
        elif kind < 0.92:
            channel += 1
            events.append(
                CallStarted(logon, f"PJSIP/{logon}-{channel:08x}", "600", Direction.OUTBOUND, clock())
            )
        else:
            events.append(CallEnded(f"PJSIP/{logon}-{rng.randint(1, max(channel, 1)):08x}", clock(), logon))
    return events


def comparable(service: BridgeService) -> dict[str, Any]:
    """The state two services must agree on (audit ids and generation time left out)."""
    status = service.status()
    audit = [{k: v for k, v in row.items() if k != "at"} for row in service.audit_log(1000)]
    return {
        "licences": status["licences"],
        "holders": sorted(a["logon"] for a in status["assignments"]),
        "subscribers": status["subscribers"],
        "unmanaged": status["unmanaged"],
        "calls": sorted(c["channel"] for c in status["calls"]),
        "audit": sorted(audit, key=lambda r: sorted((k, str(v)) for k, v in r.items())),
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_has_exactly_the_effects_of_its_events_one_by_one(
    make_settings: SettingsFactory,
    make_service: ServiceFactory,
    sqlite_url: str,
    database_url: str,
    clock: FakeClock,
    seed: int,
    tmp_path: Any,
) -> None:
    one_url = f"sqlite:///{tmp_path / 'one-by-one.db'}"
    one = make_service(make_settings(**{"database.url": one_url, "licences.count": 2}))
    batched = make_service(make_settings(**{"database.url": database_url, "licences.count": 2}))
    provision(one)
    provision(batched)
    events = random_events(random.Random(seed), clock, 400)
    singles = [one.apply(e) for e in events]
    outcomes: list[Any] = []
    rng = random.Random(seed + 100)
    position = 0
    while position < len(events):
        size = rng.randint(1, 60)
        outcomes += batched.apply_batch(events[position : position + size])
        position += size
    assert outcomes == singles
    assert comparable(batched) == comparable(one)


def test_a_storm_is_a_few_transactions_not_one_per_event(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, clock: FakeClock
) -> None:
    service = make_service(make_settings(**{"database.url": database_url}))
    service.import_subscribers("".join(f"p{i},{100 + i}\n" for i in range(300)))
    storm: list[Event] = []
    for i in range(300):
        storm.append(Keepalive(f"p{i}", clock(), source="127.0.0.1:5060"))
        storm.append(LoggedOn(f"p{i}", clock(), contact=f"sip:p{i}@127.0.0.1:5060"))
    commits: list[int] = []

    def committed(_conn: Any) -> None:
        commits.append(1)

    event.listen(service.database.engine, "commit", committed)
    outcomes = service.apply_batch(storm)
    event.remove(service.database.engine, "commit", committed)
    assert len(commits) == 1
    # Each first SuccessfulAuth came before its contact: unknown then, known after.
    assert [o.unknown_registration for o in outcomes[::2]] == [True] * 300
    assert {s["state"] for s in service.status()["subscribers"]} == {"logged_on"}
    refreshed = service.apply_batch([Keepalive(f"p{i}", clock.advance(1)) for i in range(300)])
    assert not any(o.unknown_registration for o in refreshed)


def test_one_bad_event_does_not_cost_the_others(
    make_settings: SettingsFactory, make_service: ServiceFactory, clock: FakeClock
) -> None:
    service = make_service(make_settings())
    service.add_subscriber("21-desk", "21")
    service.add_subscriber("22-desk", "22")
    # A naive time is refused by the store: the run fails as a whole, then goes one by one.
    bad = LoggedOn("22-desk", clock().replace(tzinfo=None), contact="sip:b")
    outcomes = service.apply_batch(
        [LoggedOn("21-desk", clock(), contact="sip:a"), bad, LogonFailed("22-desk", clock())]
    )
    assert len(outcomes) == 3
    states = {s["logon"]: s["state"] for s in service.status()["subscribers"]}
    assert states == {"21-desk": "logged_on", "22-desk": "logon_failed"}


def test_a_flood_of_unknown_log_ons_is_summarised_not_written_row_by_row(
    make_settings: SettingsFactory,
    make_service: ServiceFactory,
    database_url: str,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="forum_bridge.service")
    service = make_service(make_settings(**{"database.url": database_url}))
    service.add_subscriber("21-desk", "21")
    flood = [
        LogonFailed(f"scan{i}", clock(), source=f"203.0.113.{i % 3}:5060", reason="unknown_user")
        for i in range(1000)
    ]
    service.apply_batch(flood[:500])
    service.apply(LogonFailed("21-desk", clock(), source="192.0.2.1:5060"))  # a real phone, mid-flood
    service.apply_batch(flood[500:])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == DIGEST_INDIVIDUAL + 1
    assert not service.flush_failure_summary()  # the window has not ended yet
    clock.advance(DIGEST_WINDOW_SECONDS)
    assert service.flush_failure_summary()
    failed = service.status()["failed_logons"]
    summary = failed[0]
    assert summary["count"] == 1000 - DIGEST_INDIVIDUAL
    assert summary["distinct"] == 1000 - DIGEST_INDIVIDUAL
    assert summary["reason"] == "unknown_user"
    assert summary["source"].startswith("203.0.113.")
    assert len(summary["sample"]) == 5 and summary["sample"][0] == summary["logon"]
    # The managed phone's failure is still there, one by one, among a dozen rows, not 1,000.
    assert any(f["logon"] == "21-desk" and f["count"] == 1 for f in failed)
    assert len(failed) == DIGEST_INDIVIDUAL + 2
    assert len(caplog.records) == DIGEST_INDIVIDUAL + 2
    assert "990 more" in caplog.records[-1].getMessage()
    kinds = [row["kind"] for row in service.audit_log(2000)]
    assert kinds.count(SUMMARY_KIND) == 1 and kinds.count("logon_failed") == DIGEST_INDIVIDUAL + 1


def test_a_new_window_writes_failures_one_by_one_again(
    make_settings: SettingsFactory, make_service: ServiceFactory, clock: FakeClock
) -> None:
    service = make_service(make_settings())
    for i in range(DIGEST_INDIVIDUAL + 3):
        service.apply(LogonFailed(f"scan{i}", clock(), reason="unknown_user"))
    clock.advance(DIGEST_WINDOW_SECONDS + 1)
    # The next failure closes the old window (its summary) and is written itself.
    service.apply(LogonFailed("typo-21", clock(), reason="unknown_user"))
    failed = service.status()["failed_logons"]
    assert failed[0]["logon"] == "typo-21" and failed[0]["count"] == 1
    assert failed[1]["count"] == 3


def test_counts_match_the_status_document(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, clock: FakeClock
) -> None:
    service = make_service(make_settings(**{"database.url": database_url, "licences.count": 3}))
    provision(service)
    for logon in ("21-desk", "22-desk", "trunk-a"):
        service.apply(LoggedOn(logon, clock(), contact=f"sip:{logon}@a"))
    service.apply(LoggedOn("21-desk", clock(), contact="sip:21-desk@b"))
    service.apply(LogonFailed("22-desk", clock()))
    service.apply(LogonFailed("23-desk", clock()))
    assert service.authorize("21-desk", "600").allowed
    status = service.status()
    states = [s["state"] for s in status["subscribers"]]
    assert service.counts() == {
        "licences": status["licences"],
        "subscribers": {state: states.count(state) for state in ("logged_on", "logged_off", "logon_failed")},
        "unmanaged": len(status["unmanaged"]),
    }
    assert service.counts()["subscribers"] == {"logged_on": 1, "logged_off": 1, "logon_failed": 2}


def test_counts_take_the_same_few_queries_for_ten_or_a_thousand_subscribers(
    make_settings: SettingsFactory, make_service: ServiceFactory, clock: FakeClock
) -> None:
    service = make_service(make_settings())
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    def queries() -> int:
        statements.clear()
        event.listen(service.database.engine, "before_cursor_execute", count)
        service.counts()
        event.remove(service.database.engine, "before_cursor_execute", count)
        return len(statements)

    service.import_subscribers("".join(f"p{i},{100 + i}\n" for i in range(10)))
    few = queries()
    service.import_subscribers("".join(f"q{i},{200 + i}\n" for i in range(1000)))
    service.apply_batch([LoggedOn(f"q{i}", clock(), contact=f"sip:q{i}@a") for i in range(1000)])
    assert queries() == few <= 10
    assert all("count(" in s.lower() for s in statements if s.lstrip().upper().startswith("SELECT"))


def test_the_keepalive_clock_judges_as_of_what_has_been_applied(
    make_settings: SettingsFactory, make_service: ServiceFactory, clock: FakeClock
) -> None:
    """A refresh received in time but not applied yet must not let the clock free the licence."""
    service = make_service(make_settings(**{"keepalive.grace": 5}))
    service.set_profile("fast", 10)
    service.add_subscriber("21-desk", "21", "fast")
    service.apply(LoggedOn("21-desk", clock(), contact="sip:a"))
    assert service.authorize("21-desk", "600").takes_licence
    refresh_received = clock.advance(10)  # arrives in time; the adapter has not applied it yet
    clock.advance(12)  # past the deadline of the registration (15 s), before the refresh's (25 s)
    assert service.expire_keepalives(now=refresh_received) == []
    service.apply(Keepalive("21-desk", refresh_received))
    assert service.expire_keepalives() == []
    clock.advance(4)
    assert service.expire_keepalives() == ["21-desk"]


def test_the_status_document_pages_and_searches_subscribers_and_always_counts_all(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, clock: FakeClock
) -> None:
    service = make_service(make_settings(**{"database.url": database_url, "licences.count": 3}))
    service.import_subscribers("".join(f"p{i:03d},{500 + i}\n" for i in range(120)))
    service.apply_batch([LoggedOn(f"p{i:03d}", clock(), contact=f"sip:p{i:03d}@a") for i in range(0, 120, 2)])
    service.apply(LoggedOn("trunk-a", clock(), contact="sip:trunk@b"))
    service.apply(LogonFailed("p001", clock()))
    assert service.authorize("p100", "600").takes_licence
    full = service.status()
    assert len(full["subscribers"]) == 120
    page = service.status(offset=50, limit=20)
    assert [s["logon"] for s in page["subscribers"]] == [f"p{i:03d}" for i in range(50, 70)]
    assert page["subscribers"] == full["subscribers"][50:70]
    assert page["subscriber_page"] == {"search": "", "offset": 50, "limit": 20, "matched": 120}
    assert page["summary"] == {
        "subscribers": 120,
        "logged_on": 60,
        "logged_off": 59,
        "logon_failed": 1,
        "unmanaged": 1,
    }
    for key in ("licences", "assignments", "unmanaged", "failed_logons", "calls"):
        assert page[key] == full[key], key
    assert page["assignments"][0]["number"] == "600"  # p100's number, though p100 is not on this page
    found = service.status(search="p10", limit=5)
    assert [s["logon"] for s in found["subscribers"]] == ["p100", "p101", "p102", "p103", "p104"]
    assert found["subscriber_page"]["matched"] == 10
    assert service.status(search="611")["subscribers"][0]["logon"] == "p111"  # by call number
    assert service.status(search="%")["subscriber_page"]["matched"] == 0  # no wildcard from a search


def test_over_long_names_and_contacts_in_a_batch_are_stored_as_one_by_one(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, clock: FakeClock
) -> None:
    """A peer's over-long field is fitted on the way in; the batch must key it the same way."""
    service = make_service(make_settings(**{"database.url": database_url}))
    service.add_subscriber("21-desk", "21")
    long_contact = "sip:21-desk@192.0.2.1:5060;" + "x" * 900
    long_trunk = "trunk-" + "y" * 300
    events: list[Event] = [
        LoggedOn("21-desk", clock(), contact=long_contact, user_agent="U" * 600),
        Keepalive("21-desk", clock()),
        LoggedOn("21-desk", clock(), contact=long_contact),  # the same contact again: a refresh
        LoggedOn(long_trunk, clock(), contact="sip:trunk@192.0.2.9"),
        Keepalive(long_trunk, clock()),
    ]
    outcomes = service.apply_batch(events)
    assert [o.unknown_registration for o in outcomes] == [False, False, False, False, False]
    status = service.status()
    desk = status["subscribers"][0]
    assert desk["state"] == "logged_on"
    assert len(desk["contacts"]) == 1 and len(desk["contacts"][0]) <= 512
    assert len(status["unmanaged"]) == 1
    service.apply_batch([LoggedOff("21-desk", clock(), contact=long_contact)])
    assert service.status()["subscribers"][0]["state"] == "logged_off"
