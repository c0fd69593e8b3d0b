"""The service layer: the one place that turns events into state changes and enforcement.

Both PBX adapters call :class:`BridgeService`; the CLI and the status page read through it. Each
public method is one database transaction. Decisions come from :func:`forum_bridge.core.decide_call`;
this module only gathers the facts, applies the verdict, writes the audit log and logs one line per
decision.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from forum_bridge.batching import SUMMARY_KIND, FailureDigest, Summary, apply_run
from forum_bridge.config import Settings
from forum_bridge.core.events import (
    CallEnded,
    CallStarted,
    Direction,
    Event,
    Keepalive,
    LoggedOff,
    LoggedOn,
    LogonFailed,
)
from forum_bridge.core.names import invisible_character
from forum_bridge.core.rules import Decision, LogonState, Reason, decide_call
from forum_bridge.errors import (
    AlreadyExistsError,
    DecisionAbandoned,
    ForumBridgeError,
    InvalidInputError,
    NotFoundError,
    StoreError,
)
from forum_bridge.pool_watch import PoolWatch
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from forum_bridge.store.models import (
    AuditRow,
    CallRow,
    LicenceRow,
    ProfileRow,
    RegistrationRow,
    SubscriberRow,
    UsageRow,
    stored,
)

log = logging.getLogger("forum_bridge.decision")
service_log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
_MAX_RECEIPT_LAG = 300.0  # seconds an event may wait between receipt and apply, for keepalive timing
Monotonic = Callable[[], float]
MAX_NAME = 128
MAX_NUMBER = 64
RESERVED_WORDS = {
    "reserved": True,
    "yes": True,
    "true": True,
    "1": True,
    "no": False,
    "false": False,
    "0": False,
}
STATUS_MAX_AGE = 1.0  # seconds a shared status document serves readers when nothing changed here


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 with a Z, as every JSON document of the bridge writes times."""
    if value is None:
        return None
    v = value.astimezone(UTC)
    # Formatted by hand: the status document formats one or two times per subscriber, and this is
    # twice as fast as isoformat(), with the same text.
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (v.year, v.month, v.day, v.hour, v.minute, v.second)  # noqa: UP031


@dataclass(frozen=True)
class CallRecord:
    """A decision on one call leg, handed to listeners (metrics) after the transaction."""

    logon: str
    number: str
    direction: Direction
    decision: Decision
    channel: str = ""


@dataclass(frozen=True)
class Outcome:
    """What an adapter must do after :meth:`BridgeService.apply`."""

    hangup: bool = False
    decision: Decision | None = None
    unknown_registration: bool = False
    # Set when the event changed whether its log-on is blocked by a failed log-on (True: blocked
    # now, False: the block was cleared), so the adapter can tell the PBX at once; see blocked_logons.
    blocked: bool | None = None
    # For a LoggedOn that added a new contact: the log-on's other contacts on this node. A PBX that
    # keeps one contact per address (FreeSWITCH without multiple-registrations) may have dropped
    # them without an event; the adapter can check and log them off.
    other_contacts: tuple[str, ...] = ()
    # For a Keepalive that may not clear a block, of a registered log-on whose latest log-on failed:
    # the adapter should find out whether it was a REGISTER after all and, if so, send it again
    # with ``clears_block=True``.
    check_logon: bool = False


@dataclass(frozen=True)
class PruneReport:
    """What :meth:`BridgeService.prune_history` deleted; ``more`` when old lines are left."""

    audit: int = 0
    usage: int = 0
    more: bool = False


PRUNE_BATCH = 2000  # rows per table and call: a short write transaction, even on SQLite
PRUNE_EVERY = 3600.0  # seconds between prunes in the running bridge (sooner while lines are left)


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


class DecisionTicket:
    """One caller's wait for a call decision: its deadline, and the leg it is about.

    The FastAGI hook makes one per question. When the deadline passes it answers by its fail mode
    and tells the service (:meth:`BridgeService.give_up`); from then on the decision can no longer
    commit, and the leg keeps the answer given.
    """

    _numbers = itertools.count(1)

    def __init__(self, deadline: float, channel: str = "") -> None:
        """``deadline`` is a ``time.monotonic()`` value; ``channel`` the leg, if there is one."""
        self.deadline = deadline
        self.channel = channel
        self.key = f"#{next(self._numbers)}"

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return time.monotonic() >= self.deadline


class _Superseded(Exception):
    """Internal: the leg was answered without the database meanwhile; roll back, return that."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason.value)
        self.decision = decision


class _DecisionGate:
    """Makes "committed" and "answered without the database" exclude each other, per leg.

    A decision commits only after :meth:`begin_commit` said yes; a caller that gives up first
    makes every later commit of its ticket and its channel fail, so an answer once given is never
    contradicted by a licence taken later. Answers given are kept a while (bounded) so that the
    same leg seen again (its AMI event) gets the same answer.
    """

    _TTL = 600.0
    _LIMIT = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._committing: dict[str, int] = {}
        self._settled: OrderedDict[str, tuple[float, Decision]] = OrderedDict()

    def settled(self, *keys: str) -> Decision | None:
        """The answer given without the database for any of ``keys``, if one was."""
        if not self._settled:
            return None
        with self._lock:
            for key in keys:
                entry = self._settled.get(key) if key else None
                if entry is not None and time.monotonic() - entry[0] <= self._TTL:
                    return entry[1]
        return None

    def begin_commit(self, keys: Sequence[str], ticket: DecisionTicket | None) -> bool | Decision:
        """True: commit. False: the ticket's caller gave up. A Decision: the leg was answered so."""
        with self._lock:
            if ticket is not None and ticket.key in self._settled:
                return False
            for key in keys:
                entry = self._settled.get(key)
                if entry is not None:
                    return entry[1]
            for key in keys:
                self._committing[key] = self._committing.get(key, 0) + 1
            return True

    def end_commit(self, keys: Sequence[str]) -> Decision | None:
        """The commit finished; the answer given meanwhile by a caller that could not wait, if any."""
        with self._lock:
            answer = None
            for key in keys:
                left = self._committing.get(key, 0) - 1
                if left > 0:
                    self._committing[key] = left
                else:
                    self._committing.pop(key, None)
                entry = self._settled.get(key)
                if entry is not None:
                    answer = entry[1]
            return answer

    def give_up(self, ticket: DecisionTicket, answer: Decision, *, force: bool) -> bool:
        """Record ``answer`` for the ticket and its leg; False (nothing recorded) while committing."""
        keys = [k for k in (ticket.key, ticket.channel) if k]
        with self._lock:
            if not force and any(self._committing.get(k) for k in keys):
                return False
            now = time.monotonic()
            for key in keys:
                self._settled[key] = (now, answer)
                self._settled.move_to_end(key)
            while self._settled and (
                len(self._settled) > self._LIMIT or now - next(iter(self._settled.values()))[0] > self._TTL
            ):
                self._settled.popitem(last=False)
            return True


