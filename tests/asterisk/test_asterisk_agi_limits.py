"""The FastAGI hook cannot be locked out or used by strangers.

FastAGI has no authentication: only allow-listed addresses are served, idle connections give way
to Asterisk's own requests, and nobody outside the allow-list can take a licence.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from forum_bridge.adapters.asterisk.agi import FastAgiServer
from forum_bridge.config import Settings, load_settings
from forum_bridge.errors import ConfigError
from forum_bridge.service import BridgeService
from tests.asterisk.aio import run
from tests.asterisk.test_asterisk_agi import ask, environment, hook_settings, logged_on

__all__ = ["hook_settings"]  # the fixture, re-used

ServiceFactory = Callable[[Settings], BridgeService]


async def closed_on_us(reader: asyncio.StreamReader) -> bool:
    """True when the server closed the connection without a word (EOF or a reset)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


def holders(service: BridgeService) -> list[str]:
    return [a["logon"] for a in service.status()["assignments"]]


def test_idle_connections_give_way_to_asterisks_request(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings())
    service.add_subscriber("21-desk", "21")
    logged_on(service, "21-desk")

    async def scenario() -> None:
        server = FastAgiServer(service.settings, service, max_clients=8, read_timeout=30.0)
        await server.start()
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(8):  # a scanner (or a stuck peer) fills every place and says nothing
                idle.append(await asyncio.open_connection("127.0.0.1", server.port))
            while server.active < 8:
                await asyncio.sleep(0.01)
            answer = await asyncio.wait_for(ask(server.port, "outbound", "600"), 10)
            assert answer == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "licence_acquired"}
            assert server.evicted == 1 and server.refused == 0
            # The oldest idle connection was the one dropped.
            assert await closed_on_us(idle[0][0])
        finally:
            for _reader, writer in idle:
                writer.close()
            await server.close()

    run(scenario())


def test_connections_busy_deciding_are_never_dropped_for_a_newcomer(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings())
    release = asyncio.Event()

    async def scenario() -> None:
        async def slow(timeout: float, logon: str | None = None) -> None:
            await release.wait()

        server = FastAgiServer(service.settings, service, max_clients=2, before_decision=slow)
        await server.start()
        try:
            busy = [asyncio.ensure_future(ask(server.port, "outbound", "600")) for _ in range(2)]
            while server.requests < 2:
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(environment("outbound", "600"))
            assert await closed_on_us(reader)  # refused: nobody was idle
            writer.close()
            assert server.refused == 1 and server.evicted == 0
            release.set()
            answers = await asyncio.wait_for(asyncio.gather(*busy), 10)
            assert all(a["FORUM_BRIDGE_RESULT"] == "allow" for a in answers)
        finally:
            release.set()
            await server.close()

    run(scenario())


def test_an_address_outside_the_allow_list_gets_no_answer_and_takes_no_licence(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The whole of 127.0.0.0/8 is loopback on Linux: allow only 127.0.0.2 and ask from 127.0.0.1.
    service = make_service(hook_settings(**{"asterisk.agi_allow": ["127.0.0.2"]}))
    service.add_subscriber("21-desk", "21")
    logged_on(service, "21-desk")

    async def stranger(port: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(environment("inbound", "21"))
        try:
            return await closed_on_us(reader)
        finally:
            writer.close()

    async def allowed(port: int) -> dict[str, str]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.2", 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(environment("inbound", "21"))
        variables: dict[str, str] = {}
        while line := await asyncio.wait_for(reader.readline(), 5):
            _set, _variable, name, value = line.decode().split(" ", 3)
            variables[name] = value.strip().strip('"')
            writer.write(b"200 result=1\n")
        writer.close()
        return variables

    async def scenario() -> None:
        server = FastAgiServer(service.settings, service)
        await server.start()
        try:
            for _ in range(3):
                assert await stranger(server.port)
            assert server.rejected == 3 and server.requests == 0
            assert holders(service) == []
            assert (await allowed(server.port))["FORUM_BRIDGE_DIAL"] == "PJSIP/21-desk"
            assert holders(service) == ["21-desk"]
        finally:
            await server.close()

    with caplog.at_level("WARNING"):
        run(scenario())
    refusals = [r for r in caplog.records if "not in asterisk.agi_allow" in r.getMessage()]
    assert len(refusals) == 1  # once per address, however often it tries


def test_the_allow_list_defaults_to_loopback_and_refuses_everyone() -> None:
    assert load_settings(environ={}).asterisk.agi_allow == ("127.0.0.0/8", "::1/128")
    env = {"FORUM_BRIDGE_ASTERISK_AGI_ALLOW": "192.0.2.10, 2001:db8::/64"}
    assert load_settings(environ=env).asterisk.agi_allow == ("192.0.2.10/32", "2001:db8::/64")
    for bad in (["0.0.0.0/0"], ["::/0"], ["pbx.example"], [], "10.0.0.1/33"):
        with pytest.raises(ConfigError, match=r"asterisk\.agi_allow"):
            load_settings(environ={}, overrides={"asterisk.agi_allow": bad})
    # The FreeSWITCH socket hook has the same kind of list.
    assert load_settings(environ={}).freeswitch.socket_allow == ("127.0.0.0/8", "::1/128")
    env = {"FORUM_BRIDGE_FREESWITCH_SOCKET_ALLOW": "192.0.2.20"}
    assert load_settings(environ=env).freeswitch.socket_allow == ("192.0.2.20/32",)
    with pytest.raises(ConfigError, match=r"freeswitch\.socket_allow"):
        load_settings(environ={}, overrides={"freeswitch.socket_allow": ["0.0.0.0/0"]})


def test_closing_with_a_request_in_progress_logs_no_error(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(hook_settings())

    async def scenario() -> None:
        never = asyncio.Event()

        async def stuck(timeout: float, logon: str | None = None) -> None:
            await never.wait()

        server = FastAgiServer(service.settings, service, before_decision=stuck)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(environment("outbound", "600"))
        while server.requests < 1:
            await asyncio.sleep(0.01)
        await server.close()  # the bridge stops (SIGTERM) while the dialplan waits
        assert await closed_on_us(reader)
        writer.close()
        await asyncio.sleep(0.05)  # let the loop run the streams' done callbacks

    with caplog.at_level("ERROR"):
        run(scenario())
    assert [r.getMessage() for r in caplog.records if r.levelno >= 40] == []
