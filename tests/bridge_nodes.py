"""Bridge processes built in the test process, each with its own monotonic clock (keepalive tests).

Several bridges share one database in these tests: processes of one node, or nodes of one
PostgreSQL pool. Each keeps its keepalive deadlines in memory on its own monotonic clock, which
the test moves by hand.
"""

from __future__ import annotations

from forum_bridge.config import Settings
from forum_bridge.core import LoggedOn, Reason
from forum_bridge.service import BridgeService
from forum_bridge.store.database import Database
from tests.conftest import FakeClock


class FakeMonotonic:
    """A monotonic clock the test moves by hand (only forwards)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def bridge_node(
    settings: Settings, databases: list[Database], clock: FakeClock, mono: FakeMonotonic
) -> BridgeService:
    """One started bridge process on ``settings``' database; nothing of it in memory yet."""
    database = Database(settings.database_url)
    databases.append(database)
    database.upgrade()
    service = BridgeService(settings, database, clock=clock, monotonic=mono)
    service.start()
    return service


def log_on_licensed(service: BridgeService, clock: FakeClock, name: str) -> None:
    """``name`` logs on and takes a licence with its first call."""
    service.apply(LoggedOn(name, at=clock(), contact=f"sip:{name}@127.0.0.1:5060"))
    assert service.authorize(name, "600").reason is Reason.LICENCE_ACQUIRED


def licensed(service: BridgeService) -> list[str]:
    """The log-ons holding a licence, sorted."""
    return sorted(a["logon"] for a in service.status()["assignments"])
