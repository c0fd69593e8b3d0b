"""``forum-bridge run asterisk|freeswitch``: a configuration that cannot work is one line and exit 2.

Both connectors run as real processes (nothing is listening at the PBX's address; they never get
that far). A web token shorter than 16 characters is refused when the status page starts, which
happens after the database is prepared, so this also proves that a configuration error found late
in the start still exits 2 and not 1 (which systemd and an operator would read as a crash).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_tcp_port

ROOT = Path(__file__).resolve().parents[1]
SHORT_TOKEN = "Short-Tok3n"  # 11 characters: below the minimum of 16


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(
        f"""
[database]
url = "sqlite:///{tmp_path / "b.db"}"
[node]
name = "pbx1"
[web]
enabled = true
port = {free_tcp_port()}
[asterisk]
ami_port = {free_tcp_port()}
ami_secret = "process-secret-Xy9"
agi_port = {free_tcp_port()}
reconnect_max = 0.5
[freeswitch]
esl_port = {free_tcp_port()}
socket_port = {free_tcp_port()}
reconnect_max = 0.5
""",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("pbx", ["asterisk", "freeswitch"])
def test_a_short_web_token_stops_run_with_one_line_and_exit_2(tmp_path: Path, pbx: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    env["FORUM_BRIDGE_WEB_TOKEN"] = SHORT_TOKEN
    result = subprocess.run(
        [sys.executable, "-m", "forum_bridge", "--config", str(_config(tmp_path)), "run", pbx],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    errors = [line for line in output.splitlines() if "level=error" in line]
    assert len(errors) == 1, output
    assert "web.token" in errors[0] and "too short" in errors[0]
    assert "Traceback" not in output
    assert SHORT_TOKEN not in output
