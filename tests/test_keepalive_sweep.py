"""The keepalive sweep times contacts in memory and reads the database only to confirm an expiry.

A sweep every second must not read every contact of the node: it takes the contacts whose
deadline came from its own queue, confirms each against the stored row (another process of the
node, another node or the CLI may have refreshed or removed it), and only a slow full pass reads
them all, for what this process never saw.
"""

from __future__ import annotations

from typing import Any

import pytest

from forum_bridge import keepalive
from forum_bridge.config import Settings
from forum_bridge.core import Keepalive, LoggedOn
from forum_bridge.service import BridgeService
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from tests.bridge_nodes import FakeMonotonic, bridge_node, licensed, log_on_licensed
from tests.conftest import FakeClock, SettingsFactory

LIMIT = 120 + 10  # the default profile's keepalive plus the grace
SWEEP = 10.0  # seconds between the sweeps these tests run


@pytest.fixture
def full_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The node whose contacts were all read, once per full read the sweep made."""
    reads: list[str] = []
    real = ops.node_registrations

    def counted(session: Any, node: str, *args: Any, **kwargs: Any) -> list[ops.NodeContact]:
        reads.append(node)
        return real(session, node, *args, **kwargs)

    monkeypatch.setattr(keepalive.ops, "node_registrations", counted)
    return reads


def sweep_until(
    service: BridgeService, clock: FakeClock, clocks: list[FakeMonotonic], until: float, elapsed: float
) -> tuple[float, list[tuple[float, str]]]:
    """Sweep every SWEEP seconds from ``elapsed`` up to ``until``; (elapsed, [(when, log-on freed)])."""
    freed: list[tuple[float, str]] = []
    while elapsed < until:
        step = min(SWEEP, until - elapsed)
        elapsed += step
        clock.advance(step)
        for mono in clocks:
            mono.advance(step)
        freed += [(elapsed, logon) for logon in service.expire_keepalives()]
    return elapsed, freed


def settings_for(make_settings: SettingsFactory, url: str) -> Settings:
    return make_settings(**{"database.url": url, "licences.count": 10})


def test_the_queue_frees_the_silent_at_their_deadline_and_keeps_the_refreshed(
    make_settings: SettingsFactory,
    databases: list[Database],
    clock: FakeClock,
    database_url: str,
    full_reads: list[str],
) -> None:
    mono = FakeMonotonic()
    svc = bridge_node(settings_for(make_settings, database_url), databases, clock, mono)
    for name in ("21-desk", "22-desk", "23-desk", "24-desk"):
        svc.add_subscriber(name, name[:2])
        log_on_licensed(svc, clock, name)
    assert svc.expire_keepalives() == []
    assert full_reads == ["pbx1"]  # the first sweep of a process reads what is there

    elapsed, freed = sweep_until(svc, clock, [mono], 60, 0.0)
    svc.apply(Keepalive("22-desk", at=clock()))  # a keepalive refreshes every contact of the log-on
    svc.apply(LoggedOn("23-desk", at=clock(), contact="sip:23-desk@127.0.0.1:5060"))  # a re-REGISTER
    elapsed, more = sweep_until(svc, clock, [mono], LIMIT - 1, elapsed)
    assert freed + more == []
    reads_before = len(full_reads)
    elapsed, freed = sweep_until(svc, clock, [mono], LIMIT + 1, elapsed)  # one sweep, 131 s on
    assert len(full_reads) == reads_before  # not a full pass: the queue found them
    assert freed == [(LIMIT + 1, "21-desk"), (LIMIT + 1, "24-desk")]  # as a full read would
    assert licensed(svc) == ["22-desk", "23-desk"]

    elapsed, freed = sweep_until(svc, clock, [mono], 60 + LIMIT + SWEEP, elapsed)
    assert sorted(logon for _, logon in freed) == ["22-desk", "23-desk"]
    assert all(60 + LIMIT <= at <= 60 + LIMIT + SWEEP for at, _ in freed)
    assert licensed(svc) == []
    releases = [a for a in svc.audit_log(50) if a["kind"] == "release"]
    assert sorted((a["logon"], a["reason"]) for a in releases) == [
        (name, "keepalive") for name in ("21-desk", "22-desk", "23-desk", "24-desk")
    ]


def test_sweeps_between_full_passes_read_no_contact_while_nothing_is_due(
    make_settings: SettingsFactory,
    databases: list[Database],
    clock: FakeClock,
    database_url: str,
    full_reads: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    confirmed: list[int] = []
    real = ops.registrations_of

    def counted(session: Any, node: str, keys: Any) -> list[ops.NodeContact]:
        confirmed.append(len(keys))
        return real(session, node, keys)

    monkeypatch.setattr(keepalive.ops, "registrations_of", counted)
    mono = FakeMonotonic()
    svc = bridge_node(settings_for(make_settings, database_url), databases, clock, mono)
    for name in ("21-desk", "22-desk"):
        svc.add_subscriber(name, name[:2])
        log_on_licensed(svc, clock, name)
    svc.expire_keepalives()
    for _ in range(int(keepalive.FULL_PASS_SECONDS) - 1):
        clock.advance(1)
        mono.advance(1)
        assert svc.expire_keepalives() == []
    assert full_reads == ["pbx1"]
    assert all(count == 0 for count in confirmed)


def test_a_contact_refreshed_by_another_process_of_the_node_is_not_expired(
    make_settings: SettingsFactory, databases: list[Database], clock: FakeClock, database_url: str
) -> None:
    settings = settings_for(make_settings, database_url)
    mono, other_mono = FakeMonotonic(), FakeMonotonic()
    svc = bridge_node(settings, databases, clock, mono)
    other = bridge_node(settings, databases, clock, other_mono)  # e.g. a second bridge of the same PBX
    svc.add_subscriber("21-desk", "21")
    log_on_licensed(svc, clock, "21-desk")
    svc.expire_keepalives()
    elapsed, freed = sweep_until(svc, clock, [mono, other_mono], 100, 0.0)
    assert other.apply(Keepalive("21-desk", at=clock())).unknown_registration is False
    # This process saw no refresh since the log-on; the stored row says 100 s later.
    elapsed, more = sweep_until(svc, clock, [mono, other_mono], 100 + LIMIT - 1, elapsed)
    assert freed + more == []
    assert licensed(svc) == ["21-desk"]
    elapsed, freed = sweep_until(svc, clock, [mono, other_mono], 100 + LIMIT + SWEEP, elapsed)
    assert [logon for _, logon in freed] == ["21-desk"]
    assert licensed(svc) == []


def test_the_slow_full_pass_catches_a_registration_this_process_never_saw(
    make_settings: SettingsFactory, databases: list[Database], clock: FakeClock, database_url: str
) -> None:
    settings = settings_for(make_settings, database_url)
    mono, other_mono = FakeMonotonic(), FakeMonotonic()
    svc = bridge_node(settings, databases, clock, mono)
    svc.expire_keepalives()  # its first full read: nothing there yet
    other = bridge_node(settings, databases, clock, other_mono)
    svc.add_subscriber("21-desk", "21")
    log_on_licensed(other, clock, "21-desk")  # applied by another process of the node, which then stops
    _, freed = sweep_until(svc, clock, [mono], LIMIT + keepalive.FULL_PASS_SECONDS + SWEEP, 0.0)
    assert [logon for _, logon in freed] == ["21-desk"]
    assert freed[0][0] > LIMIT  # never before its keepalive ran out
    assert licensed(svc) == []


def test_a_shortened_profile_moves_every_deadline_at_the_next_sweep(
    make_settings: SettingsFactory, databases: list[Database], clock: FakeClock, database_url: str
) -> None:
    mono = FakeMonotonic()
    svc = bridge_node(settings_for(make_settings, database_url), databases, clock, mono)
    svc.add_subscriber("21-desk", "21")
    log_on_licensed(svc, clock, "21-desk")
    svc.expire_keepalives()
    _, freed = sweep_until(svc, clock, [mono], 40, 0.0)
    assert freed == []
    svc.set_profile("default", 20)  # 20 s + 10 s grace: 40 s of silence is past it now
    clock.advance(1)
    mono.advance(1)
    assert svc.expire_keepalives() == ["21-desk"]
