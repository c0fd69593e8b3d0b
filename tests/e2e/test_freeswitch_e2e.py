"""End to end: the bridge as administrators run it, a real FreeSWITCH 1.10, real SIP phones (SIPp).

The same scenarios as ``test_asterisk_e2e.py``, against FreeSWITCH. Each test builds its own
installation: a private FreeSWITCH from the sandbox with the snippet ``forum-bridge dialplan
freeswitch`` renders at the top of the phones' context, a TOML configuration, a SQLite database set
up with the ``forum-bridge`` command, and ``forum-bridge run freeswitch`` as a child process. State
is read with ``forum-bridge status --json`` and ``audit --json``. Nothing is skipped: if FreeSWITCH
cannot start, the tests fail and say why.

Log-ons (directory users): ``21-desk`` and ``21-soft`` share call number 21, ``22-soft`` has number
22, and ``90-trunk`` is not a subscriber (unmanaged); it plays the outside line. The sandbox's
dialplan rings every log-on of number N for ``7N``; any other number is answered and echoed.

The assertions are on behaviour (SIP codes, status, audit), not on the snippet's text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forum_bridge.adapters.freeswitch.dialplan import render_dialplan
from forum_bridge.config import load_settings
from tests.conftest import wait_until
from tests.e2e.installation import (
    NUMBERS,
    PASSWORDS,
    acquisitions,
    by_logon,
    holders,
    installations,
    metrics,
)
from tests.e2e.installation import Installation as BaseInstallation
from tests.sandbox import free_tcp_port
from tests.sandbox.freeswitch import FreeSwitchSandbox, freeswitch_binary

__all__ = ["NUMBERS", "acquisitions", "by_logon", "holders", "metrics"]  # here and in the other e2e modules

pytestmark = [pytest.mark.freeswitch, pytest.mark.timeout(600)]

CALL_NUMBERS = {"21": ["21-desk", "21-soft"], "22": ["22-soft"]}
# What a phone sees when the bridge (or the snippet) rejects its call: CALL_REJECTED.
REJECTED = 603
# How long a phone rings before it answers where the bridge must hang up a ringing leg first.
RING_SECONDS = 8


class Installation(BaseInstallation):
    """One FreeSWITCH, one bridge configuration and database, the bridge process, the phones."""

    pbx = "freeswitch"
    snippet_name = "forum_bridge.xml"
    secret_name = "ESL password"
    env_kept = ("_SANDBOX_ROOT", "_FREESWITCH_BIN")

    def __init__(
        self, tmp: Path, *, licences: int, profile_params: dict[str, str] | None = None, **settings: Any
    ) -> None:
        self.socket_port = free_tcp_port()
        self.profile_params = profile_params
        defaults = {
            "freeswitch.socket_port": self.socket_port,
            "freeswitch.fail_mode": "closed",
            "freeswitch.enforce": "both",
            "freeswitch.reconnect_max": 1.0,
        }
        super().__init__(tmp, licences=licences, **{**defaults, **settings})

    def make_sandbox(self) -> FreeSwitchSandbox:
        """A private FreeSWITCH with the snippet atop the phones' context and every phone a user."""
        return FreeSwitchSandbox(
            socket_port=self.socket_port,
            dialplan_snippet=self.snippet,
            endpoints=sorted(PASSWORDS.items()),
            numbers=CALL_NUMBERS,
            profile_params=self.profile_params,
            base_dir=self.tmp,
        )

    def connection(self) -> dict[str, Any]:
        """The ESL port and password of the sandbox."""
        if self.sandbox is None:
            return {"esl_port": 1, "esl_password": "not-yet"}
        return {"esl_port": self.sandbox.esl_port, "esl_password": self.sandbox.esl_password}

    @property
    def secret(self) -> str:
        """The ESL password."""
        return str(self.sandbox.esl_password)

    def ready_lines(self) -> list[str]:
        """The socket hook listens, unless events alone enforce."""
        return [] if self.values["freeswitch.enforce"] == "esl" else ["socket hook listening"]


@pytest.fixture(scope="module", autouse=True)
def freeswitch_installed() -> None:
    """Find the FreeSWITCH binary first, so a missing install is reported as such."""
    freeswitch_binary()


@pytest.fixture
def make_installation(tmp_path: Path) -> Iterator[Callable[..., Installation]]:
    """Build, provision and (unless ``start=False``) start installations for one test."""
    yield from installations(tmp_path, Installation)


def adapter_complaints(inst: Installation) -> list[str]:
    """Warning and error lines of the FreeSWITCH side (listener, socket hook) and any error line."""
    return [
        line
        for line in inst.log_text().splitlines()
        if "level=error" in line
        or ("level=warning" in line and "logger=forum_bridge.adapters.freeswitch" in line)
    ]


