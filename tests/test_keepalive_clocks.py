"""Keepalive expiry follows a monotonic clock, and a shared pool expires what no live node refreshes.

Wall clocks step (NTP, an operator, a VM resumed); "how long since" must not. Several bridges share
one PostgreSQL pool; one that stops must not keep its licences for ever, and the others must not
fight over expiring them.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from forum_bridge.core import Keepalive, Reason
from forum_bridge.service import BridgeService
from forum_bridge.store.database import Database
from tests.bridge_nodes import FakeMonotonic, bridge_node, licensed, log_on_licensed
from tests.conftest import FakeClock, SettingsFactory


def test_a_wall_clock_step_forward_frees_no_licence_and_a_step_back_keeps_none(
    make_settings: SettingsFactory, databases: list[Database], clock: FakeClock, database_url: str
) -> None:
    mono = FakeMonotonic()
    svc = bridge_node(make_settings(**{"database.url": database_url}), databases, clock, mono)
    svc.add_subscriber("21-desk", "21")
    log_on_licensed(svc, clock, "21-desk")

    clock.advance(3600)  # the host's clock jumps an hour ahead; only a second really passed
    mono.advance(1)
    assert svc.expire_keepalives() == []
    assert licensed(svc) == ["21-desk"]

    clock.now -= timedelta(hours=2)  # and then two hours back
    mono.advance(120 + 10 - 1)  # just inside the keepalive (120 s) plus grace (10 s)
    assert svc.expire_keepalives() == []
    mono.advance(2)
    assert svc.expire_keepalives() == ["21-desk"]
    assert licensed(svc) == []


def test_a_keepalive_after_a_step_back_still_counts(
    make_settings: SettingsFactory, databases: list[Database], clock: FakeClock, database_url: str
) -> None:
    mono = FakeMonotonic()
    svc = bridge_node(make_settings(**{"database.url": database_url}), databases, clock, mono)
    svc.add_subscriber("21-desk", "21")
    log_on_licensed(svc, clock, "21-desk")
    mono.advance(100)
    clock.now -= timedelta(hours=2)
    svc.apply(Keepalive("21-desk", at=clock()))  # stamped two hours "before" the log-on
    mono.advance(100)  # 200 s after the log-on, 100 s after the keepalive
    assert svc.expire_keepalives() == []
    assert licensed(svc) == ["21-desk"]


def test_a_restarted_bridge_counts_from_the_stored_time_once(
    make_settings: SettingsFactory, databases: list[Database], clock: FakeClock, database_url: str
) -> None:
    settings = make_settings(**{"database.url": database_url})
    first = bridge_node(settings, databases, clock, FakeMonotonic())
    first.add_subscriber("21-desk", "21")
    log_on_licensed(first, clock, "21-desk")
    clock.advance(100)
    mono = FakeMonotonic()  # a new process: a new monotonic clock, nothing in memory
    second = bridge_node(settings, databases, clock, mono)
    assert second.expire_keepalives() == []
    clock.advance(3600)  # a later step of the wall clock is ignored from now on
    mono.advance(29)
    assert second.expire_keepalives() == []
    mono.advance(2)  # 100 + 31 s of silence: past 130 s
    assert second.expire_keepalives() == ["21-desk"]


@pytest.mark.postgres
def test_a_node_that_goes_away_loses_its_licences_to_the_live_nodes_sweep(
    make_settings: SettingsFactory, databases: list[Database], clock: FakeClock, postgres_url: str
) -> None:
    pbx1_clock, pbx2_clock = FakeMonotonic(), FakeMonotonic()
    pbx1 = bridge_node(
        make_settings(**{"database.url": postgres_url, "node.name": "pbx1"}), databases, clock, pbx1_clock
    )
    pbx2 = bridge_node(
        make_settings(**{"database.url": postgres_url, "node.name": "pbx2"}), databases, clock, pbx2_clock
    )
    for name in ("21-desk", "22-desk"):
        pbx1.add_subscriber(name, name[:2])
        log_on_licensed(pbx1, clock, name)
    assert pbx1.expire_keepalives() == [] and pbx2.expire_keepalives() == []

    # pbx1 stays alive and its phones keep refreshing: pbx2 leaves them alone, hour after hour.
    for step in range(3 * 36):
        clock.advance(100)
        pbx1_clock.advance(100)
        pbx2_clock.advance(100)
        pbx1.apply(Keepalive("21-desk", at=clock()))
        pbx1.apply(Keepalive("22-desk", at=clock()))
        assert pbx1.expire_keepalives() == []
        if step % 6 == 0:
            assert pbx2.expire_keepalives() == []
    assert licensed(pbx2) == ["21-desk", "22-desk"]

    # pbx1 stops (no more heartbeats, no more refreshes). Its own wall times mean nothing to pbx2.
    pbx2.expire_keepalives()
    pbx2_clock.advance(61)  # past node.dead_after (60 s), but not past the keepalive (130 s)
    assert pbx2.expire_keepalives() == []
    assert licensed(pbx2) == ["21-desk", "22-desk"]
    pbx2_clock.advance(70)
    assert sorted(pbx2.expire_keepalives()) == ["21-desk", "22-desk"]
    assert licensed(pbx2) == []
    assert all(s["state"] == "logged_off" for s in pbx2.status()["subscribers"])
    assert pbx2.authorize("21-desk", "600").reason is Reason.NOT_LOGGED_ON
    releases = [a for a in pbx2.audit_log(50) if a["kind"] == "release"]
    assert sorted((a["logon"], a["reason"], a["node"]) for a in releases) == [
        ("21-desk", "keepalive", "pbx2"),
        ("22-desk", "keepalive", "pbx2"),
    ]


@pytest.mark.postgres
def test_two_live_nodes_expire_a_gone_node_once_without_fighting(
    make_settings: SettingsFactory, databases: list[Database], clock: FakeClock, postgres_url: str
) -> None:
    pbx1 = bridge_node(
        make_settings(**{"database.url": postgres_url, "node.name": "pbx1"}),
        databases,
        clock,
        FakeMonotonic(),
    )
    watchers = [
        bridge_node(
            make_settings(**{"database.url": postgres_url, "node.name": f"pbx{i}"}), databases, clock, mono
        )
        for i, mono in ((2, FakeMonotonic()), (3, FakeMonotonic()))
    ]
    for name in ("21-desk", "22-desk"):
        pbx1.add_subscriber(name, name[:2])
        log_on_licensed(pbx1, clock, name)
    pbx1.expire_keepalives()
    for watcher in watchers:
        watcher.expire_keepalives()
        assert isinstance(watcher.monotonic, FakeMonotonic)
        watcher.monotonic.advance(200)

    results: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(watchers))

    def sweep(watcher: BridgeService) -> None:
        try:
            start.wait(10)
            results.append(watcher.expire_keepalives())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=sweep, args=(w,)) for w in watchers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(name for freed in results for name in freed) == [
        "21-desk",
        "22-desk",
    ]  # each freed exactly once
    releases = [a for a in watchers[0].audit_log(50) if a["kind"] == "release"]
    assert sorted(a["logon"] for a in releases) == ["21-desk", "22-desk"]
    assert licensed(watchers[0]) == []


def test_a_node_that_comes_back_keeps_what_it_refreshes(
    make_settings: SettingsFactory, databases: list[Database], clock: FakeClock, database_url: str
) -> None:
    pbx1_clock, pbx2_clock = FakeMonotonic(), FakeMonotonic()
    pbx1 = bridge_node(
        make_settings(**{"database.url": database_url, "node.name": "pbx1"}), databases, clock, pbx1_clock
    )
    pbx2 = bridge_node(
        make_settings(**{"database.url": database_url, "node.name": "pbx2"}), databases, clock, pbx2_clock
    )
    pbx1.add_subscriber("21-desk", "21")
    log_on_licensed(pbx1, clock, "21-desk")
    pbx1.expire_keepalives()
    pbx2.expire_keepalives()
    pbx2_clock.advance(59)
    assert pbx2.expire_keepalives() == []
    pbx1.expire_keepalives()  # one heartbeat just in time
    pbx2_clock.advance(59)
    assert pbx2.expire_keepalives() == []  # 118 s since pbx1 was first seen, 59 s since it beat
    assert licensed(pbx2) == ["21-desk"]
