"""The README's main job: the demo runs the real bridge against a real Asterisk (or FreeSWITCH) and SIPp phones."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.asterisk
@pytest.mark.timeout(600)
def test_demo_runs_every_step_against_real_asterisk() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.sandbox.demo"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "22-desk called 600: refused (403)" in out
    assert "22-desk called 112: answered (200)" in out
    assert "23-desk called 112: refused (403)" in out
    assert "Licences: 2 of 2 in use, 0 free" in out
    assert "demo finished" in out


@pytest.mark.freeswitch
@pytest.mark.timeout(600)
def test_demo_runs_every_step_against_real_freeswitch() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.sandbox.demo", "freeswitch"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "FreeSWITCH" in out
    assert "22-desk called 600: refused (603)" in out
    assert "22-desk called 112: answered (200)" in out
    assert "23-desk called 112: refused (603)" in out or "23-desk called 112: hung up by the bridge" in out
    assert "Licences: 2 of 2 in use, 0 free" in out
    assert "demo finished" in out
