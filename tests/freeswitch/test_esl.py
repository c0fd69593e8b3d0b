"""The ESL wire format: framing and decoding, checked against FreeSWITCH 1.10.12's own bytes."""

from __future__ import annotations

import pytest

from forum_bridge.adapters.freeswitch.esl import (
    ConnectionClosed,
    EslClient,
    EslEvent,
    FrameReader,
    event_from_frame,
    parse_event_plain,
)
from forum_bridge.adapters.freeswitch.events import registration_logon
from forum_bridge.errors import ConfigError, ProtocolError
from tests.freeswitch.fake_esl import (
    ACCEPTED,
    AUTH_REQUEST,
    DISCONNECT_NOTICE,
    EVENTS_CAPTURE,
    INVALID,
    MISC_CAPTURE,
    channel_data,
    event_frame,
    register_event,
    split_stream,
    unregister_event,
)


class ChunkedSocket:
    """A socket stand-in that hands out the given bytes a few at a time, then end of stream."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data = data
        self.chunk = chunk

    def recv(self, _size: int) -> bytes:
        piece, self.data = self.data[: self.chunk], self.data[self.chunk :]
        return piece


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_reader_frames_the_captured_stream_exactly(chunk: int) -> None:
    data = EVENTS_CAPTURE.read_bytes()
    expected = split_stream(data)
    reader = FrameReader(ChunkedSocket(data, chunk))
    frames = [reader.read_frame() for _ in expected]
    assert [f.content_type for f in frames] == [dict(h)["Content-Type"] for h, _ in expected]
    assert [f.body for f in frames] == [body for _, body in expected]
    assert all(not f.problems for f in frames)
    # The body's own trailing blank line is part of Content-Length: nothing is left over.
    with pytest.raises(ConnectionClosed):
        reader.read_frame()
    assert [f.content_type for f in frames[:3]] == ["auth/request", "command/reply", "command/reply"]
    assert frames[2].reply_text == "+OK event listener enabled plain"


def test_fake_server_frames_are_the_captured_bytes() -> None:
    stream = EVENTS_CAPTURE.read_bytes()
    assert stream.startswith(AUTH_REQUEST + ACCEPTED)
    misc = MISC_CAPTURE.read_bytes()
    after_wrong_password = misc.split(b"sent: 'auth WRONGPW' ########\n", 1)[1]
    assert after_wrong_password.startswith(INVALID + DISCONNECT_NOTICE)


def test_event_values_are_decoded_one_by_one_after_splitting() -> None:
    frames = split_stream(EVENTS_CAPTURE.read_bytes())
    sip_create = next(body for _, body in frames if b"Channel-Name: sofia/internal/1000" in body)
    event = parse_event_plain(sip_create)
    assert event.name == "CHANNEL_CREATE"
    assert event.get("Channel-Name") == "sofia/internal/1000@127.0.0.1"
    # An SDP value holds %0D%0A: decoded after the split, it stays one header.
    sdp = event.get("variable_switch_r_sdp")
    assert sdp.startswith("v=0\r\no=user1 ") and "a=rtpmap:0 PCMU/8000\r\n" in sdp
    assert event.get("variable_sip_full_from") == '"Ext 1000" <sip:1000@127.0.0.1>;tag=1'
    assert event.get("variable_max_forwards") == "70"  # the header after the SDP is intact


def test_plus_is_literal_and_percent_2b_is_plus() -> None:
    event = parse_event_plain(b"Event-Name: CUSTOM\nuser-agent: a+b%2Bc%20d\n\n")
    assert event.get("user-agent") == "a+b+c d"


def test_repeated_headers_are_kept_and_lookup_is_case_insensitive() -> None:
    frames = split_stream(EVENTS_CAPTURE.read_bytes())
    failure = next(body for _, body in frames if b"register_failure" in body)
    event = parse_event_plain(failure)
    assert event.subclass == "sofia::register_failure"
    assert event.get_all("profile-name") == ["internal", "internal"]
    assert event.get("TO-USER") == "1001"


def test_undefined_values_read_as_empty() -> None:
    assert parse_event_plain(b"Event-Name: CUSTOM\nvariable_x: _undef_\n\n").get("variable_x", "?") == ""


def test_event_body_after_inner_content_length() -> None:
    body = b"Event-Name: BACKGROUND_JOB\nJob-UUID: 51\nContent-Length: 5\n\nhello"
    event = parse_event_plain(body)
    assert event.body == "hello"
    assert event.get("Job-UUID") == "51"


@pytest.mark.parametrize(
    "body",
    [b"", b"Foo: bar\n\n", b"garbage without colon\n\n", b"Event-Name: X\nContent-Length: x\n\n"],
)
def test_malformed_event_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_event_plain(body)


def test_end_of_stream_inside_a_body_ends_the_read_instead_of_spinning() -> None:
    frame = event_frame("Event-Name: CUSTOM\nEvent-Subclass: sofia%3A%3Aregister\n\n")
    reader = FrameReader(ChunkedSocket(frame[:-10], 3))
    with pytest.raises(ConnectionClosed):
        reader.read_frame()


def test_bad_content_length_is_reported_not_trusted() -> None:
    reader = FrameReader(ChunkedSocket(b"Content-Type: text/event-plain\nContent-Length: lots\n\n", 64))
    frame = reader.read_frame()
    assert frame.body == b""
    assert any("not a number" in p for p in frame.problems)


def test_oversized_body_is_a_protocol_error() -> None:
    reader = FrameReader(
        ChunkedSocket(b"Content-Type: api/response\nContent-Length: 999999\n\n", 64), max_body=1000
    )
    with pytest.raises(ProtocolError):
        reader.read_frame()


def test_channel_data_headers_are_decoded_and_content_type_comes_last() -> None:
    data = channel_data("aaaa-1", "1000", "600")
    frame = FrameReader(ChunkedSocket(data, 100)).read_frame()
    assert frame.headers[-4][0] == "Content-Type"  # near the end, as mod_event_socket appends it
    event = event_from_frame(frame)
    assert event.name == "CHANNEL_DATA"
    assert event.get("Reply-Text") == "+OK\n"
    assert event.get("Unique-ID") == "aaaa-1"
    assert event.get("Caller-Destination-Number") == "600"


def test_client_refuses_a_password_that_would_inject_commands() -> None:
    with pytest.raises(ConfigError) as info:
        EslClient("127.0.0.1", 8021, "pw\n\napi shutdown")
    assert "shutdown" not in str(info.value)


def test_client_repr_does_not_show_the_password() -> None:
    assert "s3cret" not in repr(EslClient("127.0.0.1", 8021, "s3cret"))


def test_the_events_of_one_log_on_can_be_taken_ahead_of_the_queue_in_their_order() -> None:
    client = EslClient("127.0.0.1", 8021, "ClueCon", tag=registration_logon)
    bodies = [register_event("1000", 5091), register_event("1001", 5092), unregister_event("1000", 5091)]
    for body in bodies:
        client._queue_event(parse_event_plain(body.encode()), len(body))
    taken = client.take_matching({"1000"})
    assert [e.subclass for e in taken] == ["sofia::register", "sofia::unregister"]
    # The rest stays queued, and the owner's place in the queue did not move.
    assert client.events_received == 3 and client.events_taken == 0
    # Tagging and picking built no lookup index of the event left waiting (it stays small).
    assert client._events.queue[0][0]._index is None
    rest = client.next_event(timeout=0)
    assert isinstance(rest, EslEvent) and rest.get("username") == "1001"
    assert client.events_taken == 2 and client.next_event(timeout=0) is None


def test_made_up_header_names_and_values_cannot_grow_the_shared_tables() -> None:
    # Names and header lines are shared between events (a storm's queue holds thousands), but a
    # peer inventing new ones every time must not grow those tables without bound.
    from forum_bridge.adapters.freeswitch import esl

    for i in range(3000):
        body = f"Event-Name: CUSTOM\nX-Made-Up-{i}: a\nX-Also-{i}: {i}\nX-Value: v{i}\n\n"
        event = parse_event_plain(body.encode())
        assert event.get(f"x-made-up-{i}") == "a" and event.get("X-VALUE") == f"v{i}"
    assert len(esl._NAMES) <= esl._NAMES_LIMIT and len(esl._LOWER) <= esl._NAMES_LIMIT
    assert len(esl._PAIRS) <= esl._PAIRS_LIMIT
    # Long names and values are never kept in them.
    long_name, long_value = "X-" + "n" * 5000, "v" * 100_000
    parse_event_plain(f"Event-Name: CUSTOM\n{long_name}: {long_value}\n\n".encode())
    assert long_name not in esl._NAMES and long_name not in esl._LOWER
    assert all(len(value) <= esl._SHARED_LENGTH for _name, value in esl._PAIRS)
    # The common lines are still shared by two events parsed after the flood.
    first, second = (parse_event_plain(b"Event-Name: CUSTOM\nCore-UUID: 7\n\n") for _ in range(2))
    assert first.headers[1] is second.headers[1]
