"""Faults against the real FreeSWITCH 1.10 and SIPp phones, with ``forum-bridge run freeswitch``.

The FreeSWITCH counterpart of ``test_real_asterisk.py``: FreeSWITCH restarted while phones are
registered and a call is up, and the bridge's event-socket connection cut (``ss -K``, as a
firewall or a crashing middlebox would) during calls, while a phone logs off unseen. Afterwards
the bridge must equal what FreeSWITCH shows: the same log-ons logged on, no licence leaked or held
twice, the database consistent with its audit log, no call left behind, the blocked log-ons back
in mod_hash (a restart empties it), and calls decided again.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from forum_bridge.adapters.freeswitch.events import parse_sofia_registrations
from tests.e2e.test_freeswitch_e2e import (
    NUMBERS,
    REJECTED,
    Installation,
    by_logon,
    freeswitch_installed,
    holders,
    make_installation,
)
from tests.e2e.test_freeswitch_emergency import fail_log_on, fs_hash
from tests.faults.test_kill9 import consistent

__all__ = ["freeswitch_installed", "make_installation"]  # fixtures, re-used

pytestmark = [pytest.mark.freeswitch, pytest.mark.timeout(600)]


def registered_in_freeswitch(inst: Installation) -> set[str]:
    """The managed log-ons FreeSWITCH holds a live registration of (sofia's own table)."""
    answer = inst.sandbox.api(f"sofia xmlstatus profile {inst.sandbox.profile} reg")
    return {r.logon for r in parse_sofia_registrations(answer)} & set(NUMBERS)


def logged_on(status: dict[str, Any]) -> set[str]:
    return {logon for logon, s in by_logon(status).items() if s["state"] == "logged_on"}


def equals_freeswitch(inst: Installation) -> dict[str, Any]:
    """Wait until the bridge's log-ons are FreeSWITCH's and no call is left; check the invariants."""
    deadline = time.monotonic() + 30
    while True:
        status = inst.status()
        expected = registered_in_freeswitch(inst)
        if logged_on(status) == expected and not status["calls"]:
            break
        assert time.monotonic() < deadline, (expected, logged_on(status), status["calls"])
        time.sleep(0.2)
    held = holders(status)
    assert len(held) == len(set(held)), held  # no log-on holds two licences
    assert set(held) <= expected, (held, expected)  # a logged-off log-on holds none
    consistent(f"sqlite:///{inst.tmp / 'bridge.db'}")  # licence rows agree with the audit log
    return status


def kill_esl_connections(port: int) -> None:
    """Destroy the bridge's TCP connection to the event socket (both ends see it reset)."""
    ss = shutil.which("ss")
    assert ss is not None, "ss (iproute2) is needed to cut the connection"
    done = subprocess.run(
        [ss, "-K", "-tn", f"dport = :{port}"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "ESTAB" in done.stdout, f"no connection to the event socket was cut: {done.stdout}"


def test_freeswitch_restarted_with_phones_registered_and_a_call_up(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, other = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, other):
        assert phone.register() == 200
    inst.wait_status(lambda s: logged_on(s) == {"21-desk", "22-soft"})
    fail_log_on(inst, "21-soft")  # blocked from every call, 112 included, through mod_hash
    assert desk.call("600") == 200
    running = other.start_call("601", hold_seconds=30)  # still up when FreeSWITCH goes
    inst.wait_status(lambda s: holders(s) == ["21-desk", "22-soft"])

    resyncs = inst.log_text().count("resync node=pbx1")
    inst.sandbox.restart()
    inst.wait_log("is back", 1, timeout=60)
    inst.wait_log("resync node=pbx1", resyncs + 1, timeout=60)
    running.stop()

    log = inst.log_text()
    assert log.count("went away") == 1 and log.count("is back") == 1  # once each, not per attempt
    status = equals_freeswitch(inst)
    assert by_logon(status)["21-soft"]["state"] == "logon_failed"
    # The restart emptied mod_hash; the bridge wrote the block and its heartbeat again.
    deadline = time.monotonic() + 10
    while fs_hash(inst).get("blocked_21-soft") != "yes":
        assert time.monotonic() < deadline, f"the block was not written again: {fs_hash(inst)}"
        time.sleep(0.05)
    assert any(key.startswith("alive_") for key in fs_hash(inst))
    blocked = inst.phone("21-soft")  # the right password now, but it has not logged on again
    assert int(blocked.call("112", hold_seconds=0.3)) == REJECTED
    # Calls are decided for the new FreeSWITCH; a phone it still holds keeps its one licence.
    if "21-desk" in registered_in_freeswitch(inst):
        assert desk.call("602") == 200
    else:
        assert desk.register() == 200
        assert desk.call("602") == 200
    final = equals_freeswitch(inst)
    assert "21-desk" in holders(final)
    assert "Traceback" not in inst.log_text()


def test_the_event_socket_cut_during_calls_while_a_phone_logs_off_unseen(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, soft, other = inst.phone("21-desk"), inst.phone("21-soft"), inst.phone("22-soft")
    for phone in (desk, soft, other):
        assert phone.register() == 200
    inst.wait_status(lambda s: logged_on(s) == {"21-desk", "21-soft", "22-soft"})
    first = desk.start_call("600", hold_seconds=4)
    second = other.start_call("601", hold_seconds=4)
    inst.wait_status(lambda s: holders(s) == ["21-desk", "22-soft"] and len(s["calls"]) == 2)

    kill_esl_connections(inst.sandbox.esl_port)
    assert soft.unregister() == 200  # its event may fall into the gap; the resync must see it
    inst.wait_log("went away", 1)
    inst.wait_log("is back", 1, timeout=60)
    assert int(first.wait(timeout=30)) == 200 and int(second.wait(timeout=30)) == 200
    status = equals_freeswitch(inst)  # the calls ended, whether or not their hang-ups were seen
    assert by_logon(status)["21-soft"]["state"] == "logged_off"
    assert holders(status) == ["21-desk", "22-soft"]
    # Events flow on the new connection: a log-off frees its licence at once, a call takes one.
    assert desk.unregister() == 200
    inst.wait_status(lambda s: holders(s) == ["22-soft"])
    assert soft.register() == 200
    inst.wait_status(lambda s: "21-soft" in logged_on(s))
    assert soft.call("602") == 200
    final = equals_freeswitch(inst)
    assert holders(final) == ["21-soft", "22-soft"]
    log = inst.log_text()
    assert log.count("went away") == 1 and log.count("is back") == 1
    assert "Traceback" not in log
