"""Two bridges (two PBX nodes, two processes) decide through their FastAGI hooks at once on one pool.

Each bridge process runs the real hook server with its own service and node name; the test plays
Asterisk on both at the same moment. Whatever the interleaving, one licence goes to exactly one
caller, and one log-on asking on both nodes at once ends up holding exactly one licence.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest

from forum_bridge.config import load_settings
from forum_bridge.core import LoggedOn
from forum_bridge.service import BridgeService, utcnow
from forum_bridge.store.database import Database
from tests.asterisk.aio import run
from tests.asterisk.test_asterisk_agi import ask

LOGONS = [f"{30 + i}-desk" for i in range(6)]
ROUNDS = 6


def _bridge(url: str, node: str, ports: Any, stop: Any) -> None:
    """One bridge process: the hook server of node ``node`` until ``stop`` is set."""
    from forum_bridge.adapters.asterisk.agi import FastAgiServer

    settings = load_settings(
        environ={},
        overrides={"database.url": url, "licences.count": 1, "node.name": node, "asterisk.agi_port": 0},
    )
    service = BridgeService(settings)

    async def serve() -> None:
        server = FastAgiServer(settings, service, decision_timeout=20)
        await server.start()
        ports.put((node, server.port))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, stop.wait, 180)
        await server.close()

    asyncio.run(serve())
    service.database.dispose()


def _prepare(url: str) -> BridgeService:
    settings = load_settings(
        environ={}, overrides={"database.url": url, "licences.count": 1, "node.name": "adm"}
    )
    database = Database(url)
    database.upgrade()
    service = BridgeService(settings, database)
    service.start()
    service.import_subscribers("".join(f"{logon},{30 + i}\n" for i, logon in enumerate(LOGONS)))
    for logon in LOGONS:
        service.apply(LoggedOn(logon, at=utcnow(), contact=f"sip:{logon}@127.0.0.1:5090"))
    return service


@pytest.mark.timeout(300)
def test_two_bridges_deciding_through_their_hooks_at_once_share_one_pool(database_url: str) -> None:
    admin = _prepare(database_url)
    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_bridge, args=(database_url, node, ports, stop)) for node in ("pbx1", "pbx2")]
    for proc in procs:
        proc.start()
    try:
        found = dict(ports.get(timeout=120) for _ in procs)
        port1, port2 = found["pbx1"], found["pbx2"]

        async def contest(round_: int) -> list[dict[str, str]]:
            # Every log-on calls at once, half through each bridge.
            asks = [
                ask(
                    port1 if i % 2 == 0 else port2,
                    "outbound",
                    "600",
                    channel=f"PJSIP/{logon}-a{round_:03x}{i:04x}",
                )
                for i, logon in enumerate(LOGONS)
            ]
            return list(await asyncio.gather(*asks))

        async def same_logon(round_: int) -> list[dict[str, str]]:
            logon = LOGONS[round_ % len(LOGONS)]
            asks = [
                ask(port, "outbound", "600", channel=f"PJSIP/{logon}-b{round_:03x}{n:04x}")
                for n, port in enumerate((port1, port2, port1, port2))
            ]
            return list(await asyncio.gather(*asks))

        for round_ in range(ROUNDS):
            answers = run(contest(round_), timeout=60)
            reasons = sorted(a["FORUM_BRIDGE_REASON"] for a in answers)
            assert reasons == ["emergency_only"] * (len(LOGONS) - 1) + ["licence_acquired"], answers
            winner = LOGONS[[a["FORUM_BRIDGE_REASON"] for a in answers].index("licence_acquired")]
            assert [a["logon"] for a in admin.status()["assignments"]] == [winner]
            admin.reset_licences("test")

            answers = run(same_logon(round_), timeout=60)
            reasons = sorted(a["FORUM_BRIDGE_REASON"] for a in answers)
            assert reasons == ["licence_acquired", "licensed", "licensed", "licensed"], answers
            assert [a["logon"] for a in admin.status()["assignments"]] == [LOGONS[round_ % len(LOGONS)]]
            admin.reset_licences("test")
        acquisitions = [a for a in admin.audit_log(1000) if a["kind"] == "acquire"]
        assert len(acquisitions) == 2 * ROUNDS
        assert {a["node"] for a in acquisitions} <= {"pbx1", "pbx2"}
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
        admin.database.dispose()
    assert [p.exitcode for p in procs] == [0, 0]
