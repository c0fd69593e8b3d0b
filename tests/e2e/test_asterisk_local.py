"""End to end: the dialplan answers a licensed log-on's call by itself (real Asterisk 22, SIPp).

With ``asterisk.enforce = both`` the bridge keeps ``forum-bridge/licensed/<log-on>`` in AstDB and
the outbound routine lets those log-ons' calls through without a FastAGI connection. What the
hook was asked is counted from the bridge's DEBUG log: the hook writes one
``hook outbound channel=...`` line per question. The AMI side still decides every call (one
``decision`` line each), which is what makes the local answer safe.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.e2e.installation import by_logon, holders, installations
from tests.e2e.test_asterisk_e2e import Installation
from tests.sandbox import build_root
from tests.sandbox.sipp import SippPhone

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(600)]


@pytest.fixture(scope="module", autouse=True)
def sandbox_root() -> None:
    """Build (or find the cached) chroot first, so a build failure is reported as such."""
    build_root()


@pytest.fixture
def make_installation(tmp_path: Path) -> Iterator[Callable[..., Installation]]:
    """Build, provision and start installations for one test."""
    yield from installations(tmp_path, Installation)


def astdb(inst: Installation, family: str) -> set[str]:
    """The keys of ``family`` as Asterisk's own ``database show`` (the same LIKE match as DBGetTree) lists them."""
    prefix = f"/{family}/"
    keys = set()
    for line in inst.sandbox.cli(f"database show {family}").splitlines():
        key = line.split(" : ", 1)[0].strip()
        if " : " in line:
            assert key.startswith(prefix), f"{family} listed a key of another family: {line!r}"
            keys.add(key[len(prefix) :])
    return keys


def wait_astdb(inst: Installation, family: str, wanted: set[str]) -> None:
    wait_until(lambda: astdb(inst, family) == wanted, 10, f"{family} to hold {sorted(wanted)}")


def licensed_desk(inst: Installation) -> SippPhone:
    """21-desk registered, its first call taken its licence, and AstDB told so."""
    desk = inst.phone("21-desk")
    assert desk.register() == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    assert desk.call("600") == 200
    wait_astdb(inst, "forum-bridge/licensed", {"21-desk"})
    return desk


def asked(inst: Installation, logon: str) -> int:
    """How many outbound questions the FastAGI hook answered for ``logon``'s channels."""
    return inst.log_text().count(f"hook outbound channel=PJSIP/{logon}-")


def decision(inst: Installation, logon: str, number: str) -> str:
    """The one decision line of ``logon``'s call to ``number`` (waited for)."""
    inst.wait_log(f"decision logon={logon} number={number} ")
    lines = re.findall(rf"^.*decision logon={re.escape(logon)} number={number} .*$", inst.log_text(), re.M)
    assert len(lines) == 1, lines
    return lines[0]


def test_a_licensed_log_on_is_answered_by_the_dialplan_and_the_others_still_ask_the_hook(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2, **{"log.level": "DEBUG"})
    desk, other, trunk = inst.phone("21-desk"), inst.phone("22-soft"), inst.phone("90-trunk")
    for phone in (desk, other, trunk):
        assert phone.register() == 200
    inst.wait_status(lambda s: all(by_logon(s)[x]["state"] == "logged_on" for x in ("21-desk", "22-soft")))
    assert astdb(inst, "forum-bridge/licensed") == set()

    # Without a licence the call asks the hook, which takes one; Asterisk learns of it at once.
    assert desk.call("600") == 200
    assert asked(inst, "21-desk") == 1
    assert "reason=licence_acquired" in decision(inst, "21-desk", "600")
    assert holders(inst.status()) == ["21-desk"]
    wait_astdb(inst, "forum-bridge/licensed", {"21-desk"})

    # The next calls of the licensed log-on: no FastAGI connection, still decided once over AMI.
    for number in ("601", "602"):
        assert desk.call(number) == 200
        assert "result=allowed reason=licensed" in decision(inst, "21-desk", number)
    assert asked(inst, "21-desk") == 1

    # An unmanaged endpoint (the trunk) never holds a licence: the hook answers each of its calls.
    assert trunk.call("600") == 200
    assert trunk.call("601") == 200
    assert asked(inst, "90-trunk") == 2

    # Freed by the log-off: the entry goes, and the next call (after a new log-on) asks again.
    assert desk.unregister() == 200
    wait_astdb(inst, "forum-bridge/licensed", set())
    assert holders(inst.status()) == []
    assert desk.register() == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    assert desk.call("603") == 200
    assert asked(inst, "21-desk") == 2
    assert "reason=licence_acquired" in decision(inst, "21-desk", "603")
    wait_astdb(inst, "forum-bridge/licensed", {"21-desk"})

    # A blocked log-on is refused before anything else, its licence freed by the failed log-on.
    assert other.call("600") == 200
    wait_astdb(inst, "forum-bridge/licensed", {"21-desk", "22-soft"})
    asked_before = asked(inst, "22-soft")
    assert inst.phone("22-soft", password="wrong-password").register() == 401
    wait_astdb(inst, "forum-bridge/blocked", {"22-soft"})
    wait_astdb(inst, "forum-bridge/licensed", {"21-desk"})  # the two families never mix
    assert other.call("601") == 403
    assert other.call("112") == 403  # blocked: no call at all, 112 included
    assert asked(inst, "22-soft") == asked_before  # refused by the dialplan alone
    assert holders(inst.status()) == ["21-desk"]


def test_a_call_right_after_the_log_off_is_refused_or_hung_up(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    desk = licensed_desk(inst)
    # No wait between the two: the entry may still be in AstDB when the INVITE arrives.
    assert desk.unregister() == 200
    result = desk.call("601", hold_seconds=5)
    line = decision(inst, "21-desk", "601")
    assert "result=denied reason=not_logged_on" in line
    if result == 200:
        # Let through by the dialplan before AstDB heard of the log-off: the AMI side hangs it up.
        assert result.remote_hangup
        inst.wait_log("hung up channel=PJSIP/21-desk-")
    else:
        assert result == 403  # the entry was gone already: the hook refused
    assert holders(inst.status()) == []


def test_a_stopped_bridge_withdraws_the_local_answer_and_a_hung_one_loses_it_with_the_heartbeat(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    desk = licensed_desk(inst)
    # Hung (SIGSTOP): nothing decides over AMI, but the heartbeat is fresh, so the dialplan answers.
    assert inst.bridge is not None
    inst.bridge.send_signal(signal.SIGSTOP)
    try:
        assert desk.call("601") == 200
        # Once the heartbeat is older than the bound (90 s), the hook and its fail mode decide.
        beat = inst.sandbox.cli("database get forum-bridge heartbeat")
        inst.sandbox.cli("database put forum-bridge heartbeat 1000000000")
        assert desk.call("602") == 503  # fail_mode = closed: the hung hook did not answer in time
        assert desk.call("112") == 200
        inst.sandbox.cli(f"database put forum-bridge heartbeat {beat.split()[-1]}")
    finally:
        inst.bridge.send_signal(signal.SIGCONT)
    # Stopped cleanly: the bridge deletes the licensed entries on its way out; every call asks.
    inst.stop_bridge()
    assert astdb(inst, "forum-bridge/licensed") == set()
    inst.wait_log("licensed log-ons withdrawn from Asterisk")
    assert desk.call("603") == 503
    assert desk.call("112") == 200
