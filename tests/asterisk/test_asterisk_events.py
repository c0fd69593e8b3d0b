"""AMI frames -> normalised events, checked against frames recorded from a real Asterisk 22."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from forum_bridge.adapters.asterisk.events import (
    AmiEventMapper,
    call_snapshot,
    contact_registration,
    event_time,
    headers_of,
    logon_of_channel,
    source_of_address,
)
from forum_bridge.core.events import (
    CallEnded,
    CallStarted,
    Direction,
    Keepalive,
    LoggedOff,
    LoggedOn,
    LogonFailed,
)
from forum_bridge.service import CallSnapshot
from forum_bridge.store import Registration
from tests.asterisk.ami_transcript import events, frames

AT = datetime(2026, 11, 24, 4, 39, tzinfo=UTC)
CAPTURE = "asterisk22-ami-capture.txt"
CALL_CAPTURE = "asterisk22-call-capture.txt"
NUMBERS = {"21-desk": "21", "22-soft": "22"}


def map_all(name: str) -> list[object]:
    mapper = AmiEventMapper(number_of=NUMBERS.get)
    mapped = [mapper.map(frame, AT) for frame in events(name)]
    return [event for event in mapped if event is not None]


def test_the_real_capture_maps_to_the_expected_event_sequence() -> None:
    desk = "sip:21-desk@127.0.0.1:5081"
    assert map_all(CAPTURE) == [
        # register 21-desk: SuccessfulAuth first, then the new contact
        Keepalive("21-desk", AT, source="127.0.0.1:5081"),
        LoggedOn("21-desk", AT, contact=desk, source="127.0.0.1:5081"),
        # refresh: only SuccessfulAuth
        Keepalive("21-desk", AT, source="127.0.0.1:5081"),
        # wrong password, then an unknown user (two InvalidAccountID, one Call-ID: counted once;
        # the ChallengeResponseFailed of "<unknown>" names nobody)
        LogonFailed("22-soft", AT, source="127.0.0.1:5082", reason="wrong_password"),
        LogonFailed("nobody", AT, source="127.0.0.1:5083", reason="unknown_user"),
        # 22-soft registers properly (expires 8 s)
        Keepalive("22-soft", AT, source="127.0.0.1:5084"),
        LoggedOn("22-soft", AT, contact="sip:22-soft@127.0.0.1:5084", source="127.0.0.1:5084"),
        # 21-desk calls 600 (answered) and 700 (rejected by the dialplan)
        Keepalive("21-desk", AT, source="127.0.0.1:5085"),
        CallStarted("21-desk", "PJSIP/21-desk-00000002", "600", Direction.OUTBOUND, AT),
        CallEnded("PJSIP/21-desk-00000002", AT, logon="21-desk"),
        Keepalive("21-desk", AT, source="127.0.0.1:5086"),
        CallStarted("21-desk", "PJSIP/21-desk-00000003", "700", Direction.OUTBOUND, AT),
        CallEnded("PJSIP/21-desk-00000003", AT, logon="21-desk"),
        # unregister (Expires: 0) and 22-soft's registration expiring
        Keepalive("21-desk", AT, source="127.0.0.1:5081"),
        LoggedOff("21-desk", AT, contact=desk, reason="logoff"),
        LoggedOff("22-soft", AT, contact="sip:22-soft@127.0.0.1:5084", reason="logoff"),
    ]


def test_amis_own_successful_auth_is_not_a_phone_keepalive() -> None:
    ami_login = next(e for e in events(CAPTURE, "SuccessfulAuth") if e["Service"] == "AMI")
    assert ami_login["AccountID"] == "forumbridge"
    assert AmiEventMapper().map(ami_login, AT) is None


def test_call_events_keep_the_uniqueid_and_the_dialled_number() -> None:
    newchannel = events(CAPTURE, "Newchannel")[0]
    event = AmiEventMapper().map(newchannel, AT)
    assert isinstance(event, CallStarted)
    assert event.number == "600"
    assert event.extra["uniqueid"] == "1795495161.2" == event.extra["linkedid"]


def test_the_leg_that_rings_a_phone_is_inbound_for_the_subscribers_number() -> None:
    """Recorded: the PBX creates the leg Down, with the caller's Linkedid and Exten "s"."""
    new = events(CALL_CAPTURE, "Newchannel")
    caller = AmiEventMapper(number_of=NUMBERS.get).map(new[0], AT)
    callee_frame = new[1]
    assert (callee_frame["ChannelState"], callee_frame["Exten"]) == ("0", "s")
    callee = AmiEventMapper(number_of=NUMBERS.get).map(callee_frame, AT)
    assert caller == CallStarted("22-soft", "PJSIP/22-soft-00000000", "721", Direction.OUTBOUND, AT)
    assert callee == CallStarted("21-desk", "PJSIP/21-desk-00000001", "21", Direction.INBOUND, AT)
    # Without a subscriber the number is unknown ("s" is not a number).
    unmanaged = AmiEventMapper().map(callee_frame, AT)
    assert isinstance(unmanaged, CallStarted)
    assert (unmanaged.direction, unmanaged.number) == (Direction.INBOUND, "")


