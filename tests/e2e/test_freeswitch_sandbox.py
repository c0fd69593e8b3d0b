"""The FreeSWITCH sandbox itself: loopback only, its own ports, restarts, and loud failures."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from tests.sandbox import SippPhone
from tests.sandbox.asterisk import SandboxError, free_tcp_port
from tests.sandbox.freeswitch import BIN_ENV_VAR, FreeSwitchSandbox, freeswitch_binary

pytestmark = [pytest.mark.freeswitch, pytest.mark.timeout(300)]

ANSWER_ALL = "<include/>\n"  # no bridge: every call goes to the sandbox's echo


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _local_addresses(pid: int) -> set[tuple[str, str, int]]:
    """(protocol, address, port) of every TCP/UDP socket the process holds."""
    inodes = _socket_inodes(pid)
    found = set()
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            if len(raw) == 4:
                host = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(address, 16)))
            else:
                words = struct.unpack("<4I", raw)
                host = socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))
            found.add((proto, host, int(port, 16)))
    return found


def test_it_listens_on_loopback_only_on_its_own_ports_and_survives_a_restart() -> None:
    with FreeSwitchSandbox(free_tcp_port(), ANSWER_ALL, [("21-desk", "pw-21")]) as pbx:
        assert pbx.pid is not None
        addresses = _local_addresses(pbx.pid)
        assert {("udp", "127.0.0.1", pbx.sip_port), ("tcp", "127.0.0.1", pbx.sip_port)} <= addresses
        assert ("tcp", "127.0.0.1", pbx.esl_port) in addresses
        assert {host for _, host, _ in addresses} == {"127.0.0.1"}
        phone = SippPhone("21-desk", "pw-21", pbx.sip_port)
        try:
            assert phone.register() == 200
            assert phone.call("600") == 200  # answered and echoed by the sandbox dialplan
            assert "21-desk" in pbx.api(f"sofia xmlstatus profile {pbx.profile} reg")
            ports = (pbx.sip_port, pbx.esl_port)
            pbx.restart()
            assert (pbx.sip_port, pbx.esl_port) == ports
            assert phone.call("601") == 200
        finally:
            phone.close()
        directory = pbx.directory
    assert not directory.exists()  # close() removed the instance's files


def test_a_port_it_cannot_bind_fails_loudly_with_the_log_tail() -> None:
    pbx = FreeSwitchSandbox(free_tcp_port(), ANSWER_ALL, [("21-desk", "pw-21")])
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("127.0.0.1", pbx.esl_port))
        blocker.listen(1)
        with pytest.raises(SandboxError) as info:
            pbx.start(timeout=15)
        message = str(info.value)
        assert f"127.0.0.1:{pbx.esl_port}" in message
        assert "--- log" in message  # FreeSWITCH's own words come with it
        assert not pbx.running
    finally:
        blocker.close()
        pbx.close()


def test_a_sandbox_that_cannot_start_leaves_nothing_behind(tmp_path: Path) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pbx = FreeSwitchSandbox(
            free_tcp_port(), ANSWER_ALL, [("21-desk", "pw-21")], base_dir=tmp_path, start_timeout=10
        )
        blocker.bind(("127.0.0.1", pbx.sip_port))  # sofia cannot bind its SIP port
        with pytest.raises(SandboxError, match="not ready"), pbx:
            pass
    finally:
        blocker.close()
    assert not pbx.running
    assert list(tmp_path.iterdir()) == []


def test_a_missing_freeswitch_is_named_with_the_way_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BIN_ENV_VAR, "/nonexistent/freeswitch")
    with pytest.raises(SandboxError, match=r"no FreeSWITCH at /nonexistent/freeswitch: run the test command"):
        freeswitch_binary()


def test_reloading_the_dialplan_takes_effect_and_a_broken_one_is_refused() -> None:
    with FreeSwitchSandbox(free_tcp_port(), ANSWER_ALL, [("21-desk", "pw-21")]) as pbx:
        phone = SippPhone("21-desk", "pw-21", pbx.sip_port)
        try:
            assert phone.call("600") == 200
            reject = (
                "<include>\n"
                '  <extension name="no">\n'
                '    <condition field="destination_number" expression="^600$">\n'
                '      <action application="hangup" data="CALL_REJECTED"/>\n'
                "    </condition>\n"
                "  </extension>\n"
                "</include>\n"
            )
            pbx.reload_dialplan(reject)
            assert phone.call("600") == 603
            assert phone.call("601") == 200
            with pytest.raises(SandboxError, match=r"reloadxml said.*error near line"):
                pbx.reload_dialplan("<include>\n  <extension>\n")
            assert phone.call("600") == 603  # FreeSWITCH kept the last good dialplan
        finally:
            phone.close()
