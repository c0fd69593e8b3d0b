"""Failed log-ons: the audit line and warning of each, and summaries of unknown log-ons' floods.

A managed log-on's failure is always written. Failures of log-ons that are not provisioned (a SIP
scanner) are counted by a :class:`~forum_bridge.batching.FailureDigest`: a few are written one by
one per window, the rest as one summary row and line when the window ends.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy.orm import Session

from forum_bridge.batching import SUMMARY_KIND, FailureDigest, Summary
from forum_bridge.clocks import Clock, iso
from forum_bridge.core.events import LogonFailed
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database

service_log = logging.getLogger("forum_bridge.service")


class FailedLogons:
    """Records failed log-ons of one node and writes the summaries of unknown log-ons' failures."""

    def __init__(self, database: Database, node: str, clock: Clock) -> None:
        """Failures are written to ``database`` as ``node``'s; ``clock`` dates the summaries due."""
        self.database = database
        self.node = node
        self.clock = clock
        # Failed log-ons of unknown log-ons (SIP scanners) are counted, not written one by one.
        self.digest = FailureDigest()

    def record(self, session: Session, event: LogonFailed, *, managed: bool) -> None:
        """Audit and log one failed log-on; failures of unknown log-ons beyond a budget are counted.

        A flood of failures for log-ons that are not provisioned (a SIP scanner) writes at most
        :data:`~forum_bridge.batching.DIGEST_INDIVIDUAL` rows and WARNING lines per window, then one
        summary row and line per window; a managed log-on's failure is always written.
        """
        if not managed:
            write, ended = self.digest.note(event, event.at)
            if ended is not None:
                self._write_summary(session, ended)
            if not write:
                return
        ops.audit(
            session,
            event.at,
            "logon_failed",
            logon=event.logon,
            reason=event.reason if managed else "unknown_user",
            node=self.node,
            detail=event.source,
        )
        service_log.warning(
            "log-on failed logon=%s reason=%s source=%s managed=%s node=%s",
            event.logon,
            event.reason,
            event.source,
            managed,
            self.node,
        )

    def flush_summary(self, now: datetime | None = None) -> bool:
        """Write the summary of a failure window that has ended (the sweep calls this); True if one was."""
        summary = self.digest.due(now or self.clock())
        if summary is None:
            return False
        with self.database.transaction() as session:
            self._write_summary(session, summary)
        return True

    def _write_summary(self, session: Session, summary: Summary) -> None:
        ops.audit(
            session,
            summary.end,
            SUMMARY_KIND,
            logon=summary.names[0] if summary.names else "",
            reason="unknown_user",
            node=self.node,
            detail=summary.detail(),
        )
        service_log.warning(
            "log-on failed for unknown log-ons: %d more since %s, %s%d distinct names, sample=%s"
            " sources=%s node=%s",
            summary.count,
            iso(summary.start),
            "" if summary.distinct_exact else "at least ",
            summary.distinct,
            ",".join(summary.names),
            ",".join(f"{source}x{count}" for source, count in summary.sources),
            self.node,
        )
