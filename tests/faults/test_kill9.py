"""``kill -9`` of the bridge process during an event storm and during calls, then a restart.

The database must be consistent afterwards (SQLite's integrity check, every licence holder matches
the audit log's last word on it, no log-on holds two licences), the audit written before the kill
must be intact, and once restarted the bridge must equal what Asterisk shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from forum_bridge.config import load_settings
from forum_bridge.service import BridgeService
from forum_bridge.store.database import Database
from tests.asterisk.aio import run
from tests.asterisk.conftest import contact_item, contact_status, new_channel
from tests.asterisk.fake_ami import FakeAmi, render
from tests.asterisk.test_asterisk_agi import ask
from tests.sandbox.asterisk import free_tcp_port

ROOT = Path(__file__).resolve().parents[2]
PHONES = ["21-desk", "22-soft", "23-desk", "24-desk"]


def consistent(url: str) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """Check the invariants on the database at rest; return (audit, states, holders)."""
    database = Database(url)
    try:
        with database.engine.connect() as connection:
            assert connection.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        service = BridgeService(load_settings(environ={}, overrides={"database.url": url}), database)
        status = service.status()
        audit = list(reversed(service.audit_log(100_000)))
    finally:
        database.dispose()
    holders = [a["logon"] for a in status["assignments"]]
    assert len(holders) == len(set(holders)), holders
    assert status["licences"]["used"] <= status["licences"]["total"]
    last: dict[str, str] = {}
    for row in audit:
        if row["kind"] in ("acquire", "release"):
            last[row["logon"]] = row["kind"]
    # Every licence held was acquired (and not released since), and every acquisition not released
    # is still held: the licence rows and the audit log were committed together or not at all.
    assert sorted(holders) == sorted(logon for logon, kind in last.items() if kind == "acquire")
    states = {s["logon"]: s["state"] for s in status["subscribers"]}
    return audit, states, sorted(holders)


def test_kill_9_during_a_storm_and_calls_then_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bridge.db'}"
    agi_port = free_tcp_port()
    setup = Database(url)
    setup.upgrade()
    service = BridgeService(
        load_settings(environ={}, overrides={"database.url": url, "licences.count": 2}), setup
    )
    service.start()
    for phone in PHONES:
        service.add_subscriber(phone, phone[:2])
    setup.dispose()
    log = tmp_path / "bridge.log"

    async def scenario() -> None:
        fake = FakeAmi()
        await fake.start()
        config = tmp_path / "bridge.toml"
        config.write_text(
            f'[database]\nurl = "{url}"\n[node]\nname = "pbx1"\n[licences]\ncount = 2\n[web]\nenabled = false\n'
            f'[asterisk]\nami_port = {fake.port}\nami_secret = "fake-ami-secret"\nagi_port = {agi_port}\n'
            'enforce = "both"\nreconnect_max = 0.5\n',
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
        processes: list[asyncio.subprocess.Process] = []

        async def start_bridge(logins: int) -> asyncio.subprocess.Process:
            with log.open("a") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "forum_bridge", "--config", str(config), "run", "asterisk",
                    cwd=ROOT, env=env, stdout=out, stderr=out,
                )  # fmt: skip
            processes.append(proc)
            await fake.wait_until(
                lambda: fake.logins >= logins and len(fake.actions_named("CoreShowChannels")) >= logins, 30
            )
            return proc

        async def ask_when_up(*args: str, channel: str) -> dict[str, str]:
            deadline = time.monotonic() + 20
            while True:
                try:
                    return await ask(agi_port, *args, channel=channel)
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)

        try:
            fake.contacts = [contact_item(p, 5081 + i) for i, p in enumerate(PHONES[:3])]
            proc = await start_bridge(1)
            deadline = time.monotonic() + 30
            while consistent(url)[1].get("21-desk") != "logged_on":  # the login resync is applied
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            first = await ask_when_up("outbound", "600", channel="PJSIP/21-desk-00000001")
            assert first["FORUM_BRIDGE_REASON"] == "licence_acquired"
            fake.channels.append({**new_channel("21-desk", "600"), "Channel": "PJSIP/21-desk-00000001"})

            # A storm of refreshes and calls, hook questions in flight, and then kill -9.
            storm = []
            for i in range(3000):
                phone = PHONES[i % 3]
                storm.append(contact_status(phone, "Reachable", 5081 + PHONES.index(phone)))
                if i % 10 == 0:
                    storm.append(new_channel(PHONES[1 + i % 2], "600"))
            data = b"".join(render(frame) for frame in storm)
            fake.push_bytes(data[: len(data) // 3])
            in_flight = [
                asyncio.ensure_future(ask(agi_port, "outbound", "600", channel=f"PJSIP/22-soft-{i:08x}"))
                for i in range(2, 10)
            ]
            await asyncio.sleep(0.2)
            fake.push_bytes(data[len(data) // 3 :])
            proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
            await asyncio.gather(*in_flight, return_exceptions=True)  # some answered, some cut
            audit_at_kill, _states, _holders = consistent(url)

            # While the bridge is dead, 23-desk goes away and the storm's calls end.
            fake.contacts = [contact_item(p, 5081 + i) for i, p in enumerate(PHONES[:2])]
            fake.channels = fake.channels[:1]
            proc = await start_bridge(2)
            deadline = time.monotonic() + 30
            while True:
                audit, states, holders = consistent(url)
                wanted = {p: "logged_on" if p in PHONES[:2] else "logged_off" for p in PHONES}
                if states == wanted:
                    break
                assert time.monotonic() < deadline, states
                await asyncio.sleep(0.2)
            assert audit[: len(audit_at_kill)] == audit_at_kill  # nothing written before the kill was lost
            assert "21-desk" in holders  # its call is still up, so its licence stays
            again = await ask_when_up("outbound", "600", channel="PJSIP/21-desk-00000099")
            assert again["FORUM_BRIDGE_REASON"] == "licensed"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            for proc in processes:
                if proc.returncode is None:
                    proc.kill()
                    with contextlib.suppress(Exception):
                        await proc.wait()
            await fake.close()

    run(scenario(), timeout=120)
    assert "fake-ami-secret" not in log.read_text(errors="replace")
