"""End to end: the bridge as administrators run it, a real Asterisk 22, real SIP phones (SIPp).

Each test builds its own installation: a private Asterisk from the sandbox with the bridge's
rendered ``forum_bridge.conf`` included, a TOML configuration, a SQLite database set up with the
``forum-bridge`` command, and ``forum-bridge run asterisk`` as a child process. State is read
with ``forum-bridge status --json``. Nothing is skipped: if Asterisk cannot be built or started,
the tests fail and say why.

Endpoints: ``21-desk`` and ``21-soft`` share call number 21, ``22-soft`` has number 22, and
``90-trunk`` is not a subscriber (unmanaged); it plays the outside line. The sandbox's dialplan
sends ``7<number>`` to ``forum-bridge-inbound`` (then ``Dial`` or ``Hangup(21)``), anything else
through ``forum-bridge-outbound`` to ``Answer()``/``Echo()``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forum_bridge.adapters.asterisk.dialplan import render_dialplan
from forum_bridge.config import load_settings
from tests.conftest import wait_until
from tests.e2e.installation import (
    PASSWORDS,
    ROOT,
    acquisitions,
    by_logon,
    holders,
    installations,
    metrics,
)
from tests.e2e.installation import Installation as BaseInstallation
from tests.sandbox import AsteriskSandbox, build_root, free_tcp_port

__all__ = ["acquisitions", "by_logon", "holders", "metrics"]  # used here and by the other e2e modules

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(600)]

AMI_ONLY_SNIPPET = """\
; No hook: the outbound routine only waits, so that enforcement over AMI is all there is.
[forum-bridge-outbound]
exten => s,1,Wait(3)
 same => n,Return()

