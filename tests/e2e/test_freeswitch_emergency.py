"""End to end on the real FreeSWITCH: emergency calls never wait on the bridge, other calls are bounded.

Each test runs a private FreeSWITCH (the sandbox) with the snippet ``forum-bridge dialplan
freeswitch`` renders, ``forum-bridge run freeswitch`` as a child process, and SIPp phones. The
bridge is stopped (SIGTERM), hung (SIGSTOP: the kernel still accepts the socket hook's connection,
nothing answers) or cut off from its PostgreSQL database. "Answered within 3 s" is SIPp's own
bound: the phone waits at most ``ring_timeout`` = 3 s after its authenticated INVITE for a final
answer and cancels the call otherwise (487), so a 200 or 503 means it came in time.

Log-ons as in ``test_freeswitch_e2e.py``: ``21-desk`` and ``21-soft`` (number 21), ``22-soft``
(number 22) and the unmanaged ``90-trunk``, which plays the outside line. Calls to ``8<number>``
use the snippet's ``forum-bridge-inbound`` lookup; any other number is answered and echoed.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PostgresServer
from tests.e2e.test_freeswitch_e2e import NUMBERS, REJECTED, Installation, by_logon, holders, metrics
from tests.sandbox import SippPhone, free_tcp_port
from tests.sandbox.freeswitch import freeswitch_binary

pytestmark = [pytest.mark.freeswitch, pytest.mark.timeout(600)]

UNAVAILABLE = 503  # no decision from the bridge, fail_mode closed (NORMAL_TEMPORARY_FAILURE)
BOUND = 3.0  # seconds: the bound for an answer with the bridge stopped, hung or without database

# The operator's extension for calls to a call number, as deploy/freeswitch/README.md shows it.
INBOUND_EXTENSION = """<include>
  <extension name="test_call_number">
    <condition field="destination_number" expression="^8(\\d+)$">
      <action application="set" data="forum_bridge_number=$1"/>
      <action application="execute_extension" data="forum-bridge-inbound XML ${context}"/>
      <action application="log" data="INFO test: dial=[${forum_bridge_dial}] result=[${forum_bridge_result}]"/>
      <action application="bridge" data="${forum_bridge_dial}"/>
      <action application="hangup" data="USER_BUSY"/>
    </condition>
  </extension>
