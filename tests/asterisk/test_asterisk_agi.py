"""The FastAGI hook server, driven the way Asterisk's res_agi drives it (and the way it must not be)."""

from __future__ import annotations

import asyncio
import shlex
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from forum_bridge.adapters.asterisk.agi import FastAgiServer, agi_quote, parse_environment
from forum_bridge.config import Settings
from forum_bridge.core.events import Direction, LoggedOn, LogonFailed
from forum_bridge.core.rules import Decision
from forum_bridge.errors import ProtocolError, StoreError
from forum_bridge.service import BridgeService
from tests.asterisk.aio import run

SettingsFactory = Callable[..., Settings]
ServiceFactory = Callable[[Settings], BridgeService]


def environment(script: str, *args: str, channel: str = "PJSIP/21-desk-00000001", port: int = 4573) -> bytes:
    """The block Asterisk 22 writes (res_agi.c setup_env), ``\\n`` line ends, one empty line."""
    lines = [
        "agi_network: yes",
        f"agi_network_script: {script}",
        f"agi_request: agi://127.0.0.1:{port}/{script}",
        f"agi_channel: {channel}",
        "agi_language: en",
        "agi_type: PJSIP",
        "agi_uniqueid: 1795495164.3",
        "agi_version: 22.10.1",
        "agi_callerid: 21",
        "agi_calleridname: Desk",
        "agi_callingpres: 0",
        "agi_callingani2: 0",
        "agi_callington: 0",
        "agi_callingtns: 0",
        "agi_dnid: 600",
        "agi_rdnis: unknown",
        "agi_context: forum-bridge-outbound",
        "agi_extension: s",
        "agi_priority: 6",
        "agi_enhanced: 0.0",
        "agi_accountcode: ",
        "agi_threadid: 140234567890",
        *(f"agi_arg_{i}: {a}" for i, a in enumerate(args, start=1)),
    ]
    return ("\n".join(lines) + "\n\n").encode()


