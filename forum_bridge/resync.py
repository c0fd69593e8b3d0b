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

from forum_bridge.clocks import Clock, Monotonic
from forum_bridge.core.events import Direction
from forum_bridge.keepalive import KeepaliveClock, LogOff
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
        log_off: LogOff,
    ) -> None:
        """``log_off`` is the service's; ``keepalive`` learns which contacts the PBX still holds."""
        self.database = database
        self.node = node
        self.clock = clock
        self.monotonic = monotonic
        self.keepalive = keepalive
        self._log_off = log_off

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
            known = {(row.logon, row.contact) for row in ops.node_registrations(session, self.node)}
            mono = self.monotonic()
            for logon, contact in sorted(known - set(wanted)):
                report.logged_off.append(logon)
                self.keepalive.forget(logon, contact)
                if self._log_off(session, logon, contact, now, "logoff"):
                    report.released.append(logon)
            for logon, contact in sorted(known & set(wanted)):
                # The PBX still holds the contact, so the phone refreshed it while we were away.
                ops.touch_registrations(session, self.node, logon, now, contact)
                self.keepalive.contact_present(logon, contact, mono, now)
            for key in sorted(set(wanted) - known):
                r = wanted[key]
                ops.add_registration(session, self.node, r.logon, r.contact, r.source, r.user_agent, now)
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
