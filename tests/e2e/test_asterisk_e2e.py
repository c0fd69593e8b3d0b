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
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from forum_bridge.adapters.asterisk.dialplan import render_dialplan
from forum_bridge.cli import main as cli_main
from forum_bridge.config import load_settings
from tests.conftest import wait_until
from tests.sandbox import AsteriskSandbox, SippPhone, build_root, free_tcp_port

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {
    "21-desk": "desk-pw-21",
    "21-soft": "soft-pw-21",
    "22-soft": "soft-pw-22",
    "90-trunk": "trunk-pw-90",
}
NUMBERS = {"21-desk": "21", "21-soft": "21", "22-soft": "22"}
AMI_ONLY_SNIPPET = """\
; No hook: the outbound routine only waits, so that enforcement over AMI is all there is.
[forum-bridge-outbound]
exten => s,1,Wait(3)
 same => n,Return()

[forum-bridge-inbound]
exten => s,1,Return()
"""


class Installation:
    """One Asterisk, one bridge configuration and database, the bridge process, the phones."""

    def __init__(self, tmp: Path, *, licences: int, **settings: Any) -> None:
        self.tmp = tmp
        self.agi_port = free_tcp_port()
        self.log_path = tmp / "bridge.log"
        self.config = tmp / "bridge.toml"
        self.values: dict[str, Any] = {
            "licences.count": licences,
            "asterisk.agi_port": self.agi_port,
            "asterisk.fail_mode": "closed",
            "asterisk.enforce": "both",
            "asterisk.reconnect_max": 1.0,
            **settings,
        }
        self._write_config(ami_port=1, ami_secret="not-yet")
        # The snippet as an administrator makes it: with the CLI, from the same configuration.
        snippet = tmp / "forum_bridge.conf"
        self.cli("dialplan", "asterisk", "-o", str(snippet))
        self.snippet = snippet.read_text(encoding="utf-8")
        self.sandbox = AsteriskSandbox(
            agi_port=self.agi_port,
            dialplan_snippet=self.snippet,
            endpoints=sorted(PASSWORDS.items()),
        )
        self._write_config(ami_port=self.sandbox.ami_port, ami_secret=self.sandbox.ami_secret)
        self.bridge: subprocess.Popen[bytes] | None = None
        self._log = None
        self.phones: list[SippPhone] = []

    # --- configuration and the CLI ------------------------------------------------------------

    def _write_config(self, *, ami_port: int, ami_secret: str) -> None:
        sections: dict[str, dict[str, Any]] = {
            "database": {"url": f"sqlite:///{self.tmp / 'bridge.db'}"},
            "node": {"name": "pbx1"},
            "keepalive": {"grace": 1},
            "web": {"enabled": False},
            "log": {"level": "INFO"},
            "emergency": {"numbers": ["110", "112"]},
            "asterisk": {"ami_port": ami_port, "ami_secret": ami_secret},
        }
        for key, value in self.values.items():
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
        lines: list[str] = []
        for section, body in sections.items():
            lines.append(f"[{section}]")
            lines.extend(f"{name} = {json.dumps(value)}" for name, value in body.items())
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def cli(self, *args: str) -> str:
        """``forum-bridge --config <file> ARGS`` (in-process); fail the test on a non-zero exit."""
        result = CliRunner().invoke(
            cli_main, ["--config", str(self.config), *args], env={"FORUM_BRIDGE_CONFIG": None}
        )
        assert result.exit_code == 0, f"forum-bridge {' '.join(args)}: {result.output}"
        return result.output

    def cli_process(self, *args: str) -> str:
        """``python -m forum_bridge --config <file> ARGS`` as a child process."""
        proc = subprocess.run(
            [sys.executable, "-m", "forum_bridge", "--config", str(self.config), *args],
            cwd=ROOT,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"forum-bridge {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    def status(self) -> dict[str, Any]:
        """``forum-bridge status --json``."""
        data: dict[str, Any] = json.loads(self.cli("status", "--json"))
        return data

    def provision(self, *, profile: str | None = None) -> None:
        """Create the schema and the subscribers, as the README tells administrators."""
        self.cli("db", "upgrade")
        for logon, number in NUMBERS.items():
            args = ["subscriber", "add", logon, "--number", number]
            if profile:
                args += ["--profile", profile]
            self.cli(*args)

    # --- the bridge process -------------------------------------------------------------------

    def start_bridge(self) -> None:
        """Start ``forum-bridge run asterisk``; return once it has logged in and resynced."""
        before = self.log_text().count("resync node=pbx1")
        self._log = self.log_path.open("ab")
        self.bridge = subprocess.Popen(
            [sys.executable, "-m", "forum_bridge", "--config", str(self.config), "run", "asterisk"],
            cwd=ROOT,
            env=_clean_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_log("resync node=pbx1", before + 1)
        self.wait_log("FastAGI hook listening", 1)

    def stop_bridge(self) -> None:
        """SIGTERM, and require a clean exit."""
        if self.bridge is None:
            return
        self.bridge.send_signal(signal.SIGTERM)
        try:
            code = self.bridge.wait(timeout=20)
        finally:
            if self.bridge.poll() is None:
                self.bridge.kill()
                self.bridge.wait()
            self.bridge = None
            if self._log is not None:
                self._log.close()
                self._log = None
        assert code == 0, self.log_text()[-3000:]

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears ``count`` times in the bridge's log."""
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            if self.bridge is not None and self.bridge.poll() is not None:
                raise AssertionError(
                    f"the bridge exited ({self.bridge.returncode}):\n{self.log_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{text!r} x{count} not logged in {timeout}s:\n{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        """Poll ``status --json`` until ``predicate`` holds; return that status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"status never matched in {timeout}s: {json.dumps(status, indent=1)[:3000]}"
                )
            time.sleep(0.1)

    # --- phones -------------------------------------------------------------------------------

    def phone(self, logon: str, password: str | None = None) -> SippPhone:
        phone = SippPhone(logon, password or PASSWORDS[logon], self.sandbox.sip_port)
        self.phones.append(phone)
        return phone

    def close(self) -> None:
        try:
            if self.bridge is not None:
                self.bridge.kill()
                self.bridge.wait()
        finally:
            if self._log is not None:
                self._log.close()
            for phone in self.phones:
                phone.close()
            self.sandbox.close()


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FORUM_BRIDGE_") or k.endswith("_SANDBOX_ROOT")
    }


@pytest.fixture(scope="module", autouse=True)
def sandbox_root() -> None:
    """Build (or find the cached) chroot first, so a build failure is reported as such."""
    build_root()


@pytest.fixture
def make_installation(tmp_path: Path) -> Iterator[Callable[..., Installation]]:
    made: list[Installation] = []

    def build(
        *, licences: int = 1, start: bool = True, profile: str | None = None, **settings: Any
    ) -> Installation:
        folder = tmp_path / f"install{len(made)}"
        folder.mkdir()
        inst = Installation(folder, licences=licences, **settings)
        made.append(inst)
        inst.sandbox.start()
        if profile:
            inst.cli("db", "upgrade")
            inst.cli("profile", "set", profile, "--keepalive", "5")
        inst.provision(profile=profile)
        if start:
            inst.start_bridge()
        return inst

    yield build
    for inst in made:
        secret = inst.sandbox.ami_secret
        log = inst.log_text()
        inst.close()
        assert secret not in log, "the AMI secret appeared in the bridge's log"


def metrics(port: int) -> str:
    """The bridge's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def by_logon(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["logon"]: s for s in status["subscribers"]}


def holders(status: dict[str, Any]) -> list[str]:
    return sorted(a["logon"] for a in status["assignments"])


def acquisitions(inst: Installation) -> list[tuple[str, str]]:
    lines = json.loads(inst.cli("audit", "--json"))
    return [(a["logon"], a["number"]) for a in reversed(lines) if a["kind"] == "acquire"]


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
    with desk.start_uas(timeout=30) as desk_rings, soft.start_uas(timeout=30, ring_seconds=5) as soft_rings:
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