[forum-bridge-inbound]
exten => s,1,Return()
"""


class Installation(BaseInstallation):
    """One Asterisk, one bridge configuration and database, the bridge process, the phones."""

    pbx = "asterisk"
    snippet_name = "forum_bridge.conf"
    secret_name = "AMI secret"

    def __init__(self, tmp: Path, *, licences: int, **settings: Any) -> None:
        self.agi_port = free_tcp_port()
        defaults = {
            "asterisk.agi_port": self.agi_port,
            "asterisk.fail_mode": "closed",
            "asterisk.enforce": "both",
            "asterisk.reconnect_max": 1.0,
        }
        super().__init__(tmp, licences=licences, **{**defaults, **settings})

    def make_sandbox(self) -> AsteriskSandbox:
        """A private Asterisk that includes the snippet and knows every phone."""
        return AsteriskSandbox(
            agi_port=self.agi_port, dialplan_snippet=self.snippet, endpoints=sorted(PASSWORDS.items())
        )

    def connection(self) -> dict[str, Any]:
        """The AMI port and secret of the sandbox."""
        if self.sandbox is None:
            return {"ami_port": 1, "ami_secret": "not-yet"}
        return {"ami_port": self.sandbox.ami_port, "ami_secret": self.sandbox.ami_secret}

    @property
    def secret(self) -> str:
        """The AMI secret."""
        return str(self.sandbox.ami_secret)

    def ready_lines(self) -> list[str]:
        """The hook listens."""
        return ["FastAGI hook listening"]


@pytest.fixture(scope="module", autouse=True)
def sandbox_root() -> None:
    """Build (or find the cached) chroot first, so a build failure is reported as such."""
    build_root()


@pytest.fixture
def make_installation(tmp_path: Path) -> Iterator[Callable[..., Installation]]:
    """Build, provision and (unless ``start=False``) start installations for one test."""
    yield from installations(tmp_path, Installation)


# --- the tests ----------------------------------------------------------------------------------


def test_licences_are_taken_by_calls_not_by_registration_and_a_full_pool_allows_only_emergency(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    desk, soft = inst.phone("21-desk"), inst.phone("22-soft")
    assert desk.register() == 200
    status = inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    assert status["licences"]["used"] == 0  # log-on alone takes no licence
    assert desk.call("600") == 200  # the first call takes the only licence
    status = inst.status()
    assert holders(status) == ["21-desk"]
    assert desk.register() == 200  # a refresh
    assert desk.call("601") == 200  # a second call keeps the same licence
    assert holders(inst.status()) == ["21-desk"]
    assert acquisitions(inst) == [("21-desk", "600")]
    # Seen over AMI and asked by the dialplan: decided (and logged) once all the same.
    assert inst.log_text().count("decision logon=21-desk number=600 ") == 1
    # 22-soft registers although no licence is free: the technical log-on always succeeds.
    assert soft.register() == 200
    status = inst.wait_status(lambda s: by_logon(s)["22-soft"]["state"] == "logged_on")
    assert status["licences"]["free"] == 0
    assert by_logon(status)["22-soft"]["licensed"] is False
    assert soft.call("600") == 403  # no licence: emergency calls only
    assert soft.call("112") == 200
    status = inst.status()
    assert holders(status) == ["21-desk"]
    denied = [a for a in json.loads(inst.cli("audit", "--json")) if a["kind"] == "deny"]
    assert [(d["logon"], d["number"], d["reason"]) for d in denied] == [("22-soft", "600", "emergency_only")]


def test_two_log_ons_of_one_call_number_take_two_licences_and_both_ring(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, soft, trunk = inst.phone("21-desk"), inst.phone("21-soft"), inst.phone("90-trunk")
    for phone in (desk, soft, trunk):
        assert phone.register() == 200
    inst.wait_status(lambda s: all(by_logon(s)[x]["state"] == "logged_on" for x in ("21-desk", "21-soft")))
    # A call from outside to number 21 rings both of its log-ons; the first to answer gets it.
    # The desk picks up after a second, as a person would: answered at once, the PBX's CANCEL to the
    # other device can reach SIPp together with the INVITE, before it rang, which SIPp aborts on.
    with (
        desk.start_uas(timeout=30, ring_seconds=1) as desk_rings,
        soft.start_uas(timeout=30, ring_seconds=5) as soft_rings,
    ):
        assert trunk.call("721", hold_seconds=1) == 200
        assert desk_rings.wait(timeout=30) == 200
        soft_result = soft_rings.wait(timeout=30)
    assert soft_result == 487 and soft_result.cancelled  # it rang, then the PBX cancelled it
    status = inst.status()
    assert holders(status) == ["21-desk", "21-soft"]
    assert status["licences"]["free"] == 0
    assert by_logon(status)["22-soft"]["licensed"] is False
    assert "90-trunk" in [u["logon"] for u in status["unmanaged"]]


def test_an_inbound_call_rings_only_log_ons_that_can_get_a_licence(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    desk, soft, other, trunk = (inst.phone(x) for x in ("21-desk", "21-soft", "22-soft", "90-trunk"))
    for phone in (desk, soft, other, trunk):
        assert phone.register() == 200
    inst.wait_status(lambda s: all(v["state"] == "logged_on" for v in s["subscribers"]))
    assert other.call("600") == 200  # 22-soft holds the only licence now
    assert trunk.call("721") == 403  # nobody of number 21 may ring: the dialplan rejects
    inst.cli_process("licences", "reset", "--yes")
    with desk.start_uas(timeout=30) as desk_rings:
        assert trunk.call("721") == 200
        assert desk_rings.wait(timeout=30) == 200
    assert holders(inst.status()) == ["21-desk"]  # 21-desk took the licence; 21-soft never rang


def test_a_wrong_password_or_an_unknown_user_cannot_call_at_all(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    impostor = inst.phone("21-desk", password="wrong-password")
    assert impostor.register() == 401
    status = inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logon_failed")
    failure = status["failed_logons"][0]
    assert (failure["logon"], failure["reason"]) == ("21-desk", "wrong_password")
    assert failure["source"] == f"127.0.0.1:{impostor.local_port}"
    # Asterisk itself refuses the phone's calls (401 to the INVITE's digest), 112 included.
    assert impostor.call("112") == 401
    assert impostor.call("600") == 401
    nobody = inst.phone("99-nobody", password="whatever")
    assert nobody.register() == 401
    status = inst.wait_status(lambda s: any(f["logon"] == "99-nobody" for f in s["failed_logons"]))
    unknown = next(f for f in status["failed_logons"] if f["logon"] == "99-nobody")
    assert unknown["reason"] == "unknown_user"
    assert status["licences"]["used"] == 0
    # The right password logs on again and clears the failure.
    assert inst.phone("21-desk").register() == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")


def test_unregister_frees_the_licence_at_once(make_installation: Callable[..., Installation]) -> None:
    inst = make_installation(licences=1)
    desk = inst.phone("21-desk")
    assert desk.register() == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    assert desk.call("600") == 200
    assert holders(inst.status()) == ["21-desk"]
    began = time.monotonic()
    assert desk.unregister() == 200
    status = inst.wait_status(lambda s: s["licences"]["used"] == 0, timeout=5)
    assert time.monotonic() - began < 5
    assert by_logon(status)["21-desk"]["state"] == "logged_off"


def test_a_missed_keepalive_frees_the_licence_after_the_profile_interval(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1, profile="fast")  # keepalive 5 s, grace 1 s
    desk = inst.phone("21-desk")
    assert desk.register(expires=120) == 200  # Asterisk keeps it; the phone just never refreshes
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    assert desk.call("600", hold_seconds=0.5) == 200
    answered = time.monotonic()
    assert holders(inst.status()) == ["21-desk"]
    status = inst.wait_status(lambda s: s["licences"]["used"] == 0, timeout=15)
    assert time.monotonic() - answered >= 4.0  # not before keepalive + grace after the INVITE
    assert by_logon(status)["21-desk"]["state"] == "logged_off"
    inst.wait_log("missed keepalive logon=21-desk")
    releases = [a for a in json.loads(inst.cli("audit", "--json")) if a["kind"] == "release"]
    assert [(r["logon"], r["reason"]) for r in releases] == [("21-desk", "keepalive")]


def test_reset_frees_every_licence_and_the_next_call_takes_one_again(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, other = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, other):
        assert phone.register() == 200
    inst.wait_status(lambda s: sum(v["state"] == "logged_on" for v in s["subscribers"]) == 2)
    assert desk.call("600") == 200
    assert other.call("600") == 200
    assert inst.status()["licences"]["used"] == 2
    out = inst.cli_process("licences", "reset", "--yes")
    assert "2" in out
    status = inst.status()
    assert status["licences"]["used"] == 0
    assert all(v["state"] == "logged_on" for v in by_logon(status).values() if v["logon"] != "21-soft")
    assert other.call("600") == 200
    assert holders(inst.status()) == ["22-soft"]


def test_a_phone_that_unregistered_while_the_bridge_was_stopped_is_freed_by_the_resync(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, other = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, other):
        assert phone.register() == 200
    inst.wait_status(lambda s: sum(v["state"] == "logged_on" for v in s["subscribers"]) == 2)
    assert desk.call("600") == 200 and other.call("600") == 200
    inst.stop_bridge()
    assert desk.unregister() == 200  # nobody tells the bridge
    assert holders(inst.status()) == ["21-desk", "22-soft"]
    inst.start_bridge()  # returns after the login resync
    status = inst.status()
    assert holders(status) == ["22-soft"]
    assert by_logon(status)["21-desk"]["state"] == "logged_off"
    assert by_logon(status)["22-soft"]["state"] == "logged_on"


def test_the_bridge_reconnects_and_resyncs_when_asterisk_restarts(
    make_installation: Callable[..., Installation],
) -> None:
    web_port = free_tcp_port()
    inst = make_installation(licences=1, **{"web.enabled": True, "web.port": web_port})
    desk = inst.phone("21-desk")
    assert desk.register() == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    assert desk.call("600") == 200
    connected = 'forum_bridge_pbx_connected{pbx="asterisk"}'
    assert f"{connected} 1.0" in metrics(web_port)
    inst.sandbox.stop()
    inst.wait_log("lost Asterisk AMI", 1)
    wait_until(lambda: f"{connected} 0.0" in metrics(web_port), 15, "the metric to show the PBX down")
    inst.sandbox.start()
    inst.wait_log("is back", 1)
    wait_until(lambda: f"{connected} 1.0" in metrics(web_port), 15, "the metric to show the PBX up again")
    lag_count = next(
        line
        for line in metrics(web_port).splitlines()
        if line.startswith("forum_bridge_event_lag_seconds_count")
    )
    assert float(lag_count.split()[1]) > 0  # from the EventTV of security events
    inst.wait_log("resync node=pbx1", 2)
    log = inst.log_text()
    assert log.count("lost Asterisk AMI") == 1
    assert log.count("is back") == 1
    assert "level=error" not in log  # a login refused during the shutdown is no credentials problem
    # Asterisk kept the registration over its restart (astdb): the resync keeps the log-on.
    status = inst.status()
    assert by_logon(status)["21-desk"]["state"] == "logged_on"
    assert holders(status) == ["21-desk"]
    assert desk.call("601") == 200  # the hook answers for the new Asterisk too
    assert desk.unregister() == 200  # and events flow on the new session
    inst.wait_status(lambda s: s["licences"]["used"] == 0, timeout=5)


def test_with_the_bridge_stopped_emergency_calls_still_pass_and_others_follow_the_fail_mode(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    other = inst.phone("22-soft")
    assert other.register() == 200
    inst.wait_status(lambda s: by_logon(s)["22-soft"]["state"] == "logged_on")
    inst.stop_bridge()
    assert other.call("112") == 200
    assert other.call("600") == 503  # fail_mode closed: Hangup(34), "the bridge could not be asked"
    settings = load_settings(inst.config, environ={}, overrides={"asterisk.fail_mode": "open"})
    inst.sandbox.reload_dialplan(render_dialplan(settings))
    assert other.call("600") == 200


def sample_ami_user() -> dict[str, list[str]]:
    """The privileges of the AMI user in deploy/asterisk/manager.conf.sample."""
    section = (ROOT / "deploy" / "asterisk" / "manager.conf.sample").read_text().split("[forumbridge]", 1)[1]
    options: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.strip() and not line.lstrip().startswith(";") and "=" in line:
            name = line.split("=", 1)[0].strip()
            options.setdefault(name, []).append(line.strip())
    return options


def test_enforcement_over_ami_alone_with_the_sample_least_privilege_user(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1, start=False, **{"asterisk.enforce": "ami"})
    sample = sample_ami_user()
    assert sample["read"] == ["read = system,call,security"] and sample["write"] == ["write = system"]
    manager = inst.sandbox.config_dir / "manager.conf"
    lines = []
    for line in manager.read_text().splitlines():
        name = line.split("=", 1)[0].strip()
        if name in ("read", "write", "writetimeout"):
            lines.extend(sample[name])
            if name == "write":
                lines.extend(sample["eventfilter(action(exclude),name(ChallengeSent))"])
        else:
            lines.append(line)
    manager.write_text("\n".join(lines) + "\n")
    inst.sandbox.cli("manager reload")
    assert "write perm: system\n" in inst.sandbox.cli(f"manager show user {inst.sandbox.ami_username}")
    inst.sandbox.reload_dialplan(AMI_ONLY_SNIPPET)
    inst.start_bridge()  # logged in and resynced (PJSIPShowContacts, CoreShowChannels) as that user
    desk, other = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, other):
        assert phone.register() == 200
    inst.wait_status(lambda s: sum(v["state"] == "logged_on" for v in s["subscribers"]) == 2)
    assert desk.call("600") == 200
    assert holders(inst.status()) == ["21-desk"]
    assert other.call("600") == 403  # AMI Hangup with cause 21 while the dialplan waits
    assert other.call("112") == 200
    inst.wait_log("hung up channel=PJSIP/22-soft-")
    assert inst.log_text().count("hung up channel=") == 1
    assert "Permission denied" not in inst.log_text()


def test_the_sample_extensions_conf_connects_an_internal_call(
    make_installation: Callable[..., Installation],
) -> None:
    """deploy/asterisk/extensions.conf.sample on a real Asterisk: 21-desk calls number 22."""
    inst = make_installation(licences=2)
    sample = (ROOT / "deploy" / "asterisk" / "extensions.conf.sample").read_text()
    sample = sample.replace("agi://127.0.0.1:4573", f"agi://127.0.0.1:{inst.agi_port}")
    (inst.sandbox.config_dir / "extensions.conf").write_text(sample)
    inst.sandbox.reload_dialplan()
    desk, other = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, other):
        assert phone.register() == 200
    inst.wait_status(lambda s: sum(v["state"] == "logged_on" for v in s["subscribers"]) == 2)
    with other.start_uas(timeout=30) as rings:
        assert desk.call("22") == 200
        assert rings.wait(timeout=30) == 200
    # The caller and the phone that rang each hold a licence now.
    assert holders(inst.status()) == ["21-desk", "22-soft"]
    assert acquisitions(inst) == [("21-desk", "22"), ("22-soft", "22")]
