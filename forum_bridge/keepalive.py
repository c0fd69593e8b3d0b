"""Keepalive expiry of this node's contacts, and node heartbeats: contacts of nodes that are gone.

Keepalive timing runs on the monotonic clock, so a wall-clock step neither frees nor keeps a
licence. A contact that misses its keepalive (its profile's interval plus the grace) is logged off
through the service, as a log-off from the PBX would be. Every sweep also counts one heartbeat of
this node; another node's contacts expire here only once its heartbeat has stood still for
``node.dead_after`` seconds.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from forum_bridge.clocks import Clock, Monotonic, iso
from forum_bridge.config import Settings
from forum_bridge.core.events import Event, Keepalive, LoggedOn
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from forum_bridge.store.models import ProfileRow, RegistrationRow, stored

# The service's logger: operators filter the bridge's own lines by it.
service_log = logging.getLogger("forum_bridge.service")

_MAX_RECEIPT_LAG = 300.0  # seconds an event may wait between receipt and apply, for keepalive timing
# The slow safety net of the sweep: how often it reads every contact of the node (monotonic seconds).
FULL_PASS_SECONDS = 30.0


class LogOff(Protocol):
    """The service's log-off of one contact; True when that freed the log-on's licence."""

    def __call__(
        self, session: Session, logon: str, contact: str, at: datetime, reason: str, node: str | None = None
    ) -> bool:
        """Remove the contact (of ``node``, default this one) and release the licence if it was the last."""
        ...


class Refreshed(Protocol):
    """What the keepalive clock needs of an event's Outcome: was the registration known."""

    @property
    def unknown_registration(self) -> bool:
        """True when the event refreshed no stored registration."""
        ...


def seen_key(logon: str, contact: str) -> tuple[str, str]:
    """A registration's key as stored (peer values are fitted to their columns on the way in)."""
    return stored(RegistrationRow.logon, logon), stored(RegistrationRow.contact, contact)


def keepalive_limits(session: Session, settings: Settings) -> Callable[[str | None], float]:
    """Seconds of silence after which a contact of a log-on of that profile counts as gone.

    The profile comes with each contact (:func:`~forum_bridge.store.operations.node_registrations`);
    None (not provisioned) is the default profile. Plus the grace.
    """
    keepalive = {row.name: row.keepalive_seconds for row in session.scalars(select(ProfileRow))}
    default = keepalive.get(settings.default_profile, 120)
    grace = settings.keepalive_grace

    def limit(profile: str | None) -> float:
        return float(keepalive.get(profile or "", default) + grace)

    return limit