def denials(inst: Installation) -> list[tuple[str, str, str]]:
    return [(d["logon"], d["number"], d["reason"]) for d in reversed(inst.audit()) if d["kind"] == "deny"]


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
    assert holders(inst.status()) == ["21-desk"]
    assert desk.register() == 200  # a refresh
    assert desk.call("601") == 200  # a second call keeps the same licence
    assert holders(inst.status()) == ["21-desk"]
    assert acquisitions(inst) == [("21-desk", "600")]
    # Asked by the dialplan and seen over ESL: decided (and logged) once all the same.
    assert inst.log_text().count("decision logon=21-desk number=600 ") == 1
    # 22-soft registers although no licence is free: the technical log-on always succeeds.
    assert soft.register() == 200
    status = inst.wait_status(lambda s: by_logon(s)["22-soft"]["state"] == "logged_on")
    assert status["licences"]["free"] == 0
    assert by_logon(status)["22-soft"]["licensed"] is False
    assert soft.call("600") == REJECTED  # no licence: emergency calls only
    assert soft.call("112") == 200
    assert holders(inst.status()) == ["21-desk"]
    assert denials(inst) == [("22-soft", "600", "emergency_only")]
    # Every call was handled as it should be: nothing for an operator to act on (the full pool
    # itself may be warned about; the FreeSWITCH side has nothing to say).
    assert adapter_complaints(inst) == []


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
    # FreeSWITCH has no hook for calls to a phone, so the event path hangs up a ringing leg whose
    # log-on can get no licence (uuid_kill); a phone answers only if nobody did so by then. The
    # bridge needs milliseconds for it on a quiet machine and seconds on a loaded one: the phones
    # ring long enough for a loaded one. The first part costs nothing for it (every leg is hung
    # up, then the phones stop at once); only the winner of the second part rings the time out.
    with (
        desk.start_uas(timeout=60, ring_seconds=RING_SECONDS) as desk_rings,
        soft.start_uas(timeout=60, ring_seconds=RING_SECONDS) as soft_rings,
    ):
        # Nobody of number 21 can get a licence: each leg is hung up before it is answered.
        # The bridge fails with the legs' cause: the caller hears CALL_REJECTED too.
        assert trunk.call("721", ring_timeout=RING_SECONDS + 15) == REJECTED
        assert desk_rings.wait(timeout=60) != 200
        assert soft_rings.wait(timeout=60) != 200
    assert holders(inst.status()) == ["22-soft"]
    inst.cli_process("licences", "reset", "--yes")
    with (
        desk.start_uas(timeout=60, ring_seconds=RING_SECONDS) as desk_rings,
        soft.start_uas(timeout=60, ring_seconds=RING_SECONDS) as soft_rings,
    ):
        assert trunk.call("721", ring_timeout=RING_SECONDS + 15) == 200
        answered = [r.wait(timeout=60) for r in (desk_rings, soft_rings)]
    # Both legs ring at once; the one that got the licence first rang, the other was hung up.
    assert sorted(int(r) == 200 for r in answered) == [False, True]
    winner = "21-desk" if answered[0] == 200 else "21-soft"
    assert holders(inst.status()) == [winner]


