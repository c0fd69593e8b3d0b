"""ESL events and API answers -> core events, checked against FreeSWITCH 1.10.12 captures."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from forum_bridge.adapters.freeswitch.esl import parse_event_plain
from forum_bridge.adapters.freeswitch.events import (
    SUBSCRIPTION,
    contact_from_url,
    event_time,
    normalise_contact,
    parse_channels,
    parse_registrations,
    to_core_event,
)
from forum_bridge.core.events import CallEnded, CallStarted, Direction, LoggedOff, LoggedOn, LogonFailed
from forum_bridge.errors import ProtocolError
from forum_bridge.service import CallSnapshot
from forum_bridge.store.operations import Registration
from tests.freeswitch.fake_esl import CAPTURED_SIP_UUID, Subscription, captured, edit_event, ringing_leg_event

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


def test_register_failure_names_the_user_in_to_user() -> None:
    assert mapped(captured("CUSTOM", subclass="sofia::register_failure")) == LogonFailed(
        logon="1001", at=AT, source="127.0.0.1:5091"
    )


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
    # A register without any user is not a log-on.
    body = edit_event(captured("CUSTOM", subclass="sofia::register"), remove=["from-user", "username"])
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
    assert parse_channels(answer) == [
        CallSnapshot("u1", "1000", "600", Direction.OUTBOUND),
        CallSnapshot("u2", "1001", "1001", Direction.INBOUND),
    ]
    assert parse_channels('{"row_count":0}') == []