def test_a_ring_state_leg_linked_to_another_call_is_inbound_too() -> None:
    frame = dict(events(CALL_CAPTURE, "Newchannel")[1], ChannelState="5")
    event = AmiEventMapper(number_of=NUMBERS.get).map(frame, AT)
    assert isinstance(event, CallStarted)
    assert event.direction is Direction.INBOUND


def test_core_show_channel_items_become_call_snapshots() -> None:
    items = events(CALL_CAPTURE, "CoreShowChannel")
    snapshots = [call_snapshot(headers_of(item), NUMBERS.get) for item in items]
    assert snapshots == [
        CallSnapshot("PJSIP/21-desk-00000001", "21-desk", "21", Direction.INBOUND),
        CallSnapshot("PJSIP/22-soft-00000000", "22-soft", "721", Direction.OUTBOUND),
    ]


def test_contact_list_items_become_registrations() -> None:
    items = events(CALL_CAPTURE, "ContactList")
    assert items, "the recording holds a PJSIPShowContacts answer"
    registration = contact_registration(headers_of(items[0]))
    assert registration == Registration(
        "21-desk", "sip:21-desk@127.0.0.1:5091", "127.0.0.1:5091", "SIPp-test"
    )


def test_a_contact_without_endpoint_uses_the_aor_of_its_object_name() -> None:
    item = headers_of(
        {"ObjectName": "23-fax;@e51fc9c826a8010b8e7ad5cce4f984a8", "Uri": "sip:23-fax@10.0.0.9:5060"}
    )
    assert contact_registration(item) == Registration("23-fax", "sip:23-fax@10.0.0.9:5060", "", "")
    assert contact_registration(headers_of({"ObjectName": "x;@1"})) is None


def test_the_contact_uri_of_contact_status_and_contact_list_agree() -> None:
    """A resync must not see a different contact than the live events did."""
    status = next(e for e in events(CALL_CAPTURE, "ContactStatus"))
    listed = events(CALL_CAPTURE, "ContactList")[0]
    assert status["URI"] == listed["Uri"]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("NonQualified", "on"),
        ("Created", "on"),  # the 13.x/14.x label
        ("Reachable", "on"),
        ("Removed", "logoff"),
        ("Unreachable", "keepalive"),
        ("Unknown", None),
    ],
)
def test_contact_status_labels(status: str, expected: str | None) -> None:
    frame = {
        "Event": "ContactStatus",
        "URI": "sip:21-desk@127.0.0.1:5081",
        "ContactStatus": status,
        "AOR": "21-desk",
        "EndpointName": "21-desk",
        "UserAgent": "Yealink T46U",
    }
    event = AmiEventMapper().map(frame, AT)
    if expected is None:
        assert event is None
    elif expected == "on":
        assert event == LoggedOn(
            "21-desk", AT, contact="sip:21-desk@127.0.0.1:5081", user_agent="Yealink T46U"
        )
    else:
        assert event == LoggedOff("21-desk", AT, contact="sip:21-desk@127.0.0.1:5081", reason=expected)