def test_a_wrong_password_or_an_unknown_user_cannot_call_at_all(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    impostor = inst.phone("21-desk", password="wrong-password")
    assert impostor.register() == 403  # FreeSWITCH answers a wrong password with 403
    status = inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logon_failed")
    failure = status["failed_logons"][0]
    assert (failure["logon"], failure["reason"]) == ("21-desk", "wrong_password")
    assert failure["source"] == f"127.0.0.1:{impostor.local_port}"
    # FreeSWITCH itself refuses the phone's calls (403 to the INVITE's digest), 112 included.
    assert impostor.call("112") == 403
    assert impostor.call("600") == 403
    nobody = inst.phone("99-nobody", password="whatever")
    assert nobody.register() == 403
    status = inst.wait_status(lambda s: any(f["logon"] == "99-nobody" for f in s["failed_logons"]))
    unknown = next(f for f in status["failed_logons"] if f["logon"] == "99-nobody")
    assert unknown["reason"] == "unknown_user"
    assert status["licences"]["used"] == 0
    # The right password logs on again and clears the failure.
    assert inst.phone("21-desk").register() == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")


def test_a_spoofed_from_is_decided_for_the_user_who_authenticated(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    desk, soft = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, soft):
        assert phone.register() == 200
    inst.wait_status(lambda s: sum(v["state"] == "logged_on" for v in s["subscribers"]) == 2)
    assert desk.call("600") == 200  # 21-desk holds the only licence
    # 22-soft's phone, with 22-soft's password, claims to be 21-desk (licensed) or 90-trunk (unmanaged).
    as_desk = inst.phone("22-soft", from_user="21-desk")
    as_trunk = inst.phone("22-soft", from_user="90-trunk")
    assert as_desk.call("601") == REJECTED
    assert as_trunk.call("602") == REJECTED
    assert as_desk.call("112") == 200  # an emergency call still passes
    assert holders(inst.status()) == ["21-desk"]
    assert denials(inst) == [("22-soft", "601", "emergency_only"), ("22-soft", "602", "emergency_only")]


def test_a_spoofed_register_logs_on_the_user_who_authenticated(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    # 22-soft's credentials registering the address 21-desk: FreeSWITCH accepts it by default.
    spoofer = inst.phone("22-soft", from_user="21-desk")
    assert spoofer.register() == 200
    status = inst.wait_status(lambda s: by_logon(s)["22-soft"]["state"] == "logged_on")
    assert by_logon(status)["21-desk"]["state"] == "logged_off"
    assert by_logon(status)["22-soft"]["contact"] == spoofer.contact_uri
    # A resync (the bridge restarted) reads the same identity from FreeSWITCH's tables.
    inst.stop_bridge()
    inst.start_bridge()
    status = inst.status()
    assert by_logon(status)["22-soft"]["state"] == "logged_on"
    assert by_logon(status)["21-desk"]["state"] == "logged_off"
    assert spoofer.unregister() == 200
    inst.wait_status(lambda s: by_logon(s)["22-soft"]["state"] == "logged_off")


def test_a_failed_log_on_cannot_be_dodged_with_another_from(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    soft = inst.phone("22-soft")
    assert soft.register() == 200
    assert inst.phone("21-desk", password="wrong-password").register() == 403
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logon_failed")
    # 21-desk's right password on a call, but From: 22-soft (logged on, a licence free).
    dodger = inst.phone("21-desk", from_user="22-soft")
    assert dodger.call("600") == REJECTED
    assert holders(inst.status()) == []
    assert denials(inst) == [("21-desk", "600", "logon_failed")]
    assert soft.call("600") == 200  # 22-soft itself is not affected
    assert holders(inst.status()) == ["22-soft"]


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
    assert desk.register(expires=120) == 200  # FreeSWITCH keeps it; the phone just never refreshes
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    assert desk.call("600", hold_seconds=0.5) == 200
    answered = time.monotonic()
    assert holders(inst.status()) == ["21-desk"]
    status = inst.wait_status(lambda s: s["licences"]["used"] == 0, timeout=15)
    assert time.monotonic() - answered >= 4.0  # not before keepalive + grace after the INVITE
    assert by_logon(status)["21-desk"]["state"] == "logged_off"
    inst.wait_log("missed keepalive logon=21-desk")
    releases = [a for a in inst.audit() if a["kind"] == "release"]
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
    inst.start_bridge()  # returns after the resync
    status = inst.status()
    assert holders(status) == ["22-soft"]
    assert by_logon(status)["21-desk"]["state"] == "logged_off"
    assert by_logon(status)["22-soft"]["state"] == "logged_on"


def test_a_flushed_registration_is_not_logged_back_on_by_the_resync(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, other = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, other):
        assert phone.register(expires=300) == 200
    inst.wait_status(lambda s: sum(v["state"] == "logged_on" for v in s["subscribers"]) == 2)
    assert desk.call("600") == 200
    inst.stop_bridge()
    out = inst.sandbox.api(
        f"sofia profile {inst.sandbox.profile} flush_inbound_reg 21-desk@{inst.sandbox.domain}"
    )
    assert out.startswith("+OK")
    wait_until(
        lambda: "21-desk" not in inst.sandbox.api(f"sofia xmlstatus profile {inst.sandbox.profile} reg"),
        10,
        "sofia to forget the flushed contact",
    )
    # The core's table still lists the flushed contact (until its expiry, 300 s from now).
    assert "21-desk" in inst.sandbox.api("show registrations")
    inst.start_bridge()
    status = inst.status()
    assert by_logon(status)["21-desk"]["state"] == "logged_off"
    assert holders(status) == []
    assert by_logon(status)["22-soft"]["state"] == "logged_on"


def test_the_bridge_reconnects_and_resyncs_when_freeswitch_restarts(
    make_installation: Callable[..., Installation],
) -> None:
    web_port = free_tcp_port()
    inst = make_installation(licences=1, **{"web.enabled": True, "web.port": web_port})
    desk = inst.phone("21-desk")
    assert desk.register() == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    assert desk.call("600") == 200
    connected = 'forum_bridge_pbx_connected{pbx="freeswitch"}'
    assert f"{connected} 1.0" in metrics(web_port)
    inst.sandbox.stop()
    inst.wait_log("went away", 1)
    wait_until(lambda: f"{connected} 0.0" in metrics(web_port), 15, "the metric to show the PBX down")
    inst.sandbox.start()
    inst.wait_log("is back", 1)
    wait_until(lambda: f"{connected} 1.0" in metrics(web_port), 15, "the metric to show the PBX up again")
    inst.wait_log("resync node=pbx1", 2)
    log = inst.log_text()
    assert log.count("went away") == 1
    assert log.count("is back") == 1
    assert "level=error" not in log
    # FreeSWITCH kept the registration over its restart (sofia's database): the resync keeps it.
    status = inst.status()
    assert by_logon(status)["21-desk"]["state"] == "logged_on"
    assert holders(status) == ["21-desk"]
    assert desk.call("601") == 200  # the hook answers for the new FreeSWITCH too
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
    # fail_mode closed: no call without a decision; 503, "could not be asked", not 603 "denied".
    assert other.call("600") == 503
    settings = load_settings(inst.config, environ={}, overrides={"freeswitch.fail_mode": "open"})
    inst.sandbox.reload_dialplan(render_dialplan(settings))
    assert other.call("600") == 200


def test_a_received_call_takes_the_callees_licence(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, other = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, other):
        assert phone.register() == 200
    inst.wait_status(lambda s: sum(v["state"] == "logged_on" for v in s["subscribers"]) == 2)
    with other.start_uas(timeout=30) as rings:
        assert desk.call("722") == 200
        assert rings.wait(timeout=30) == 200
    # The caller and the phone that rang each hold a licence now. FreeSWITCH's leg to a phone has
    # the directory user as its destination, so that is the number the audit shows for it.
    assert holders(inst.status()) == ["21-desk", "22-soft"]
    assert acquisitions(inst) == [("21-desk", "722"), ("22-soft", "22-soft")]


# No hook: the phones' calls go straight on (after a pause, so the event path has time to act).
ESL_ONLY_SNIPPET = """\
<include>
  <extension name="forum_bridge_esl_only" continue="true">
    <condition field="destination_number" expression="^.+$">
      <action application="sleep" data="3000"/>
    </condition>
  </extension>
</include>
"""


@pytest.mark.parametrize("enforce", ["hook", "esl", "both"])
def test_enforce_setting_chooses_who_hangs_up(
    make_installation: Callable[..., Installation], enforce: str
) -> None:
    inst = make_installation(licences=1, start=False, **{"freeswitch.enforce": enforce})
    if enforce == "esl":
        inst.sandbox.reload_dialplan(ESL_ONLY_SNIPPET)
    inst.start_bridge()
    desk, other = inst.phone("21-desk"), inst.phone("22-soft")
    for phone in (desk, other):
        assert phone.register() == 200
    inst.wait_status(lambda s: sum(v["state"] == "logged_on" for v in s["subscribers"]) == 2)
    assert desk.call("600") == 200
    assert other.call("600") == REJECTED
    assert other.call("112") == 200
    assert holders(inst.status()) == ["21-desk"]
    log = inst.log_text()
    kills = log.count("hung up channel")
    # Only the event path kills with uuid_kill; the hook hangs up inside the dialplan (with both,
    # whichever of the two comes first; the call is decided once either way).
    assert kills == {"hook": 0, "esl": 1}.get(enforce, min(kills, 1))
    if enforce == "hook":
        assert "socket hook not started" not in log
    if enforce == "esl":
        assert "socket hook not started" in log
    assert denials(inst) == [("22-soft", "600", "emergency_only")]
    # With both, the hook's session ends when the event path kills the call: no error for that.
    assert adapter_complaints(inst) == []


def test_a_second_device_replacing_the_first_does_not_keep_the_licence(
    make_installation: Callable[..., Installation],
) -> None:
    # The sandbox's profile, like FreeSWITCH's default, keeps one contact per address.
    inst = make_installation(licences=1)
    first, second = inst.phone("21-desk"), inst.phone("21-desk")
    assert first.register(expires=300) == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    assert first.call("600") == 200
    assert second.register(expires=300) == 200  # FreeSWITCH drops the first contact, silently
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["contact"] == second.contact_uri)
    assert holders(inst.status()) == ["21-desk"]
    assert second.unregister() == 200  # the log-on's last device in FreeSWITCH logs off
    status = inst.wait_status(lambda s: s["licences"]["used"] == 0, timeout=5)
    assert by_logon(status)["21-desk"]["state"] == "logged_off"
