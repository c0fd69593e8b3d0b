"""The AMI listener against a fake AMI server speaking Asterisk 22's bytes, with a real service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from forum_bridge.adapters.asterisk import ami as ami_module
from forum_bridge.adapters.asterisk.ami import EVENT_CLASSES, AmiListener
from forum_bridge.config import Settings
from forum_bridge.core.events import Direction
from forum_bridge.core.rules import Decision, Reason
from forum_bridge.decision_gate import DecisionTicket
from forum_bridge.errors import PbxConnectionError, StoreError
from forum_bridge.service import BridgeService
from tests.asterisk.aio import run
from tests.asterisk.ami_transcript import raw_frames
from tests.asterisk.conftest import AmiRig, challenge_failed, contact_item, contact_status, new_channel
from tests.asterisk.fake_ami import FakeAmi

ServiceFactory = Callable[[Settings], BridgeService]
SettingsFactory = Callable[..., Settings]
AMI_LOGGER = "forum_bridge.adapters.asterisk.ami"


def test_login_uses_the_event_mask_and_resyncs_contacts_and_channels(ami: AmiRig) -> None:
    ami.setup("21-desk", registered=True)
    fake = ami.fake
    fake.channels = [dict(new_channel("21-desk", "600"), Application="Echo", Duration="00:00:01")]
    fake.channels[0].pop("Event")

    async def scenario(listener: AmiListener) -> None:
        login = fake.actions_named("Login")[0]
        assert login["Events"] == EVENT_CLASSES == "system,call,security"
        assert login["Username"] == "forumbridge"
        status = ami.service.status()
        desk = ami.subscriber("21-desk")
        assert desk["state"] == "logged_on"
        assert desk["contact"] == "sip:21-desk@127.0.0.1:5081"
        assert desk["source"] == "127.0.0.1:5081"
        assert desk["user_agent"] == "SIPp-test"
        assert [(c["channel"], c["number"]) for c in status["calls"]] == [
            (fake.channels[0]["Channel"], "600")
        ]
        assert ami.recorded.connected == [True]

    ami.listen(scenario)
    assert ami.recorded.connected == [True, False]


def test_a_contact_that_vanished_while_away_is_freed_after_the_reconnect(ami: AmiRig) -> None:
    service = ami.setup("21-desk", "22-soft", registered=True, **{"licences.count": 2})

    async def scenario(listener: AmiListener) -> None:
        assert service.authorize("21-desk", "600").allowed
        assert service.authorize("22-soft", "600").allowed
        assert ami.holders() == ["21-desk", "22-soft"]
        # While the bridge is away, 21-desk unregisters: nobody tells the bridge.
        await ami.fake.drop()
        ami.fake.contacts = [contact_item("22-soft", 5082)]
        await ami.wait(lambda: listener.resyncs >= 2)
        assert listener.logins == 2
        assert ami.subscriber("21-desk")["state"] == "logged_off"
        assert ami.subscriber("22-soft")["state"] == "logged_on"
        assert ami.holders() == ["22-soft"]
        assert listener.last_resync is not None
        assert listener.last_resync.released == ["21-desk"]

    ami.listen(scenario)


def test_the_recorded_transcript_applied_through_the_wire(ami: AmiRig) -> None:
    """Every event frame of the real capture, pushed as recorded bytes, lands in the right state."""
    event_frames = [f for f in raw_frames("asterisk22-ami-capture.txt") if f.startswith("Event:")]
    service = ami.setup("21-desk", "22-soft")

    async def scenario(listener: AmiListener) -> None:
        await ami.send(*event_frames, timeout=10)
        await asyncio.sleep(0)
        assert ami.fake.hangups == []  # the licence was free for the call to 600

    ami.listen(scenario)
    status = service.status()
    assert status["licences"]["used"] == 0  # 21-desk unregistered: freed at once
    assert {s["logon"]: s["state"] for s in status["subscribers"]} == {
        "21-desk": "logged_off",
        "22-soft": "logged_off",
    }
    failed = {(f["logon"], f["reason"], f["source"]) for f in status["failed_logons"]}
    assert failed == {
        ("22-soft", "wrong_password", "127.0.0.1:5082"),
        ("nobody", "unknown_user", "127.0.0.1:5083"),
    }
    acquired = [a for a in service.audit_log() if a["kind"] == "acquire"]
    assert [(a["logon"], a["number"]) for a in acquired] == [("21-desk", "600")]
    assert status["calls"] == []


def test_pool_full_hangs_up_a_normal_call_but_not_an_emergency_call(ami: AmiRig) -> None:
    ami.setup("21-desk", "22-soft", registered=True)
    fake = ami.fake
    emergency, denied = new_channel("22-soft", "112"), new_channel("22-soft", "600")

    async def scenario(listener: AmiListener) -> None:
        await ami.send(new_channel("21-desk", "600"))
        assert ami.holders() == ["21-desk"]
        fake.channels = [{"Channel": denied["Channel"]}]
        ami.push(emergency, denied)
        await fake.wait_until(lambda: len(fake.hangups) >= 1)
        hangup = fake.hangups[0]
        assert (hangup["Channel"], hangup["Cause"]) == (denied["Channel"], "21")
        await ami.wait(lambda: listener.hangups_sent == [denied["Channel"]])

    ami.listen(scenario)
    # Frames are applied in order, so a hang-up of the 112 call would have come first.
    assert [h["Channel"] for h in fake.hangups] == [denied["Channel"]]
    assert ami.holders() == ["21-desk"]


def test_a_failed_log_on_is_hung_up_even_for_an_emergency_call(ami: AmiRig) -> None:
    ami.setup("21-desk", registered=True, **{"licences.count": 2})
    fake, call = ami.fake, new_channel("21-desk", "112")

    async def scenario(listener: AmiListener) -> None:
        ami.push(challenge_failed("21-desk"), call)
        await fake.wait_until(lambda: len(fake.hangups) >= 1)
        assert (fake.hangups[0]["Channel"], fake.hangups[0]["Cause"]) == (call["Channel"], "21")
        assert ami.subscriber("21-desk")["state"] == "logon_failed"

    ami.listen(scenario)


def test_an_inbound_leg_of_a_log_on_without_a_licence_is_hung_up(ami: AmiRig) -> None:
    service = ami.setup("21-desk", "21-soft", registered=True)
    fake, ringing = ami.fake, new_channel("21-soft", "21", inbound=True)

    async def scenario(listener: AmiListener) -> None:
        assert service.authorize("21-desk", "600").allowed  # the only licence
        ami.push(ringing)
        await fake.wait_until(lambda: len(fake.hangups) >= 1)
        assert (fake.hangups[0]["Channel"], fake.hangups[0]["Cause"]) == (ringing["Channel"], "21")
        deny = [a for a in service.audit_log() if a["kind"] == "deny"]
        assert (deny[0]["logon"], deny[0]["number"], deny[0]["detail"]) == (
            "21-soft",
            "21",
            Direction.INBOUND.value,
        )

    ami.listen(scenario)


def test_hook_only_mode_records_calls_without_deciding(ami: AmiRig) -> None:
    service = ami.setup("21-desk", "22-soft", registered=True, **{"asterisk.enforce": "hook"})
    call = new_channel("22-soft", "600")

    async def scenario(listener: AmiListener) -> None:
        assert service.authorize("21-desk", "600").allowed
        await ami.send(call)
        assert [c["channel"] for c in service.status()["calls"]] == [call["Channel"]]
        await ami.send({"Event": "Hangup", "Channel": call["Channel"], "Cause": "16"})
        assert service.status()["calls"] == []

    ami.listen(scenario)
    assert ami.fake.hangups == []
    assert ami.holders() == ["21-desk"]


def test_database_errors_follow_the_fail_mode_but_emergency_calls_run(
    ami: AmiRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = ami.setup("21-desk", registered=True)
    fake, emergency, normal = ami.fake, new_channel("21-desk", "112"), new_channel("21-desk", "600")

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise StoreError("database error: disk I/O error")

    monkeypatch.setattr(service, "authorize", broken)

    async def scenario(listener: AmiListener) -> None:
        await ami.send(emergency, normal)
        await fake.wait_until(lambda: len(fake.hangups) >= 1)

    ami.listen(scenario)
    assert [h["Channel"] for h in fake.hangups] == [normal["Channel"]]
    # Not decided (the database failed): 503 like the dialplan's fail mode, not 403.
    assert [h["Cause"] for h in fake.hangups] == ["34"]


def test_a_leg_the_hook_gave_up_on_is_hung_up_as_undecided_not_denied(ami: AmiRig) -> None:
    # The hook answered the fail mode (closed) before the leg's Newchannel was applied: that
    # answer stands for the leg, and its hang-up must be the fail mode's 503, not a denial's 403.
    service = ami.setup("21-desk", registered=True)
    fake, call = ami.fake, new_channel("21-desk", "600")
    ticket = DecisionTicket(time.monotonic() + 5, call["Channel"])
    assert service.give_up(ticket, Decision(False, Reason.BRIDGE_ERROR))

    async def scenario(listener: AmiListener) -> None:
        await ami.send(call)
        await fake.wait_until(lambda: len(fake.hangups) >= 1)

    ami.listen(scenario)
    assert [(h["Channel"], h["Cause"]) for h in fake.hangups] == [(call["Channel"], "34")]
    assert ami.holders() == []


def test_an_emergency_call_let_through_without_the_database_does_not_count_as_it_being_back(
    ami: AmiRig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AMI_LOGGER)
    service = ami.setup("21-desk", registered=True)
    database = service.database

    @contextlib.contextmanager
    def broken(*_args: Any, **_kwargs: Any) -> Iterator[Any]:
        raise StoreError("database error: connection refused")
        yield

    async def scenario(listener: AmiListener) -> None:
        with monkeypatch.context() as patched:
            patched.setattr(database, "begin", broken)
            patched.setattr(database, "transaction", broken)
            await ami.send(contact_status("21-desk", "Reachable"))
            await ami.wait(lambda: listener._db_failing)
            # Let through (emergency calls come first), but the database is still down.
            await ami.send(new_channel("21-desk", "112"))
            assert listener._db_failing
        await ami.send(contact_status("21-desk", "Reachable"))
        await ami.wait(lambda: not listener._db_failing)

    ami.listen(scenario)
    assert ami.fake.hangups == []
    back = [r for r in caplog.records if r.getMessage() == "database is back"]
    assert len(back) == 1


def test_reconnect_is_logged_once_when_asterisk_goes_and_once_when_it_is_back(
    ami: AmiRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=AMI_LOGGER)

    async def scenario(listener: AmiListener) -> None:
        await ami.fake.stop_listening()
        # Several refused attempts while Asterisk is away.
        await ami.wait(lambda: listener._failures >= 4)
        await ami.fake.start()
        await ami.wait(lambda: listener.resyncs >= 2)
        assert listener.logins == 2

    ami.listen(scenario)
    assert ami.recorded.connected == [True, False, True, False]
    records = [r for r in caplog.records if r.name == AMI_LOGGER and r.levelno >= logging.INFO]
    lost = [r for r in records if "lost Asterisk AMI" in r.getMessage()]
    back = [r for r in records if "is back" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert len(back) == 1 and back[0].levelno == logging.INFO
    assert [r for r in records if r.levelno >= logging.WARNING] == lost


def test_a_wrong_secret_gives_one_clear_error_line_without_the_secret(
    ami: AmiRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-Zq7"
    ami.fake.secret = "the-right-one"
    ami.setup(secret=wrong)
    fake = ami.fake

    async def scenario(listener: AmiListener) -> None:
        await fake.wait_until(lambda: fake.login_attempts >= 3, 5)
        assert listener.connected is False
        assert listener.logins == 0

    ami.listen(scenario, resynced=False)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "refused the AMI login of user 'forumbridge'" in message
    assert "Authentication failed" in message
    assert "asterisk.ami_secret" in message
    assert wrong not in caplog.text
    assert all(wrong not in str(r.args) for r in caplog.records)


def test_a_login_refused_while_asterisk_shuts_down_is_not_blamed_on_the_secret(
    ami: AmiRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AMI_LOGGER)
    fake = ami.fake
    fake.login_error = "Asterisk is shutting down"

    async def scenario(listener: AmiListener) -> None:
        await fake.wait_until(lambda: fake.login_attempts >= 2)
        fake.login_error = None
        await ami.wait(lambda: listener.resyncs >= 1)

    ami.listen(scenario, resynced=False)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Asterisk is shutting down" in warnings[0]


def test_a_silent_peer_is_detected_by_the_ping_and_the_session_replaced(ami: AmiRig) -> None:
    ami.setup(**{"asterisk.action_timeout": 0.3})

    async def scenario(listener: AmiListener) -> None:
        ami.fake.answer_pings = False
        await ami.wait(lambda: listener.logins >= 2)
        ami.fake.answer_pings = True
        await ami.wait(lambda: listener.resyncs >= 2)
        assert listener.connected

    ami.listen(scenario, ping_interval=0.05)
    assert len(ami.fake.actions_named("Ping")) == 1  # unanswered, so the session was replaced


def test_malformed_frames_are_dropped_and_the_session_goes_on(ami: AmiRig) -> None:
    ami.setup("21-desk")
    fake = ami.fake

    async def scenario(listener: AmiListener) -> None:
        fake.push_bytes(b"this is not a header\r\nneither is this\r\n\r\n")
        fake.push_bytes(b"Event: Newchannel\r\nEvent: Hangup\r\nChannel: PJSIP/x-00000001\r\n\r\n")
        fake.push_bytes(b"Event: ContactStatus\r\nContactStatus: NonQualified\r\n\r\n")
        fake.push_bytes(b"Event: Newchannel\r\nChannel: PJSIP/21-desk-00000009\r\nExten: \xff\xfe\r\n\r\n")
        fake.push_bytes(bytes(range(1, 9)) + b"\r\n\r\n")
        good = contact_status("21-desk")
        good["UserAgent"] = "Zoë Müller"
        fake.push(good)
        await ami.wait(lambda: ami.subscriber("21-desk")["state"] == "logged_on")
        assert listener.logins == 1
        assert ami.subscriber("21-desk")["user_agent"] == "Zoë Müller"

    ami.listen(scenario)


def test_an_endless_frame_drops_the_connection_instead_of_growing_memory(ami: AmiRig) -> None:
    async def scenario(listener: AmiListener) -> None:
        chunk = b"Event: X\r\n" + b"Y: " + b"z" * 65536 + b"\r\n"
        for _ in range(20):
            ami.fake.push_bytes(chunk)
        await ami.wait(lambda: listener.logins >= 2)

    ami.listen(scenario)


def test_a_keepalive_of_an_unknown_registration_triggers_a_resync(
    ami: AmiRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ami_module, "_UNKNOWN_RESYNC_DELAY", 0.05)
    monkeypatch.setattr(ami_module, "_UNKNOWN_RESYNC_MIN_INTERVAL", 0.0)
    ami.setup("21-desk")

    async def scenario(listener: AmiListener) -> None:
        assert ami.subscriber("21-desk")["state"] == "logged_off"
        # The phone is registered in Asterisk, but the bridge does not know the contact
        # (e.g. it logged it off for a missed keepalive): its next REGISTER refresh shows.
        ami.fake.contacts = [contact_item("21-desk")]
        ami.push(
            {
                "Event": "SuccessfulAuth",
                "Privilege": "security,all",
                "EventTV": "2026-11-24T04:39:17.371+0000",
                "Service": "PJSIP",
                "AccountID": "21-desk",
                "RemoteAddress": "IPV4/UDP/127.0.0.1/5081",
                "UsingPassword": "1",
            }
        )
        await ami.wait(lambda: listener.resyncs >= 2)
        assert ami.subscriber("21-desk")["state"] == "logged_on"

    ami.listen(scenario)


def test_event_lag_is_reported_from_event_tv(ami: AmiRig) -> None:
    async def scenario(listener: AmiListener) -> None:
        await ami.send(challenge_failed("nobody"))

    ami.listen(scenario)
    assert len(ami.recorded.lags) == 1
    assert ami.recorded.lags[0] > 0  # the recorded EventTV is in the past


def test_a_refused_resync_is_one_error_and_the_session_keeps_following_events(
    ami: AmiRig, caplog: pytest.LogCaptureFixture
) -> None:
    """An AMI user without write = system: reconnecting would not help, so the session stays."""
    caplog.set_level(logging.INFO, logger=AMI_LOGGER)
    fake = ami.fake
    fake.refused_actions = {"pjsipshowcontacts"}
    ami.setup("21-desk")

    async def scenario(listener: AmiListener) -> None:
        await fake.wait_until(lambda: len(fake.actions_named("PJSIPShowContacts")) >= 1)
        ami.push(contact_status("21-desk"))
        await ami.wait(lambda: ami.subscriber("21-desk")["state"] == "logged_on")
        assert listener.logins == 1 and listener.resyncs == 0
        fake.refused_actions = set()
        # The retry comes after reconnect_max (0.2 s here, at least 1 s in real life).
        await ami.wait(lambda: listener.resyncs >= 1)
        assert listener.logins == 1

    ami.listen(scenario, resynced=False)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "write = system" in errors[0].getMessage()
    assert "Permission denied" in errors[0].getMessage()


def test_caught_up_waits_for_frames_already_received(ami: AmiRig) -> None:
    ami.setup("21-desk")

    async def scenario(listener: AmiListener) -> None:
        base = listener.received
        ami.push(contact_status("21-desk"))
        await ami.wait(lambda: listener.received > base)
        # Received but perhaps not applied yet: caught_up is the barrier the hook uses.
        assert await listener.caught_up(5)
        assert listener.frames >= base + 1
        assert ami.subscriber("21-desk")["state"] == "logged_on"

    ami.listen(scenario)


def test_actions_are_refused_at_once_while_disconnected(
    bridge_settings: SettingsFactory, make_service: ServiceFactory
) -> None:
    async def scenario() -> None:
        service = make_service(bridge_settings(1))
        listener = AmiListener(service.settings, service)
        with pytest.raises(PbxConnectionError, match="not connected"):
            await listener.send_action({"Action": "Ping"})
        assert await listener.hangup("PJSIP/21-desk-00000001") is False

    run(scenario(), timeout=5)


def test_a_utf8_character_split_across_two_reads_survives() -> None:
    """panoramisk decodes each read on its own and would drop the character; the listener does not."""
    seen: list[dict[str, str]] = []

    class Factory:
        save_stream = None

        def dispatch(self, message: Any) -> None:
            seen.append(dict(message))

    class Transport:
        def abort(self) -> None:
            raise AssertionError("not expected")

    protocol = ami_module._Protocol()
    protocol.connection_made(Transport())
    protocol.factory, protocol.responses, protocol.encoding = Factory(), {}, "utf8"
    data = "Event: ContactStatus\r\nUserAgent: Zoë Müller\r\n\r\n".encode()
    cut = data.index("ë".encode()) + 1
    protocol.data_received(data[:cut])
    protocol.data_received(data[cut:])
    assert [m["UserAgent"] for m in seen] == ["Zoë Müller"]


def queries(fake: FakeAmi) -> list[dict[str, str]]:
    """The PJSIPShowEndpoint actions the bridge sent."""
    return fake.actions_named("PJSIPShowEndpoint")


def successful_auth(logon: str, call_id: str) -> dict[str, str]:
    """A SuccessfulAuth as Asterisk 22 writes it, for a REGISTER or an INVITE alike."""
    return {
        "Event": "SuccessfulAuth",
        "Privilege": "security,all",
        "EventTV": "2026-11-24T04:39:17.371+0000",
        "Severity": "Informational",
        "Service": "PJSIP",
        "EventVersion": "1",
        "AccountID": logon,
        "SessionID": call_id,
        "LocalAddress": "IPV4/UDP/127.0.0.1/5060",
        "RemoteAddress": "IPV4/UDP/127.0.0.1/5081",
        "UsingPassword": "1",
    }


def test_only_a_register_lifts_a_registered_log_ons_block_not_its_authenticated_112(
    ami: AmiRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ami_module, "_LOGON_CHECK_DELAYS", (0.01, 0.02, 0.04, 0.08))
    changes: list[tuple[str, bool]] = []
    ami.setup("21-desk", registered=True)
    fake = ami.fake

    async def scenario(listener: AmiListener) -> None:
        assert ami.subscriber("21-desk")["state"] == "logged_on"
        ami.push(challenge_failed("21-desk"))
        # The contact's expiry now is the reference a REGISTER must move.
        await ami.wait(lambda: "21-desk" in listener._expiries)
        assert [a["Endpoint"] for a in queries(fake)] == ["21-desk"]
        assert changes == [("21-desk", True)]
        # Two INVITEs (to 112) authenticate: the contact's expiry does not move, so the
        # block stays however long the bridge looks.
        for attempt in range(2):
            asked = len(queries(fake))
            ami.push(successful_auth("21-desk", f"invite-{attempt}@127.0.0.1"))
            await fake.wait_until(lambda: len(queries(fake)) >= asked + 4)  # noqa: B023
            await ami.wait(lambda: not listener._logon_checks)
            assert ami.service.blocked_logons() == ["21-desk"]
            assert changes == [("21-desk", True)]
        # A REGISTER refresh from the same contact, with a new Call-ID: Asterisk keeps the
        # contact's first Call-ID but moves its expiry, and only a bit after the auth.
        ami.push(successful_auth("21-desk", "register-2@127.0.0.1"))
        await fake.wait_until(lambda: len(queries(fake)) >= 5)
        fake.contacts = [dict(fake.contacts[0], ExpirationTime="1795497162")]
        await ami.wait(lambda: bool(changes[1:]))
        assert changes == [("21-desk", True), ("21-desk", False)]
        assert ami.service.blocked_logons() == []
        assert ami.subscriber("21-desk")["state"] == "logged_on"

    ami.listen(scenario, on_blocked=lambda *c: changes.append(c))


def test_a_failure_after_the_reference_needs_a_register_after_that_failure(
    ami: AmiRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ami_module, "_LOGON_CHECK_DELAYS", (0.01, 0.02))
    ami.setup("21-desk", registered=True)
    fake = ami.fake

    async def scenario(listener: AmiListener) -> None:
        ami.push(challenge_failed("21-desk"))
        await ami.wait(lambda: "21-desk" in listener._expiries)
        # The phone refreshed (expiry moved) but the bridge missed that SuccessfulAuth;
        # then a log-on fails again: the reference is taken anew, so the next INVITE's
        # authentication finds nothing moved since the latest failure.
        uri, moved = fake.contacts[0]["Uri"], "1795497162"
        fake.contacts = [dict(fake.contacts[0], ExpirationTime=moved)]
        ami.push(dict(challenge_failed("21-desk"), SessionID="another-register@127.0.0.1"))
        await ami.wait(lambda: listener._expiries["21-desk"].get(uri) == moved)
        ami.push(successful_auth("21-desk", "invite@127.0.0.1"))
        await fake.wait_until(lambda: len(queries(fake)) >= 4)
        await ami.wait(lambda: not listener._logon_checks)
        assert ami.service.blocked_logons() == ["21-desk"]

    ami.listen(scenario)


def test_a_block_check_the_ami_user_may_not_run_leaves_the_block_and_the_session(
    ami: AmiRig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ami_module, "_LOGON_CHECK_DELAYS", (0.01,))
    ami.fake.refused_actions.add("pjsipshowendpoint")
    ami.setup("21-desk", registered=True)

    async def scenario(listener: AmiListener) -> None:
        await ami.send(challenge_failed("21-desk"), successful_auth("21-desk", "register@127.0.0.1"))
        await ami.wait(lambda: not listener._logon_checks)
        assert ami.service.blocked_logons() == ["21-desk"]
        assert listener.connected and ami.fake.logins == 1

    with caplog.at_level(logging.WARNING, logger=AMI_LOGGER):
        ami.listen(scenario)
    assert "could not read the contacts of blocked logon=21-desk" in caplog.text


def test_a_block_from_before_the_bridge_started_is_lifted_by_the_first_register(
    ami: AmiRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ami_module, "_LOGON_CHECK_DELAYS", (0.01, 0.02))
    service = ami.setup("21-desk", registered=True)
    fake = ami.fake

    async def scenario() -> None:
        async with ami.listening() as listener:
            ami.push(challenge_failed("21-desk"))
            await ami.wait(lambda: "21-desk" in listener._expiries)
        # A new bridge process: it knows the block only from the database.
        async with ami.listening(resynced=False) as listener:
            await ami.wait(lambda: "21-desk" in listener._expiries)
            assert service.blocked_logons() == ["21-desk"]
            fake.contacts = [dict(fake.contacts[0], ExpirationTime="1795497162")]
            ami.push(successful_auth("21-desk", "register-after-restart@127.0.0.1"))
            await ami.wait(lambda: not service.blocked_logons())

    ami.run(scenario())


def test_the_session_filter_is_asked_for_at_each_login_and_a_refusal_is_one_warning(
    ami: AmiRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AMI_LOGGER)
    fake = ami.fake
    fake.filtering = True  # the fake holds back what the session's filter excludes, as Asterisk does
    ami.setup("21-desk")

    async def scenario(listener: AmiListener) -> None:
        # Asked before the login resync, with the six event names the mapper reads.
        assert [a.get("Action") for a in fake.actions][1:3] == ["Filter", "PJSIPShowContacts"]
        assert fake.actions_named("Filter")[0]["Filter"] == ami_module.EVENT_FILTER
        assert listener.filtered
        base, unused, applied = listener.received, listener.unused, listener.frames
        fake.push({"Event": "ChallengeSent", "Service": "PJSIP", "AccountID": "21-desk"})
        fake.push({"Event": "PeerStatus", "Peer": "PJSIP/21-desk", "PeerStatus": "Reachable"})
        fake.push({"Event": "HangupRequest", "Channel": "PJSIP/21-desk-00000001"})
        fake.push(contact_status("21-desk"))
        await ami.wait(lambda: listener.frames >= applied + 1)
        # Held back by Asterisk (the fake applies the filter as it does), not dropped here.
        assert (listener.received - base, listener.unused - unused) == (1, 0)
        assert ami.subscriber("21-desk")["state"] == "logged_on"
        # An Asterisk that refuses the filter: one warning, and the events still flow.
        fake.refused_actions.add("filter")
        await fake.drop()
        await ami.wait(lambda: listener.resyncs >= 2, 10)
        assert not listener.filtered
        await fake.drop()
        await ami.wait(lambda: listener.resyncs >= 3, 10)
        base, unused, applied = listener.received, listener.unused, listener.frames
        fake.push({"Event": "ChallengeSent", "Service": "PJSIP", "AccountID": "21-desk"})
        fake.push(contact_status("21-desk", "Removed"))
        await ami.wait(lambda: listener.frames >= applied + 2)
        assert (listener.received - base, listener.unused - unused) == (2, 1)
        assert ami.subscriber("21-desk")["state"] != "logged_on"

    ami.listen(scenario, timeout=30)
    warnings = [r.getMessage() for r in caplog.records if "event filter" in r.getMessage()]
    assert len(warnings) == 1 and "Permission denied" in warnings[0], warnings