def test_a_failure_after_a_success_counts_again_even_with_the_same_call_id() -> None:
    mapper = AmiEventMapper()
    failed = next(e for e in events(CAPTURE, "ChallengeResponseFailed") if e["AccountID"] == "22-soft")
    success = dict(next(e for e in events(CAPTURE, "SuccessfulAuth") if e["AccountID"] == "22-soft"))
    success["SessionID"] = failed["SessionID"]
    assert isinstance(mapper.map(failed, AT), LogonFailed)
    assert mapper.map(failed, AT) is None  # the same attempt reported twice
    assert isinstance(mapper.map(success, AT), Keepalive)
    assert isinstance(mapper.map(failed, AT), LogonFailed)


def test_frames_the_bridge_ignores_map_to_nothing() -> None:
    mapper = AmiEventMapper()
    ignored = events(CAPTURE, "TestEvent", "ChallengeSent", "PeerStatus", "VarSet", "Newexten", "FullyBooted")
    assert ignored
    assert all(mapper.map(frame, AT) is None for frame in ignored)
    local = {"Event": "Newchannel", "Channel": "Local/600@phones-00000001;1", "Exten": "600"}
    assert mapper.map(local, AT) is None
    assert mapper.map({"Event": "Hangup", "Channel": "IAX2/trunk-123"}, AT) is None


def test_a_frame_without_event_is_refused() -> None:
    response = next(f for f in frames(CAPTURE) if f.get("Response") == "Error")
    with pytest.raises(ValueError, match="not an AMI event"):
        AmiEventMapper().map(response, AT)


def test_headers_are_case_insensitive_and_repeated_headers_take_the_first_value() -> None:
    assert headers_of({"Event": "X", "ChanVariable": ["A=1", "B=2"], "Empty": None}) == {
        "event": "X",
        "chanvariable": "A=1",
        "empty": "",
    }


@pytest.mark.parametrize(
    ("address", "source"),
    [
        ("IPV4/UDP/127.0.0.1/5082", "127.0.0.1:5082"),
        ("IPV6/UDP/::1/5060", "[::1]:5060"),
        ("IPV4/TLS/203.0.113.7/5061", "203.0.113.7:5061"),
        ("garbage", "garbage"),
        ("", ""),
    ],
)
def test_source_of_remote_address(address: str, source: str) -> None:
    assert source_of_address(address) == source


@pytest.mark.parametrize(
    ("channel", "logon"),
    [
        ("PJSIP/21-desk-00000001", "21-desk"),
        ("PJSIP/a-b-c-0000abcd", "a-b-c"),
        ("PJSIP/21-desk", None),
        ("SIP/21-desk-00000001", None),
        ("Local/600@phones-00000001;1", None),
    ],
)
def test_logon_of_channel(channel: str, logon: str | None) -> None:
    assert logon_of_channel(channel) == logon


def test_event_time_reads_event_tv_and_timestamp() -> None:
    auth = headers_of(events(CAPTURE, "SuccessfulAuth")[0])
    assert event_time(auth) == datetime(2026, 11, 24, 4, 39, 14, 166000, tzinfo=UTC)
    assert event_time({"timestamp": "1795497078.172800"}) == datetime.fromtimestamp(1795497078.1728, UTC)
    assert event_time({"eventtv": "yesterday"}) is None
    assert event_time({}) is None


def test_a_successful_auth_never_clears_a_block_by_itself() -> None:
    # The capture has SuccessfulAuths of REGISTERs and of INVITEs (to 600 and 700): alike on the wire.
    keepalives = [event for event in map_all(CAPTURE) if isinstance(event, Keepalive)]
    assert len(keepalives) == 6
    assert not any(event.clears_block for event in keepalives)
