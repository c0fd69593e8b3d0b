"""Fixtures for the Asterisk adapter tests: a service on SQLite, a running listener, frame builders."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from forum_bridge.adapters.asterisk.ami import AmiListener
from forum_bridge.config import Settings
from forum_bridge.service import BridgeService
from tests.asterisk.fake_ami import FakeAmi


class RecordingObserver:
    """Collects what the listener reports to the metrics."""

    def __init__(self) -> None:
        self.connected: list[bool] = []
        self.lags: list[float] = []

    def set_connected(self, up: bool) -> None:
        self.connected.append(up)

    def observe_event_lag(self, seconds: float) -> None:
        self.lags.append(seconds)


@pytest.fixture
def bridge_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings for a bridge talking to a fake AMI on ``port``; dotted keys override."""

    def build(port: int, secret: str = "fake-ami-secret", **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "licences.count": 1,
            "asterisk.ami_port": port,
            "asterisk.ami_secret": secret,
            "asterisk.enforce": "ami",
            "asterisk.reconnect_max": 0.2,
            "asterisk.action_timeout": 3.0,
            "asterisk.agi_port": 0,
        }
        values.update(overrides)
        return make_settings(**values)

    return build


@contextlib.asynccontextmanager
async def running(settings: Settings, service: BridgeService, **kwargs: Any) -> AsyncIterator[AmiListener]:
    """A listener running in the current loop; stopped (and checked to stop) on exit."""
    listener = AmiListener(settings, service, **kwargs)
    listener.reconnect_min = 0.02
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    try:
        yield listener
    finally:
        stop.set()
        await asyncio.wait_for(task, 5.0)


@contextlib.asynccontextmanager
async def fake_ami(**kwargs: Any) -> AsyncIterator[FakeAmi]:
    """A started fake AMI server, closed on exit."""
    fake = FakeAmi(**kwargs)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def contact_status(logon: str, status: str = "NonQualified", port: int = 5081) -> dict[str, str]:
    """A ContactStatus event as Asterisk 22 writes it."""
    return {
        "Event": "ContactStatus",
        "Privilege": "system,all",
        "URI": f"sip:{logon}@127.0.0.1:{port}",
        "ContactStatus": status,
        "AOR": logon,
        "EndpointName": logon,
        "RoundtripUsec": "0",
    }


def contact_item(logon: str, port: int = 5081) -> dict[str, str]:
    """A ContactList item (PJSIPShowContacts) as Asterisk 22 writes it."""
    return {
        "ObjectType": "contact",
        "ObjectName": f"{logon};@e51fc9c826a8010b8e7ad5cce4f984a8",
        "ViaAddr": "127.0.0.1",
        "CallId": f"1-{port}@127.0.0.1",
        "Endpoint": logon,
        "ViaPort": str(port),
        "Uri": f"sip:{logon}@127.0.0.1:{port}",
        "UserAgent": "SIPp-test",
        "ExpirationTime": "1795497102",
        "Status": "NonQualified",
        "RoundtripUsec": "N/A",
    }


_seq = 0


def new_channel(logon: str, number: str, *, inbound: bool = False) -> dict[str, str]:
    """A Newchannel event: a phone's own call (Ring, own Linkedid) or a leg ringing it (Down)."""
    global _seq
    _seq += 1
    uniqueid = f"1795495161.{_seq}"
    return {
        "Event": "Newchannel",
        "Privilege": "call,all",
        "Channel": f"PJSIP/{logon}-{_seq:08x}",
        "ChannelState": "0" if inbound else "4",
        "ChannelStateDesc": "Down" if inbound else "Ring",
        "CallerIDNum": "<unknown>" if inbound else logon,
        "CallerIDName": "<unknown>",
        "ConnectedLineNum": "<unknown>",
        "ConnectedLineName": "<unknown>",
        "Language": "en",
        "AccountCode": "",
        "Context": "phones",
        "Exten": "s" if inbound else number,
        "Priority": "1",
        "Uniqueid": uniqueid,
        "Linkedid": "1795495100.1" if inbound else uniqueid,
    }


def challenge_failed(logon: str) -> dict[str, str]:
    """A ChallengeResponseFailed (wrong password) as recorded."""
    return {
        "Event": "ChallengeResponseFailed",
        "Privilege": "security,all",
        "EventTV": "2026-11-24T04:39:18.487+0000",
        "Severity": "Error",
        "Service": "PJSIP",
        "EventVersion": "1",
        "AccountID": logon,
        "SessionID": f"1-{_seq}@127.0.0.1",
        "LocalAddress": "IPV4/UDP/127.0.0.1/5060",
        "RemoteAddress": "IPV4/UDP/127.0.0.1/5082",
        "Challenge": "1795495158/804da13edc2db280e171903d7a256968",
        "Response": "49193ba55a2c6b30a09035681971c5b6",
    }
