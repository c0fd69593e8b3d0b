"""ESL events and API answers -> core events, checked against FreeSWITCH 1.10.12 captures."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from forum_bridge.adapters.freeswitch.esl import parse_event_plain
from forum_bridge.adapters.freeswitch.events import (
    SUBSCRIPTION,
    FailureDeduplicator,
    contact_from_url,
    event_time,
    identity_lookups,
    normalise_contact,
    parse_channels,
    parse_profiles,
    parse_registrations,
    parse_sofia_registrations,
    to_core_event,
    uuid_getvar_value,
)
from forum_bridge.core.events import (
    CallEnded,
    CallStarted,
    Direction,
    LoggedOff,
    LoggedOn,
    LogonFailed,
)
from forum_bridge.errors import ProtocolError
from forum_bridge.service import CallSnapshot
from forum_bridge.store.operations import Registration
from tests.freeswitch.fake_esl import (
    CAPTURED_SIP_UUID,
    Subscription,
    captured,
    edit_event,
    identity_answers,
    identity_events,
    ringing_leg_event,
)

AT = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


def mapped(body: str) -> object:
    return to_core_event(parse_event_plain(body.encode()), AT)


def test_register_is_a_log_on_with_the_contact_uri() -> None:
    assert mapped(captured("CUSTOM", subclass="sofia::register")) == LoggedOn(
        logon="1000",
        at=AT,
        contact="sip:1000@127.0.0.1:5091",
        source="127.0.0.1:5091",
        user_agent="SIPp-test",
        expires=60,
    )


def test_register_failure_of_a_register_names_the_address_and_of_an_invite_nobody() -> None:
    # Its to-user is the To header: the address for a REGISTER, the number dialled for an INVITE.
    register, invite = identity_events("sofia::register_failure")
    assert (register.get("to-user"), invite.get("to-user")) == ("1000", "9198")
    assert to_core_event(register, AT) == LogonFailed(logon="1000", at=AT, source="127.0.0.1:59423")
    assert to_core_event(invite, AT) is None
    assert mapped(captured("CUSTOM", subclass="sofia::register_failure")) == LogonFailed(
        logon="1001", at=AT, source="127.0.0.1:5091"
    )


def test_a_register_failure_right_after_a_forbidden_attempt_is_the_same_failure() -> None:
    events = identity_events("sofia::register_attempt") + identity_events("sofia::register_failure")
    events.sort(key=lambda e: int(e.get("Event-Sequence")))
    dedup = FailureDeduplicator(window=5.0)
    kept = [e for e in events if dedup.keep(e, 100.0)]
    failures = [to_core_event(e, AT) for e in kept if isinstance(to_core_event(e, AT), LogonFailed)]
    # One failure per refused request (the REGISTER and the INVITE), each of the digest user.
    assert [(f.logon, f.source) for f in failures if isinstance(f, LogonFailed)] == [
        ("1000", "127.0.0.1:59423"),
        ("1000", "127.0.0.1:54482"),
    ]
    # A register_failure with no attempt before it (or long after it) still counts.
    (register, _invite) = identity_events("sofia::register_failure")
    assert FailureDeduplicator().keep(register, 0.0)
    late = FailureDeduplicator(window=5.0)
    forbidden = next(e for e in events if e.get("auth-result") == "FORBIDDEN")
    assert late.keep(forbidden, 0.0)
    assert late.keep(register, 6.0)


def test_the_deduplicator_forgets_the_oldest_addresses_first() -> None:
    forbidden = next(
        e for e in identity_events("sofia::register_attempt") if e.get("auth-result") == "FORBIDDEN"
    )
    (register, _invite) = identity_events("sofia::register_failure")
    dedup = FailureDeduplicator(limit=2)
    dedup.keep(forbidden, 0.0)
    for port in ("1", "2"):
        other = parse_event_plain(
            edit_event(
                captured("CUSTOM", subclass="sofia::register_failure"),
                {
                    "network-port": port,
                    "Event-Subclass": "sofia::register_attempt",
                    "auth-result": "FORBIDDEN",
                },
            ).encode()
        )
        dedup.keep(other, 0.0)
    assert dedup.keep(register, 1.0)  # its attempt was pushed out by two newer addresses


def test_a_forbidden_register_attempt_is_a_failed_log_on_of_the_digest_user() -> None:
    # A REGISTER and an INVITE with the wrong password for 1000, captured on a real FreeSWITCH.
    forbidden = [e for e in identity_events("sofia::register_attempt") if e.get("auth-result") == "FORBIDDEN"]
    assert [to_core_event(e, AT) for e in forbidden] == [
        LogonFailed(logon="1000", at=AT, source="127.0.0.1:59423"),
        LogonFailed(logon="1000", at=AT, source="127.0.0.1:54482"),
    ]


def test_a_successful_register_attempt_is_no_log_on_of_its_own() -> None:
    # Two REGISTERs (each also a sofia::register, which logs on) and an INVITE: an authenticated
    # call must not count as a successful log-on, or it would lift a failed log-on's block.
    renewed = [e for e in identity_events("sofia::register_attempt") if e.get("auth-result") == "RENEWED"]
    assert len(renewed) == 3
    assert [to_core_event(e, AT) for e in renewed] == [None, None, None]
    registered = {e.get("call-id") for e in identity_events("sofia::register")}
    assert [e.get("call-id") in registered for e in renewed] == [True, True, False]
    stale = edit_event(
        captured("CUSTOM", subclass="sofia::register"),
        {"Event-Subclass": "sofia::register_attempt", "auth-result": "STALE"},
    )
    assert mapped(stale) is None


def test_a_spoofed_register_logs_on_the_user_who_authenticated_not_the_address() -> None:
    honest, spoofed = identity_events("sofia::register")
    assert to_core_event(honest, AT) == LoggedOn(
        logon="1000",
        at=AT,
        contact="sip:1000@127.0.0.1:47920",
        source="127.0.0.1:47920",
        user_agent="forum-bridge-sandbox-sipp",
        expires=60,
    )
    assert spoofed.get("from-user") == "1000"
    assert to_core_event(spoofed, AT) == LoggedOn(
        logon="1001",
        at=AT,
        contact="sip:1000@127.0.0.1:58254",
        source="127.0.0.1:58254",
        user_agent="forum-bridge-sandbox-sipp",
        expires=60,
    )


def test_a_call_with_a_spoofed_from_belongs_to_the_user_who_authenticated() -> None:
    (create,) = identity_events("CHANNEL_CREATE")
    # Everything the phone chose says 1000; only the authentication says 1001.
    assert create.get("variable_sip_from_user") == create.get("Caller-Username") == "1000"
    assert create.get("Channel-Name").startswith("sofia/internal/1000@")
    call = to_core_event(create, AT)
    assert isinstance(call, CallStarted)
    assert (call.logon, call.number, call.direction) == ("1001", "9198", Direction.OUTBOUND)


def test_a_placed_leg_freeswitch_did_not_authenticate_belongs_to_no_log_on() -> None:
    body = edit_event(
        captured("CHANNEL_CREATE", channel="sofia/"),
        remove=["variable_sip_auth_username", "variable_user_name"],
    )
    assert mapped(body) is None


def test_unregister_and_expire_are_log_offs_of_that_contact() -> None:
    assert mapped(captured("CUSTOM", subclass="sofia::unregister")) == LoggedOff(
        logon="1000", at=AT, contact="sip:1000@127.0.0.1:5091", reason="logoff"
    )
    assert mapped(captured("CUSTOM", subclass="sofia::expire")) == LoggedOff(
        logon="1001", at=AT, contact="sip:1001@127.0.0.1:5091", reason="expired"
    )


def test_a_call_placed_by_a_phone_is_an_outbound_call_of_its_log_on() -> None:
    call = mapped(captured("CHANNEL_CREATE", channel="sofia/"))
    assert call == CallStarted(
        logon="1000", channel=CAPTURED_SIP_UUID, number="9198", direction=Direction.OUTBOUND, at=AT
    )


def test_a_leg_ringing_a_phone_is_an_inbound_call_of_the_dialled_user() -> None:
    call = mapped(ringing_leg_event("bbbb-2", "1001", caller="1000"))
    assert isinstance(call, CallStarted)
    assert (call.logon, call.channel, call.direction) == ("1001", "bbbb-2", Direction.INBOUND)


@pytest.mark.parametrize("leg", ["loopback/9198-a", "loopback/9198-b"])
def test_loopback_legs_belong_to_no_log_on(leg: str) -> None:
    assert mapped(captured("CHANNEL_CREATE", channel=leg)) is None


def test_trunk_legs_belong_to_no_log_on() -> None:
    body = edit_event(
        captured("CHANNEL_CREATE", channel="sofia/"), {"Channel-Name": "sofia/gateway/carrier/0301234"}
    )
    assert mapped(body) is None


def test_hangup_complete_ends_the_call() -> None:
    assert mapped(captured("CHANNEL_HANGUP_COMPLETE", channel="sofia/")) == CallEnded(
        channel=CAPTURED_SIP_UUID, at=AT, logon="1000"
    )


def test_other_events_mean_nothing() -> None:
    assert mapped("Event-Name: HEARTBEAT\nEvent-Info: System%20Ready\n\n") is None
    assert mapped("Event-Name: CUSTOM\nEvent-Subclass: sofia%3A%3Agateway_state\n\n") is None
    # A register without a digest user (a blind registration) is not a log-on, whatever To says.
    body = edit_event(captured("CUSTOM", subclass="sofia::register"), remove=["username"])
    assert mapped(body) is None
    body = edit_event(captured("CUSTOM", subclass="sofia::unregister"), {"username": "unknown"})
    assert mapped(body) is None


def test_event_time_is_freeswitchs_microsecond_timestamp() -> None:
    event = parse_event_plain(captured("CUSTOM", subclass="sofia::register").encode())
    assert event_time(event) == pytest.approx(1795495818.141495)


def test_subscription_names_channel_events_before_custom() -> None:
    subscription = Subscription()
    assert subscription.add(SUBSCRIPTION)
    assert {"CHANNEL_CREATE", "CHANNEL_HANGUP_COMPLETE", "CUSTOM"} <= subscription.names
    assert subscription.subclasses == {
        "sofia::register",
        "sofia::unregister",
        "sofia::expire",
        "sofia::register_failure",
        "sofia::register_attempt",
    }
    assert subscription.wants(captured("CHANNEL_CREATE", channel="sofia/"))


def test_the_custom_trap_is_real_in_the_fake() -> None:
    # What the brief warns about: channel events named after CUSTOM never arrive.
    subscription = Subscription()
    subscription.add("event plain CUSTOM sofia::register CHANNEL_CREATE")
    assert not subscription.wants(captured("CHANNEL_CREATE", channel="sofia/"))


@pytest.mark.parametrize(
    ("value", "uri"),
    [
        ('"" <sip:1000@127.0.0.1:5091>', "sip:1000@127.0.0.1:5091"),
        ('"user" <sip:1000@192.0.2.50:5060;ob>', "sip:1000@192.0.2.50:5060"),
        (
            '"user" <sip:1000@10.0.0.5:5060>;fs_nat=yes;fs_path=<sip:1000@192.0.2.9:4711>',
            "sip:1000@10.0.0.5:5060",
        ),
        ("sip:1000@192.0.2.50:5060;transport=tcp", "sip:1000@192.0.2.50:5060"),
    ],
)
def test_contacts_are_reduced_to_their_uri(value: str, uri: str) -> None:
    assert normalise_contact(value) == uri


def test_registration_url_names_the_same_contact_as_the_event() -> None:
    assert contact_from_url("sofia/internal/sip:1000@127.0.0.1:5091") == normalise_contact(
        '"" <sip:1000@127.0.0.1:5091>'
    )


def test_show_registrations_rows() -> None:
    answer = json.dumps(
        {
            "row_count": 2,
            "rows": [
                {
                    "reg_user": "1000",
                    "url": "sofia/internal/sip:1000@127.0.0.1:5091",
                    "network_ip": "127.0.0.1",
                    "network_port": "5091",
                    "expires": "1795495878",
                },
                {
                    "reg_user": "1001",
                    "url": "sofia/internal/sips:1001@192.0.2.7:5061;transport=tls",
                    "network_ip": "192.0.2.7",
                    "network_port": "5061",
                },
            ],
        }
    )
    assert parse_registrations(answer + "\n") == [
        Registration("1000", "sip:1000@127.0.0.1:5091", "127.0.0.1:5091"),
        Registration("1001", "sips:1001@192.0.2.7:5061", "192.0.2.7:5061"),
    ]


def test_show_registrations_without_rows_is_empty() -> None:
    assert parse_registrations('{"row_count":0}\n') == []


@pytest.mark.parametrize("answer", ["-ERR no reply\n", "[1, 2]", '{"rows": 5}'])
def test_show_answers_that_are_not_rows_are_protocol_errors(answer: str) -> None:
    with pytest.raises(ProtocolError):
        parse_registrations(answer)


def test_show_channels_rows_give_the_sip_legs_of_log_ons() -> None:
    answer = json.dumps(
        {
            "row_count": 3,
            "rows": [
                {
                    "uuid": "u1",
                    "direction": "inbound",
                    "name": "sofia/internal/1000@127.0.0.1",
                    "dest": "600",
                    "presence_id": "1000@127.0.0.1",
                },
                {
                    "uuid": "u2",
                    "direction": "outbound",
                    "name": "sofia/internal/1001@127.0.0.1:5091",
                    "dest": "1001",
                    "presence_id": "1001@127.0.0.1",
                },
                {
                    "uuid": "u3",
                    "direction": "outbound",
                    "name": "loopback/9198-a",
                    "dest": "9198",
                    "presence_id": "",
                },
            ],
        }
    )
    assert identity_lookups(answer) == [("u1", "sip_auth_username"), ("u2", "dialed_user")]
    # The log-on of a placed leg is who authenticated it (uuid_getvar), never presence_id or From.
    assert parse_channels(answer, {"u1": "1005"}) == [
        CallSnapshot("u1", "1005", "600", Direction.OUTBOUND),
        CallSnapshot("u2", "1001", "1001", Direction.INBOUND),
    ]
    assert parse_channels(answer) == [CallSnapshot("u2", "1001", "1001", Direction.INBOUND)]
    assert parse_channels('{"row_count":0}') == []


def test_uuid_getvar_answers() -> None:
    answers = identity_answers()
    assert uuid_getvar_value(answers[-2]) == "1001"
    assert uuid_getvar_value(answers[-1]) == ""  # -ERR No such channel!
    assert uuid_getvar_value("_undef_") == ""


def test_sofia_xmlstatus_lists_the_profiles() -> None:
    assert parse_profiles(identity_answers()[0]) == ["internal"]
    answer = (
        "<profiles>\n<profile>\n<name>internal</name>\n<type>profile</type>\n</profile>\n"
        "<profile>\n<name>example.com</name>\n<type>alias</type>\n</profile>\n"
        "<profile>\n<name>carrier</name>\n<type>gateway</type>\n</profile>\n"
        "<profile>\n<name>external</name>\n<type>profile</type>\n</profile>\n</profiles>\n"
    )
    assert parse_profiles(answer) == ["internal", "external"]
    with pytest.raises(ProtocolError):
        parse_profiles("-ERR no reply\n")
    with pytest.raises(ProtocolError):
        parse_profiles(
            "<profiles>\n<profile>\n<name>a b</name>\n<type>profile</type>\n</profile>\n</profiles>"
        )


def test_sofia_registrations_are_by_authenticated_user() -> None:
    # The phone authenticated as 1001 registered the address 1000.
    assert parse_sofia_registrations(identity_answers()[1]) == [
        Registration("1001", "sip:1000@127.0.0.1:58254", "127.0.0.1:58254", "forum-bridge-sandbox-sipp")
    ]
    assert parse_sofia_registrations("<profile>\n  <registrations>\n  </registrations>\n</profile>\n") == []
    with pytest.raises(ProtocolError):
        parse_sofia_registrations("Invalid Profile!\n")


def _registration(call_id: str, user: str, status: str = "expsecs(57)") -> str:
    return (
        "    <registration>\n"
        f"        <call-id>{call_id}</call-id>\n"
        f"        <user>{user}@sandbox.test</user>\n"
        f"        <contact>&quot;&quot; &lt;sip:{user}@127.0.0.1:5091&gt;</contact>\n"
        "        <agent>a &amp; b</agent>\n"
        f"        <status>Registered(UDP)(unknown) exp(2026-12-03 09:59:38) {status}</status>\n"
        "        <network-ip>127.0.0.1</network-ip>\n"
        "        <network-port>5091</network-port>\n"
        f"        <sip-auth-user>{user}</sip-auth-user>\n"
        "    </registration>\n"
    )


def test_a_call_id_cannot_forge_a_registration_and_expired_rows_are_gone() -> None:
    # A Call-ID may hold "<" and ">"; FreeSWITCH writes it unescaped. It stays one value.
    forged = "x</call-id></registration><registration><sip-auth-user>1009</sip-auth-user><contact>sip:9@h</contact>"
    answer = (
        "<profile>\n  <registrations>\n"
        + _registration(forged, "1000")
        + _registration("c2", "1002", "expsecs(-3)")  # past its expiry, not yet swept
        + "  </registrations>\n</profile>\n"
    )
    assert parse_sofia_registrations(answer) == [
        Registration("1000", "sip:1000@127.0.0.1:5091", "127.0.0.1:5091", "a & b")
    ]