class KeepaliveClock:
    """When each contact of this node was last refreshed, and the sweep that logs off the silent.

    The deadlines live in memory, fed by what this process applies (log-ons, keepalives, resyncs):
    a sweep reads only the contacts whose deadline has come, to confirm them against the database
    before logging them off (another process, node or the CLI may have refreshed or removed the
    row). Every :data:`FULL_PASS_SECONDS`, at the first sweep, after a resync and after a failed
    sweep, one full pass reads every contact of the node instead, as a safety net: it finds the
    contacts this process never saw and the log-ons whose profile changed.
    """

    def __init__(
        self,
        database: Database,
        settings: Settings,
        clock: Clock,
        monotonic: Monotonic,
        log_off: LogOff,
    ) -> None:
        """``log_off`` is the service's, so an expiry frees a licence exactly as a log-off does."""
        self.database = database
        self.settings = settings
        self.node = settings.node_name
        self.clock = clock
        self.monotonic = monotonic
        self._log_off = log_off
        # (logon, contact) of this node -> (monotonic time of the last refresh, the wall time that
        # refresh stored as last_seen); logon -> the same for its last keepalive (which refreshes
        # all of its contacts here). A stored last_seen that differs was written by someone else.
        self._contact_seen: dict[tuple[str, str], tuple[float, datetime]] = {}
        self._logon_seen: dict[str, tuple[float, datetime]] = {}
        # Log-on -> its profile as last read (None: not provisioned); missing: not read yet.
        self._profile_of: dict[str, str | None] = {}
        # One entry per timed contact: (when to look at it next, logon, contact). The moment is
        # never later than its deadline, so a refresh only needs the dicts above; the entry is
        # moved on when it comes due and the contact turns out refreshed.
        self._due: list[tuple[float, str, str]] = []
        self._queued: set[tuple[str, str]] = set()
        self._limits: dict[str | None, float] = {}
        self._shortest = 0.0  # the shortest of the limits (0 until the first sweep reads them)
        self._full_pass_at: float | None = None  # None: the next sweep reads every contact
        self._peers = PeerNodes(database, settings, log_off)

    # --- refreshes, noted as events are applied ---------------------------------------------------

    def contact_refreshed(self, logon: str, contact: str, at: datetime) -> None:
        """A log-on (REGISTER) of the contact, received at ``at`` (which it stored as last_seen)."""
        self._seen(seen_key(logon, contact), self.mono_at(at), at)

    def logon_refreshed(self, logon: str, at: datetime) -> None:
        """A keepalive of the log-on, received at ``at``: it refreshes all of its contacts here."""
        self._logon_seen[stored(RegistrationRow.logon, logon)] = (self.mono_at(at), at)

    def contact_present(self, logon: str, contact: str, mono: float, at: datetime | None = None) -> None:
        """The PBX shows the contact now (a resync, which stored ``at``, default the clock): refreshed
        at ``mono``."""
        self._seen(seen_key(logon, contact), mono, self.clock() if at is None else at)

    def forget(self, logon: str, contact: str) -> None:
        """The contact (keyed as stored) is logged off: nothing to time any more."""
        self._contact_seen.pop((logon, contact), None)

    def resynced(self) -> None:
        """The node's registrations were brought in line with the PBX: read them all next sweep."""
        self._full_pass_at = None

    def batch_applied(self, events: Sequence[Event], outcomes: Sequence[Refreshed]) -> None:
        """Note the registrations a batch of events refreshed, as applying each one would."""
        for event, outcome in zip(events, outcomes, strict=False):
            if isinstance(event, LoggedOn):
                self.contact_refreshed(event.logon, event.contact, event.at)
            elif isinstance(event, Keepalive) and not outcome.unknown_registration:
                self.logon_refreshed(event.logon, event.at)

    def mono_at(self, at: datetime) -> float:
        """The monotonic time of an event stamped ``at`` on receipt (it may be applied later).

        Only the short wait between receipt and now is read from the wall clock, clamped, so a
        step of the wall clock cannot move a refresh by more than that.
        """
        waited = (self.clock() - at).total_seconds()
        return self.monotonic() - min(max(waited, 0.0), _MAX_RECEIPT_LAG)

    def _seen(self, key: tuple[str, str], mono: float, at: datetime) -> None:
        # Once per event of a storm: kept to a few dictionary and heap operations.
        self._contact_seen[key] = (mono, at)
        if key not in self._queued:
            # Looked at first after the shortest limit (the profile may not be known yet); the
            # queue moves it on, in memory, when its own deadline is later.
            self._queued.add(key)
            heapq.heappush(self._due, (mono + self._shortest, key[0], key[1]))

    def _queue(self, key: tuple[str, str], when: float) -> None:
        self._queued.add(key)
        heapq.heappush(self._due, (when, *key))

    def _limit_of(self, logon: str) -> float:
        if logon in self._profile_of and self._limits:
            return self._limit(self._profile_of[logon])
        return self._shortest

    def _limit(self, profile: str | None) -> float:
        limit = self._limits.get(profile)
        return limit if limit is not None else self._limits[None]

    # --- the sweep -------------------------------------------------------------------------------

    def expire(self, now: datetime | None = None) -> list[str]:
        """Log off every contact that missed its keepalive; return the log-ons freed.

        ``now`` is the moment up to which the adapter has applied every event it received (default:
        the clock): a keepalive received in time but still queued behind a flood must not count as
        missed.

        Also counts one heartbeat of this node. This node's contacts are timed on the monotonic
        clock (a contact not refreshed since this process started counts from its stored
        ``last_seen`` once, and so does one whose stored ``last_seen`` another process moved).
        Contacts of another node are left to that node while its heartbeat moves; once it has not
        moved for ``node.dead_after`` seconds, they expire here by their own keepalive interval
        counted from that node's last heartbeat, with its calls.
        """
        wall = self.clock()
        now = wall if now is None else min(now, wall)
        # Silence is measured only up to the moment the adapter's events are applied.
        mono = self.monotonic() - (wall - now).total_seconds()
        freed: list[str] = []
        try:
            with self.database.transaction() as session:
                # The sweep runs every few seconds: it also catches pool changes made by one-shot
                # commands (reset, reserve), which do not watch the pool themselves.
                ops.mark_pool_changed(session)
                ops.heartbeat(session, self.node, now)
                beats = ops.node_beats(session)
                self._read_limits(session)
                full = self._full_pass_at is None or self.monotonic() >= self._full_pass_at
                if full:
                    rows = ops.node_registrations(session, self.node)
                    self._forget_unknown_contacts(rows)
                    self._due, self._queued = [], set()
                else:
                    due = self._come_due(mono)
                    rows = ops.registrations_of(session, self.node, due)
                    # Logged off meanwhile (by this process, another one, or the CLI): forget them.
                    for key in set(due).difference((row.logon, row.contact) for row in rows):
                        self._contact_seen.pop(key, None)
                for row in rows:
                    silent = mono - self._judge(row, now, mono)
                    if silent > self._limit(row.profile):
                        service_log.info(
                            "missed keepalive logon=%s contact=%s last_seen=%s silent=%.0fs node=%s",
                            row.logon,
                            row.contact,
                            iso(row.last_seen),
                            silent,
                            self.node,
                        )
                        self.forget(row.logon, row.contact)
                        if self._log_off(session, row.logon, row.contact, now, "keepalive"):
                            freed.append(row.logon)
        except BaseException:
            # Deadlines taken off the queue for this sweep are lost with it: read everything next time.
            self._full_pass_at = None
            raise
        if full:
            self._full_pass_at = self.monotonic() + FULL_PASS_SECONDS
        freed += self._peers.expire(beats, now, mono)
        return freed

    def backlog(self) -> int:
        """Contacts of this node past their keepalive deadline that no sweep has logged off yet."""
        now = self.clock()
        with self.database.transaction() as session:
            return ops.overdue_registrations(
                session, self.node, now, self.settings.default_profile, self.settings.keepalive_grace
            )

    def _read_limits(self, session: Session) -> None:
        """The profiles' limits (one small read a sweep); a shortened one re-times every contact."""
        keepalive: dict[str, int] = dict(
            session.execute(select(ProfileRow.name, ProfileRow.keepalive_seconds)).all()
        )
        grace = self.settings.keepalive_grace
        limits: dict[str | None, float] = {name: float(s + grace) for name, s in keepalive.items()}
        limits[None] = float(keepalive.get(self.settings.default_profile, 120) + grace)
        shortened = any(limits.get(name, 0.0) < old for name, old in self._limits.items())
        self._limits = limits
        self._shortest = min(limits.values())
        if shortened:
            self._due = [(self._refresh(key)[0] + self._limit_of(key[0]), *key) for key in self._contact_seen]
            heapq.heapify(self._due)
            self._queued = set(self._contact_seen)

    def _come_due(self, mono: float) -> list[tuple[str, str]]:
        """Take off the queue every contact whose deadline has come; requeue the refreshed ones."""
        due: list[tuple[str, str]] = []
        while self._due and self._due[0][0] < mono:
            _, logon, contact = heapq.heappop(self._due)
            key = (logon, contact)
            if key not in self._contact_seen:
                self._queued.discard(key)
                continue
            deadline = self._refresh(key)[0] + self._limit_of(logon)
            if deadline < mono:
                self._queued.discard(key)  # queued again by _judge unless it expires
                due.append(key)
            else:
                heapq.heappush(self._due, (deadline, logon, contact))
        return due

    def _refresh(self, key: tuple[str, str]) -> tuple[float, datetime]:
        """The contact's last refresh here: (monotonic time, the last_seen it stored)."""
        seen = self._contact_seen[key]
        keepalive = self._logon_seen.get(key[0])
        return seen if keepalive is None or keepalive[0] < seen[0] else keepalive

    def _judge(self, row: ops.NodeContact, now: datetime, mono: float) -> float:
        """The contact's last refresh (monotonic), counting what the database shows of it."""
        key = (row.logon, row.contact)
        self._profile_of[row.logon] = row.profile
        limit = self._limit(row.profile)
        assert row.last_seen is not None  # both reads of the sweep give it
        known = self._contact_seen.get(key)
        if known is None or row.last_seen != self._refresh(key)[1]:
            # Not refreshed here since this process started, or stored since by someone else: the
            # stored wall time is all there is. Read it once, clamped (a clock that stepped back
            # must not keep the contact for ever); it never moves a refresh seen here earlier.
            elapsed = (now - row.last_seen).total_seconds()
            seen = mono - min(max(elapsed, 0.0), limit + 1.0)
            self._contact_seen[key] = (seen if known is None else max(seen, known[0]), row.last_seen)
        refreshed = self._refresh(key)[0]
        if key not in self._queued and mono - refreshed <= limit:
            self._queue(key, refreshed + limit)
        return refreshed

    def _forget_unknown_contacts(self, rows: Sequence[ops.NodeContact]) -> None:
        contacts = {(row.logon, row.contact) for row in rows}
        logons = {row.logon for row in rows}
        for key in [k for k in self._contact_seen if k not in contacts]:
            self._contact_seen.pop(key, None)
        for logon in [k for k in self._logon_seen if k not in logons]:
            self._logon_seen.pop(logon, None)
        for logon in [k for k in self._profile_of if k not in logons]:
            self._profile_of.pop(logon, None)


