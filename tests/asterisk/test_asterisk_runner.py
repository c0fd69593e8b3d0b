"""The runner: AMI listener, FastAGI hook and keepalive clock together; the process and its signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forum_bridge.adapters.asterisk.ami import RecentDecisions
from forum_bridge.adapters.asterisk.runner import Bridge
from forum_bridge.config import Settings
from forum_bridge.core.rules import Decision, Reason
from forum_bridge.errors import ForumBridgeError
from forum_bridge.service import BridgeService
from forum_bridge.store.database import Database
from tests.asterisk.aio import run
from tests.asterisk.conftest import AmiRig, contact_status, new_channel
from tests.asterisk.test_asterisk_agi import ask
from tests.conftest import FakeClock
from tests.sandbox.asterisk import free_tcp_port

ROOT = Path(__file__).resolve().parents[2]


def test_hook_events_and_the_keepalive_clock_work_together(ami: AmiRig, clock: FakeClock) -> None:
    service = ami.setup("21-desk", **{"asterisk.enforce": "both", "keepalive.grace": 1})
    service.set_profile("default", 5)

    async def scenario() -> None:
        async with ami.serving() as bridge:
            await ami.wait(lambda: bridge.ami.resyncs >= 1)
            ami.push(contact_status("21-desk"))
            await ami.wait(lambda: ami.subscriber("21-desk")["state"] == "logged_on")
            answer = await ask(bridge.agi.port, "outbound", "600")
            assert answer == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "licence_acquired"}
            assert service.status()["licences"]["used"] == 1
            # No refresh for longer than the profile's keepalive plus grace: freed by the clock.
            clock.advance(7)
            deadline = time.monotonic() + 5
            while service.status()["licences"]["used"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            status = service.status()
            assert status["licences"]["used"] == 0
            assert status["subscribers"][0]["state"] == "logged_off"
        assert ami.recorded.connected == [True, False]
        assert bridge.agi.active == 0

    ami.run(scenario())


def _config(tmp_path: Path, **asterisk: Any) -> Path:
    values = {
        "ami_port": free_tcp_port(),  # nothing listens there: Asterisk is "down"
        "ami_secret": "process-secret-Xy9",
        "agi_port": free_tcp_port(),
        "reconnect_max": 0.5,
        **asterisk,
    }
    body = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in values.items())
    path = tmp_path / "bridge.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "b.db"}"\n[node]\nname = "pbx1"\n'
        f"[web]\nenabled = false\n[asterisk]\n{body}\n",
        encoding="utf-8",
    )
    return path


def _bridge_process(config: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "forum_bridge", "--config", str(config), "run", "asterisk"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_the_process_refuses_to_start_on_an_older_schema(tmp_path: Path) -> None:
    config = _config(tmp_path)
    database = Database(f"sqlite:///{tmp_path / 'b.db'}")
    database.upgrade()
    with database.engine.begin() as connection:  # as if the file came from an older release
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    database.dispose()
    proc = _bridge_process(config)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "forum-bridge db upgrade" in out
    assert "process-secret-Xy9" not in out


def test_the_process_serves_the_hook_while_asterisk_is_down_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = _config(tmp_path)
    database = Database(f"sqlite:///{tmp_path / 'b.db'}")
    database.upgrade()
    database.dispose()
    agi_port = int(next(line for line in config.read_text().splitlines() if "agi_port" in line).split("=")[1])
    proc = _bridge_process(config)
    try:

        async def wait_and_ask() -> dict[str, str]:
            deadline = time.monotonic() + 30
            while True:
                try:
                    return await ask(agi_port, "outbound", "112", channel="PJSIP/21-desk-00000001")
                except ConnectionRefusedError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    await asyncio.sleep(0.05)

        answer = run(wait_and_ask(), timeout=40)
        assert answer["FORUM_BRIDGE_RESULT"] == "allow"  # unmanaged log-on
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "cannot reach Asterisk AMI" in out
    assert out.count("cannot reach Asterisk AMI") == 1
    assert 'msg="stopped"' in out
    assert "process-secret-Xy9" not in out


def test_in_both_mode_each_call_leg_is_decided_once(ami: AmiRig, caplog: pytest.LogCaptureFixture) -> None:
    """The Newchannel comes over AMI first; the hook then reuses that decision, and the AMI only
    records the leg that rings a phone the hook has just let ring."""
    caplog.set_level(logging.INFO, logger="forum_bridge.decision")
    service = ami.setup(
        "21-desk", "22-soft", registered=True, **{"asterisk.enforce": "both", "licences.count": 2}
    )
    call, leg = new_channel("21-desk", "600"), new_channel("22-soft", "22", inbound=True)

    async def scenario() -> None:
        async with ami.serving() as bridge:
            await ami.wait(lambda: bridge.ami.resyncs >= 1)
            base = bridge.ami.received
            ami.push(call)
            # As on a real Asterisk, the Newchannel is in before the dialplan asks.
            await ami.wait(lambda: bridge.ami.received > base)
            answer = await ask(bridge.agi.port, "outbound", "600", channel=call["Channel"])
            assert answer == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "licence_acquired"}
            rung = await ask(bridge.agi.port, "inbound", "22", channel="PJSIP/90-trunk-00000001")
            assert rung["FORUM_BRIDGE_DIAL"] == "PJSIP/22-soft"
            await ami.send(leg)
            calls = {c["channel"] for c in service.status()["calls"]}
            assert calls == {call["Channel"], leg["Channel"]}

    ami.run(scenario())
    assert ami.fake.hangups == []
    decisions = [r.getMessage() for r in caplog.records if r.name == "forum_bridge.decision"]
    assert len(decisions) == 2, decisions
    assert "logon=21-desk number=600 direction=outbound result=allowed" in decisions[0]
    assert "logon=22-soft number=22 direction=inbound result=allowed" in decisions[1]


def test_recent_decisions_expire_and_rings_are_taken_once() -> None:
    now = [100.0]
    recent = RecentDecisions(ttl=10, limit=2, clock=lambda: now[0])
    allowed = Decision(True, Reason.LICENSED)
    recent.record_call("PJSIP/a-00000001", allowed)
    assert recent.call("PJSIP/a-00000001") == allowed
    recent.record_call("PJSIP/b-00000002", allowed)
    recent.record_call("PJSIP/c-00000003", allowed)
    assert recent.call("PJSIP/a-00000001") is None  # over the limit: the oldest went
    recent.record_rung("21-desk")
    recent.record_rung("21-desk")
    assert recent.take_rung("21-desk") and recent.take_rung("21-desk")
    assert not recent.take_rung("21-desk")
    recent.record_rung("21-desk")
    now[0] += 11
    assert not recent.take_rung("21-desk")
    assert recent.call("PJSIP/c-00000003") is None


def test_a_part_that_dies_stops_the_bridge_instead_of_leaving_it_half_alive(
    bridge_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        service = make_service(bridge_settings(1))
        bridge = Bridge(service.settings, service)

        async def broken(stop: asyncio.Event) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(bridge.ami, "run", broken)
        with pytest.raises(ForumBridgeError, match="forum-bridge-ami ended unexpectedly"):
            await bridge.serve(asyncio.Event())
        assert bridge.agi.active == 0

    run(scenario(), timeout=10)
