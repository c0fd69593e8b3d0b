"""The installation every end-to-end test builds, whatever the PBX: configuration, CLI, bridge, phones.

An installation is what an administrator has: a TOML configuration, a SQLite database set up with
the ``forum-bridge`` command, the rendered dialplan snippet loaded into a private PBX from the
sandbox, ``forum-bridge run <pbx>`` as a child process, and SIPp phones. The PBX-specific parts
(which sandbox, which connection settings, which line says the hook listens) are the subclass's.
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
from typing import Any, ClassVar, TypeVar

from click.testing import CliRunner

from forum_bridge.cli import main as cli_main
from tests.sandbox import SippPhone

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {
    "21-desk": "desk-pw-21",
    "21-soft": "soft-pw-21",
    "22-soft": "soft-pw-22",
    "90-trunk": "trunk-pw-90",
}
NUMBERS = {"21-desk": "21", "21-soft": "21", "22-soft": "22"}


class Installation:
    """One PBX, one bridge configuration and database, the bridge process, the phones."""

    pbx: ClassVar[str]  # "asterisk" or "freeswitch": the dialplan and run commands' argument
    snippet_name: ClassVar[str]  # the file the rendered snippet is written to
    secret_name: ClassVar[str]  # what the PBX calls the password of the bridge's connection
    # FORUM_BRIDGE_* variables the child processes keep (the sandbox's, not the bridge's settings).
    env_kept: ClassVar[tuple[str, ...]] = ("_SANDBOX_ROOT",)
    sandbox: Any

    def __init__(self, tmp: Path, *, licences: int, **settings: Any) -> None:
        self.tmp = tmp
        self.log_path = tmp / "bridge.log"
        self.config = tmp / "bridge.toml"
        self.values: dict[str, Any] = {"licences.count": licences, **settings}
        self.bridge: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self.phones: list[SippPhone] = []
        self.sandbox: Any = None
        self._write_config()
        # The snippet as an administrator makes it: with the CLI, from the same configuration.
        snippet = tmp / self.snippet_name
        self.cli("dialplan", self.pbx, "-o", str(snippet))
        self.snippet = snippet.read_text(encoding="utf-8")
        self.sandbox = self.make_sandbox()
        self._write_config()

    # --- what a subclass says about its PBX ------------------------------------------------------

    def make_sandbox(self) -> Any:
        """The private PBX (not started yet) with :attr:`snippet` loaded."""
        raise NotImplementedError

    def connection(self) -> dict[str, Any]:
        """The keys of the PBX's section that reach the sandbox (before it exists: placeholders)."""
        raise NotImplementedError

    @property
    def secret(self) -> str:
        """The PBX password the bridge uses, which its log must never show."""
        raise NotImplementedError

    def ready_lines(self) -> list[str]:
        """Log lines (besides the resync) that say the bridge is ready for calls."""
        raise NotImplementedError

    # --- configuration and the CLI ------------------------------------------------------------

    def _write_config(self) -> None:
        sections: dict[str, dict[str, Any]] = {
            "database": {"url": f"sqlite:///{self.tmp / 'bridge.db'}"},
            "node": {"name": "pbx1"},
            "keepalive": {"grace": 1},
            "web": {"enabled": False},
            "log": {"level": "INFO"},
            "emergency": {"numbers": ["110", "112"]},
            self.pbx: self.connection(),
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
        self._write_config()

    def clean_env(self) -> dict[str, str]:
        """This process's environment without the bridge's own settings."""
        return {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("FORUM_BRIDGE_") or k.endswith(self.env_kept)
        }

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
            env=self.clean_env(),
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
        """Start ``forum-bridge run <pbx>``; return once it is connected, resynced and ready."""
        before = self.log_text().count("resync node=pbx1")
        self._log = self.log_path.open("ab")
        self.bridge = subprocess.Popen(
            [sys.executable, "-m", "forum_bridge", "--config", str(self.config), "run", self.pbx],
            cwd=ROOT,
            env=self.clean_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_log("resync node=pbx1", before + 1)
        for line in self.ready_lines():
            self.wait_log(line, 1)

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
        """What the bridge process wrote so far."""
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
        """A SIPp phone of ``logon`` (its own password unless another is given)."""
        phone = SippPhone(logon, password or PASSWORDS[logon], self.sandbox.sip_port, from_user=from_user)
        self.phones.append(phone)
        return phone

    def close(self) -> None:
        """Kill the bridge if it still runs, remove the phones' files, stop the PBX."""
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


Inst = TypeVar("Inst", bound=Installation)


def installations(tmp_path: Path, kind: type[Inst]) -> Iterator[Callable[..., Inst]]:
    """The body of each module's ``make_installation`` fixture: build, provision and start
    installations of ``kind``; close them after the test and check the PBX secret never was logged."""
    made: list[Inst] = []

    def build(*, licences: int = 1, start: bool = True, profile: str | None = None, **settings: Any) -> Inst:
        folder = tmp_path / f"install{len(made)}"
        folder.mkdir()
        inst = kind(folder, licences=licences, **settings)
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
        secret = inst.secret
        log = inst.log_text()
        inst.close()
        assert secret not in log, f"the {inst.secret_name} appeared in the bridge's log"


def metrics(port: int) -> str:
    """The bridge's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def by_logon(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The status document's subscribers by log-on."""
    return {s["logon"]: s for s in status["subscribers"]}


def holders(status: dict[str, Any]) -> list[str]:
    """The log-ons holding a licence, sorted."""
    return sorted(a["logon"] for a in status["assignments"])


def acquisitions(inst: Installation) -> list[tuple[str, str]]:
    """(log-on, number) of every licence taken, oldest first."""
    return [(a["logon"], a["number"]) for a in reversed(inst.audit()) if a["kind"] == "acquire"]
