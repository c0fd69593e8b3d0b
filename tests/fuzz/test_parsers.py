"""Property-based fuzzing of every parser that reads a peer's bytes: AMI, ESL and FastAGI.

Whatever arrives, in whatever chunks, no exception escapes but the documented ones (ProtocolError,
and the end of the stream), and what a parser buffers stays bounded. Each property runs a fixed
number of examples with a fixed seed, so CI time is bounded and failures reproduce.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forum_bridge.adapters.asterisk import agi as agi_module
from forum_bridge.adapters.asterisk.agi import FastAgiServer, parse_environment
from forum_bridge.adapters.asterisk.ami import _MAX_FRAME, _Protocol
from forum_bridge.adapters.asterisk.events import (
    AmiEventMapper,
    call_snapshot,
    contact_registration,
    event_time,
    headers_of,
    logon_of_channel,
)
from forum_bridge.adapters.freeswitch import events as fs_events
from forum_bridge.adapters.freeswitch.esl import (
    ConnectionClosed,
    FrameReader,
    event_from_frame,
    parse_event_plain,
)
from forum_bridge.config import load_settings
from forum_bridge.errors import ProtocolError

NOW = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Pieces real peers send, so that random streams reach deep into the parsers, not only the first check.
AMI_WORDS = [
    b"Asterisk Call Manager/9.0.0\r\n",
    b"Event: ",
    b"Response: Success\r\n",
    b"ActionID: 1\r\n",
    b"\r\n\r\n",
    b"\r\n",
    b": ",
    b"Newchannel",
    b"ContactStatus",
    b"SuccessfulAuth",
    b"ChallengeResponseFailed",
    b"InvalidAccountID",
    b"Hangup",
    b"Channel: PJSIP/21-desk-00000001\r\n",
    b"AccountID: 21-desk\r\n",
    b"Service: PJSIP\r\n",
    b"EndpointName: 21-desk\r\n",
    b"ContactStatus: Removed\r\n",
    b"Uri: sip:21-desk@127.0.0.1:5081\r\n",
    b"ChannelState: 4\r\n",
    b"Exten: 600\r\n",
    b"Timestamp: 1795495164.123\r\n",
    b"RemoteAddress: IPV4/UDP/127.0.0.1/5081\r\n",
    b"\xc3",
    b"\xa4",
    b"\xff",
]
ESL_WORDS = [
    b"Content-Type: text/event-plain\n",
    b"Content-Type: command/reply\n",
    b"Content-Type: api/response\n",
    b"Content-Length: ",
    b"12",
    b"99999999999",
    b"\n\n",
    b"\n",
    b"Event-Name: CUSTOM\n",
    b"Event-Subclass: sofia%3A%3Aregister\n",
    b"Event-Name: CHANNEL_CREATE\n",
    b"Unique-ID: 4f1c0e2a-7f7b-4c55-9d1e-2b8f0a6c9e11\n",
    b"Caller-Username: 1000\n",
    b"Caller-Destination-Number: 600\n",
    b"from-user: 1000\n",
    b"contact: %3Csip%3A1000%40127.0.0.1%3E\n",
    b"Event-Date-Timestamp: 1795495164123456\n",
    b"%",
    b"%0A",
    b"_undef_",
    b"\xff",
]
AGI_WORDS = [
    b"agi_network: yes\n",
    b"agi_network_script: outbound\n",
    b"agi_channel: PJSIP/21-desk-00000001\n",
    b"agi_arg_1: 600\n",
    b"agi_",
    b": ",
    b"\n",
    b"\r\n",
    b"x" * 5000,
    b"\xff",
]


def stream(words: list[bytes]) -> st.SearchStrategy[list[bytes]]:
    """Chunks as a peer's TCP reads might cut them: real pieces mixed with random bytes."""
    piece = st.one_of(st.sampled_from(words), st.binary(max_size=64))
    return st.lists(st.lists(piece, max_size=12).map(b"".join), max_size=24)


# --- AMI ----------------------------------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


class _Factory:
    forgetable_actions: tuple[str, ...] = ()
    awaiting_actions: list[Any] = []

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def dispatch(self, message: Any) -> None:
        self.messages.append(message)

    def connection_lost(self, exc: object) -> None:
        pass


