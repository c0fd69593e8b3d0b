"""The ESL listener against a fake FreeSWITCH: the Forum rules, enforcement, resync and failures.

Every scenario asserts through ``svc.status()``, the document ``forum-bridge status --json`` prints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from forum_bridge.errors import StoreError
from forum_bridge.store.models import CallRow
from tests.freeswitch.conftest import Bridge, wait_until
from tests.freeswitch.fake_esl import (
    FakeEslServer,
    captured,
    channel_create_event,
    edit_event,
    event_frame,
    expire_event,
    hangup_event,
    register_event,
    register_failure_event,
    register_failure_only_event,
    ringing_leg_event,
)

StartBridge = Callable[..., Bridge]

KILL = "api uuid_kill {} CALL_REJECTED"


def call(bridge: Bridge, uuid: str, user: str, number: str) -> None:
    """A phone places a call: FreeSWITCH lists the channel and sends CHANNEL_CREATE."""
    bridge.fake.add_channel(uuid, user, number)
    bridge.push(channel_create_event(uuid, user, number))


def test_subscription_puts_channel_events_before_custom(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    event = next(c for c in bridge.fake.commands if c.startswith("event "))
    assert event.index("CHANNEL_CREATE") < event.index("CUSTOM")
    assert event.index("CHANNEL_HANGUP_COMPLETE") < event.index("CUSTOM")
    assert event.split("CUSTOM", 1)[1].split() == [
        "sofia::register",
        "sofia::unregister",
        "sofia::expire",
        "sofia::register_failure",
        "sofia::register_attempt",
    ]


def test_log_on_succeeds_with_no_licence_free(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    call(bridge, "c-1000", "1000", "600")
    assert bridge.licences() == {"total": 1, "used": 1, "free": 0, "reserved": 0}
    bridge.register("1001")
    status = bridge.subscriber("1001")
    assert (status["state"], status["licensed"]) == ("logged_on", False)
    assert status["contact"] == "sip:1001@127.0.0.1:5091"
    assert bridge.fake.kills() == []


def test_a_licence_is_taken_at_the_first_call_not_at_log_on(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    assert bridge.licences()["used"] == 0
    assert bridge.subscriber("1000")["licensed"] is False
    call(bridge, "c-1", "1000", "600")
    status = bridge.service.status()
    assert status["licences"] == {"total": 1, "used": 1, "free": 0, "reserved": 0}
    assert [(a["slot"], a["logon"], a["number"]) for a in status["assignments"]] == [(1, "1000", "1000")]
    assert status["assignments"][0]["since"] == "2026-11-24T08:00:00Z"
    assert [(c["channel"], c["logon"], c["number"], c["direction"]) for c in status["calls"]] == [
        ("c-1", "1000", "600", "outbound")
    ]
    bridge.push(hangup_event("c-1", "1000", "600"))
    assert bridge.service.status()["calls"] == []
    assert bridge.subscriber("1000")["licensed"] is True  # kept until log-off


def test_a_refresh_takes_no_licence_and_moves_the_keepalive(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    first_seen = bridge.subscriber("1000")["last_seen"]
    bridge.clock.advance(60)
    bridge.register("1000")  # the refresh: same contact
    status = bridge.subscriber("1000")
    assert status["contacts"] == ["sip:1000@127.0.0.1:5091"]
    assert status["last_seen"] > first_seen
    assert bridge.licences()["used"] == 0
    call(bridge, "c-1", "1000", "600")
    bridge.register("1000")
    call(bridge, "c-2", "1000", "601")
    assert bridge.licences()["used"] == 1


def test_two_log_ons_of_one_number_take_two_licences(start_bridge: StartBridge) -> None:
    bridge = start_bridge(subscribers={"2000": "20", "2001": "20"}, **{"licences.count": 2})
    bridge.register("2000", 5091)
    bridge.register("2001", 5092)
    call(bridge, "c-a", "2000", "600")
    call(bridge, "c-b", "2001", "601")
    status = bridge.service.status()
    assert status["licences"]["used"] == 2
    assert sorted((a["logon"], a["number"]) for a in status["assignments"]) == [
        ("2000", "20"),
        ("2001", "20"),
    ]


def test_pool_full_kills_a_normal_call_and_lets_an_emergency_call_pass(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    bridge.register("1001")
    call(bridge, "c-holder", "1000", "600")
    call(bridge, "c-denied", "1001", "601")
    assert bridge.fake.kills() == [KILL.format("c-denied")]
    call(bridge, "c-112", "1001", "112")
    assert bridge.fake.kills() == [KILL.format("c-denied")]
    assert bridge.subscriber("1001")["licensed"] is False
    assert bridge.licences()["used"] == 1


def test_a_ringing_leg_without_a_licence_is_killed(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    bridge.register("1001")
    call(bridge, "c-holder", "1000", "600")
    bridge.fake.add_channel("b-leg", "1001", "1001", direction="outbound")
    bridge.push(ringing_leg_event("b-leg", "1001", caller="1003"))
    assert bridge.fake.kills() == [KILL.format("b-leg")]


@pytest.mark.parametrize(("enforce", "spared"), [("esl", False), ("both", True)])
def test_a_failed_log_on_blocks_every_call_even_emergency(
    start_bridge: StartBridge, enforce: str, spared: bool
) -> None:
    bridge = start_bridge(**{"licences.count": 2, "freeswitch.enforce": enforce})
    bridge.register("1000")
    bridge.push(register_failure_event("1000"))
    assert bridge.subscriber("1000")["state"] == "logon_failed"
    call(bridge, "c-112", "1000", "112")
    call(bridge, "c-600", "1000", "600")
    # With the dialplan deciding emergency calls (both), one it let through is never cut: it may be
    # connected to the emergency service already. It is still decided and audited as denied.
    expected = [KILL.format("c-600")] if spared else [KILL.format("c-112"), KILL.format("c-600")]
    assert bridge.fake.kills() == expected
    denied = [(a["number"], a["reason"]) for a in reversed(bridge.service.audit_log()) if a["kind"] == "deny"]
    assert denied == [("112", "logon_failed"), ("600", "logon_failed")]
    assert bridge.licences()["used"] == 0
    failures = bridge.service.status()["failed_logons"]
    assert [(f["logon"], f["source"]) for f in failures] == [("1000", "127.0.0.1:5091")]


def test_unregister_frees_the_licence_at_once(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    call(bridge, "c-1", "1000", "600")
    before = bridge.listener.events_handled
    assert bridge.fake.unregister("1000") == 1
    wait_until(lambda: bridge.listener.events_handled > before)
    status = bridge.subscriber("1000")
    assert (status["state"], status["licensed"]) == ("logged_off", False)
    assert bridge.licences()["free"] == 1


def test_expiry_frees_the_licence(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1001")
    call(bridge, "c-1", "1001", "600")
    bridge.push(expire_event("1001"))
    assert (bridge.subscriber("1001")["state"], bridge.licences()["used"]) == ("logged_off", 0)


def test_a_missed_keepalive_frees_the_licence(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    call(bridge, "c-1", "1000", "600")
    bridge.clock.advance(120 + 10)  # the default profile's keepalive plus grace: not yet
    bridge.let_sweeps_run()
    assert bridge.subscriber("1000")["licensed"] is True
    bridge.clock.advance(1)
    wait_until(lambda: bridge.licences()["used"] == 0, what="the sweep to free the licence")
    assert bridge.subscriber("1000")["state"] == "logged_off"


def test_reset_frees_every_licence_without_cutting_calls(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    call(bridge, "c-1", "1000", "600")
    assert bridge.service.reset_licences("admin") == 1
    status = bridge.service.status()
    assert status["licences"]["used"] == 0
    assert [c["channel"] for c in status["calls"]] == ["c-1"]
    assert bridge.fake.kills() == []
    call(bridge, "c-2", "1000", "601")
    assert bridge.service.status()["assignments"][0]["logon"] == "1000"


def test_reconnect_resyncs_and_logs_once_each_way(
    start_bridge: StartBridge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="forum_bridge")
    bridge = start_bridge(**{"licences.count": 2})
    bridge.register("1000", 5091)
    bridge.register("1001", 5092)
    call(bridge, "c-1001", "1001", "600")
    assert bridge.subscriber("1001")["licensed"] is True

    bridge.fake.set_down(True)
    wait_until(lambda: not bridge.listener.connected, what="the listener to notice")
    wait_until(lambda: bridge.fake.refused >= 3, what="several reconnect attempts")
    # While the bridge is away, 1001 unregisters and 1002 registers; no events reach it.
    bridge.fake.remove_registration("1001", 5092)
    bridge.fake.add_registration("1002", 5093)
    bridge.fake.channels = []
    bridge.fake.set_down(False)
    wait_until(lambda: bridge.listener.sessions == 2, what="the second session")

    assert bridge.subscriber("1001")["state"] == "logged_off"
    assert bridge.subscriber("1001")["licensed"] is False
    assert bridge.subscriber("1002")["state"] == "logged_on"
    assert bridge.subscriber("1002")["contact"] == "sip:1002@127.0.0.1:5093"
    assert bridge.subscriber("1000")["state"] == "logged_on"
    assert bridge.licences()["used"] == 0
    assert bridge.service.status()["calls"] == []
    messages = [r.getMessage() for r in caplog.records if r.name.endswith("freeswitch.listener")]
    assert len([m for m in messages if "went away" in m]) == 1
    assert len([m for m in messages if "is back" in m]) == 1
    assert bridge.metrics.connected == [True, False, True]


def test_resync_moves_the_keepalive_of_registrations_that_stayed(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    bridge.register("1001", 5092)
    bridge.push(register_failure_event("1001"))
    bridge.clock.advance(100)
    bridge.fake.drop()
    wait_until(lambda: bridge.listener.sessions == 2, what="the reconnect")
    bridge.clock.advance(100)  # 200 s after the REGISTER, 100 s after the resync
    bridge.let_sweeps_run()
    assert bridge.subscriber("1000")["state"] == "logged_on"
    # A registration that FreeSWITCH still lists does not undo a failed log-on.
    assert bridge.subscriber("1001")["state"] == "logon_failed"


def test_an_event_arriving_during_the_resync_is_applied_after_it(start_bridge: StartBridge) -> None:
    bridge = start_bridge(wait=False)
    fake = bridge.fake

    def register_mid_resync(command: str) -> None:
        # The registrations snapshot (empty) has gone out; 1000 registers before the channels reply.
        if command == "api show channels as json" and fake.accepted == 1:
            fake.add_registration("1000")
            fake.push_event(register_event("1000"))

    fake.before_reply = register_mid_resync
    wait_until(lambda: bridge.listener.connected, what="the first session")
    wait_until(lambda: bridge.listener.events_handled == 1, what="the register event")
    assert bridge.subscriber("1000")["state"] == "logged_on"


def test_a_resync_cut_short_is_done_again_after_reconnecting(start_bridge: StartBridge) -> None:
    bridge = start_bridge(wait=False)
    bridge.fake.add_registration("1000")
    bridge.fake.drop_on = "api show channels"
    wait_until(lambda: bridge.listener.connected, what="a complete session")
    assert (bridge.fake.accepted, bridge.listener.sessions) == (2, 1)
    assert bridge.subscriber("1000")["state"] == "logged_on"


def test_malformed_frames_are_dropped_and_the_connection_survives(
    start_bridge: StartBridge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="forum_bridge")
    bridge = start_bridge()
    junk = [
        b"Some-Header: without a content type\n\n",
        b"Content-Type: command/reply\nReply-Text: +OK nobody asked\n\n",
        b"Content-Type: application/x-unknown\nContent-Length: 3\n\nabc",
        b"a line that is no header\nContent-Type: text/event-plain\nContent-Length: 0\n\n",
        event_frame("Foo: no event name\n\n"),
        event_frame("Event-Name: CHANNEL_CREATE\nUnique-ID: only-this\n\n"),
        b"Content-Type: text/event-plain\nContent-Length: many\n\n",
        b"\xff\xfe\xfd: \x00\x01\n\n",
        event_frame("Event-Name: CUSTOM\nEvent-Subclass: sofia%3A%3Aregister\nfrom-user: 99%zz%FF\n\n"),
        b"\n\n\n",
    ]
    for frame in junk:
        assert bridge.fake.send_raw(frame) == 1
    bridge.register("1000")
    assert bridge.subscriber("1000")["state"] == "logged_on"
    assert bridge.listener.sessions == 1
    assert bridge.fake.accepted == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("without Content-Type" in m for m in warnings)
    assert any("answers no command" in m for m in warnings)
    assert any("malformed event" in m for m in warnings)


def test_a_connection_dropped_in_the_middle_of_a_frame_reconnects(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    frame = event_frame(register_event("1000"))
    bridge.fake.send_raw(frame[: len(frame) // 2])
    bridge.fake.drop()
    wait_until(lambda: bridge.listener.sessions == 2, what="the reconnect")
    assert bridge.subscriber("1000")["state"] == "logged_off"  # half an event is no event
    bridge.register("1000")
    assert bridge.subscriber("1000")["state"] == "logged_on"


def test_a_connection_dropped_before_the_kill_reply_reconnects(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    bridge.register("1001")
    call(bridge, "c-holder", "1000", "600")
    bridge.fake.drop_on = "api uuid_kill"
    bridge.fake.add_channel("c-denied", "1001", "601")
    bridge.fake.push_event(channel_create_event("c-denied", "1001", "601"))
    wait_until(lambda: bridge.listener.sessions == 2, what="the reconnect")
    assert bridge.fake.kills() == [KILL.format("c-denied")]
    assert bridge.subscriber("1001")["licensed"] is False


def test_a_wrong_password_is_one_clear_line_without_the_password(
    start_bridge: StartBridge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "Wr0ng-Secret-42"
    bridge = start_bridge(wait=False, **{"freeswitch.esl_password": password})
    wait_until(lambda: bridge.fake.auth_attempts >= 3, what="several attempts with backoff")
    assert not bridge.listener.connected
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    line = errors[0].getMessage()
    assert "rejected the ESL password" in line and "freeswitch.esl_password" in line
    assert "\n" not in line
    assert all(password not in r.getMessage() for r in caplog.records)
    assert password not in caplog.text
    # Once the password is right on FreeSWITCH's side, the listener gets in.
    bridge.fake.password = password
    wait_until(lambda: bridge.listener.connected, what="the listener to connect")


def test_a_password_with_a_line_break_stops_the_listener_with_one_error(
    start_bridge: StartBridge, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = start_bridge(wait=False, **{"freeswitch.esl_password": "pw\napi shutdown"})
    wait_until(lambda: bridge.greenlets[0].dead, what="the listener to give up")
    assert bridge.fake.accepted == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "FreeSWITCH listener stopped: configuration key freeswitch.esl_password: must not contain a line break"
    ]


def test_a_quiet_link_is_probed_and_a_dead_one_replaced(start_bridge: StartBridge) -> None:
    bridge = start_bridge(idle_probe=0.05)
    wait_until(lambda: "api status" in bridge.fake.commands, what="a probe of the quiet link")
    assert bridge.listener.sessions == 1
    bridge.fake.drop_on = "api status"
    wait_until(lambda: bridge.listener.sessions == 2, what="a new connection after the failed probe")


def test_enforce_hook_records_calls_but_never_kills(start_bridge: StartBridge) -> None:
    bridge = start_bridge(**{"freeswitch.enforce": "hook"})
    bridge.register("1000")
    bridge.register("1001")
    call(bridge, "c-1", "1000", "600")
    call(bridge, "c-2", "1001", "601")
    assert bridge.fake.kills() == []
    assert bridge.licences()["used"] == 0  # the hook takes licences; the listener only records
    assert [c["channel"] for c in bridge.service.status()["calls"]] == ["c-1", "c-2"]


@pytest.mark.parametrize(("fail_mode", "killed"), [("closed", True), ("open", False)])
def test_database_failure_follows_fail_mode(
    start_bridge: StartBridge, monkeypatch: pytest.MonkeyPatch, fail_mode: str, killed: bool
) -> None:
    bridge = start_bridge(**{"freeswitch.fail_mode": fail_mode})
    bridge.register("1000")

    def broken(*_args: object, **_kwargs: object) -> object:
        raise StoreError("database error: disk I/O error")

    monkeypatch.setattr(bridge.service, "authorize", broken)
    call(bridge, "c-1", "1000", "600")
    # 503: "could not be decided", as the dialplan's fail mode answers, unlike 603 "denied".
    assert bridge.fake.kills() == (["api uuid_kill c-1 NORMAL_TEMPORARY_FAILURE"] if killed else [])
    assert bridge.listener.connected


def test_event_lag_and_connection_state_reach_the_metrics(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.listener._wall_clock = lambda: 1795495818.141495 + 2.5
    bridge.push(captured("CUSTOM", subclass="sofia::register"))  # stamped 1795495818141495 µs
    assert bridge.metrics.lags == [pytest.approx(2.5)]
    assert bridge.metrics.connected == [True]


def test_a_call_with_a_spoofed_from_is_decided_for_the_user_who_authenticated(
    start_bridge: StartBridge,
) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    bridge.register("1001", 5092)
    call(bridge, "c-holder", "1000", "600")  # 1000 holds the only licence
    # 1001 authenticates with its own password but claims to be 1000 in From.
    bridge.fake.add_channel("c-spoof", "1001", "601")
    spoofed = edit_event(
        channel_create_event("c-spoof", "1001", "601"),
        {"variable_sip_from_user": "1000", "Caller-Username": "1000", "Caller-Caller-ID-Number": "1000"},
    )
    bridge.push(spoofed)
    assert bridge.fake.kills() == [KILL.format("c-spoof")]
    assert bridge.subscriber("1001")["licensed"] is False
    denied = [a for a in bridge.service.audit_log() if a["kind"] == "deny"]
    assert [(d["logon"], d["reason"]) for d in denied] == [("1001", "emergency_only")]


def test_a_wrong_password_blocks_the_digest_user_not_the_address_it_claimed(
    start_bridge: StartBridge,
) -> None:
    bridge = start_bridge(**{"licences.count": 2})
    bridge.register("1000")
    bridge.register("1001", 5092)
    # 1001's credentials with a wrong password, To: 1000: the attempt names 1001, the
    # register_failure that follows it names only the address, 1000.
    bridge.push(edit_event(register_failure_event("1001", 5092), {"from-user": "1000", "to-user": "1000"}))
    bridge.push(register_failure_only_event("1000", 5092))
    assert bridge.subscriber("1001")["state"] == "logon_failed"
    assert bridge.subscriber("1000")["state"] == "logged_on"
    failed = [a for a in bridge.service.audit_log() if a["kind"] == "logon_failed"]
    assert [a["logon"] for a in failed] == ["1001"]  # one request, one failure


def test_a_register_failure_alone_still_counts_for_the_address(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000")
    bridge.push(register_failure_only_event("1000"))
    assert bridge.subscriber("1000")["state"] == "logon_failed"


def test_resync_trusts_sofias_table_not_show_registrations(start_bridge: StartBridge) -> None:
    bridge = start_bridge(**{"licences.count": 2})
    bridge.register("1000", 5091)
    bridge.register("1001", 5092)
    call(bridge, "c-1000", "1000", "600")
    bridge.fake.set_down(True)
    wait_until(lambda: not bridge.listener.connected, what="the listener to notice")
    # While the bridge is away: 1000 is flushed (sofia forgets it, "show registrations" still lists
    # it), and a phone authenticated as 1001 registers the address 1002.
    bridge.fake.flush_registration("1000", 5091)
    bridge.fake.add_registration("1002", 5093, auth_user="1001")
    bridge.fake.channels = []
    bridge.fake.set_down(False)
    wait_until(lambda: bridge.listener.sessions == 2, what="the second session")
    assert "api sofia xmlstatus profile internal reg" in bridge.fake.commands
    assert bridge.subscriber("1000")["state"] == "logged_off"
    assert bridge.subscriber("1000")["licensed"] is False
    assert bridge.subscriber("1002")["state"] != "logged_on"
    status = bridge.subscriber("1001")
    assert status["state"] == "logged_on"


def test_resync_names_a_placed_call_by_who_authenticated_it(
    start_bridge: StartBridge, fake_esl: FakeEslServer
) -> None:
    fake_esl.add_registration("1001", 5092)
    # A call 1001 placed with From: 1000 before the bridge started: only uuid_getvar knows it is 1001.
    fake_esl.add_channel("c-live", "1001", "600")
    fake_esl.channels[-1].update(name="sofia/internal/1000@127.0.0.1", presence_id="", cid_num="1000")
    bridge = start_bridge()
    assert "api uuid_getvar c-live sip_auth_username" in bridge.fake.commands
    with bridge.service.database.transaction() as session:
        row = session.get(CallRow, ("fs1", "c-live"))
        assert row is not None
        assert (row.logon, row.number) == ("1001", "600")


def test_a_contact_freeswitch_replaced_without_an_event_is_logged_off(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000", 5091)
    call(bridge, "c-1000", "1000", "600")
    # A second device of 1000 registers; without multiple-registrations FreeSWITCH drops the first
    # device's contact silently, and only the new register event comes.
    bridge.fake.remove_registration("1000", 5091)
    bridge.register("1000", 5092)
    wait_until(lambda: bridge.subscriber("1000")["contact"] == "sip:1000@127.0.0.1:5092", what="the swap")
    releases = [a for a in bridge.service.audit_log() if a["kind"] == "release"]
    assert releases == []  # the licence stays: the log-on is still registered
    bridge.fake.unregister("1000", 5092)
    wait_until(lambda: bridge.licences()["used"] == 0, what="the licence to be freed at the log-off")


def test_an_over_long_contact_freeswitch_still_holds_is_not_taken_for_replaced(
    start_bridge: StartBridge, caplog: pytest.LogCaptureFixture
) -> None:
    """The stored copy of a contact longer than its column is shortened; it must still be found live."""
    bridge = start_bridge()
    bridge.register("1000", 5091)
    long_uri = "sip:1000@" + "h" * 600 + ".example:5092"
    bridge.fake.add_registration("1000", 5092)
    bridge.fake.registrations[-1]["url"] = f"sofia/internal/{long_uri}"
    bridge.push(edit_event(register_event("1000", 5092), {"contact": f'"" <{long_uri}>'}))
    # FreeSWITCH drops the first device silently; a third registers, which makes the bridge look.
    bridge.fake.remove_registration("1000", 5091)
    caplog.set_level(logging.INFO, logger="forum_bridge.adapters.freeswitch.listener")
    bridge.register("1000", 5093)
    replaced = [r.getMessage() for r in caplog.records if "replaced contact" in r.getMessage()]
    assert any("sip:1000@127.0.0.1:5091 of 1000" in m for m in replaced), replaced  # the check ran
    assert not any("sip:1000@hhh" in m for m in replaced), replaced


def test_a_second_device_freeswitch_keeps_stays_logged_on(start_bridge: StartBridge) -> None:
    bridge = start_bridge()
    bridge.register("1000", 5091)
    call(bridge, "c-1000", "1000", "600")
    bridge.register("1000", 5092)  # multiple-registrations on: FreeSWITCH keeps both
    assert "api sofia xmlstatus profile internal reg" in bridge.fake.commands
    bridge.fake.unregister("1000", 5092)
    bridge.let_sweeps_run()
    assert bridge.licences()["used"] == 1  # the first device still holds the log-on


def test_without_sofias_table_the_resync_falls_back_on_show_registrations(
    start_bridge: StartBridge, fake_esl: FakeEslServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake_esl.add_registration("1000", 5091)
    original = fake_esl._api

    def no_sofia(command: str) -> str:
        if command.startswith("sofia "):
            return "-ERR sofia Command not found!\n"
        return original(command)

    fake_esl._api = no_sofia  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING)
    bridge = start_bridge()
    assert bridge.subscriber("1000")["state"] == "logged_on"
    assert any("using show registrations" in r.getMessage() for r in caplog.records)