</include>
"""


@pytest.fixture(scope="module", autouse=True)
def freeswitch_installed() -> None:
    """Find the FreeSWITCH binary first, so a missing install is reported as such."""
    freeswitch_binary()


@pytest.fixture
def make_installation(tmp_path: Path) -> Iterator[Callable[..., Installation]]:
    """Build, provision and start installations; the bridge is always resumed and stopped after."""
    made: list[Installation] = []

    def build(*, licences: int = 2, start: bool = True, **settings: Any) -> Installation:
        folder = tmp_path / f"install{len(made)}"
        folder.mkdir()
        values = {"emergency.outside_line_prefix": "0", **settings}
        inst = Installation(folder, licences=licences, **values)
        made.append(inst)
        inst.sandbox.start()
        # After the bridge's snippet (files are included in name order), in the phones' context.
        (inst.sandbox.config_dir / "forum_bridge" / "zz_call_numbers.xml").write_text(
            INBOUND_EXTENSION, encoding="utf-8"
        )
        inst.sandbox.reload_dialplan()
        if "database.url" in settings:
            # In child processes, so no pooled connection of this process outlives its database.
            inst.cli_process("db", "upgrade")
            for logon, number in NUMBERS.items():
                inst.cli_process("subscriber", "add", logon, "--number", number)
        else:
            inst.provision()
        if start:
            inst.start_bridge()
        return inst

    yield build
    for inst in made:
        if inst.bridge is not None:
            with contextlib.suppress(ProcessLookupError):
                inst.bridge.send_signal(signal.SIGCONT)
        secret = inst.sandbox.esl_password
        log = inst.log_text()
        inst.close()
        assert secret not in log, "the ESL password appeared in the bridge's log"


@contextlib.contextmanager
def hung(inst: Installation) -> Iterator[None]:
    """The bridge process stopped with SIGSTOP (its sockets still accept), resumed afterwards."""
    assert inst.bridge is not None
    inst.bridge.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        inst.bridge.send_signal(signal.SIGCONT)


def call(phone: SippPhone, number: str) -> int:
    """The final answer to a call, if it came within :data:`BOUND` seconds (else 487: cancelled)."""
    return int(phone.call(number, hold_seconds=0.3, ring_timeout=BOUND))


def never_answered(phone: SippPhone, number: str) -> int:
    """Place a call that must be refused; check that no 200 OK ever reached the phone."""
    result = phone.call(number, hold_seconds=0.3, ring_timeout=BOUND)
    answers = [m.status for m in result.messages if m.direction == "received" and m.status]
    assert 200 not in answers, f"the call to {number} was answered: {answers}"
    return int(result)


def fs_hash(inst: Installation) -> dict[str, str]:
    """FreeSWITCH's mod_hash entries of the bridge's realm."""
    found: dict[str, str] = {}
    for line in inst.sandbox.api("hash_dump db forum_bridge").splitlines():
        if line.startswith("D/forum_bridge_"):
            key, _, value = line[len("D/forum_bridge_") :].partition("/")
            found[key] = value
    return found


def fail_log_on(inst: Installation, logon: str) -> None:
    """A REGISTER with a wrong password (403); wait until the bridge has put the block into FreeSWITCH."""
    assert inst.phone(logon, "wrong-password").register() == 403
    inst.wait_status(lambda s: by_logon(s)[logon]["state"] == "logon_failed")
    deadline = time.monotonic() + 10
    while fs_hash(inst).get(f"blocked_{logon}") != "yes":
        assert time.monotonic() < deadline, f"blocked_{logon} never reached FreeSWITCH: {fs_hash(inst)}"
        time.sleep(0.05)


# --- emergency calls without the bridge ----------------------------------------------------------


def test_emergency_calls_are_answered_with_the_bridge_stopped_and_hung(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    desk, soft = inst.phone("21-desk"), inst.phone("22-soft")
    assert desk.register() == 200 and soft.register() == 200
    assert desk.call("600") == 200  # the only licence: 22-soft is left with emergency calls
    assert call(soft, "112") == 200
    with hung(inst):
        for number in ("112", "0112", "110"):
            assert call(soft, number) == 200, number
            assert call(desk, number) == 200, number
        # Everything else gets its fail-mode answer in time instead of waiting for the phone to give up.
        assert call(desk, "600") == UNAVAILABLE
        assert call(soft, "601") == UNAVAILABLE
    assert call(desk, "602") == 200  # resumed: the hook answers again
    inst.stop_bridge()
    for number in ("112", "0112"):
        assert call(soft, number) == 200, number
    assert call(desk, "603") == UNAVAILABLE  # the socket is refused at once: fail_mode closed


def test_emergency_calls_are_answered_with_the_database_unreachable(
    make_installation: Callable[..., Installation], postgres_server: PostgresServer
) -> None:
    import psycopg

    name = f"fb_fs_emerg_{int(time.time() * 1000)}"
    url = postgres_server.create_database(name)
    inst = make_installation(licences=1, **{"database.url": url})
    desk = inst.phone("21-desk")
    assert desk.register() == 200
    inst.wait_log("logged on logon=21-desk")
    with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as admin:
        # The database goes away under the running bridge: no new connections, the old ones cut.
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            for number in ("112", "0112"):
                assert call(desk, number) == 200, number
            # The hook (and the event side) are up but cannot decide: fail_mode closed, 503.
            assert call(desk, "600") == UNAVAILABLE
            with hung(inst):
                assert call(desk, "112") == 200
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert "cannot decide channel" in inst.log_text() or "socket hook cannot decide" in inst.log_text()


# --- a blocked log-on ---------------------------------------------------------------------------


def test_a_blocked_log_ons_emergency_call_is_refused_before_it_is_answered_even_with_the_bridge_hung(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, soft = inst.phone("21-desk"), inst.phone("22-soft")
    assert desk.register() == 200 and soft.register() == 200
    fail_log_on(inst, "21-desk")
    # The phone with the right password still authenticates its INVITE, but may call nobody.
    assert never_answered(desk, "112") == REJECTED
    assert never_answered(desk, "0112") == REJECTED
    assert never_answered(desk, "600") == REJECTED  # the hook denies everything else
    with hung(inst):
        assert never_answered(desk, "112") == REJECTED  # decided in FreeSWITCH, not by the bridge
        assert call(soft, "112") == 200  # only that log-on is blocked
    # A successful log-on clears the block at once, in FreeSWITCH too.
    assert desk.register() == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    deadline = time.monotonic() + 10
    while "blocked_21-desk" in fs_hash(inst):
        assert time.monotonic() < deadline, "the block was never lifted in FreeSWITCH"
        time.sleep(0.05)
    assert call(desk, "112") == 200


def test_stale_blocks_no_longer_keep_a_phone_from_emergency_numbers(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    desk = inst.phone("21-desk")
    assert desk.register() == 200
    fail_log_on(inst, "21-desk")
    alive = [key for key in fs_hash(inst) if key.startswith("alive_")]
    # Every 100-second bucket from now to now + block_stale_after (300 s): 4 or 5 keys.
    assert 4 <= len(alive) <= 5 and "alive_forever" not in alive
    inst.stop_bridge()
    assert never_answered(desk, "112") == REJECTED  # the bridge is gone, but its word is still fresh
    # What the passing of block_stale_after does: the heartbeat buckets run out.
    for key in alive:
        inst.sandbox.api(f"hash delete/forum_bridge/{key}")
    assert call(desk, "112") == 200
    # The bridge is back and knows the log-on is blocked, but FreeSWITCH lets a call through that it
    # has not been told about (as after its restart): the call may be connected to the emergency
    # service already, so the bridge never cuts it. (Its 30-second self-heal may put the block back
    # between the delete and the call: then try again, a bounded number of times.)
    inst.start_bridge()
    for _attempt in range(3):
        inst.sandbox.api("hash delete/forum_bridge/blocked_21-desk")
        connected = desk.call("112", hold_seconds=2.0, ring_timeout=BOUND)
        if int(connected) != REJECTED:
            break
    assert int(connected) == 200 and not connected.remote_hangup
    inst.wait_log("emergency call channel=")
    # A restarted FreeSWITCH has lost the whole hash; the bridge writes it again when it connects.
    before = inst.log_text().count("resync node=pbx1")
    inst.sandbox.restart()
    inst.wait_log("resync node=pbx1", before + 1, timeout=60)
    deadline = time.monotonic() + 10
    while fs_hash(inst).get("blocked_21-desk") != "yes":
        assert time.monotonic() < deadline, "the block was not written again after the restart"
        time.sleep(0.05)
    # The registration went with the restart; the phone's INVITE still authenticates, and is refused.
    assert never_answered(desk, "112") == REJECTED


# --- other calls with the bridge hung -----------------------------------------------------------


def test_with_fail_mode_open_other_calls_go_on_in_time_with_the_bridge_hung(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1, **{"freeswitch.fail_mode": "open"})
    desk = inst.phone("21-desk")
    assert desk.register() == 200
    with hung(inst):
        assert call(desk, "600") == 200
        assert call(desk, "112") == 200


# --- received calls -------------------------------------------------------------------------------


def test_a_phone_without_a_licence_is_never_rung(make_installation: Callable[..., Installation]) -> None:
    inst = make_installation(licences=1)
    trunk, desk, soft = inst.phone("90-trunk"), inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (trunk, desk, soft):
        assert phone.register() == 200
    assert soft.call("600") == 200  # 22-soft takes the only licence
    ringing = desk.start_uas(timeout=20)
    try:
        result = trunk.call("821", hold_seconds=0.3, ring_timeout=10)
    finally:
        seen = ringing.stop()
    assert int(result) >= 400, result
    invites = [m for m in seen.messages if m.method == "INVITE" and m.is_request]
    assert invites == [], "21-desk's phone was sent an INVITE although it may not have a licence"
    assert holders(inst.status()) == ["22-soft"]
    assert "test: dial=[] result=[deny]" in inst.sandbox.log_path.read_text(errors="replace")


def test_a_phone_that_may_have_a_licence_is_rung_and_takes_it(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    trunk, soft = inst.phone("90-trunk"), inst.phone("22-soft")
    assert trunk.register() == 200 and soft.register() == 200
    ringing = soft.start_uas(timeout=20)
    try:
        assert trunk.call("822", hold_seconds=0.5, ring_timeout=10) == 200
    finally:
        answered = ringing.stop()
    assert int(answered) == 200
    assert holders(inst.status()) == ["22-soft"]


def test_a_received_call_with_the_bridge_hung_rings_nobody_in_time(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2, **{"freeswitch.fail_mode": "open"})
    trunk, soft = inst.phone("90-trunk"), inst.phone("22-soft")
    assert trunk.register() == 200 and soft.register() == 200
    ringing = soft.start_uas(timeout=20)
    try:
        with hung(inst):
            # The trunk's own leg goes on (fail_mode open), the lookup gives up: nobody to ring.
            result = trunk.call("822", hold_seconds=0.3, ring_timeout=2 * BOUND)
    finally:
        seen = ringing.stop()
    assert 400 <= int(result) < 500, result  # refused in time (USER_BUSY here), not cancelled (487)
    assert int(result) != 487
    assert [m for m in seen.messages if m.method == "INVITE" and m.is_request] == []
    assert "test: dial=[] result=[error]" in inst.sandbox.log_path.read_text(errors="replace")


# --- the module check ---------------------------------------------------------------------------


def test_the_bridge_names_a_missing_module_and_metrics_show_it(
    make_installation: Callable[..., Installation],
) -> None:
    web = free_tcp_port()
    inst = make_installation(**{"web.enabled": True, "web.port": web})
    inst.wait_log("FreeSWITCH has every module the dialplan needs")
    page = metrics(web)
    assert 'forum_bridge_pbx_module_missing{module="mod_hash",pbx="freeswitch"} 0.0' in page
    inst.stop_bridge()
    assert "+OK" in inst.sandbox.api("unload mod_hash")
    inst.start_bridge()
    inst.wait_log("FreeSWITCH lacks mod_hash, which the forum_bridge dialplan needs")
    page = metrics(web)
    assert 'forum_bridge_pbx_module_missing{module="mod_hash",pbx="freeswitch"} 1.0' in page
    assert 'forum_bridge_pbx_module_missing{module="mod_dptools",pbx="freeswitch"} 0.0' in page
    # Without mod_hash nobody is blocked from emergency numbers, and the bridge keeps running.
    desk = inst.phone("21-desk")
    assert desk.register() == 200
    assert call(desk, "112") == 200
    assert inst.bridge is not None and inst.bridge.poll() is None
