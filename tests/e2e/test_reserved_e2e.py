"""End to end with a real Asterisk 22 and SIPp phones: a reserved licence and the pool warning.

Same installation as ``test_asterisk_e2e`` (the bridge as a child process, set up with the
``forum-bridge`` command): two licences, ``22-soft`` reserved, so ``21-desk`` and ``21-soft`` share
a floating pool of one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.e2e.test_asterisk_e2e import (  # noqa: F401 - fixtures used by name
    Installation,
    by_logon,
    holders,
    make_installation,
    sandbox_root,
)

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(600)]


def test_a_reserved_phone_calls_when_the_floating_pool_is_full_and_keeps_its_licence_to_itself(
    make_installation: Callable[..., Installation],  # noqa: F811
) -> None:
    inst = make_installation(licences=2, start=False)
    assert "licence reserved for 22-soft" in inst.cli("subscriber", "reserve", "22-soft")
    inst.start_bridge()
    desk, soft, reserved = inst.phone("21-desk"), inst.phone("21-soft"), inst.phone("22-soft")
    for phone in (desk, soft, reserved):
        assert phone.register() == 200
    inst.wait_status(lambda s: all(v["state"] == "logged_on" for v in s["subscribers"]))
    assert desk.call("600") == 200  # takes the one floating licence
    inst.wait_log("licence pool above warn_at used=1 floating=1 percent=100 warn_at=80 reserved=1")
    assert soft.call("600") == 403  # a licence is unheld, but it is 22-soft's
    assert soft.call("112") == 200
    assert reserved.call("600") == 200  # its first connection, with every floating licence held
    status = inst.status()
    assert status["licences"] == {"total": 2, "used": 2, "free": 0, "reserved": 1}
    assert holders(status) == ["21-desk", "22-soft"]
    assert by_logon(status)["22-soft"]["reserved"] is True
    assert by_logon(status)["21-desk"]["reserved"] is False
    # Log-off frees it at once, and nobody else may take it.
    assert reserved.unregister() == 200
    inst.wait_status(lambda s: holders(s) == ["21-desk"], timeout=5)
    assert soft.call("600") == 403
    assert reserved.register() == 200
    inst.wait_status(lambda s: by_logon(s)["22-soft"]["state"] == "logged_on")
    assert reserved.call("600") == 200
    assert holders(inst.status()) == ["21-desk", "22-soft"]
    assert inst.log_text().count("licence pool above warn_at") == 1  # one line, however many calls
    inst.stop_bridge()
