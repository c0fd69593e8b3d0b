"""The socket hook's inbound lookup (``socket host:port/inbound``): who may ring for a call number.

A fake FreeSWITCH runs the ``forum-bridge-inbound`` extension's ``socket`` application; the bridge
must set ``forum_bridge_dial`` (every time, empty when nobody may ring) and ``forum_bridge_result``,
then resume the dialplan. Each log-on rung takes its licence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from forum_bridge.adapters.freeswitch.socket_hook import SocketHookServer
from forum_bridge.config import Settings
from forum_bridge.core.events import LoggedOn, LogonFailed
from forum_bridge.errors import StoreError
from forum_bridge.service import BridgeService
from tests.conftest import FakeClock
from tests.freeswitch.conftest import wait_until
from tests.freeswitch.fake_esl import FakeSocketCall, channel_data, fs_url_encode

HookFactory = Callable[..., tuple[SocketHookServer, BridgeService]]


@pytest.fixture
def start_hook(
    fs_settings: Callable[..., Settings], make_service: Callable[[Settings], BridgeService], clock: FakeClock
) -> Iterator[HookFactory]:
    """A hook with log-ons 21-desk and 21-soft on number 21 and 22-soft on 22, all logged on."""
    servers: list[SocketHookServer] = []

    def start(**overrides: object) -> tuple[SocketHookServer, BridgeService]:
        service = make_service(fs_settings(**overrides))
        for logon, number in (("21-desk", "21"), ("21-soft", "21"), ("22-soft", "22")):
            service.add_subscriber(logon, number)
            service.apply(LoggedOn(logon, at=clock(), contact=f"sip:{logon}@127.0.0.1:5091"))
        server = SocketHookServer(service, host="127.0.0.1", port=0, session_timeout=5.0)
        server.start()
        servers.append(server)
        return server, service

    yield start
    for server in servers:
        server.stop(timeout=1)


def lookup(server: SocketHookServer, uuid: str, number: str, **variables: str) -> list[str]:
    """FreeSWITCH runs ``socket .../inbound`` with ``forum_bridge_number``; return what the bridge sent."""
    extra = {
        "socket_path": "inbound",
        "forum_bridge_number": number,
        "domain_name": "sandbox.test",
        **variables,
    }
    lines = "".join(f"variable_{name}: {fs_url_encode(value)}\n" for name, value in extra.items())
    captured = channel_data(uuid, "90-trunk", number).decode()
    kept = [
        line for line in captured.split("\n") if line.split(":", 1)[0] not in {f"variable_{n}" for n in extra}
    ]
    data = "\n".join(kept).replace("Content-Type: command/reply", lines + "Content-Type: command/reply", 1)
    before = server.sessions
    fake = FakeSocketCall(server.port, data.encode())
    fake.start()
    wait_until(lambda: fake.finished.is_set() and server.sessions > before, what="the hook session")
    assert fake.error is None
    return fake.commands


def answered(uuid: str, dial: str, result: str) -> list[str]:
    setvar = f"api uuid_setvar {uuid} forum_bridge_dial {dial}".rstrip()
    return ["connect", setvar, f"api uuid_setvar {uuid} forum_bridge_result {result}", "resume", "exit"]


def holders(service: BridgeService) -> list[str]:
    return sorted(a["logon"] for a in service.status()["assignments"])


def test_every_log_on_of_the_number_with_a_licence_to_take_rings(start_hook: HookFactory) -> None:
    server, service = start_hook(**{"licences.count": 3})
    commands = lookup(server, "in-1", "21")
    assert commands == answered("in-1", "user/21-desk@sandbox.test,user/21-soft@sandbox.test", "allow")
    assert holders(service) == ["21-desk", "21-soft"]  # a call received is a connection


def test_a_log_on_without_a_licence_is_left_out_and_nobody_is_an_empty_dial_string(
    start_hook: HookFactory,
) -> None:
    server, service = start_hook(**{"licences.count": 1})
    assert lookup(server, "in-1", "22") == answered("in-1", "user/22-soft@sandbox.test", "allow")
    # The only licence is held by 22-soft: neither phone of 21 may ring, and the variable is cleared.
    assert lookup(server, "in-2", "21") == answered("in-2", "", "deny")
    assert holders(service) == ["22-soft"]


def test_a_blocked_log_on_is_not_rung(start_hook: HookFactory, clock: FakeClock) -> None:
    server, service = start_hook(**{"licences.count": 3})
    service.apply(LogonFailed(logon="21-soft", at=clock(), source="192.0.2.9:5060"))
    assert lookup(server, "in-1", "21") == answered("in-1", "user/21-desk@sandbox.test", "allow")


def test_the_domain_can_be_given_and_a_bad_one_is_not_used(start_hook: HookFactory) -> None:
    server, _service = start_hook(**{"licences.count": 3})
    given = lookup(server, "in-1", "22", forum_bridge_domain="pbx.example.net")
    assert given == answered("in-1", "user/22-soft@pbx.example.net", "allow")
    bad = lookup(server, "in-2", "22", forum_bridge_domain="x y,user/evil", domain_name="")
    assert bad == answered("in-2", "user/22-soft", "allow")


@pytest.mark.parametrize("number", ["", "21;drop", "9" * 65])
def test_an_unusable_number_rings_nobody(start_hook: HookFactory, number: str) -> None:
    server, service = start_hook()
    assert lookup(server, "in-1", number) == answered("in-1", "", "deny")
    assert holders(service) == []


def test_database_trouble_rings_nobody_and_says_error(
    start_hook: HookFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, service = start_hook()

    def broken(*_args: object) -> object:
        raise StoreError("database error: unable to open database file")

    monkeypatch.setattr(service, "ringable", broken)
    assert lookup(server, "in-1", "21") == answered("in-1", "", "error")
