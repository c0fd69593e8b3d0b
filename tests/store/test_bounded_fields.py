"""Every field that comes from a peer fits its column on SQLite and on PostgreSQL alike.

PostgreSQL refuses an over-long value (or a NUL) and fails the whole transaction; SQLite stores
anything. These tests run on both: one long header must not take a node out, and an over-long
dialled number must get a decision of its own, never an exception that turns into the fail mode.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import select

from forum_bridge.config import Settings
from forum_bridge.core import CallStarted, Direction, LoggedOff, LoggedOn, LogonFailed, Reason
from forum_bridge.service import BridgeService, CallSnapshot
from forum_bridge.store import Registration
from forum_bridge.store.models import AuditRow, CallRow, RegistrationRow, fit
from tests.asterisk.aio import run
from tests.asterisk.test_asterisk_agi import ask, started
from tests.conftest import FakeClock, SettingsFactory

ServiceFactory = Callable[[Settings], BridgeService]

LONG_CONTACT = "sip:trunk@192.0.2.1:5060;" + "x-pad=" + "a" * 700
LONG_AGENT = "ScannerPhone/" + "b" * 400
LONG_NUMBER = "0049" + "1" * 96  # a 100-digit dialled number


@pytest.fixture
def svc(make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str) -> BridgeService:
    """Two licences and one managed phone, on the database under test."""
    service = make_service(make_settings(**{"database.url": database_url}))
    service.add_subscriber("21-desk", "21")
    return service


def test_fit_keeps_short_values_and_keeps_long_ones_distinct() -> None:
    assert fit("sip:21-desk@192.0.2.7", 512) == "sip:21-desk@192.0.2.7"
    a, b = fit("x" * 600 + "A", 512), fit("x" * 600 + "B", 512)
    assert len(a) == len(b) == 512 and a != b
    assert fit(a, 512) == a  # storing a stored value again changes nothing
    assert fit("nul\x00here", 64) == "nul\ufffdhere"
    assert fit("lone\udcffsurrogate", 64) == "lone?surrogate"


def test_one_long_header_in_a_resync_does_not_poison_the_others(svc: BridgeService) -> None:
    registrations = [
        Registration("21-desk", "sip:21-desk@192.0.2.7:5060", "192.0.2.7:5060", "Yealink T46U"),
        Registration("90-trunk", LONG_CONTACT, "192.0.2.1:5060", LONG_AGENT),
        Registration("91-door", "sip:91-door@192.0.2.9:5060", "192.0.2.9:5060", "x" * 300),
    ]
    report = svc.resync(registrations, [])
    assert sorted(report.logged_on) == ["21-desk", "90-trunk", "91-door"]
    status = svc.status()
    assert status["subscribers"][0]["state"] == "logged_on"
    unmanaged = {u["logon"]: u for u in status["unmanaged"]}
    assert set(unmanaged) == {"90-trunk", "91-door"}
    assert len(unmanaged["90-trunk"]["contact"]) == 512
    assert unmanaged["90-trunk"]["contact"].startswith("sip:trunk@192.0.2.1:5060;x-pad=aaa")
    assert len(unmanaged["90-trunk"]["user_agent"]) == 256
    # The same report again is a refresh: the long contact is found as the one stored before.
    again = svc.resync(registrations, [])
    assert again.logged_on == [] and again.logged_off == []
    # And once the PBX no longer lists it, it goes.
    gone = svc.resync(registrations[:1], [])
    assert sorted(gone.logged_off) == ["90-trunk", "91-door"]


def test_long_event_fields_are_stored_and_found_again(svc: BridgeService, clock: FakeClock) -> None:
    svc.apply(LoggedOn("21-desk", clock(), contact=LONG_CONTACT, source="s" * 200, user_agent=LONG_AGENT))
    svc.apply(LoggedOn("21-desk", clock(), contact=LONG_CONTACT + "-second", user_agent="\x00odd"))
    with svc.database.transaction() as session:
        rows = list(session.scalars(select(RegistrationRow).order_by(RegistrationRow.id)))
    assert len(rows) == 2  # two long contacts differing at the end stay two contacts
    assert rows[1].user_agent == "\ufffdodd"
    svc.apply(LoggedOff("21-desk", clock(), contact=LONG_CONTACT))
    svc.apply(LoggedOff("21-desk", clock(), contact=LONG_CONTACT + "-second"))
    assert svc.status()["subscribers"][0]["state"] == "logged_off"


def test_a_failed_log_on_with_long_fields_is_audited(svc: BridgeService, clock: FakeClock) -> None:
    svc.apply(LogonFailed("u" * 300, clock(), source="192.0.2.66:" + "9" * 300, reason="r" * 100))
    failed = svc.status()["failed_logons"]
    assert len(failed) == 1 and len(failed[0]["logon"]) == 128


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_an_over_long_dialled_number_gets_a_decision_not_the_fail_mode(
    make_settings: SettingsFactory,
    make_service: ServiceFactory,
    database_url: str,
    clock: FakeClock,
    fail_mode: str,
) -> None:
    settings = make_settings(
        **{"database.url": database_url, "licences.count": 1, "asterisk.fail_mode": fail_mode}
    )
    svc = make_service(settings)
    svc.add_subscriber("21-desk", "21")
    svc.add_subscriber("22-desk", "22")
    # Not logged on: the rules deny, whatever the number's length.
    assert svc.authorize("21-desk", LONG_NUMBER).reason is Reason.NOT_LOGGED_ON
    svc.apply(LoggedOn("21-desk", clock(), contact="sip:21-desk@192.0.2.7"))
    svc.apply(LoggedOn("22-desk", clock(), contact="sip:22-desk@192.0.2.8"))
    channel = "PJSIP/21-desk-" + "0" * 300
    first = svc.authorize("21-desk", LONG_NUMBER, channel=channel)
    assert first.allowed and first.reason is Reason.LICENCE_ACQUIRED
    # The same over-long channel again is the same leg, decided once.
    again = svc.authorize("21-desk", LONG_NUMBER, channel=channel)
    assert (again.allowed, again.reason) == (True, Reason.LICENCE_ACQUIRED)
    # The only licence is held: the next over-long number is denied by the rules, not let through.
    outcome = svc.apply(CallStarted("22-desk", "PJSIP/22-desk-01", LONG_NUMBER, Direction.OUTBOUND, clock()))
    assert outcome.hangup and outcome.decision is not None
    assert outcome.decision.reason is Reason.EMERGENCY_ONLY
    with svc.database.transaction() as session:
        numbers = list(session.scalars(select(AuditRow.number).where(AuditRow.kind.in_(["acquire", "deny"]))))
        calls = list(session.scalars(select(CallRow.channel)))
    assert numbers and all(len(n) == 64 and n.startswith("0049111") for n in numbers)
    assert sorted(len(c) for c in calls) == [16, 256]


def test_a_resync_with_long_call_fields_keeps_the_calls(svc: BridgeService) -> None:
    calls = [
        CallSnapshot("PJSIP/21-desk-" + "9" * 400, "21-desk", LONG_NUMBER, Direction.OUTBOUND),
        CallSnapshot("PJSIP/21-desk-00000002", "21-desk", "600", Direction.OUTBOUND),
    ]
    svc.resync([Registration("21-desk", "sip:21-desk@192.0.2.7")], calls)
    assert len(svc.status()["calls"]) == 2
    report = svc.resync([Registration("21-desk", "sip:21-desk@192.0.2.7")], calls)
    assert report.calls_dropped == 0  # the long channel is recognised as the one kept before


def test_the_fastagi_hook_decides_an_over_long_number_by_the_rules(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, clock: FakeClock
) -> None:
    """Through the hook, as Asterisk asks, with fail_mode open: before, the store's exception let
    the call through as ``bridge_error``; now the full pool denies it like any other call."""
    settings = make_settings(
        **{
            "database.url": database_url,
            "licences.count": 1,
            "asterisk.agi_port": 0,
            "asterisk.fail_mode": "open",
        }
    )
    svc = make_service(settings)
    svc.add_subscriber("21-desk", "21")
    svc.add_subscriber("22-desk", "22")
    svc.apply(LoggedOn("21-desk", clock(), contact="sip:21-desk@192.0.2.7"))
    svc.apply(LoggedOn("22-desk", clock(), contact="sip:22-desk@192.0.2.8"))
    assert svc.authorize("21-desk", "600").reason is Reason.LICENCE_ACQUIRED  # the only licence

    async def scenario() -> dict[str, str]:
        server = await started(settings, svc)
        try:
            return await ask(server.port, "outbound", LONG_NUMBER, channel="PJSIP/22-desk-00000002")
        finally:
            await server.close()

    answer = run(scenario())
    assert answer == {"FORUM_BRIDGE_RESULT": "deny", "FORUM_BRIDGE_REASON": "emergency_only"}
