"""Resync: make this node's registrations and calls in the database match what the PBX shows.

An adapter resyncs after (re)connecting to its PBX, when events may have been missed. Contacts the
PBX no longer holds are logged off through the service (which frees their licences as a log-off
does); contacts it still holds count as refreshed; new ones are logged on; the calls in progress
replace the ones stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from forum_bridge.clocks import Clock, Monotonic
from forum_bridge.core.events import Direction
from forum_bridge.keepalive import KeepaliveClock
from forum_bridge.store import batch_statements as batch_sql
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from forum_bridge.store.models import RegistrationRow, stored

# The service's logger: operators filter the bridge's own lines by it.
service_log = logging.getLogger("forum_bridge.service")


@dataclass(frozen=True)
class CallSnapshot:
    """A call leg a PBX reports during a resync."""

    channel: str
    logon: str
    number: str
    direction: Direction


@dataclass
class ResyncReport:
    """What a resync changed."""

    logged_on: list[str] = field(default_factory=list)
    logged_off: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    calls_dropped: int = 0


class Resync:
    """Brings one node's stored registrations and calls in line with its PBX."""

    def __init__(
        self,
        database: Database,
        node: str,
        clock: Clock,
        monotonic: Monotonic,
        keepalive: KeepaliveClock,
    ) -> None:
        """``keepalive`` learns which contacts the PBX still holds."""
        self.database = database
        self.node = node
        self.clock = clock
        self.monotonic = monotonic
        self.keepalive = keepalive

    def _release_unregistered(self, session: Session, logons: Sequence[str], now: datetime) -> list[str]:
        """Free the licences of ``logons`` that no longer have a contact on any node (as a log-off
        does); the log-ons freed."""
        holding = set(ops.licence_holders(session)).intersection(logons)
        if not holding:
            return []
        registered = ops.registered_among(session, sorted(holding))
        return [
            logon
            for logon in sorted(holding - registered)
            if ops.release(session, logon, now, "logoff", self.node) is not None
        ]

    def run(self, registrations: Sequence[ops.Registration], calls: Sequence[CallSnapshot]) -> ResyncReport:
        """Make this node's registrations and calls match what the PBX reports now."""
        now = self.clock()
        report = ResyncReport()
        # Keyed as stored, so an over-long contact is recognised as the one stored before.
        wanted = {
            (stored(RegistrationRow.logon, r.logon), stored(RegistrationRow.contact, r.contact)): r
            for r in registrations
        }
        with self.database.transaction() as session:
            # Set-based: with 10,000 phones (a bridge restarted beside a running PBX, or a PBX
            # restarted under it) a few statements, where one or two per contact took seconds on
            # SQLite and up to twenty on PostgreSQL, all the while holding the database.
            known = ops.node_contacts(session, self.node)
            mono = self.monotonic()
            gone = sorted(set(known) - set(wanted))
            ops.delete_registrations_by_id(session, [known[key] for key in gone])
            for logon, contact in gone:
                report.logged_off.append(logon)
                self.keepalive.forget(logon, contact)
                service_log.info(
                    "logged off logon=%s contact=%s reason=logoff node=%s", logon, contact, self.node
                )
            report.released = self._release_unregistered(session, sorted({logon for logon, _ in gone}), now)
            still = sorted(set(known) & set(wanted))
            if still:
                # The PBX still holds these contacts: the phones refreshed them while we were away.
                # After the deletes above they are all this node has left.
                ops.touch_node_registrations(session, self.node, now)
            for logon, contact in still:
                self.keepalive.contact_present(logon, contact, mono, now)
            added = [(key, wanted[key]) for key in sorted(set(wanted) - set(known))]
            batch_sql.insert_contacts(
                session,
                [batch_sql.NewContact(self.node, *key, r.source, r.user_agent, now, now) for key, r in added],
            )
            for key, r in added:
                self.keepalive.contact_present(*key, mono, now)
                report.logged_on.append(r.logon)
            report.calls_dropped = ops.replace_calls(session, self.node, [c.channel for c in calls])
            for call in calls:
                ops.add_call(session, self.node, call.channel, call.logon, call.number, call.direction, now)
        self.keepalive.resynced()
        service_log.info(
            "resync node=%s registrations=%d logged_on=%d logged_off=%d released=%d calls=%d",
            self.node,
            len(registrations),
            len(report.logged_on),
            len(report.logged_off),
            len(report.released),
            len(calls),
        )
        return report
