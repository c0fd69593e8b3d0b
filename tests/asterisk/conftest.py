"""Fixtures for the Asterisk adapter tests: a service on SQLite, a running listener, frame builders.

Most scenarios take the ``ami`` fixture: a fake Asterisk already listening, a service on SQLite
and the AMI listener (or the whole bridge) started on demand inside the fixture's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import pytest

from forum_bridge.adapters.asterisk.ami import AmiListener, AmiObserver
from forum_bridge.adapters.asterisk.runner import Bridge
from forum_bridge.config import Settings
from forum_bridge.service import BridgeService
from tests.asterisk.fake_ami import FakeAmi

T = TypeVar("T")


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


class AmiRig:
    """One scenario: a fake Asterisk speaking the real bytes, a service, and the listener on demand.

    The rig owns an event loop: set the service and the fake up in plain code, then hand a
    coroutine to :meth:`run` (or a scenario taking the listener to :meth:`listen`). The fake keeps
    listening until the test ends, so what it received can be checked after the listener stopped.
    """

    def __init__(
        self,
        runner: asyncio.Runner,
        fake: FakeAmi,
        settings: Callable[..., Settings],
        make_service: Callable[[Settings], BridgeService],
    ) -> None:
        self.runner = runner
        self.fake = fake
        self.observer: AmiObserver = RecordingObserver()
        self._settings = settings
        self._make_service = make_service
        self._service: BridgeService | None = None
        self._listener: AmiListener | None = None
        self._target = 0  # listener.frames once every frame pushed so far is applied

    # --- set-up (plain code) ---------------------------------------------------------------------

    def settings(self, **overrides: Any) -> Settings:
        """Settings for a bridge talking to this fake (see ``bridge_settings``)."""
        return self._settings(self.fake.port, **overrides)

    def setup(self, *subscribers: str, registered: bool = False, **overrides: Any) -> BridgeService:
        """The service with these settings overrides and subscribers (number: the digits before
        the dash); ``registered``: Asterisk lists each with a contact (port 5081, 5082, ...)."""
        assert self._service is None, "the service is set up once, before it is used"
        self._service = self._make_service(self.settings(**overrides))
        for logon in subscribers:
            self._service.add_subscriber(logon, logon.split("-")[0])
        if registered:
            self.fake.contacts = [contact_item(logon, 5081 + i) for i, logon in enumerate(subscribers)]
        return self._service

    @property
    def service(self) -> BridgeService:
        """The service (with the default settings if :meth:`setup` was not called)."""
        return self._service if self._service is not None else self.setup()

    def use_fake(self, fake: FakeAmi) -> FakeAmi:
        """Put a variant of the fake (a subclass that misbehaves on cue) in the plain one's place."""
        assert self._service is None, "the fake is chosen before the service is set up"
        self.runner.run(self.fake.close())
        self.runner.run(fake.start())
        self.fake = fake
        return fake

    def adopt(self, service: BridgeService) -> None:
        """Use a service built by the test (e.g. on the real clock) instead of :meth:`setup`'s."""
        assert self._service is None, "the service is set up once, before it is used"
        self._service = service

    @property
    def recorded(self) -> RecordingObserver:
        """The default observer, with what the listener reported to the metrics."""
        assert isinstance(self.observer, RecordingObserver)
        return self.observer

    # --- running ---------------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` in the rig's loop; fail the test if it takes longer than ``timeout``."""
        return self.runner.run(asyncio.wait_for(coro, timeout))

    def listen(
        self, scenario: Callable[[AmiListener], Awaitable[None]], timeout: float = 30.0, **kwargs: Any
    ) -> None:
        """Run ``scenario(listener)`` with a listener that has logged in and resynced once."""

        async def body() -> None:
            async with self.listening(**kwargs) as listener:
                await scenario(listener)

        self.run(body(), timeout)

    @contextlib.asynccontextmanager
    async def listening(self, *, resynced: bool = True, **kwargs: Any) -> AsyncIterator[AmiListener]:
        """An AMI listener (``AmiListener`` keyword arguments), stopped on exit; by default
        entered once it has logged in and resynced."""
        async with running(self.service.settings, self.service, observer=self.observer, **kwargs) as listener:
            self._listener, self._target = listener, 0
            try:
                if resynced:
                    await listener.wait_until(lambda: listener.resyncs >= 1, 5)
                yield listener
            finally:
                self._listener = None

    @contextlib.asynccontextmanager
    async def serving(self, interval: float | None = None) -> AsyncIterator[Bridge]:
        """The whole Asterisk bridge as ``forum-bridge run asterisk`` builds it (AMI listener,
        FastAGI hook, AstDB writer); ``interval``: of the AstDB pass. Stopped on exit."""
        bridge = Bridge(self.service.settings, self.service, self.observer)
        bridge.ami.reconnect_min = 0.02
        if interval is not None:
            bridge.emergency.interval = interval
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.serve(stop))
        self._listener, self._target = bridge.ami, 0
        try:
            await asyncio.wait_for(bridge.started.wait(), 5)
            yield bridge
        finally:
            self._listener = None
            stop.set()
            await asyncio.wait_for(task, 10)

    @property
    def listener(self) -> AmiListener:
        """The listener running now."""
        assert self._listener is not None, "no listener is running"
        return self._listener

    # --- what scenarios do -----------------------------------------------------------------------

    def push(self, *frames: Mapping[str, str] | str) -> None:
        """Send event frames to the listener (without waiting for them)."""
        for frame in frames:
            self._target = max(self._target, self.listener.frames) + 1
            self.fake.push(frame)

    async def send(self, *frames: Mapping[str, str] | str, timeout: float = 5.0) -> None:
        """Send event frames and wait until the listener has applied them."""
        self.push(*frames)
        await self.wait_applied(timeout)

    async def wait_applied(self, timeout: float = 5.0) -> None:
        """Wait until every frame pushed so far has been applied (or dropped) by the listener."""
        listener = self.listener
        await listener.wait_until(lambda: listener.frames >= self._target, timeout)

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds after some frame, login or resync of the listener."""
        await self.listener.wait_until(predicate, timeout)

    def subscriber(self, logon: str) -> dict[str, Any]:
        """The status document's entry of ``logon``."""
        return next(s for s in self.service.status()["subscribers"] if s["logon"] == logon)

    def holders(self) -> list[str]:
        """The log-ons holding a licence, sorted."""
        return sorted(a["logon"] for a in self.service.status()["assignments"])


@pytest.fixture
def ami(
    bridge_settings: Callable[..., Settings], make_service: Callable[[Settings], BridgeService]
) -> Iterator[AmiRig]:
    """A fake Asterisk listening on a free port, with a service and listener on demand."""
    with asyncio.Runner() as runner:
        fake = FakeAmi()
        runner.run(fake.start())
        rig = AmiRig(runner, fake, bridge_settings, make_service)
        try:
            yield rig
        finally:
            runner.run(rig.fake.close())


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