@FUZZ
@given(stream(AMI_WORDS))
def test_ami_framing_and_mapping_never_raise(chunks: list[bytes]) -> None:
    protocol = _Protocol()
    transport = _Transport()
    protocol.connection_made(transport)
    factory = _Factory()
    protocol.factory = factory
    mapper = AmiEventMapper(number_of=lambda logon: "21" if logon == "21-desk" else None)
    for chunk in chunks:
        protocol.data_received(chunk)
        assert sum(len(part) for part in protocol.queue) <= _MAX_FRAME + len(chunk) * 4
    for message in factory.messages:
        headers = headers_of(message)
        with contextlib.suppress(ValueError):  # documented: a frame without an Event header
            mapper.map(headers, NOW)
        event_time(headers)
        contact_registration(headers)
        call_snapshot(headers, lambda logon: None)
        logon_of_channel(headers.get("channel", ""))


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "event",
                "channel",
                "accountid",
                "service",
                "uri",
                "contactstatus",
                "endpointname",
                "aor",
                "channelstate",
                "exten",
                "context",
                "calleridnum",
                "connectedlinenum",
                "remoteaddress",
                "timestamp",
                "sessionid",
                "linkedid",
                "uniqueid",
            ]
        ),
        st.text(max_size=80),
    )
)
def test_ami_event_mapping_takes_any_header_values(headers: dict[str, str]) -> None:
    for name in (
        "Newchannel",
        "ContactStatus",
        "SuccessfulAuth",
        "ChallengeResponseFailed",
        "InvalidAccountID",
        "Hangup",
        "FullyBooted",
    ):
        mapper = AmiEventMapper(number_of=lambda logon: None)
        with contextlib.suppress(ValueError):
            mapper.map({**headers, "event": name}, NOW)
        contact_registration({**headers, "event": name})
        call_snapshot({**headers, "event": name})


# --- ESL ----------------------------------------------------------------------------------------


class _Socket:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)

    def recv(self, size: int) -> bytes:
        return self._chunks.pop(0)[:size] if self._chunks else b""


@FUZZ
@given(stream(ESL_WORDS))
def test_esl_frames_and_events_never_raise_but_protocol_errors(chunks: list[bytes]) -> None:
    reader = FrameReader(_Socket(chunks), max_body=4096, max_header=8192, max_total=64 * 1024)
    for _ in range(1000):
        try:
            frame = reader.read_frame()
        except (ProtocolError, ConnectionClosed):
            break
        assert len(reader._buffer) <= 8192 + 4096 + 65536
        channel = event_from_frame(frame)
        fs_events.caller_logon(channel)
        fs_events.dialled_number(channel)
        fs_events.is_channel_uuid(fs_events.channel_uuid(channel))
        if frame.content_type == "text/event-plain":
            try:
                event = parse_event_plain(frame.body)
            except ProtocolError:
                continue
            fs_events.to_core_event(event, NOW)
            fs_events.event_time(event)


@FUZZ
@given(st.text(max_size=400))
def test_freeswitch_tables_parse_or_raise_protocol_error(answer: str) -> None:
    for parse in (fs_events.parse_registrations, fs_events.parse_channels):
        with contextlib.suppress(ProtocolError):
            parse(answer)


@FUZZ
@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                key: st.one_of(
                    st.text(max_size=40), st.integers(), st.none(), st.lists(st.integers(), max_size=2)
                )
                for key in (
                    "reg_user",
                    "realm",
                    "url",
                    "network_ip",
                    "network_port",
                    "uuid",
                    "name",
                    "cid_num",
                    "dest",
                    "direction",
                    "presence_id",
                    "callstate",
                    "expires",
                )
            },
        ),
        max_size=5,
    )
)
def test_freeswitch_table_rows_of_any_shape(rows: list[dict[str, Any]]) -> None:
    import json

    answer = json.dumps({"row_count": len(rows), "rows": rows})
    fs_events.parse_registrations(answer)
    fs_events.parse_channels(answer)


# --- FastAGI ------------------------------------------------------------------------------------


@FUZZ
@given(st.lists(st.text(max_size=100), max_size=30))
def test_agi_environment_lines_parse_or_raise_protocol_error(lines: list[str]) -> None:
    try:
        env = parse_environment(lines)
    except ProtocolError:
        return
    assert all(name.startswith("agi_") for name in env)


@FUZZ
@given(stream(AGI_WORDS))
def test_agi_environment_reader_is_bounded(chunks: list[bytes]) -> None:
    server = FastAgiServer(load_settings(environ={}), service=None)  # type: ignore[arg-type]

    async def read() -> None:
        reader = asyncio.StreamReader(limit=agi_module._LINE_LIMIT)
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        try:
            env = await server._read_environment(reader)
        except (ProtocolError, ValueError):
            return  # ValueError: one line over the limit (asyncio's LimitOverrunError)
        assert sum(len(k) + len(v) for k, v in env.items()) <= agi_module._ENV_LIMIT

    asyncio.run(read())
