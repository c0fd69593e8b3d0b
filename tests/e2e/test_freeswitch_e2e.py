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

from forum_bridge.cli import main as cli_main
from tests.sandbox import SippPhone, free_tcp_port
from tests.sandbox.freeswitch import FreeSwitchSandbox, freeswitch_binary

pytestmark = [pytest.mark.freeswitch, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {
    "21-desk": "desk-pw-21",
    "21-soft": "soft-pw-21",
    "22-soft": "soft-pw-22",
    "90-trunk": "trunk-pw-90",
}
NUMBERS = {"21-desk": "21", "21-soft": "21", "22-soft": "22"}
CALL_NUMBERS = {"21": ["21-desk", "21-soft"], "22": ["22-soft"]}
# What a phone sees when the bridge (or the snippet) rejects its call: CALL_REJECTED.
REJECTED = 603


class Installation:
    """One FreeSWITCH, one bridge configuration and database, the bridge process, the phones."""

    def __init__(
        self, tmp: Path, *, licences: int, profile_params: dict[str, str] | None = None, **settings: Any
    ) -> None:
        self.tmp = tmp
        self.socket_port = free_tcp_port()
        self.log_path = tmp / "bridge.log"
        self.config = tmp / "bridge.toml"
        self.values: dict[str, Any] = {
            "licences.count": licences,
            "freeswitch.socket_port": self.socket_port,
            "freeswitch.fail_mode": "closed",
            "freeswitch.enforce": "both",
            "freeswitch.reconnect_max": 1.0,
            **settings,
        }
        self._write_config(esl_port=1, esl_password="not-yet")
        # The snippet as an administrator makes it: with the CLI, from the same configuration.
        snippet = tmp / "forum_bridge.xml"
        self.cli("dialplan", "freeswitch", "-o", str(snippet))
        self.snippet = snippet.read_text(encoding="utf-8")
        self.sandbox = FreeSwitchSandbox(
            socket_port=self.socket_port,
            dialplan_snippet=self.snippet,
            endpoints=sorted(PASSWORDS.items()),
            numbers=CALL_NUMBERS,
            profile_params=profile_params,
            base_dir=tmp,
        )
        self._write_config(esl_port=self.sandbox.esl_port, esl_password=self.sandbox.esl_password)
        self.bridge: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.phones: list[SippPhone] = []

    # --- configuration and the CLI ------------------------------------------------------------

    def _write_config(self, *, esl_port: int, esl_password: str) -> None:
        sections: dict[str, dict[str, Any]] = {
            "database": {"url": f"sqlite:///{self.tmp / 'bridge.db'}"},
            "node": {"name": "pbx1"},
            "keepalive": {"grace": 1},
            "web": {"enabled": False},
            "log": {"level": "INFO"},
            "emergency": {"numbers": ["110", "112"]},
            "freeswitch": {"esl_port": esl_port, "esl_password": esl_password},
        }
        for key, value in self.values.items():
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
        lines: list[str] = []
        for section, body in sections.items():
            lines.append(f"[{section}]")
            lines.extend(f"{name} = {json.dumps(value)}" for name, value in body.items())
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def set(self, **values: Any) -> None:
        """Change settings (``section.key`` with ``_`` for ``.``) in the configuration file."""
        for key, value in values.items():
            self.values[key.replace("__", ".")] = value
        self._write_config(esl_port=self.sandbox.esl_port, esl_password=self.sandbox.esl_password)

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

    def audit(self) -> list[dict[str, Any]]:
        """``forum-bridge audit --json``, newest first."""
        data: list[dict[str, Any]] = json.loads(self.cli("audit", "--json"))
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
        """Start ``forum-bridge run freeswitch``; return once it is connected and resynced."""
        before = self.log_text().count("resync node=pbx1")
        self._log = self.log_path.open("ab")
        self.bridge = subprocess.Popen(
            [sys.executable, "-m", "forum_bridge", "--config", str(self.config), "run", "freeswitch"],
            cwd=ROOT,
            env=_clean_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_log("resync node=pbx1", before + 1)
        if self.values["freeswitch.enforce"] != "esl":
            self.wait_log("socket hook listening", 1)

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

    def phone(self, logon: str, password: str | None = None, *, from_user: str | None = None) -> SippPhone:
        phone = SippPhone(logon, password or PASSWORDS[logon], self.sandbox.sip_port, from_user=from_user)
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
        if not k.startswith("FORUM_BRIDGE_") or k.endswith("_SANDBOX_ROOT") or k.endswith("_FREESWITCH_BIN")
    }


@pytest.fixture(scope="module", autouse=True)
def freeswitch_installed() -> None:
    """Find the FreeSWITCH binary first, so a missing install is reported as such."""
    freeswitch_binary()


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
        secret = inst.sandbox.esl_password
        log = inst.log_text()
        inst.close()
        assert secret not in log, "the ESL password appeared in the bridge's log"


def metrics(port: int) -> str:
    """The bridge's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def by_logon(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["logon"]: s for s in status["subscribers"]}


def holders(status: dict[str, Any]) -> list[str]:
    return sorted(a["logon"] for a in status["assignments"])


def acquisitions(inst: Installation) -> list[tuple[str, str]]:
    return [(a["logon"], a["number"]) for a in reversed(inst.audit()) if a["kind"] == "acquire"]


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
