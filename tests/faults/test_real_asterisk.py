"""Faults against the real sandbox Asterisk 22 and SIPp phones.

The bridge is killed with SIGKILL after a call took a licence; while it is dead a phone
unregisters and Asterisk itself restarts. The restarted bridge must equal what Asterisk shows,
with a consistent database, and keep deciding calls.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from tests.e2e.test_asterisk_e2e import Installation, by_logon, holders, make_installation, sandbox_root
from tests.faults.test_kill9 import consistent

__all__ = ["make_installation", "sandbox_root"]  # fixtures, re-used

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(600)]


def test_kill_9_of_the_bridge_and_an_asterisk_restart_while_it_is_dead(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, soft = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, soft):
        assert phone.register() == 200
    inst.wait_status(lambda s: sum(v["state"] == "logged_on" for v in s["subscribers"]) == 2)
    assert desk.call("600") == 200
    assert holders(inst.status()) == ["21-desk"]
    url = f"sqlite:///{inst.tmp / 'bridge.db'}"
    audit_before, _states, _holders = consistent(url)

    assert inst.bridge is not None
    inst.bridge.send_signal(signal.SIGKILL)
    assert inst.bridge.wait(timeout=10) == -signal.SIGKILL
    inst.bridge = None
    if inst._log is not None:
        inst._log.close()
        inst._log = None
    assert desk.unregister() == 200  # nobody tells the bridge
    inst.sandbox.restart()  # and Asterisk restarts meanwhile (it keeps 22-soft's contact)

    inst.start_bridge()
    status = inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_off")
    assert by_logon(status)["22-soft"]["state"] == "logged_on"
    assert holders(status) == []
    audit, _states, _holders = consistent(url)
    assert audit[: len(audit_before)] == audit_before
    assert soft.call("600") == 200  # the hook answers for the restarted Asterisk
    assert holders(inst.status()) == ["22-soft"]
    assert desk.call("600") != 200  # 21-desk is logged off now
