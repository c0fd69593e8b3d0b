"""Retention: pruning old audit lines and licence-use rows, in short bounded batches.

The running bridge prunes once an hour (and at every sweep while old rows are left); trouble with
the database is logged once and never raised, so history never stops the keepalive clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from forum_bridge.clocks import Clock
from forum_bridge.config import Settings
from forum_bridge.errors import ForumBridgeError
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database

# The service's logger: operators filter the bridge's own lines by it.
service_log = logging.getLogger("forum_bridge.service")

PRUNE_BATCH = 2000  # rows per table and call: a short write transaction, even on SQLite
PRUNE_EVERY = 3600.0  # seconds between prunes in the running bridge (sooner while lines are left)


@dataclass(frozen=True)
class PruneReport:
    """What :meth:`Retention.prune_history` deleted; ``more`` when old lines are left."""

    audit: int = 0
    usage: int = 0
    more: bool = False


class Retention:
    """Deletes history older than ``[retention]`` allows, and keeps the hourly schedule of it."""

    def __init__(self, database: Database, settings: Settings, clock: Clock) -> None:
        """Prunes ``database`` by ``settings.retention``, counting age on ``clock``."""
        self.database = database
        self.settings = settings
        self.clock = clock
        self._next_prune = 0.0  # monotonic time of the next prune_if_due; 0: at the first call
        self._failing = False

    def prune_history(self, batch: int = PRUNE_BATCH) -> PruneReport:
        """Delete at most ``batch`` old rows of each table in one short transaction.

        ``more`` says whether old rows are left. A retention of 0 days keeps that table for ever.
        """
        retention = self.settings.retention
        now = self.clock()
        audit = usage = 0
        with self.database.transaction() as session:
            if retention.audit_days:
                audit = ops.prune_audit(session, now - timedelta(days=retention.audit_days), batch)
            if retention.usage_days:
                usage = ops.prune_usage(session, now - timedelta(days=retention.usage_days), batch)
        if audit or usage:
            service_log.info(
                "pruned history: audit=%d usage=%d node=%s", audit, usage, self.settings.node_name
            )
        return PruneReport(audit, usage, more=audit >= batch or usage >= batch)

    def prune_if_due(self, prune: Callable[[], PruneReport]) -> PruneReport | None:
        """Run ``prune`` once an hour, and at every call while old rows are left; None when not due.

        Database trouble is logged once, never raised.
        """
        if time.monotonic() < self._next_prune:
            return None
        try:
            report = prune()
        except ForumBridgeError as exc:
            if not self._failing:
                service_log.warning("pruning history failed: %s (trying again in an hour)", exc)
            self._failing = True
            self._next_prune = time.monotonic() + PRUNE_EVERY
            return None
        self._failing = False
        self._next_prune = 0.0 if report.more else time.monotonic() + PRUNE_EVERY
        return report