_SHARED_DOCUMENTS = 16  # listings kept at once (searches and pages of the status page)


class _SharedDocument:
    """One status document for many concurrent readers (the status page's pollers).

    A reader gets the document computed for the same database generation (no write by this
    process since) if it is younger than ``max_age`` seconds, or waits for the one being computed
    for that generation; otherwise it computes it. So 64 clients polling ``/status.json`` cost one
    computation at a time instead of 64 competing with call decisions for the interpreter, and a
    change made through this process is visible to the very next reader.
    """

    def __init__(self, max_age: float) -> None:
        self._max_age = max_age
        self._lock = threading.Lock()
        # Keyed by (generation, listing): the whole document and the page's first pages are shared.
        self._done: dict[tuple[Any, ...], tuple[float, dict[str, Any]]] = {}
        self._running: dict[tuple[Any, ...], Future[dict[str, Any]]] = {}

    def get(self, key: tuple[Any, ...], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The shared document for ``key`` (generation first); ``compute`` makes a new one when needed."""
        with self._lock:
            done = self._done.get(key)
            if done is not None and time.monotonic() - done[0] <= self._max_age:
                return done[1]
            running = self._running.get(key)
            if running is None:
                mine: Future[dict[str, Any]] = Future()
                self._running[key] = mine
        if running is not None:
            return running.result()
        try:
            document = compute()
        except BaseException as exc:
            with self._lock:
                self._running.pop(key, None)
            mine.set_exception(exc)
            raise
        with self._lock:
            self._running.pop(key, None)
            # Documents of older generations are stale; and a search per reader must not pile up.
            if len(self._done) >= _SHARED_DOCUMENTS:
                self._done.clear()
            self._done = {k: v for k, v in self._done.items() if k[0] == key[0]}
            self._done[key] = (time.monotonic(), document)
        mine.set_result(document)
        return document


def _seen_key(logon: str, contact: str) -> tuple[str, str]:
    """A registration's key as stored (peer values are fitted to their columns on the way in)."""
    return stored(RegistrationRow.logon, logon), stored(RegistrationRow.contact, contact)


def validate_logon(logon: str) -> str:
    """A log-on name: SIP user part characters, nothing invisible, at most 128 characters.

    A name with an invisible character (a spreadsheet's byte order mark, a zero-width space) would
    look like another log-on's name and never match what the PBX reports, so the phone would be
    treated as unmanaged: refused, never stored.
    """
    value = logon.strip()
    hidden = invisible_character(value)
    if hidden is not None:
        raise InvalidInputError(
            f"invalid log-on {logon!r}: it holds an invisible or control character ({hidden})"
        )
    if not value or len(value) > MAX_NAME or any(c in "/,;:@<>\"'" for c in value):
        raise InvalidInputError(f"invalid log-on {logon!r}: use a SIP user name without spaces or / , ; : @")
    return value


def validate_number(number: str) -> str:
    """A call number: the ASCII digits and * # +, at most 64 characters (no other script's digits)."""
    value = number.strip()
    if not value or len(value) > MAX_NUMBER or not all(c in "0123456789*#+" for c in value):
        raise InvalidInputError(f"invalid call number {number!r}: use digits, * # or +")
    return value


class BridgeService:
    """Applies the Forum licence rules to one node's events, on a shared database."""

    def __init__(
        self,
        settings: Settings,
        database: Database | None = None,
        clock: Clock = utcnow,
        monotonic: Monotonic | None = None,
        *,
        watch_pool: bool = True,
    ) -> None:
        """``clock`` gives wall times (stored, shown); ``monotonic`` measures "how long since".

        Without ``monotonic`` the real clock pairs with :func:`time.monotonic`, and a test clock
        also drives the keepalive timing (its timestamps), so tests need to move only one clock.
        """
        self.settings = settings
        self.database = database if database is not None else Database(settings.database_url)
        self.clock = clock
        if monotonic is None:
            monotonic = time.monotonic if clock is utcnow else (lambda: clock().timestamp())
        self.monotonic = monotonic
        self.node = settings.node_name
        self._listeners: list[Callable[[CallRecord], None]] = []
        self._failure_listeners: list[Callable[[], None]] = []
        # Off for one-shot commands: their log goes nowhere, so a crossing they made is left for a
        # running bridge to find (its keepalive sweep looks at the pool every second).
        self._pool_watch = (
            PoolWatch(self.database, settings.licence_warn_at, self.node, clock) if watch_pool else None
        )
        self._next_prune = 0.0  # monotonic time of the next prune_if_due; 0: at the first call
        self._prune_failing = False
        # Failed log-ons of unknown log-ons (SIP scanners) are counted, not written one by one.
        self.failure_digest = FailureDigest()
        self._gate = _DecisionGate()
        self._shared_status = _SharedDocument(STATUS_MAX_AGE)
        # Keepalive timing on the monotonic clock, so a wall-clock step neither frees nor keeps a
        # licence. (logon, contact) of this node -> last refresh; logon -> last keepalive (which
        # refreshes all of its contacts here). Only contacts in the database are kept.
        self._contact_seen: dict[tuple[str, str], float] = {}
        self._logon_seen: dict[str, float] = {}
        # Other nodes: name -> (heartbeat count, when this process saw that count first).
        self._peer_beats: dict[str, tuple[int, float]] = {}
        self._peers_gone: set[str] = set()
        self._peers_cleared: set[str] = set()  # gone nodes with nothing left to expire

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Check the schema and bring slots and configured profiles in line with the settings.

        An empty database gets the schema at once (a new installation needs no extra step); a
        database at an older revision is left alone until ``forum-bridge db upgrade`` is run.
        """
        if self.database.current_revision() is None:
            service_log.warning("the database is empty; creating the schema")
            self.database.upgrade()
        self.database.require_current_schema()
        self.sync_configuration()
        self.check_pool()
        self._warn_about_hidden_names()

    def _warn_about_hidden_names(self) -> None:
        # Names stored before invisible characters were refused (a CSV's byte order mark) never
        # match what the PBX reports, so those phones run unmanaged: say so until they are fixed.
        with self.database.transaction() as session:
            hidden = [n for n in session.scalars(select(SubscriberRow.logon)) if invisible_character(n)]
        for logon in hidden:
            service_log.warning(
                "subscriber %r holds an invisible character (%s) and matches no phone: remove it "
                "('forum-bridge subscriber remove') and add it again",
                logon,
                invisible_character(logon),
            )

    def sync_configuration(self) -> None:
        """Create the configured profiles and as many licence slots as were purchased."""
        now = self.clock()
        with self.database.transaction() as session:
            ops.upsert_profiles(session, ((p.name, p.keepalive) for p in self.settings.profiles.values()))
            ops.sync_slots(session, self.settings.licence_count, now, self.node)

    def add_listener(self, listener: Callable[[CallRecord], None]) -> None:
        """Call ``listener`` after every call decision (metrics use this)."""
        self._listeners.append(listener)

    def add_failure_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a call could not be decided because the database failed."""
        self._failure_listeners.append(listener)

    def _decision_failed(self) -> None:
        for listener in self._failure_listeners:
            try:
                listener()
            except Exception:  # a broken listener must never affect a call
                service_log.exception("failure listener failed")

    # --- pool pressure ------------------------------------------------------------------------

    def check_pool(self) -> None:
        """Look at the pool pressure now (at start, and after changes made elsewhere)."""
        if self._pool_watch is not None:
            self._pool_watch.check()

    def keepalive_backlog(self) -> int:
        """Contacts of this node past their keepalive deadline that no sweep has logged off yet.

        Normally 0 (the sweep runs every few seconds); a number that stays up means expired phones
        keep their licences because the keepalive clock is stuck.
        """
        now = self.clock()
        with self.database.transaction() as session:
            return ops.overdue_registrations(
                session, self.node, now, self.settings.default_profile, self.settings.keepalive_grace
            )

    # --- events -------------------------------------------------------------------------------

    def apply(self, event: Event, *, enforce: bool = True) -> Outcome:
        """Apply one normalised PBX event. ``enforce`` decides calls (and may take licences)."""
        if isinstance(event, CallStarted):
            return self._call_started(event, enforce)
        with self.database.transaction() as session:
            if isinstance(event, LoggedOn):
                return self._logged_on(session, event)
            if isinstance(event, LoggedOff):
                self._logged_off(session, event.logon, event.contact, event.at, event.reason)
            elif isinstance(event, LogonFailed):
                return self._logon_failed(session, event)
            elif isinstance(event, Keepalive):
                return self._keepalive(session, event)
            elif isinstance(event, CallEnded):
                ops.end_call(session, self.node, event.channel)
        return Outcome()

    def apply_batch(self, events: Sequence[Event], *, enforce: bool = True) -> list[Outcome]:
        """Apply events in order, in as few transactions as possible; one Outcome per event.

        The effects, log lines and Outcomes are those of :meth:`apply` called for each event in turn.
        Runs of registration and security events share one transaction (a registration storm is
        thousands of them); each call start is decided in its own, as :meth:`apply` does. When a
        run's transaction fails, its events are applied one by one, so that one bad event cannot
        cost the others; StoreError is raised only when the database itself keeps failing.
        """
        outcomes: list[Outcome] = []
        run: list[Event] = []
        for event in events:
            if isinstance(event, CallStarted):
                outcomes += self._apply_run(run)
                run = []
                outcomes.append(self.apply(event, enforce=enforce))
            else:
                run.append(event)
        outcomes += self._apply_run(run)
        return outcomes

    def _apply_run(self, events: Sequence[Event]) -> list[Outcome]:
        if not events:
            return []
        try:
            with self.database.transaction() as session:
                together = apply_run(self, session, events)
            self._stamp_refreshes(events, together)
            return together
        except StoreError as exc:
            if len(events) == 1:
                raise
            service_log.warning(
                "could not apply %d events together (%s); applying them one by one", len(events), exc
            )
        outcomes: list[Outcome] = []
        failures = 0
        for event in events:
            try:
                outcomes.append(self.apply(event))
                failures = 0
            except StoreError:
                failures += 1
                if failures >= 3:
                    raise  # the database itself is failing, not one event
                service_log.exception("dropped one %s the database refused", type(event).__name__)
                outcomes.append(Outcome())
        return outcomes

    def _stamp_refreshes(self, events: Sequence[Event], outcomes: Sequence[Outcome]) -> None:
        """Note on the monotonic clock the registrations a batch refreshed (see expire_keepalives)."""
        for event, outcome in zip(events, outcomes, strict=False):
            if isinstance(event, LoggedOn):
                self._contact_seen[_seen_key(event.logon, event.contact)] = self._mono_at(event.at)
            elif isinstance(event, Keepalive) and not outcome.unknown_registration:
                self._logon_seen[stored(RegistrationRow.logon, event.logon)] = self._mono_at(event.at)

    def _mono_at(self, at: datetime) -> float:
        """The monotonic time of an event stamped ``at`` on receipt (it may be applied later).

        Only the short wait between receipt and now is read from the wall clock, clamped, so a
        step of the wall clock cannot move a refresh by more than that.
        """
        waited = (self.clock() - at).total_seconds()
        return self.monotonic() - min(max(waited, 0.0), _MAX_RECEIPT_LAG)

    def _block_cleared(self, subscriber: SubscriberRow | None) -> bool | None:
        """Clear a failed log-on's block; False when that lifted a block the PBX must forget."""
        if subscriber is None or not subscriber.last_logon_failed:
            return None
        subscriber.last_logon_failed = False
        return False if self.settings.block_after_failed_logon else None

    def _logged_on(self, session: Session, event: LoggedOn) -> Outcome:
        new = ops.add_registration(
            session, self.node, event.logon, event.contact, event.source, event.user_agent, event.at
        )
        blocked = self._block_cleared(session.get(SubscriberRow, event.logon))
        others: tuple[str, ...] = ()
        self._contact_seen[_seen_key(event.logon, event.contact)] = self._mono_at(event.at)
        if new:
            service_log.info("logged on logon=%s contact=%s node=%s", event.logon, event.contact, self.node)
            contacts = ops.logon_contacts(session, self.node, event.logon)
            others = tuple(c for c in contacts if c != event.contact)
        return Outcome(blocked=blocked, other_contacts=others)

    def _logged_off(
        self, session: Session, logon: str, contact: str, at: datetime, reason: str, node: str | None = None
    ) -> bool:
        node = node or self.node
        removed = ops.remove_registrations(session, node, logon, contact)
        if removed:
            service_log.info(
                "logged off logon=%s contact=%s reason=%s node=%s", logon, contact or "*", reason, node
            )
        if ops.is_registered(session, logon):
            return False
        return ops.release(session, logon, at, reason, self.node) is not None

    def record_failure(self, session: Session, event: LogonFailed, *, managed: bool) -> None:
        """Audit and log one failed log-on; failures of unknown log-ons beyond a budget are counted.

        A flood of failures for log-ons that are not provisioned (a SIP scanner) writes at most
        :data:`~forum_bridge.batching.DIGEST_INDIVIDUAL` rows and WARNING lines per window, then one
        summary row and line per window; a managed log-on's failure is always written.
        """
        if not managed:
            write, ended = self.failure_digest.note(event, event.at)
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

    def flush_failure_summary(self, now: datetime | None = None) -> bool:
        """Write the summary of a failure window that has ended (the sweep calls this); True if one was."""
        summary = self.failure_digest.due(now or self.clock())
        if summary is None:
            return False
        with self.database.transaction() as session:
            self._write_summary(session, summary)
        return True

    def _logon_failed(self, session: Session, event: LogonFailed) -> Outcome:
        subscriber = session.get(SubscriberRow, event.logon)
        self.record_failure(session, event, managed=subscriber is not None)
        if subscriber is None:
            return Outcome()
        was_failed = subscriber.last_logon_failed
        subscriber.last_logon_failed = True
        subscriber.last_failure_at = event.at
        if not self.settings.block_after_failed_logon:
            return Outcome()
        # It may make no call at all now, so the licence would only be wasted.
        ops.release(session, event.logon, event.at, "logon_failed", self.node)
        return Outcome(blocked=None if was_failed else True)

    def _keepalive(self, session: Session, event: Keepalive) -> Outcome:
        touched = ops.touch_registrations(session, self.node, event.logon, event.at)
        if touched:
            self._logon_seen[stored(RegistrationRow.logon, event.logon)] = self._mono_at(event.at)
        # Only a successful REGISTER of a registered log-on counts as a successful log-on attempt:
        # a phone must not clear its failed log-on by authenticating a call (e.g. to 112).
        subscriber = session.get(SubscriberRow, event.logon) if touched else None
        if subscriber is None or not subscriber.last_logon_failed:
            return Outcome(unknown_registration=touched == 0)
        if not event.clears_block:
            return Outcome(check_logon=True)
        failed_at = subscriber.last_failure_at
        if failed_at is not None and failed_at > event.at:
            # Confirmed late (the adapter asked the PBX first): a failure since then stands.
            return Outcome()
        return Outcome(blocked=self._block_cleared(subscriber))

    def _call_started(self, event: CallStarted, enforce: bool) -> Outcome:
        if not enforce:
            with self.database.transaction() as session:
                ops.add_call(
                    session, self.node, event.channel, event.logon, event.number, event.direction, event.at
                )
            return Outcome()
        decision = self.authorize(event.logon, event.number, event.direction, channel=event.channel)
        return Outcome(hangup=not decision.allowed, decision=decision)

    # --- call decisions -----------------------------------------------------------------------

    def is_emergency(self, number: str) -> bool:
        """True when ``number`` is an emergency number of this installation."""
        return self.settings.emergency.is_emergency(number)

    def authorize(
        self,
        logon: str,
        number: str,
        direction: Direction = Direction.OUTBOUND,
        *,
        channel: str = "",
        ticket: DecisionTicket | None = None,
    ) -> Decision:
        """Decide a call leg now and apply it: an allowed call may take a licence.

        Emergency calls come first: if the database fails, an outbound emergency call is still
        allowed (the failed-log-on rule cannot be checked then). Other calls raise StoreError and the
        adapter applies its fail mode. A ``channel`` decided before gets the same answer again, also
        when the answer was given without the database (see :meth:`give_up`).

        ``ticket`` ties the decision to a caller that may stop waiting for it: a decision whose
        caller gave up is rolled back (DecisionAbandoned) and takes no licence.
        """
        emergency = direction is Direction.OUTBOUND and self.is_emergency(number)
        keys = [k for k in (channel, ticket.key if ticket is not None else "") if k]
        settled = self._gate.settled(*keys)
        if settled is not None and emergency and settled.reason is Reason.BRIDGE_ERROR:
            # Emergency first: a fail-mode denial never sticks to a call for help (which takes
            # no licence, so deciding it again cannot take one either).
            keys = [ticket.key] if ticket is not None else []
            settled = self._gate.settled(*keys)
        if settled is not None and (ticket is None or self._gate.settled(ticket.key) is None):
            return settled  # the leg was answered without the database before; that answer stands
        if ticket is not None and (settled is not None or ticket.expired()):
            raise DecisionAbandoned("the caller stopped waiting before the decision began")
        now = self.clock()
        committing = False
        late: Decision | None = None
        try:
            with self.database.begin(ticket.deadline if ticket else None) as session:
                facts = ops.decision_facts(session, self.node, logon, channel)
                if facts.earlier is not None:
                    # The same leg seen twice (AMI event and dialplan hook): one decision, one audit line.
                    return facts.earlier
                state = facts.state
                decision = decide_call(
                    state,
                    direction=direction,
                    is_emergency=emergency,
                    # Taken as free here: acquire() below decides (reservations included) and the
                    # call becomes emergency_only when none may be taken, so the pool is counted once.
                    licence_free=True,
                    block_after_failed_logon=self.settings.block_after_failed_logon,
                )
                decision = self._apply_decision(session, logon, number, direction, decision, now)
                if channel:
                    ops.record_call_decision(
                        session, self.node, channel, logon, number, direction.value, now, decision
                    )
                stand = self._gate.begin_commit(keys, ticket)
                if isinstance(stand, Decision):
                    raise _Superseded(stand)
                if not stand:
                    raise DecisionAbandoned("the caller stopped waiting; the decision was rolled back")
                committing = True
            committing = False
            late = self._gate.end_commit(keys)
        except _Superseded as superseded:
            return superseded.decision
        except StoreError:
            if committing:
                self._gate.end_commit(keys)
            self._decision_failed()
            if not emergency:
                raise
            service_log.exception("database failed during an emergency call; letting it through")
            decision = Decision(True, Reason.EMERGENCY)
        if late is not None and not late.allowed and decision.reason is Reason.LICENCE_ACQUIRED:
            self._undo_late_licence(logon, channel)
        self._report(logon, number, direction, decision, channel)
        return decision

    def give_up(self, ticket: DecisionTicket, answer: Decision) -> bool:
        """The caller of :meth:`authorize` answered ``answer`` without waiting for the database.

        True: no decision of that ticket will ever be committed, and the ticket's channel gets
        ``answer`` from now on. False: the decision is being committed at this very moment; wait
        for it (its answer is the truth) and call ``give_up(ticket, answer, force=True)`` if even
        that takes too long.
        """
        return self._gate.give_up(ticket, answer, force=False)

    def give_up_anyway(self, ticket: DecisionTicket, answer: Decision) -> None:
        """Like :meth:`give_up` while a commit is in progress: a licence it takes is given back."""
        self._gate.give_up(ticket, answer, force=True)

    def _apply_decision(
        self,
        session: Session,
        logon: str,
        number: str,
        direction: Direction,
        decision: Decision,
        now: datetime,
    ) -> Decision:
        if decision.takes_licence:
            slot = ops.acquire(session, logon, self.node, now)
            if slot is None:  # lost the last licence to a concurrent call
                decision = Decision(False, Reason.EMERGENCY_ONLY)
            else:
                ops.audit(
                    session,
                    now,
                    "acquire",
                    logon=logon,
                    number=number,
                    reason=direction.value,
                    node=self.node,
                    detail=f"slot {slot}",
                )
        if not decision.allowed:
            ops.audit(
                session,
                now,
                "deny",
                logon=logon,
                number=number,
                reason=decision.reason.value,
                node=self.node,
                detail=direction.value,
            )
        return decision

    def _undo_late_licence(self, logon: str, channel: str) -> None:
        # The caller was answered (a denial, or fail mode) before this decision's commit finished.
        service_log.warning(
            "a late decision took a licence after its caller was answered; giving it back"
            " logon=%s channel=%s node=%s",
            logon,
            channel or "-",
            self.node,
        )
        try:
            with self.database.transaction() as session:
                ops.release(session, logon, self.clock(), "late_decision", self.node)
        except StoreError as exc:
            service_log.error("could not give back the late licence of %s: %s", logon, exc)

    def blocked_logons(self) -> list[str]:
        """The managed log-ons that may make no call at all, 112 included (latest log-on failed).

        This is the one fact a PBX needs to decide emergency calls without asking the bridge; the
        adapters copy it into the PBX (and :class:`Outcome.blocked` tells them of each change).
        Empty when ``emergency.block_after_failed_logon`` is off.
        """
        if not self.settings.block_after_failed_logon:
            return []
        with self.database.read() as session:
            return ops.failed_logons(session)

    def logon_state(self, logon: str) -> LogonState:
        """What the rules know about ``logon`` now (managed, logged on, failed, licensed)."""
        with self.database.read() as session:
            return ops.logon_state(session, logon)

    def call_number(self, logon: str) -> str | None:
        """The call number of a managed log-on, or None for one that is not provisioned."""
        with self.database.read() as session:
            row = session.get(SubscriberRow, logon)
            return row.number if row is not None else None

    def check(self, logon: str, number: str, direction: Direction = Direction.OUTBOUND) -> Decision:
        """What :meth:`authorize` would answer now, without taking a licence or writing anything."""
        emergency = direction is Direction.OUTBOUND and self.is_emergency(number)
        with self.database.read() as session:
            return self._decide(session, logon, number, direction, emergency, self.clock(), apply=False)

    def _decide(
        self,
        session: Session,
        logon: str,
        number: str,
        direction: Direction,
        emergency: bool,
        now: datetime,
        *,
        apply: bool,
    ) -> Decision:
        if apply:
            ops.lock_logon(session, logon)
        state = ops.logon_state(session, logon)
        decision = decide_call(
            state,
            direction=direction,
            is_emergency=emergency,
            # Only asked when it can matter; an emergency call never waits for the pool count.
            licence_free=not emergency
            and state.logged_on
            and not state.holds_licence
            and ops.licence_available(session, logon),
            block_after_failed_logon=self.settings.block_after_failed_logon,
        )
        if not apply:
            return decision
        return self._apply_decision(session, logon, number, direction, decision, now)

    def _report(
        self, logon: str, number: str, direction: Direction, decision: Decision, channel: str
    ) -> None:
        log.info(
            "decision logon=%s number=%s direction=%s result=%s reason=%s node=%s channel=%s",
            logon,
            number,
            direction.value,
            "allowed" if decision.allowed else "denied",
            decision.reason.value,
            self.node,
            channel or "-",
        )
        record = CallRecord(logon, number, direction, decision, channel)
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a broken listener must never affect a call
                service_log.exception("decision listener failed")

    def ringable(self, number: str, *, ticket: DecisionTicket | None = None) -> list[tuple[str, Decision]]:
        """Decide, for every log-on of call number ``number``, whether its phone may ring now.

        Each allowed log-on takes its licence (a call received is a connection). Log-ons denied
        are not rung; the others of the same number still may be. ``ticket``: as for
        :meth:`authorize`, once its caller gives up no further licence is taken.
        """
        with self.database.read() as session:
            logons = [row.logon for row in ops.subscribers_of_number(session, number)]
        return [(logon, self.authorize(logon, number, Direction.INBOUND, ticket=ticket)) for logon in logons]

    # --- clocks, resync, reset ----------------------------------------------------------------

    def expire_keepalives(self, now: datetime | None = None) -> list[str]:
        """Log off every contact that missed its keepalive; return the log-ons freed.

        ``now`` is the moment up to which the adapter has applied every event it received (default:
        the clock): a keepalive received in time but still queued behind a flood must not count as
        missed.

        Also counts one heartbeat of this node. This node's contacts are timed on the monotonic
        clock (a contact not refreshed since this process started counts from its stored
        ``last_seen`` once). Contacts of another node are left to that node while its heartbeat
        moves; once it has not moved for ``node.dead_after`` seconds, they expire here by their
        own keepalive interval counted from that node's last heartbeat, with its calls.
        """
        wall = self.clock()
        now = wall if now is None else min(now, wall)
        # Silence is measured only up to the moment the adapter's events are applied.
        mono = self.monotonic() - (wall - now).total_seconds()
        freed: list[str] = []
        with self.database.transaction() as session:
            # The sweep runs every few seconds: it also catches pool changes made by one-shot
            # commands (reset, reserve), which do not watch the pool themselves.
            ops.mark_pool_changed(session)
            ops.heartbeat(session, self.node, now)
            beats = ops.node_beats(session)
            limit = self._keepalive_limits(session)
            rows = ops.node_registrations(session, self.node)
            self._forget_unknown_contacts(rows)
            for row in rows:
                silent = mono - self._last_refresh(row, now, mono, limit(row.logon))
                if silent > limit(row.logon):
                    service_log.info(
                        "missed keepalive logon=%s contact=%s last_seen=%s silent=%.0fs node=%s",
                        row.logon,
                        row.contact,
                        iso(row.last_seen),
                        silent,
                        self.node,
                    )
                    self._contact_seen.pop((row.logon, row.contact), None)
                    if self._logged_off(session, row.logon, row.contact, now, "keepalive"):
                        freed.append(row.logon)
        freed += self._expire_gone_nodes(beats, now, mono)
        return freed

    def _keepalive_limits(self, session: Session) -> Callable[[str], float]:
        """Seconds of silence after which a log-on's contact counts as gone (profile plus grace)."""
        keepalive = {row.name: row.keepalive_seconds for row in session.scalars(select(ProfileRow))}
        default = keepalive.get(self.settings.default_profile, 120)
        profiles: dict[str, str] = dict(
            session.execute(select(SubscriberRow.logon, SubscriberRow.profile)).all()
        )
        grace = self.settings.keepalive_grace

        def limit(logon: str) -> float:
            return float(keepalive.get(profiles.get(logon, ""), default) + grace)

        return limit

    def _last_refresh(self, row: RegistrationRow, now: datetime, mono: float, limit: float) -> float:
        key = (row.logon, row.contact)
        seen = self._contact_seen.get(key)
        if seen is None:
            # Not refreshed since this process started: the stored wall time is all there is. Read
            # it once, clamped (a clock that stepped back must not keep the contact for ever).
            elapsed = (now - row.last_seen).total_seconds()
            seen = mono - min(max(elapsed, 0.0), limit + 1.0)
            self._contact_seen[key] = seen
        keepalive = self._logon_seen.get(row.logon)
        return seen if keepalive is None else max(seen, keepalive)

    def _forget_unknown_contacts(self, rows: Sequence[RegistrationRow]) -> None:
        contacts = {(row.logon, row.contact) for row in rows}
        logons = {row.logon for row in rows}
        for key in [k for k in self._contact_seen if k not in contacts]:
            self._contact_seen.pop(key, None)
        for logon in [k for k in self._logon_seen if k not in logons]:
            self._logon_seen.pop(logon, None)

    def _expire_gone_nodes(self, beats: dict[str, int], now: datetime, mono: float) -> list[str]:
        gone: list[tuple[str, int, float]] = []
        for name in [n for n in self._peer_beats if n not in beats]:
            del self._peer_beats[name]
            self._peers_gone.discard(name)
            self._peers_cleared.discard(name)
        for name, count in beats.items():
            if name == self.node:
                continue
            seen = self._peer_beats.get(name)
            if seen is None or seen[0] != count:
                self._peer_beats[name] = (count, mono)
                self._peers_cleared.discard(name)
                if name in self._peers_gone:
                    self._peers_gone.discard(name)
                    service_log.warning("node %s sends heartbeats again node=%s", name, self.node)
                continue
            stale = mono - seen[1]
            if stale > self.settings.node_dead_after and name not in self._peers_cleared:
                gone.append((name, count, stale))
        freed: list[str] = []
        for name, count, stale in gone:
            with self.database.transaction() as session:
                # Under the node's row lock and re-read: a peer doing the same waits, then finds
                # nothing left; a node that came back meanwhile is left alone.
                if not ops.lock_node(session, name) or ops.node_beats(session).get(name) != count:
                    continue
                if name not in self._peers_gone:
                    self._peers_gone.add(name)
                    service_log.warning(
                        "node %s sent no heartbeat for %.0fs; expiring its contacts by their keepalive"
                        " node=%s",
                        name,
                        stale,
                        self.node,
                    )
                limit = self._keepalive_limits(session)
                left = 0
                for row in ops.node_registrations(session, name):
                    if stale <= limit(row.logon):
                        left += 1
                    else:
                        service_log.info(
                            "missed keepalive logon=%s contact=%s node=%s (gone) expired_by=%s",
                            row.logon,
                            row.contact,
                            name,
                            self.node,
                        )
                        if self._logged_off(session, row.logon, row.contact, now, "keepalive", node=name):
                            freed.append(row.logon)
                # A node that is gone has no calls in progress either.
                ops.replace_calls(session, name, [])
            if left == 0:
                self._peers_cleared.add(name)  # nothing more to do until it beats again
        return freed

    def resync(
        self, registrations: Sequence[ops.Registration], calls: Sequence[CallSnapshot]
    ) -> ResyncReport:
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
                self._contact_seen.pop((logon, contact), None)
                if self._logged_off(session, logon, contact, now, "logoff"):
                    report.released.append(logon)
            for logon, contact in sorted(known & set(wanted)):
                # The PBX still holds the contact, so the phone refreshed it while we were away.
                ops.touch_registrations(session, self.node, logon, now, contact)
                self._contact_seen[_seen_key(logon, contact)] = mono
            for key in sorted(set(wanted) - known):
                r = wanted[key]
                ops.add_registration(session, self.node, r.logon, r.contact, r.source, r.user_agent, now)
                self._contact_seen[_seen_key(*key)] = mono
                report.logged_on.append(r.logon)
            report.calls_dropped = ops.replace_calls(session, self.node, [c.channel for c in calls])
            for call in calls:
                ops.add_call(session, self.node, call.channel, call.logon, call.number, call.direction, now)
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

    def prune_history(self, batch: int | None = None) -> PruneReport:
        """Delete audit lines and licence-use rows older than ``[retention]`` allows.

        At most ``batch`` (default :data:`PRUNE_BATCH`) rows of each table per call, in one short
        transaction; ``more`` says
        whether old rows are left. A retention of 0 days keeps that table for ever.
        """
        batch = batch or PRUNE_BATCH
        retention = self.settings.retention
        now = self.clock()
        audit = usage = 0
        with self.database.transaction() as session:
            if retention.audit_days:
                audit = ops.prune_audit(session, now - timedelta(days=retention.audit_days), batch)
            if retention.usage_days:
                usage = ops.prune_usage(session, now - timedelta(days=retention.usage_days), batch)
        if audit or usage:
            service_log.info("pruned history: audit=%d usage=%d node=%s", audit, usage, self.node)
        return PruneReport(audit, usage, more=audit >= batch or usage >= batch)

    def prune_if_due(self) -> PruneReport | None:
        """For the running bridge's clock: :meth:`prune_history` once an hour, and at every call
        while old rows are left; None when not due. Database trouble is logged once, never raised:
        history must never stop the keepalive clock."""
        if time.monotonic() < self._next_prune:
            return None
        try:
            report = self.prune_history()
        except ForumBridgeError as exc:
            if not self._prune_failing:
                service_log.warning("pruning history failed: %s (trying again in an hour)", exc)
            self._prune_failing = True
            self._next_prune = time.monotonic() + PRUNE_EVERY
            return None
        self._prune_failing = False
        self._next_prune = 0.0 if report.more else time.monotonic() + PRUNE_EVERY
        return report

    def reset_licences(self, actor: str) -> int:
        """Free every licence now; calls in progress go on and take a licence at their next connection."""
        with self.database.transaction() as session:
            freed = ops.reset_licences(session, self.clock(), actor, self.node)
        service_log.warning("licences reset by %s: %d freed node=%s", actor, len(freed), self.node)
        return len(freed)

    # --- administration -----------------------------------------------------------------------

    def add_subscriber(
        self, logon: str, number: str, profile: str | None = None, *, reserved: bool = False
    ) -> None:
        """Provision a log-on with its call number; ``reserved`` keeps a licence for it."""
        logon, number = validate_logon(logon), validate_number(number)
        profile = profile or self.settings.default_profile
        with self.database.transaction() as session:
            if session.get(ProfileRow, profile) is None:
                raise NotFoundError(
                    f"no profile named {profile!r}; create it with 'forum-bridge profile set'"
                )
            if session.get(SubscriberRow, logon) is not None:
                raise AlreadyExistsError(f"subscriber {logon!r} exists already")
            if reserved:
                ops.lock_pool(session)
                ops.check_reservations(session, extra=1)
                ops.mark_pool_changed(session)
                ops.audit(session, self.clock(), "reserve", logon=logon, node=self.node)
            session.add(
                SubscriberRow(
                    logon=logon,
                    number=number,
                    profile=profile,
                    last_logon_failed=False,
                    created_at=self.clock(),
                    reserved=reserved,
                )
            )

    def set_reserved(self, logon: str, reserved: bool) -> bool:
        """Reserve a licence for ``logon`` or give it back to the floating pool.

        Returns False when it was so already. A licence the log-on holds now stays with it. More
        reservations than purchased licences is an :class:`InvalidInputError` and changes nothing.
        """
        with self.database.transaction() as session:
            changed = ops.set_reserved(session, logon, reserved)
            if changed:
                ops.audit(
                    session, self.clock(), "reserve" if reserved else "unreserve", logon=logon, node=self.node
                )
        if changed:
            service_log.info(
                "licence %s logon=%s node=%s", "reserved" if reserved else "unreserved", logon, self.node
            )
        return changed

    def remove_subscriber(self, logon: str) -> None:
        """Stop managing a log-on; its licence is freed (reason: removal)."""
        with self.database.transaction() as session:
            row = session.get(SubscriberRow, logon)
            if row is None:
                raise NotFoundError(f"no subscriber {logon!r}")
            ops.release(session, logon, self.clock(), "removal", self.node)
            if row.reserved:
                ops.mark_pool_changed(session)
            session.delete(row)

    def import_subscribers(self, text: str) -> int:
        """Import ``logon,number[,profile[,reserved]]`` CSV rows in one transaction: all or nothing."""
        rows: list[tuple[str, str, str]] = []
        reserve: set[str] = set()
        seen: set[str] = set()
        # Spreadsheet programs start UTF-8 files with a byte order mark; it is not part of a name.
        text = text.removeprefix("\ufeff")
        for lineno, fields_ in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not fields_ or all(not f.strip() for f in fields_) or fields_[0].lstrip().startswith("#"):
                continue
            if lineno == 1 and [f.strip().lower() for f in fields_[:2]] == ["logon", "number"]:
                continue  # a header line
            if len(fields_) not in (2, 3, 4):
                raise InvalidInputError(
                    f"line {lineno}: expected logon,number[,profile[,reserved]], got {len(fields_)} fields"
                )
            try:
                logon, number = validate_logon(fields_[0]), validate_number(fields_[1])
            except InvalidInputError as exc:
                raise InvalidInputError(f"line {lineno}: {exc}") from exc
            if logon in seen:
                raise InvalidInputError(f"line {lineno}: log-on {logon!r} appears twice")
            seen.add(logon)
            profile = (
                fields_[2].strip()
                if len(fields_) >= 3 and fields_[2].strip()
                else self.settings.default_profile
            )
            flag = fields_[3].strip().lower() if len(fields_) == 4 else ""
            if flag and flag not in RESERVED_WORDS:
                raise InvalidInputError(
                    f"line {lineno}: reserved must be yes or no, got {fields_[3].strip()!r}"
                )
            if RESERVED_WORDS.get(flag, False):
                reserve.add(logon)
            rows.append((logon, number, profile))
        now = self.clock()
        with self.database.transaction() as session:
            profiles = set(session.scalars(select(ProfileRow.name)))
            existing = set(session.scalars(select(SubscriberRow.logon).where(SubscriberRow.logon.in_(seen))))
            for logon, _number, profile in rows:
                if profile not in profiles:
                    raise NotFoundError(f"log-on {logon!r}: no profile named {profile!r}")
                if logon in existing:
                    raise AlreadyExistsError(f"subscriber {logon!r} exists already")
            if reserve:
                ops.lock_pool(session)
                ops.check_reservations(session, extra=len(reserve))
                ops.mark_pool_changed(session)
                for logon in sorted(reserve):
                    ops.audit(session, now, "reserve", logon=logon, node=self.node, detail="import")
            session.add_all(
                SubscriberRow(
                    logon=logon,
                    number=number,
                    profile=profile,
                    last_logon_failed=False,
                    created_at=now,
                    reserved=logon in reserve,
                )
                for logon, number, profile in rows
            )
        return len(rows)

    def set_profile(self, name: str, keepalive: int) -> None:
        """Create or change a profile's keepalive interval (seconds)."""
        name = name.strip()
        if not name or len(name) > 64 or invisible_character(name) is not None:
            raise InvalidInputError(f"invalid profile name {name!r}")
        if keepalive < 1:
            raise InvalidInputError(f"keepalive must be at least 1 second, got {keepalive}")
        with self.database.transaction() as session:
            ops.upsert_profiles(session, [(name, keepalive)])

    def profiles(self) -> list[dict[str, Any]]:
        """Every profile with its keepalive and how many subscribers use it."""
        with self.database.read() as session:
            users: dict[str, int] = {}
            for profile in session.scalars(select(SubscriberRow.profile)):
                users[profile] = users.get(profile, 0) + 1
            return [
                {"name": row.name, "keepalive": row.keepalive_seconds, "subscribers": users.get(row.name, 0)}
                for row in session.scalars(select(ProfileRow).order_by(ProfileRow.name))
            ]

    # --- reading ------------------------------------------------------------------------------

    def status(
        self,
        *,
        history_hours: int = 24,
        failures: int = 50,
        search: str = "",
        offset: int = 0,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """The status document: the CLI's ``status --json``, the page and ``/status.json`` all use it.

        ``subscribers`` lists every subscriber, unless ``search`` (a part of a log-on or call number)
        or ``limit`` asks for one page of them, by log-on name from ``offset``. ``summary`` always
        counts every subscriber by state, and ``subscriber_page`` says which part is listed.
        """
        now = self.clock()
        with self.database.read() as session:
            return self._status(session, now, history_hours, failures, search.strip(), max(offset, 0), limit)

    def shared_status(self, *, search: str = "", offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """:meth:`status` for many readers at once (the status page, ``/status.json``); read-only.

        Readers asking for the same listing at the same moment share one computation; a document
        is reused while this process changed nothing and it is younger than a second (changes made
        by other processes, e.g. another node, show within that second).
        """
        key = (self.database.generation, search, offset, limit)
        return self._shared_status.get(key, lambda: self.status(search=search, offset=offset, limit=limit))

    def _status(
        self,
        session: Session,
        now: datetime,
        history_hours: int,
        failures: int,
        search: str,
        offset: int,
        limit: int | None,
    ) -> dict[str, Any]:
        # Plain rows rather than ORM objects: with 10,000 subscribers building objects dominated.
        query = select(
            SubscriberRow.logon,
            SubscriberRow.number,
            SubscriberRow.profile,
            SubscriberRow.last_logon_failed,
            SubscriberRow.last_failure_at,
            SubscriberRow.reserved,
        ).order_by(SubscriberRow.logon)
        paged = bool(search) or limit is not None
        if search:
            query = query.where(
                SubscriberRow.logon.contains(search, autoescape=True)
                | SubscriberRow.number.contains(search, autoescape=True)
            )
        matched = None
        if paged:
            matched = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
            query = query.offset(offset).limit(limit)
        subscribers = {
            logon: (number, profile, failed, failure_at, reserved)
            for logon, number, profile, failed, failure_at, reserved in session.execute(query)
        }
        licences = list(session.scalars(select(LicenceRow).order_by(LicenceRow.slot)))
        holders = {row.logon: row for row in licences if row.logon}
        registered = select(
            RegistrationRow.logon,
            RegistrationRow.contact,
            RegistrationRow.user_agent,
            RegistrationRow.source,
            RegistrationRow.node,
            RegistrationRow.last_seen,
        ).order_by(RegistrationRow.last_seen.desc(), RegistrationRow.id)
        if paged:
            # This page's subscribers and the unmanaged endpoints, not every registration.
            registered = registered.where(
                RegistrationRow.logon.in_(list(subscribers))
                | RegistrationRow.logon.not_in(select(SubscriberRow.logon))
            )
        registrations: dict[str, list[Any]] = {}
        for reg in session.execute(registered):
            registrations.setdefault(reg.logon, []).append(reg)
        numbers = dict(
            session.execute(
                select(SubscriberRow.logon, SubscriberRow.number).where(
                    SubscriberRow.logon.in_(list(holders))
                )
            ).all()
        )
        summary = self._state_counts(session)
        managed = summary["subscribers"]
        used = len(holders)
        # Counted over the whole pool (a page lists only some of the reserved log-ons).
        pool = ops.pool_counts(session)
        subscriber_docs = []
        for logon, (number, profile, last_failed, failure_at, reserved) in subscribers.items():
            regs = registrations.get(logon, [])
            latest = regs[0] if regs else None
            state = "logon_failed" if last_failed else ("logged_on" if regs else "logged_off")
            subscriber_docs.append(
                {
                    "logon": logon,
                    "number": number,
                    "profile": profile,
                    "state": state,
                    "licensed": logon in holders,
                    "reserved": bool(reserved),
                    "last_seen": iso(latest.last_seen) if latest else None,
                    "contact": latest.contact if latest else None,
                    "contacts": [r.contact for r in regs],
                    "user_agent": latest.user_agent if latest else None,
                    "source": latest.source if latest else None,
                    "node": latest.node if latest else None,
                    "last_failure": iso(failure_at),
                }
            )
        unmanaged = [
            {
                "logon": logon,
                "contact": regs[0].contact,
                "user_agent": regs[0].user_agent,
                "source": regs[0].source,
                "node": regs[0].node,
                "last_seen": iso(regs[0].last_seen),
            }
            for logon, regs in sorted(registrations.items())
            if logon not in subscribers
        ]
        failed = session.scalars(
            select(AuditRow)
            .where(AuditRow.kind.in_(("logon_failed", SUMMARY_KIND)))
            .order_by(AuditRow.id.desc())
            .limit(failures)
        )
        since = now - timedelta(hours=history_hours)
        usage = list(
            session.scalars(select(UsageRow).where(UsageRow.at >= since).order_by(UsageRow.at, UsageRow.id))
        )
        before = session.scalar(
            select(UsageRow).where(UsageRow.at < since).order_by(UsageRow.at.desc()).limit(1)
        )
        history = [{"at": iso(since), "used": before.used, "total": before.total}] if before else []
        history += [{"at": iso(u.at), "used": u.used, "total": u.total} for u in usage]
        history.append({"at": iso(now), "used": used, "total": len(licences)})
        calls = session.scalars(select(CallRow).order_by(CallRow.started_at))
        return {
            "node": self.node,
            "generated_at": iso(now),
            "licences": {
                "total": pool.total,
                "used": pool.used,
                "free": pool.free,
                "reserved": pool.reserved,
            },
            "assignments": [
                {
                    "slot": row.slot,
                    "logon": row.logon,
                    "number": numbers.get(row.logon) if row.logon else None,
                    "since": iso(row.since),
                    "node": row.node,
                }
                for row in licences
                if row.logon
            ],
            "summary": {
                "subscribers": managed,
                **summary["states"],
                "unmanaged": summary["unmanaged"],
            },
            "subscriber_page": {
                "search": search,
                "offset": offset if paged else 0,
                "limit": limit,
                "matched": matched if matched is not None else managed,
            },
            "subscribers": subscriber_docs,
            "unmanaged": unmanaged,
            "failed_logons": [_failure_doc(a) for a in failed],
            "calls": [
                {
                    "channel": c.channel,
                    "logon": c.logon,
                    "number": c.number,
                    "direction": c.direction,
                    "node": c.node,
                    "since": iso(c.started_at),
                }
                for c in calls
            ],
            "usage_history": history,
        }

    def counts(self) -> dict[str, Any]:
        """The numbers of the status summary from count queries alone (``/metrics`` reads this).

        ``licences`` (total, used, free), ``subscribers`` by state (as in the status document) and
        ``unmanaged`` endpoints, without reading a row per subscriber.
        """
        with self.database.read() as session:
            counted = self._state_counts(session)
        return {
            "licences": counted["licences"],
            "subscribers": counted["states"],
            "unmanaged": counted["unmanaged"],
        }

    @staticmethod
    def _state_counts(session: Session) -> dict[str, Any]:
        pool = ops.pool_counts(session)
        registered = select(RegistrationRow.logon).distinct().subquery()
        managed = session.scalar(select(func.count()).select_from(SubscriberRow)) or 0
        failed = (
            session.scalar(
                select(func.count())
                .select_from(SubscriberRow)
                .where(SubscriberRow.last_logon_failed.is_(True))
            )
            or 0
        )
        logged_on = (
            session.scalar(
                select(func.count())
                .select_from(SubscriberRow)
                .where(
                    SubscriberRow.last_logon_failed.is_(False),
                    SubscriberRow.logon.in_(select(registered.c.logon)),
                )
            )
            or 0
        )
        unmanaged = (
            session.scalar(
                select(func.count())
                .select_from(registered)
                .where(registered.c.logon.not_in(select(SubscriberRow.logon)))
            )
            or 0
        )
        return {
            "licences": {
                "total": pool.total,
                "used": pool.used,
                "free": pool.free,
                "reserved": pool.reserved,
            },
            "subscribers": managed,
            "states": {
                "logged_on": logged_on,
                "logged_off": managed - failed - logged_on,
                "logon_failed": failed,
            },
            "unmanaged": unmanaged,
        }

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit lines, newest first."""
        with self.database.read() as session:
            rows = session.scalars(select(AuditRow).order_by(AuditRow.id.desc()).limit(limit))
            return [
                {
                    "at": iso(r.at),
                    "kind": r.kind,
                    "logon": r.logon,
                    "number": r.number,
                    "reason": r.reason,
                    "node": r.node,
                    "actor": r.actor,
                    "detail": r.detail,
                }
                for r in rows
            ]


def _failure_doc(row: AuditRow) -> dict[str, Any]:
    """One entry of the status document's ``failed_logons``: a failure, or a summary of many.

    A summary (failures of unknown log-ons beyond the per-window budget) carries ``count`` > 1, the
    number of ``distinct`` names, a ``sample`` of them and its ``since``; ``source`` is the busiest
    source. Single failures have ``count`` 1.
    """
    doc: dict[str, Any] = {
        "at": iso(row.at),
        "logon": row.logon,
        "reason": row.reason,
        "source": row.detail,
        "node": row.node,
        "count": 1,
    }
    if row.kind == SUMMARY_KIND:
        try:
            detail = json.loads(row.detail)
            sources = detail.get("sources") or []
            doc.update(
                source=str(sources[0][0]) if sources else "",
                count=int(detail["count"]),
                distinct=int(detail.get("distinct", 0)),
                sample=[str(name) for name in detail.get("names", [])],
                since=iso(datetime.fromisoformat(str(detail["since"]))),
            )
        except (ValueError, KeyError, TypeError, IndexError):
            doc["source"] = ""
    return doc
