"""PostgreSQL stopped for 30 s under load: the hook keeps answering, nothing crashes, state catches up.

During the outage an emergency call is allowed, any other call follows ``asterisk.fail_mode``
(closed: denied with reason ``bridge_error``), and every answer comes within the hook's own
deadline. The gap shows in the log and in ``forum_bridge_database_up``; when the database is back
a resync brings in what Asterisk reported meanwhile, and the audit log from before is intact.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from forum_bridge.adapters.asterisk.runner import Bridge
from forum_bridge.config import Settings
from forum_bridge.metrics import Metrics
from forum_bridge.service import BridgeService
from forum_bridge.store.database import Database
from tests.asterisk.aio import run
from tests.asterisk.conftest import contact_item, contact_status
from tests.asterisk.fake_ami import FakeAmi
from tests.asterisk.test_asterisk_agi import ask
from tests.faults.conftest import StoppablePostgres

OUTAGE = 30.0
DECISION_TIMEOUT = 2.0


def state(service: BridgeService, logon: str) -> str:
    return str(next(s["state"] for s in service.status()["subscribers"] if s["logon"] == logon))


@pytest.mark.postgres
def test_postgresql_stopped_for_30_seconds_under_load(
    make_settings: Callable[..., Settings],
    stoppable_postgres: StoppablePostgres,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="forum_bridge")

    async def scenario() -> None:
        fake = FakeAmi()
        await fake.start()
        settings = make_settings(
            **{
                "database.url": stoppable_postgres.url,
                "licences.count": 2,
                "asterisk.ami_port": fake.port,
                "asterisk.ami_secret": "fake-ami-secret",
                "asterisk.agi_port": 0,
                "asterisk.enforce": "both",
                "asterisk.fail_mode": "closed",
                "asterisk.reconnect_max": 0.5,
                "asterisk.action_timeout": DECISION_TIMEOUT,
            }
        )
        database = Database(settings.database_url)
        service = BridgeService(settings, database)
        service.start()
        for logon in ("21-desk", "22-soft"):
            service.add_subscriber(logon, logon[:2])
        fake.contacts = [contact_item("21-desk", 5081)]
        bridge = Bridge(settings, service)
        stop = asyncio.Event()
        serving = asyncio.create_task(bridge.serve(stop))
        try:
            await asyncio.wait_for(bridge.started.wait(), 10)
            await bridge.ami.wait_until(lambda: bridge.ami.resyncs >= 1, 10)
            port = bridge.agi.port
            first = await ask(port, "outbound", "600", channel="PJSIP/21-desk-00000001")
            assert first["FORUM_BRIDGE_REASON"] == "licence_acquired"
            audit_before = service.audit_log(50)

            await asyncio.to_thread(stoppable_postgres.stop)
            stopped = time.monotonic()
            # 22-soft registers while the database is away: only Asterisk knows.
            fake.contacts.append(contact_item("22-soft", 5082))
            fake.push(contact_status("22-soft", port=5082))
            answers = 0
            seq = 2
            while time.monotonic() - stopped < OUTAGE:
                for number, expected in (("112", ("allow", "emergency")), ("600", ("deny", "bridge_error"))):
                    seq += 1
                    began = time.monotonic()
                    answer = await asyncio.wait_for(
                        ask(port, "outbound", number, channel=f"PJSIP/22-soft-{seq:08x}"), 20
                    )
                    took = time.monotonic() - began
                    assert (answer["FORUM_BRIDGE_RESULT"], answer["FORUM_BRIDGE_REASON"]) == expected
                    # Within the hook's deadline plus the catch-up wait and a generous margin.
                    assert took < DECISION_TIMEOUT + 3.0, took
                    answers += 1
                scrape, _ = await asyncio.to_thread(Metrics(service, pbx="asterisk").render)
                assert b"forum_bridge_database_up 0.0" in scrape
                await asyncio.sleep(0.5)
            assert answers >= 10
            assert not serving.done()  # nothing crashed

            await asyncio.to_thread(stoppable_postgres.start)
            deadline = time.monotonic() + 30
            while True:
                try:
                    if state(service, "22-soft") == "logged_on":
                        break
                except Exception:
                    pass  # the first queries after the restart may still fail
                assert time.monotonic() < deadline, "the state did not catch up after the database came back"
                await asyncio.sleep(0.2)
            again = await ask(port, "outbound", "600", channel="PJSIP/22-soft-ffffffff")
            assert again["FORUM_BRIDGE_REASON"] == "licence_acquired"
            scrape, _ = await asyncio.to_thread(Metrics(service, pbx="asterisk").render)
            assert b"forum_bridge_database_up 1.0" in scrape
            audit_after = service.audit_log(200)
            assert audit_after[-len(audit_before) :] == audit_before  # the history from before is intact
            assert [a["logon"] for a in service.status()["assignments"]] == ["21-desk", "22-soft"]
        finally:
            stop.set()
            await asyncio.wait_for(serving, 15)
            await fake.close()
            database.dispose()

    run(scenario(), timeout=150)
    messages = [r.getMessage() for r in caplog.records]
    assert any("keepalive clock:" in m for m in messages)
    assert any("keepalive clock works again" in m for m in messages)
    assert any("no decision for logon=22-soft" in m for m in messages)


@pytest.mark.postgres
def test_freeswitch_side_during_a_postgresql_outage(
    make_settings: Callable[..., Settings], stoppable_postgres: StoppablePostgres
) -> None:
    import gevent

    from forum_bridge.adapters.freeswitch.listener import EslListener, KeepaliveSweeper
    from forum_bridge.adapters.freeswitch.socket_hook import SocketHookServer
    from tests.freeswitch.conftest import wait_until
    from tests.freeswitch.fake_esl import FakeEslServer, FakeSocketCall, channel_data

    fake = FakeEslServer().start()
    settings = make_settings(
        **{
            "database.url": stoppable_postgres.url,
            "node.name": "fs1",
            "freeswitch.esl_port": fake.port,
            "freeswitch.fail_mode": "closed",
            "freeswitch.reconnect_max": 0.1,
        }
    )
    database = Database(settings.database_url)
    service = BridgeService(settings, database)
    service.start()
    for logon in ("1000", "1001"):
        service.add_subscriber(logon, logon)
    fake.add_registration("1000", 5091)
    listener = EslListener(service, initial_backoff=0.01, command_timeout=3.0)
    sweeper = KeepaliveSweeper(service, interval=0.05, on_recovered=listener.request_resync)
    hook = SocketHookServer(service, host="127.0.0.1", port=0, session_timeout=10)
    hook.start()
    greenlets = [gevent.spawn(listener.run), gevent.spawn(sweeper.run)]

    def verdict(uuid: str, number: str) -> str:
        before = hook.sessions
        call = FakeSocketCall(hook.port, channel_data(uuid, "1000", number))
        began = time.monotonic()
        call.start()
        wait_until(lambda: call.finished.is_set() and hook.sessions > before, 15, "the hook session")
        assert time.monotonic() - began < 10.0  # within the session deadline, database or not
        return "allowed" if "resume" in call.commands else "denied"

    try:
        wait_until(lambda: listener.connected, 10, "the listener")
        assert verdict("a-1", "600") == "allowed"
        stoppable_postgres.stop()
        fake.register("1001", 5092)  # its event cannot be stored now
        assert verdict("a-2", "112") == "allowed"  # emergency first
        assert verdict("a-3", "601") == "denied"  # fail_mode closed
        wait_until(lambda: sweeper._failing, 10, "the sweeper to notice the outage")
        stoppable_postgres.start()
        deadline = time.monotonic() + 30

        def caught_up() -> bool:
            try:
                return state(service, "1001") == "logged_on"
            except Exception:
                return False

        wait_until(caught_up, deadline - time.monotonic(), "1001's registration after the outage")
        assert [a["logon"] for a in service.status()["assignments"]] == ["1000"]
    finally:
        listener.stop()
        sweeper.stop()
        gevent.joinall(greenlets, timeout=5)
        hook.stop(timeout=1)
        fake.stop()
        database.dispose()
