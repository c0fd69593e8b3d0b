"""The systemd unit's commands start the bridge with the example configuration, against a real Asterisk.

systemd itself cannot run here, so the test does what the unit says: the same ExecStartPre and
ExecStart command lines (with the installed command replaced by this checkout's), the example
configuration file unchanged, and the site-specific values as ``FORUM_BRIDGE_*`` variables, as
``EnvironmentFile=/etc/forum-bridge/secrets.env`` would give them; then it stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from forum_bridge.adapters.asterisk.dialplan import render_dialplan
from forum_bridge.config import load_settings
from tests.conftest import wait_until
from tests.sandbox import AsteriskSandbox, SippPhone, free_tcp_port

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "forum-bridge-asterisk.service"
EXAMPLE = ROOT / "deploy" / "forum-bridge.example.toml"
INSTALLED = "/opt/forum-bridge/bin/forum-bridge"
CONFIG = "/etc/forum-bridge/forum-bridge.toml"


def unit_commands(unit: Path, config: Path) -> dict[str, list[str]]:
    """ExecStartPre and ExecStart of ``unit``, pointed at this checkout and ``config``."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStartPre", "ExecStart"):
            argv = shlex.split(value)
            assert argv[0] == INSTALLED, f"{key} does not run {INSTALLED}"
            found[key] = [
                sys.executable,
                "-m",
                "forum_bridge",
                *(str(config) if a == CONFIG else a for a in argv[1:]),
            ]
    assert set(found) == {"ExecStartPre", "ExecStart"}
    return found


@pytest.mark.asterisk
@pytest.mark.timeout(300)
def test_asterisk_unit_starts_and_stops_the_bridge(tmp_path: Path) -> None:
    config = tmp_path / "forum-bridge.toml"
    config.write_bytes(EXAMPLE.read_bytes())
    commands = unit_commands(UNIT, config)
    agi_port, web_port = free_tcp_port(), free_tcp_port()
    snippet = render_dialplan(
        load_settings(config, environ={"FORUM_BRIDGE_ASTERISK_AGI_PORT": str(agi_port)})
    )
    with AsteriskSandbox(agi_port, snippet, [("21-desk", "pw21desk")]) as pbx:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
        env.update(
            {  # what /etc/forum-bridge/secrets.env holds on a real machine
                "FORUM_BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'state' / 'forum-bridge.db'}",
                "FORUM_BRIDGE_ASTERISK_AMI_PORT": str(pbx.ami_port),
                "FORUM_BRIDGE_ASTERISK_AMI_USERNAME": pbx.ami_username,
                "FORUM_BRIDGE_ASTERISK_AMI_SECRET": pbx.ami_secret,
                "FORUM_BRIDGE_ASTERISK_AGI_PORT": str(agi_port),
                "FORUM_BRIDGE_WEB_PORT": str(web_port),
                "FORUM_BRIDGE_WEB_TOKEN": "unit-test-token-long",
            }
        )
        pre = subprocess.run(commands["ExecStartPre"], env=env, capture_output=True, text=True, timeout=60)
        assert pre.returncode == 0, pre.stderr
        added = subprocess.run(
            [
                sys.executable,
                "-m",
                "forum_bridge",
                "--config",
                str(config),
                "subscriber",
                "add",
                "21-desk",
                "--number",
                "21",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
        log = tmp_path / "bridge.log"
        with log.open("wb") as out:
            bridge = subprocess.Popen(commands["ExecStart"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:

            def connected() -> bool:
                assert bridge.poll() is None, log.read_text(errors="replace")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=2) as r:
                        return 'forum_bridge_pbx_connected{pbx="asterisk"} 1.0' in r.read().decode()
                except OSError:
                    return False

            wait_until(connected, 30, "the bridge to log in to AMI")
            phone = SippPhone("21-desk", "pw21desk", pbx.sip_port)
            assert phone.register(expires=300) == 200
            assert phone.call("600") == 200

            def status() -> dict[str, object]:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/status.json", timeout=5) as r:
                    doc: dict[str, object] = json.loads(r.read())
                    return doc

            doc = status()
            assert doc["licences"] == {"total": 4, "used": 1, "free": 3, "reserved": 0}
            assert doc["node"] == "pbx1"
            assert "pw21desk" not in log.read_text(errors="replace")
            assert pbx.ami_secret not in log.read_text(errors="replace")
        finally:
            bridge.send_signal(signal.SIGTERM)  # systemctl stop
            code = bridge.wait(timeout=15)  # TimeoutStopSec=15
        assert code == 0, log.read_text(errors="replace")
        text = log.read_text(errors="replace")
        assert "unit-test-token-long" not in text
        assert "result=allowed" in text  # one line per decision