class PeerNodes:
    """The other nodes' heartbeats as this process saw them move; expiry of the gone nodes' contacts."""

    def __init__(self, database: Database, settings: Settings, log_off: LogOff) -> None:
        """Nodes are gone after ``settings.node_dead_after`` seconds without a new heartbeat."""
        self.database = database
        self.settings = settings
        self.node = settings.node_name
        self._log_off = log_off
        # Other nodes: name -> (heartbeat count, when this process saw that count first).
        self._beats: dict[str, tuple[int, float]] = {}
        self._gone: set[str] = set()
        self._cleared: set[str] = set()  # gone nodes with nothing left to expire

    def expire(self, beats: dict[str, int], now: datetime, mono: float) -> list[str]:
        """Expire the contacts and calls of nodes whose heartbeat stood still; the log-ons freed."""
        gone: list[tuple[str, int, float]] = []
        for name in [n for n in self._beats if n not in beats]:
            del self._beats[name]
            self._gone.discard(name)
            self._cleared.discard(name)
        for name, count in beats.items():
            if name == self.node:
                continue
            seen = self._beats.get(name)
            if seen is None or seen[0] != count:
                self._beats[name] = (count, mono)
                self._cleared.discard(name)
                if name in self._gone:
                    self._gone.discard(name)
                    service_log.warning("node %s sends heartbeats again node=%s", name, self.node)
                continue
            stale = mono - seen[1]
            if stale > self.settings.node_dead_after and name not in self._cleared:
                gone.append((name, count, stale))
        freed: list[str] = []
        for name, count, stale in gone:
            with self.database.transaction() as session:
                # Under the node's row lock and re-read: a peer doing the same waits, then finds
                # nothing left; a node that came back meanwhile is left alone.
                if not ops.lock_node(session, name) or ops.node_beats(session).get(name) != count:
                    continue
                if name not in self._gone:
                    self._gone.add(name)
                    service_log.warning(
                        "node %s sent no heartbeat for %.0fs; expiring its contacts by their keepalive"
                        " node=%s",
                        name,
                        stale,
                        self.node,
                    )
                limit = keepalive_limits(session, self.settings)
                left = 0
                for row in ops.node_registrations(session, name):
                    if stale <= limit(row.profile):
                        left += 1
                    else:
                        service_log.info(
                            "missed keepalive logon=%s contact=%s node=%s (gone) expired_by=%s",
                            row.logon,
                            row.contact,
                            name,
                            self.node,
                        )
                        if self._log_off(session, row.logon, row.contact, now, "keepalive", node=name):
                            freed.append(row.logon)
                # A node that is gone has no calls in progress either.
                ops.replace_calls(session, name, [])
            if left == 0:
                self._cleared.add(name)  # nothing more to do until it beats again
        return freed
