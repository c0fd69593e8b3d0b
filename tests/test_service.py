"""The service applies the Forum rules to PBX events, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import event

from forum_bridge.config import Settings
from forum_bridge.core import (
    CallEnded,
    CallStarted,
    Direction,
    Keepalive,
    LoggedOff,
    LoggedOn,
    LogonFailed,
    Reason,
)
from forum_bridge.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from forum_bridge.service import BridgeService, CallSnapshot
from forum_bridge.store import Registration
from tests.conftest import FakeClock, SettingsFactory

ServiceFactory = Callable[[Settings], BridgeService]


@pytest.fixture
def svc(make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str) -> BridgeService:
    """Two licences; 21-desk and 21-soft share number 21; 22-desk has 22; 23-desk has 23."""
    service = make_service(make_settings(**{"database.url": database_url}))
    service.set_profile("short", 30)
    service.add_subscriber("21-desk", "21")
    service.add_subscriber("21-soft", "21")
    service.add_subscriber("22-desk", "22", "short")
    service.add_subscriber("23-desk", "23")
    return service


def logon(svc: BridgeService, clock: FakeClock, name: str, contact: str = "") -> None:
    svc.apply(LoggedOn(name, at=clock(), contact=contact or f"sip:{name}@127.0.0.1:5060", user_agent="SIPp"))


def sub(svc: BridgeService, name: str) -> dict[str, object]:
    return next(s for s in svc.status()["subscribers"] if s["logon"] == name)


def used(svc: BridgeService) -> int:
    return int(svc.status()["licences"]["used"])


def test_log_on_always_succeeds_and_takes_no_licence(svc: BridgeService, clock: FakeClock) -> None:
    for name in ("21-desk", "21-soft", "22-desk"):  # three log-ons, two licences
        logon(svc, clock, name)
    assert used(svc) == 0
    assert all(sub(svc, n)["state"] == "logged_on" for n in ("21-desk", "21-soft", "22-desk"))


def test_first_call_takes_a_licence_and_later_calls_keep_it(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk")
    assert svc.authorize("21-desk", "600").reason is Reason.LICENCE_ACQUIRED
    assert svc.authorize("21-desk", "601").reason is Reason.LICENSED
    status = svc.status()
    assert status["licences"] == {"total": 2, "used": 1, "free": 1, "reserved": 0}
    assert [(a["slot"], a["logon"], a["number"]) for a in status["assignments"]] == [(1, "21-desk", "21")]
    assert status["assignments"][0]["since"] == "2026-11-24T08:00:00Z"


def test_refresh_and_second_device_of_one_log_on_take_no_second_licence(
    svc: BridgeService, clock: FakeClock
) -> None:
    logon(svc, clock, "21-desk", "sip:21-desk@10.0.0.1")
    svc.authorize("21-desk", "600")
    clock.advance(10)
    logon(svc, clock, "21-desk", "sip:21-desk@10.0.0.1")  # refresh
    logon(svc, clock, "21-desk", "sip:21-desk@10.0.0.2")  # a second phone with the same credentials
    assert svc.authorize("21-desk", "600").reason is Reason.LICENSED
    assert used(svc) == 1
    assert sorted(sub(svc, "21-desk")["contacts"]) == ["sip:21-desk@10.0.0.1", "sip:21-desk@10.0.0.2"]  # type: ignore[arg-type]


def test_two_log_ons_of_one_number_take_two_licences(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk")
    logon(svc, clock, "21-soft")
    assert svc.authorize("21-desk", "600").allowed
    assert svc.authorize("21-soft", "600").allowed
    assert {a["logon"] for a in svc.status()["assignments"]} == {"21-desk", "21-soft"}


def test_pool_full_means_emergency_only(svc: BridgeService, clock: FakeClock) -> None:
    for name in ("21-desk", "21-soft", "22-desk"):
        logon(svc, clock, name)
    svc.authorize("21-desk", "600")
    svc.authorize("21-soft", "600")
    denied = svc.authorize("22-desk", "600")
    assert (denied.allowed, denied.reason) == (False, Reason.EMERGENCY_ONLY)
    emergency = svc.authorize("22-desk", "112")
    assert (emergency.allowed, emergency.reason) == (True, Reason.EMERGENCY)
    assert not sub(svc, "22-desk")["licensed"]
    assert [a["kind"] for a in svc.audit_log(10)].count("deny") == 1


def test_failed_log_on_blocks_every_call_and_frees_the_licence(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk")
    svc.authorize("21-desk", "600")
    svc.apply(LogonFailed("21-desk", at=clock(), source="127.0.0.1:5082"))
    assert sub(svc, "21-desk")["state"] == "logon_failed"
    assert svc.authorize("21-desk", "112").reason is Reason.LOGON_FAILED
    assert svc.authorize("21-desk", "600").reason is Reason.LOGON_FAILED
    assert used(svc) == 0
    # A later successful REGISTER of a registered contact (a refresh) clears it.
    svc.apply(Keepalive("21-desk", at=clock(), clears_block=True))
    assert sub(svc, "21-desk")["state"] == "logged_on"
    assert svc.authorize("21-desk", "600").allowed


def test_failed_log_on_is_not_cleared_by_authenticating_a_call(svc: BridgeService, clock: FakeClock) -> None:
    svc.apply(LogonFailed("23-desk", at=clock()))
    outcome = svc.apply(Keepalive("23-desk", at=clock()))  # e.g. an INVITE with the right password
    assert outcome.unknown_registration
    assert sub(svc, "23-desk")["state"] == "logon_failed"
    assert svc.authorize("23-desk", "112").reason is Reason.LOGON_FAILED
    logon(svc, clock, "23-desk")  # a successful REGISTER does
    assert sub(svc, "23-desk")["state"] == "logged_on"
    assert svc.authorize("23-desk", "112").reason is Reason.EMERGENCY


def test_a_registered_log_ons_authenticated_call_does_not_lift_its_block(
    svc: BridgeService, clock: FakeClock
) -> None:
    logon(svc, clock, "21-desk")
    assert svc.apply(LogonFailed("21-desk", at=clock())).blocked is True
    # A successful authentication the adapter cannot tell from an INVITE (e.g. to 112): the
    # keepalive clock moves, the block stays, and the adapter is asked to find out.
    clock.advance(5)
    outcome = svc.apply(Keepalive("21-desk", at=clock()))
    assert outcome.blocked is None and outcome.check_logon and not outcome.unknown_registration
    assert svc.blocked_logons() == ["21-desk"]
    assert svc.authorize("21-desk", "112").reason is Reason.LOGON_FAILED
    assert sub(svc, "21-desk")["last_seen"] == "2026-11-24T08:00:05Z"
    # Confirmed as a REGISTER: the block goes, and nothing more needs checking.
    outcome = svc.apply(Keepalive("21-desk", at=clock(), clears_block=True))
    assert outcome.blocked is False and not outcome.check_logon
    assert svc.authorize("21-desk", "112").reason is Reason.EMERGENCY
    assert not svc.apply(Keepalive("21-desk", at=clock())).check_logon  # not blocked: no question


def test_a_late_confirmation_does_not_lift_a_block_of_a_newer_failure(
    svc: BridgeService, clock: FakeClock
) -> None:
    logon(svc, clock, "21-desk")
    svc.apply(LogonFailed("21-desk", at=clock()))
    register_at = clock()
    clock.advance(1)
    svc.apply(LogonFailed("21-desk", at=clock()))  # failed again while the PBX was being asked
    assert svc.apply(Keepalive("21-desk", at=register_at, clears_block=True)).blocked is None
    assert svc.blocked_logons() == ["21-desk"]


def test_blocked_set_follows_failed_log_ons_and_reports_each_change(
    svc: BridgeService, clock: FakeClock
) -> None:
    logon(svc, clock, "21-desk")
    assert svc.blocked_logons() == []
    assert svc.apply(LogonFailed("21-desk", at=clock())).blocked is True
    assert svc.apply(LogonFailed("21-desk", at=clock())).blocked is None  # no change, nothing to tell
    assert svc.apply(LogonFailed("nobody", at=clock())).blocked is None  # unmanaged: never blocked
    svc.apply(LogonFailed("23-desk", at=clock()))
    assert svc.blocked_logons() == ["21-desk", "23-desk"]
    assert svc.apply(Keepalive("23-desk", at=clock())).blocked is None  # not registered: still blocked
    assert svc.apply(Keepalive("21-desk", at=clock(), clears_block=True)).blocked is False
    assert svc.apply(LoggedOn("23-desk", at=clock(), contact="sip:23@x")).blocked is False
    assert svc.blocked_logons() == []


def test_blocked_set_is_empty_when_the_failed_log_on_rule_is_off(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, clock: FakeClock
) -> None:
    service = make_service(
        make_settings(**{"database.url": database_url, "emergency.block_after_failed_logon": False})
    )
    service.add_subscriber("21-desk", "21")
    assert service.apply(LogonFailed("21-desk", at=clock())).blocked is None
    assert service.blocked_logons() == []


def test_unknown_user_is_recorded_as_failed_log_on(svc: BridgeService, clock: FakeClock) -> None:
    svc.apply(LogonFailed("nobody", at=clock(), source="127.0.0.1:5083", reason="unknown_user"))
    failed = svc.status()["failed_logons"]
    assert failed[0]["logon"] == "nobody" and failed[0]["reason"] == "unknown_user"


def test_log_off_frees_at_once_but_only_with_the_last_contact(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk", "sip:a")
    logon(svc, clock, "21-desk", "sip:b")
    svc.authorize("21-desk", "600")
    svc.apply(LoggedOff("21-desk", at=clock(), contact="sip:a"))
    assert used(svc) == 1
    svc.apply(LoggedOff("21-desk", at=clock(), contact="sip:b"))
    assert used(svc) == 0
    assert sub(svc, "21-desk")["state"] == "logged_off"
    assert svc.audit_log(1)[0] | {"at": None} == {
        "at": None,
        "kind": "release",
        "logon": "21-desk",
        "number": "",
        "reason": "logoff",
        "node": "pbx1",
        "actor": "",
        "detail": "slot 1",
    }
    assert svc.authorize("21-desk", "600").reason is Reason.NOT_LOGGED_ON


def test_missed_keepalive_frees_after_profile_interval_plus_grace(
    svc: BridgeService, clock: FakeClock
) -> None:
    logon(svc, clock, "22-desk")  # profile "short": 30 s, grace 10 s
    logon(svc, clock, "21-desk")  # default profile: 120 s
    svc.authorize("22-desk", "600")
    svc.authorize("21-desk", "600")
    clock.advance(40)
    assert svc.expire_keepalives() == []
    clock.advance(0.5)
    assert svc.expire_keepalives() == ["22-desk"]
    assert sub(svc, "22-desk")["state"] == "logged_off"
    assert [a["logon"] for a in svc.status()["assignments"]] == ["21-desk"]
    # A refresh (keepalive) moves the clock, so 21-desk survives past 130 s.
    clock.advance(100)
    svc.apply(Keepalive("21-desk", at=clock()))
    clock.advance(100)
    assert svc.expire_keepalives() == []
    clock.advance(31)
    assert svc.expire_keepalives() == ["21-desk"]


def test_keepalive_of_unknown_contact_asks_for_a_resync(svc: BridgeService, clock: FakeClock) -> None:
    assert svc.apply(Keepalive("21-desk", at=clock())).unknown_registration
    logon(svc, clock, "21-desk")
    assert not svc.apply(Keepalive("21-desk", at=clock())).unknown_registration


def test_reset_frees_every_licence_and_calls_take_them_again(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk")
    logon(svc, clock, "22-desk")
    svc.authorize("21-desk", "600")
    svc.authorize("22-desk", "600")
    assert svc.reset_licences("admin") == 2
    assert used(svc) == 0
    assert svc.audit_log(1)[0] | {"at": None} == {
        "at": None,
        "kind": "reset",
        "logon": "",
        "number": "",
        "reason": "reset",
        "node": "pbx1",
        "actor": "admin",
        "detail": "2 licence(s) freed",
    }
    assert svc.authorize("22-desk", "600").reason is Reason.LICENCE_ACQUIRED


def test_inbound_rings_each_log_on_that_can_get_a_licence(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk")
    logon(svc, clock, "21-soft")
    logon(svc, clock, "22-desk")
    svc.authorize("22-desk", "600")  # one licence left
    ring = svc.ringable("21")
    assert [(name, d.allowed) for name, d in ring] == [("21-desk", True), ("21-soft", False)]
    assert ring[1][1].reason is Reason.EMERGENCY_ONLY
    assert svc.ringable("999") == []


def test_call_events_with_enforcement(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk")
    started = CallStarted("21-desk", "PJSIP/21-desk-00000001", "600", Direction.OUTBOUND, clock())
    outcome = svc.apply(started, enforce=True)
    assert not outcome.hangup and outcome.decision is not None and outcome.decision.allowed
    assert svc.status()["calls"][0]["channel"] == "PJSIP/21-desk-00000001"
    svc.apply(CallEnded("PJSIP/21-desk-00000001", at=clock()))
    assert svc.status()["calls"] == []
    assert used(svc) == 1  # the licence stays with the log-on after the call
    blocked = svc.apply(
        CallStarted("23-desk", "PJSIP/23-desk-1", "600", Direction.OUTBOUND, clock()), enforce=True
    )
    assert blocked.hangup  # 23-desk is not logged on


def test_resync_logs_off_vanished_and_logs_on_new_contacts(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk", "sip:21-desk@x")
    svc.authorize("21-desk", "600")
    report = svc.resync(
        [
            Registration("22-desk", "sip:22-desk@y", "127.0.0.1:5082", "SIPp"),
            Registration("trunk", "sip:t@z"),
        ],
        [CallSnapshot("PJSIP/22-desk-1", "22-desk", "600", Direction.OUTBOUND)],
    )
    assert report.released == ["21-desk"]
    assert sorted(report.logged_on) == ["22-desk", "trunk"]
    status = svc.status()
    assert status["licences"]["used"] == 0
    assert sub(svc, "22-desk")["state"] == "logged_on"
    assert [u["logon"] for u in status["unmanaged"]] == ["trunk"]
    assert [c["channel"] for c in status["calls"]] == ["PJSIP/22-desk-1"]


def test_a_resync_costs_the_same_statements_for_ten_contacts_or_a_thousand(svc: BridgeService) -> None:
    # Set-based: one statement per contact held the database for seconds with 10,000 phones.
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    def resync_counted(registrations: list[Registration]) -> int:
        statements.clear()
        event.listen(svc.database.engine, "before_cursor_execute", count)
        try:
            svc.resync(registrations, [])
        finally:
            event.remove(svc.database.engine, "before_cursor_execute", count)
        return len(statements)

    few = [Registration(f"few{i}", f"sip:few{i}@192.0.2.1:5060") for i in range(10)]
    many = [Registration(f"many{i}", f"sip:many{i}@192.0.2.2:5060") for i in range(1000)]
    ten_new = resync_counted(few)
    assert len(svc.status()["unmanaged"]) == 10
    # The ten log off and a thousand log on; then all thousand are known (touched); then they go.
    counts = [resync_counted(many), resync_counted(many), resync_counted(few)]
    assert all(n <= ten_new + 4 for n in counts), (ten_new, counts)
    assert sorted(u["logon"] for u in svc.status()["unmanaged"]) == sorted(r.logon for r in few)


def test_a_resync_frees_a_licence_only_with_the_log_ons_last_contact(
    svc: BridgeService, clock: FakeClock
) -> None:
    logon(svc, clock, "21-desk", "sip:21-desk@a")
    logon(svc, clock, "21-desk", "sip:21-desk@b")
    logon(svc, clock, "22-desk", "sip:22-desk@c")
    svc.authorize("21-desk", "600")
    svc.authorize("22-desk", "600")
    # 21-desk keeps one contact, 22-desk loses its only one.
    report = svc.resync([Registration("21-desk", "sip:21-desk@b")], [])
    assert sorted(report.logged_off) == ["21-desk", "22-desk"]
    assert report.released == ["22-desk"]
    assert sub(svc, "21-desk")["state"] == "logged_on"
    assert sub(svc, "22-desk")["state"] == "logged_off"
    assert svc.licensed_logons() == ["21-desk"]


def test_resync_only_touches_its_own_node(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, clock: FakeClock
) -> None:
    node_a = make_service(make_settings(**{"database.url": database_url, "node.name": "a"}))
    node_b = BridgeService(make_settings(**{"database.url": database_url, "node.name": "b"}), clock=clock)
    node_a.add_subscriber("21-desk", "21")
    node_a.add_subscriber("22-desk", "22")
    logon(node_a, clock, "21-desk")
    logon(node_b, clock, "22-desk")
    node_b.authorize("22-desk", "600")
    node_a.resync([], [])
    assert sub(node_a, "22-desk")["state"] == "logged_on"
    assert sub(node_a, "21-desk")["state"] == "logged_off"
    assert node_a.status()["licences"]["used"] == 1  # the pool is shared
    node_b.database.dispose()


def test_unmanaged_log_ons_are_listed_and_never_blocked(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "trunk-1")
    assert svc.authorize("trunk-1", "600").reason is Reason.UNMANAGED
    assert svc.status()["unmanaged"][0]["logon"] == "trunk-1"
    assert used(svc) == 0


def test_licence_count_change_adds_and_drops_slots(
    make_settings: SettingsFactory, make_service: ServiceFactory, clock: FakeClock
) -> None:
    svc = make_service(make_settings(**{"licences.count": 3}))
    svc.add_subscriber("21-desk", "21")
    logon(svc, clock, "21-desk")
    svc.authorize("21-desk", "600")
    svc.authorize("21-desk", "600")
    smaller = BridgeService(make_settings(**{"licences.count": 1}), clock=clock)
    smaller.start()
    assert smaller.status()["licences"] == {"total": 1, "used": 1, "free": 0, "reserved": 0}
    smaller.database.dispose()


def test_database_failure_still_lets_emergency_calls_through(
    make_settings: SettingsFactory, clock: FakeClock
) -> None:
    from forum_bridge.errors import StoreError

    svc = BridgeService(make_settings(), clock=clock)  # never upgraded: every query fails
    assert svc.authorize("21-desk", "112").reason is Reason.EMERGENCY
    with pytest.raises(StoreError):
        svc.authorize("21-desk", "600")


def test_subscriber_administration_errors(svc: BridgeService) -> None:
    with pytest.raises(AlreadyExistsError):
        svc.add_subscriber("21-desk", "21")
    with pytest.raises(NotFoundError):
        svc.add_subscriber("30-desk", "30", "nosuchprofile")
    with pytest.raises(InvalidInputError):
        svc.add_subscriber("a b", "30")
    with pytest.raises(InvalidInputError):
        svc.add_subscriber("30-desk", "3x")
    with pytest.raises(NotFoundError):
        svc.remove_subscriber("nobody")


def test_remove_subscriber_frees_its_licence(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk")
    svc.authorize("21-desk", "600")
    svc.remove_subscriber("21-desk")
    assert used(svc) == 0
    assert svc.audit_log(5)[0]["reason"] == "removal"


def test_import_is_all_or_nothing(svc: BridgeService) -> None:
    good = "logon,number,profile\n" + "".join(f"u{i},{1000 + i}\n" for i in range(3000))
    assert svc.import_subscribers(good) == 3000
    assert len(svc.status()["subscribers"]) == 3004
    with pytest.raises(AlreadyExistsError):
        svc.import_subscribers("n1,500\nu5,1005\n")
    with pytest.raises(InvalidInputError, match="line 2"):
        svc.import_subscribers("n2,501\nbad name,502\n")
    with pytest.raises(NotFoundError):
        svc.import_subscribers("n3,503,nosuch\n")
    assert len(svc.status()["subscribers"]) == 3004


def test_usage_history_follows_every_change(svc: BridgeService, clock: FakeClock) -> None:
    logon(svc, clock, "21-desk")
    clock.advance(60)
    svc.authorize("21-desk", "600")
    clock.advance(60)
    svc.reset_licences("admin")
    used_values = [h["used"] for h in svc.status()["usage_history"]]
    assert used_values[-3:] == [1, 0, 0]
    assert 1 in used_values


def test_a_leg_seen_twice_is_decided_once(svc: BridgeService, clock: FakeClock) -> None:
    for name in ("21-desk", "21-soft", "22-desk"):
        logon(svc, clock, name)
    svc.authorize("21-desk", "600")
    svc.authorize("21-soft", "600")
    first = svc.apply(
        CallStarted("22-desk", "PJSIP/22-desk-7", "600", Direction.OUTBOUND, clock()), enforce=True
    )
    again = svc.authorize("22-desk", "600", channel="PJSIP/22-desk-7")  # the dialplan hook, same leg
    assert first.decision == again
    assert [a["kind"] for a in svc.audit_log(20)].count("deny") == 1


def test_resync_moves_the_keepalive_clock_of_contacts_the_pbx_still_holds(
    svc: BridgeService, clock: FakeClock
) -> None:
    logon(svc, clock, "21-desk", "sip:21-desk@x")
    svc.apply(LogonFailed("21-desk", at=clock()))
    clock.advance(125)  # the bridge was away longer than the keepalive (120 s + 10 s grace)
    svc.resync([Registration("21-desk", "sip:21-desk@x")], [])
    clock.advance(10)
    assert svc.expire_keepalives() == []
    assert sub(svc, "21-desk")["last_seen"] == "2026-11-24T08:02:05Z"
    assert sub(svc, "21-desk")["state"] == "logon_failed"  # a resync is no successful log-on
    state = svc.logon_state("21-desk")
    assert (state.managed, state.logged_on, state.last_logon_failed) == (True, True, True)
