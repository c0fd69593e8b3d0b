"""A call leg is decided once, and an answer the hook gave without the database is final.

The FastAGI hook stores its decision under the leg's channel, so the leg's AMI event (which may be
applied later, e.g. behind a backlog) reuses it instead of deciding again. When the database is
too slow and the hook answers by its fail mode, the decision still waiting for the database must
never take a licence afterwards, and the leg's AMI event gets the same answer.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from forum_bridge.adapters.asterisk.agi import FastAgiServer
from forum_bridge.config import Settings
from forum_bridge.core.events import CallStarted, Direction, LoggedOn
from forum_bridge.service import BridgeService, CallRecord
from tests.asterisk.aio import run
from tests.asterisk.test_asterisk_agi import ask

ServiceFactory = Callable[[Settings], BridgeService]
SettingsFactory = Callable[..., Settings]


def provisioned(service: BridgeService, count: int) -> list[str]:
    logons = [f"{20 + i}-desk" for i in range(count)]
    service.import_subscribers("".join(f"{logon},{20 + i}\n" for i, logon in enumerate(logons)))
    for logon in logons:
        service.apply(LoggedOn(logon, service.clock(), contact=f"sip:{logon}@127.0.0.1:5081"))
    return logons


@contextlib.contextmanager
def write_lock_held(url: str) -> Iterator[None]:
    """Another client holds the database's write lock (SQLite) or locks the licences (PostgreSQL)."""
    if url.startswith("sqlite"):
        path = make_url(url).database or ""
        connection = sqlite3.connect(path, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield
        finally:
            connection.execute("ROLLBACK")
            connection.close()
    else:
        with psycopg.connect(url) as connection:
            connection.execute("LOCK TABLE licences IN ACCESS EXCLUSIVE MODE")
            yield
            connection.rollback()


def test_the_hooks_decision_is_stored_under_the_channel_and_the_ami_event_reuses_it(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str
) -> None:
    service = make_service(make_settings(**{"database.url": database_url, "asterisk.agi_port": 0}))
    first, second, third = provisioned(service, 3)
    records: list[CallRecord] = []
    service.add_listener(records.append)
    channel = f"PJSIP/{first}-00000001"

    async def scenario() -> dict[str, str]:
        server = FastAgiServer(service.settings, service)
        await server.start()
        try:
            return await ask(server.port, "outbound", "600", channel=channel)
        finally:
            await server.close()

    answer = run(scenario())
    assert answer == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "licence_acquired"}
    # Meanwhile the pool changes (licences reset, two other log-ons take both): deciding the leg
    # again now would deny it and hang up a call the hook let through.
    service.reset_licences("test")
    assert service.authorize(second, "600", channel=f"PJSIP/{second}-00000002").allowed
    assert service.authorize(third, "600", channel=f"PJSIP/{third}-00000003").allowed
    assert service.status()["licences"]["free"] == 0
    # The leg's Newchannel, applied late (as the AMI listener does with enforce on).
    outcome = service.apply(CallStarted(first, channel, "600", Direction.OUTBOUND, service.clock()))
    assert not outcome.hangup
    assert outcome.decision is not None and outcome.decision.reason.value == "licence_acquired"
    assert len([r for r in records if r.logon == first]) == 1, "the leg was decided twice"
    audit = [a for a in service.audit_log() if a["logon"] == first and a["kind"] in ("acquire", "deny")]
    assert [a["kind"] for a in audit] == ["acquire"]


def test_a_denial_given_at_the_deadline_never_takes_a_licence_afterwards(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str
) -> None:
    """The database's write lock is held while callers ask: they are refused, and stay refused."""
    settings = make_settings(**{"database.url": database_url, "asterisk.agi_port": 0, "licences.count": 10})
    service = make_service(settings)
    logons = provisioned(service, 6)
    channels = [f"PJSIP/{logon}-0000000{i}" for i, logon in enumerate(logons)]

    async def scenario() -> list[dict[str, Any]]:
        server = FastAgiServer(settings, service, decision_timeout=0.5)
        await server.start()
        try:
            with write_lock_held(database_url):
                answers = [await ask(server.port, "outbound", "600", channel=channel) for channel in channels]
                inbound = await ask(server.port, "inbound", "20", channel="PJSIP/trunk-00000009")
                emergency = await ask(server.port, "outbound", "112", channel=f"PJSIP/{logons[0]}-00000010")
            # The lock is gone: the decisions still waiting behind it run now and must roll back.
            return [*answers, inbound, emergency]
        finally:
            await server.close()

    # asyncio.run returns only after the decision threads have finished.
    *answers, inbound, emergency = run(scenario())
    assert answers == [{"FORUM_BRIDGE_RESULT": "deny", "FORUM_BRIDGE_REASON": "bridge_error"}] * 6
    assert inbound == {"FORUM_BRIDGE_RESULT": "error", "FORUM_BRIDGE_REASON": "bridge_error"}
    assert emergency == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "emergency"}
    status = service.status()
    assert status["licences"]["used"] == 0, status["assignments"]
    assert not [a for a in service.audit_log(500) if a["kind"] == "acquire"]
    # Each leg's AMI event comes now: it gets the hook's answer, not a second decision.
    for logon, channel in zip(logons, channels, strict=True):
        outcome = service.apply(CallStarted(logon, channel, "600", Direction.OUTBOUND, service.clock()))
        assert outcome.hangup
        assert outcome.decision is not None and outcome.decision.reason.value == "bridge_error"
    assert service.status()["licences"]["used"] == 0
    # A new call of the same log-on, now that the database answers again, is decided normally.
    assert service.authorize(logons[0], "600", channel=f"PJSIP/{logons[0]}-00000011").allowed