async def ask(
    port: int,
    script: str,
    *args: str,
    channel: str = "PJSIP/21-desk-00000001",
    reply: Callable[[str, int], bytes] | None = None,
) -> dict[str, str]:
    """Play Asterisk: send the environment, answer each command, return the variables set."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(environment(script, *args, channel=channel, port=port))
    variables: dict[str, str] = {}
    count = 0
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            words = shlex.split(line.decode().rstrip("\n"))
            assert words[:2] == ["SET", "VARIABLE"] and len(words) == 4, line
            variables[words[2]] = words[3]
            writer.write(reply(words[2], count) if reply else b"200 result=1\n")
            count += 1
            await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()
    return variables


async def started(settings: Settings, service: Any, **kwargs: Any) -> FastAgiServer:
    server = FastAgiServer(settings, service, **kwargs)
    await server.start()
    return server


@pytest.fixture
def hook_settings(make_settings: SettingsFactory) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"licences.count": 1, "asterisk.agi_port": 0}
        values.update(overrides)
        return make_settings(**values)

    return build


def logged_on(service: BridgeService, *logons: str) -> None:
    for logon in logons:
        service.apply(LoggedOn(logon, service.clock(), contact=f"sip:{logon}@127.0.0.1:5081"))


def test_outbound_allow_then_deny_when_the_pool_is_full_but_emergency_passes(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings())
    service.add_subscriber("21-desk", "21")
    service.add_subscriber("22-soft", "22")
    logged_on(service, "21-desk", "22-soft")

    async def scenario() -> None:
        server = await started(service.settings, service)
        try:
            first = await ask(server.port, "outbound", "600")
            assert first == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "licence_acquired"}
            full = await ask(server.port, "outbound", "600", channel="PJSIP/22-soft-00000002")
            assert full == {"FORUM_BRIDGE_RESULT": "deny", "FORUM_BRIDGE_REASON": "emergency_only"}
            emergency = await ask(server.port, "outbound", "112", channel="PJSIP/22-soft-00000003")
            assert emergency == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "emergency"}
            # A new call, so a new channel (Asterisk numbers them); the same channel is one decision.
            again = await ask(server.port, "outbound", "700", channel="PJSIP/21-desk-00000004")
            assert again == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "licensed"}
            assert (server.requests, server.answered) == (4, 4)
        finally:
            await server.close()

    run(scenario())
    assert [a["logon"] for a in service.status()["assignments"]] == ["21-desk"]


def test_a_log_on_whose_log_on_failed_may_not_even_call_112(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings())
    service.add_subscriber("21-desk", "21")
    logged_on(service, "21-desk")
    service.apply(LogonFailed("21-desk", service.clock(), source="127.0.0.1:5082"))

    async def scenario() -> None:
        server = await started(service.settings, service)
        try:
            for number in ("112", "600"):
                answer = await ask(server.port, "outbound", number)
                assert answer == {"FORUM_BRIDGE_RESULT": "deny", "FORUM_BRIDGE_REASON": "logon_failed"}
        finally:
            await server.close()

    run(scenario())


def test_a_channel_that_is_not_a_pjsip_phone_is_not_managed(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings())

    async def scenario() -> None:
        server = await started(service.settings, service)
        try:
            answer = await ask(server.port, "outbound", "600", channel="Local/600@phones-00000001;2")
            assert answer == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "unmanaged"}
        finally:
            await server.close()

    run(scenario())


def test_inbound_names_the_log_ons_that_may_ring(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings(**{"licences.count": 2}))
    for logon in ("21-desk", "21-soft", "21-phone"):
        service.add_subscriber(logon, "21")
    service.add_subscriber("22-soft", "22")
    logged_on(service, "21-desk", "21-soft", "22-soft")  # 21-phone is not logged on

    async def scenario() -> None:
        server = await started(service.settings, service)
        try:
            both = await ask(server.port, "inbound", "21", channel="PJSIP/trunk-00000001")
            assert both == {
                "FORUM_BRIDGE_DIAL": "PJSIP/21-desk&PJSIP/21-soft",
                "FORUM_BRIDGE_RESULT": "allow",
            }
            # Both licences are held now: 22-soft cannot ring.
            none = await ask(server.port, "inbound", "22", channel="PJSIP/trunk-00000002")
            assert none == {"FORUM_BRIDGE_RESULT": "deny"}
            nobody = await ask(server.port, "inbound", "99", channel="PJSIP/trunk-00000003")
            assert nobody == {"FORUM_BRIDGE_RESULT": "deny"}
        finally:
            await server.close()

    run(scenario())


class BrokenService:
    """A service whose database is gone (or hangs until released)."""

    def __init__(self, settings: Settings, hang: threading.Event | None = None) -> None:
        self.settings = settings
        self.hang = hang

    def is_emergency(self, number: str) -> bool:
        return self.settings.emergency.is_emergency(number)

    def authorize(
        self, logon: str, number: str, direction: Direction = Direction.OUTBOUND, *, channel: str = ""
    ) -> Decision:
        if self.hang is not None:
            self.hang.wait(10)
        raise StoreError("database error: unable to open database file")

    def ringable(self, number: str) -> list[tuple[str, Decision]]:
        if self.hang is not None:
            self.hang.wait(10)
        raise StoreError("database error: unable to open database file")


@pytest.mark.parametrize(
    ("fail_mode", "normal"),
    [("closed", "deny"), ("open", "allow")],
)
def test_a_database_error_follows_the_fail_mode_but_emergency_calls_pass(
    hook_settings: Callable[..., Settings], fail_mode: str, normal: str
) -> None:
    settings = hook_settings(**{"asterisk.fail_mode": fail_mode})
    service = BrokenService(settings)

    async def scenario() -> None:
        server = await started(settings, service)
        try:
            assert await ask(server.port, "outbound", "600") == {
                "FORUM_BRIDGE_RESULT": normal,
                "FORUM_BRIDGE_REASON": "bridge_error",
            }
            assert await ask(server.port, "outbound", "112") == {
                "FORUM_BRIDGE_RESULT": "allow",
                "FORUM_BRIDGE_REASON": "emergency",
            }
            assert await ask(server.port, "inbound", "21") == {
                "FORUM_BRIDGE_RESULT": "error",
                "FORUM_BRIDGE_REASON": "bridge_error",
            }
        finally:
            await server.close()

    run(scenario())


def test_a_slow_database_is_answered_by_the_deadline(hook_settings: Callable[..., Settings]) -> None:
    settings = hook_settings()
    release = threading.Event()
    service = BrokenService(settings, hang=release)

    async def scenario() -> None:
        server = await started(settings, service, decision_timeout=0.2)
        try:
            began = time.monotonic()
            normal = await ask(server.port, "outbound", "600")
            emergency = await ask(server.port, "outbound", "112")
            assert time.monotonic() - began < 2.0
            assert normal == {"FORUM_BRIDGE_RESULT": "deny", "FORUM_BRIDGE_REASON": "bridge_error"}
            assert emergency == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "emergency"}
        finally:
            release.set()
            await server.close()

    run(scenario())


def test_a_database_file_that_was_deleted_fails_closed(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory, tmp_path: Any
) -> None:
    """A real service whose SQLite file vanished: the next transaction finds no schema."""
    settings = hook_settings(**{"database.url": f"sqlite:///{tmp_path / 'gone.db'}"})
    service = make_service(settings)
    service.add_subscriber("21-desk", "21")
    logged_on(service, "21-desk")
    service.database.dispose()
    (tmp_path / "gone.db").unlink()
    for leftover in tmp_path.glob("gone.db-*"):
        leftover.unlink()

    async def scenario() -> None:
        server = await started(settings, service)
        try:
            assert (await ask(server.port, "outbound", "600"))["FORUM_BRIDGE_RESULT"] == "deny"
            assert (await ask(server.port, "outbound", "112"))["FORUM_BRIDGE_RESULT"] == "allow"
        finally:
            await server.close()

    run(scenario())


def test_hangup_lines_and_multi_line_520_replies_are_understood(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings())
    service.add_subscriber("21-desk", "21")
    logged_on(service, "21-desk")

    def hangup_first(_name: str, count: int) -> bytes:
        # The caller hung up meanwhile: HANGUP arrives unasked, the real reply follows.
        return b"HANGUP\n200 result=1\n" if count == 0 else b"200 result=1\n"

    def usage(_name: str, _count: int) -> bytes:
        return (
            b"520-Invalid command syntax.  Proper usage follows:\n"
            b" Usage: SET VARIABLE <variablename> <value>\n"
            b"   Sets a variable to the current channel.\n"
            b"520 End of proper usage.\n"
        )

    async def scenario() -> None:
        server = await started(service.settings, service)
        try:
            answer = await ask(server.port, "outbound", "600", reply=hangup_first)
            assert answer == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "licence_acquired"}
            # A 520 ends the conversation after the usage text (no desynchronised replies).
            refused = await ask(server.port, "outbound", "600", reply=usage)
            assert list(refused) == ["FORUM_BRIDGE_RESULT"]
            dead = await ask(
                server.port, "outbound", "600", reply=lambda _n, _c: b"511 Command Not Permitted\n"
            )
            assert list(dead) == ["FORUM_BRIDGE_RESULT"]
            await server.wait_idle(2)
            assert server.answered == 1
        finally:
            await server.close()

    run(scenario())


def test_bad_clients_cost_nothing_and_the_next_good_client_is_answered_at_once(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings())
    service.add_subscriber("21-desk", "21")
    logged_on(service, "21-desk")

    async def eof_seen(reader: asyncio.StreamReader) -> bool:
        return await reader.read() == b""

    async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            await writer.drain()
            return await reader.read() == b""
        except ConnectionError:  # reset while our megabyte was still being sent
            return True

    async def scenario() -> None:
        server = await started(service.settings, service, read_timeout=0.5)
        try:
            # 1. connects and closes at once (a port scanner, a TCP health check)
            _r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.close()
            await w.wait_closed()
            await server.wait_idle(2)
            # 2. closes halfway through the environment (panoramisk would spin at 100 % CPU here)
            _r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(environment("outbound", "600")[:100])
            await w.drain()
            w.close()
            await w.wait_closed()
            await server.wait_idle(2)
            # 3. garbage
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            assert await asyncio.wait_for(eof_seen(r), 2)
            w.close()
            # 4. a megabyte without a newline: cut off after a few kilobytes, not buffered
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"agi_network: " + b"y" * (1 << 20))
            assert await asyncio.wait_for(closed_by_server(r, w), 2)
            w.close()
            await server.wait_idle(2)
            # 5. stalls: says nothing more after a line; closed once read_timeout passes
            r, stalled = await asyncio.open_connection("127.0.0.1", server.port)
            stalled.write(b"agi_network: yes\n")
            await stalled.drain()
            assert server.requests == 0
            # Meanwhile a good client is answered at once.
            began = time.monotonic()
            answer = await ask(server.port, "outbound", "600")
            assert time.monotonic() - began < 0.4
            assert answer["FORUM_BRIDGE_RESULT"] == "allow"
            assert await asyncio.wait_for(eof_seen(r), 2)
            stalled.close()
            # 6. an unknown script gets no command at all
            assert await ask(server.port, "nonsense", "600") == {}
            # Every handler has finished: nothing left running, nothing spinning.
            await server.wait_idle(2)
            assert server.active == 0
            assert server.requests == 2 and server.answered == 1
        finally:
            await server.close()

    cpu_before = time.process_time()
    run(scenario())
    # Well below what a spinning handler burns in the ~1 s this takes; the database work is small.
    assert time.process_time() - cpu_before < 0.9


def test_too_many_clients_at_once_drop_the_oldest_idle_one(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings())

    async def scenario() -> None:
        server = await started(service.settings, service, max_clients=2, read_timeout=5)
        try:
            idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
            while server.active < 2:
                await asyncio.sleep(0.01)
            _r, w = await asyncio.open_connection("127.0.0.1", server.port)
            # The newcomer stays; the oldest connection that said nothing makes room for it.
            assert await asyncio.wait_for(idle[0][0].read(), 2) == b""
            assert server.evicted == 1 and server.refused == 0 and server.active == 2
            w.close()
            for _r, writer in idle:
                writer.close()
            await server.wait_idle(2)
        finally:
            await server.close()

    run(scenario())


def test_the_port_in_use_is_a_clear_configuration_error(
    hook_settings: Callable[..., Settings], make_service: ServiceFactory
) -> None:
    service = make_service(hook_settings())

    async def scenario() -> None:
        first = await started(service.settings, service)
        try:
            taken = hook_settings(**{"asterisk.agi_port": first.port})
            with pytest.raises(Exception, match=r"asterisk.agi_port: cannot listen on 127.0.0.1:\d+"):
                await started(taken, service)
        finally:
            await first.close()

    run(scenario())


def test_environment_parsing_and_quoting() -> None:
    env = parse_environment(["agi_channel: PJSIP/21-desk-00000001", "agi_accountcode: ", "agi_arg_1: 600"])
    assert env == {"agi_channel": "PJSIP/21-desk-00000001", "agi_accountcode": "", "agi_arg_1": "600"}
    with pytest.raises(ProtocolError):
        parse_environment(["GET / HTTP/1.0"])
    with pytest.raises(ProtocolError):
        parse_environment(["Host: example"])
    assert agi_quote("PJSIP/a&PJSIP/b") == '"PJSIP/a&PJSIP/b"'
    assert agi_quote('say "hi"\\\n') == '"say \\"hi\\"\\\\ "'
