"""The service layer: the one place that turns events into state changes and enforcement.

Both PBX adapters call :class:`BridgeService`; the CLI and the status page read through it. Each
public method is one database transaction. Decisions come from :func:`forum_bridge.core.decide_call`;
this module only gathers the facts, applies the verdict, writes the audit log and logs one line per
decision. The other jobs are parts it builds and wires, each in a module of its own:
:mod:`~forum_bridge.administration`, :mod:`~forum_bridge.status_document`,
:mod:`~forum_bridge.keepalive`, :mod:`~forum_bridge.resync`, :mod:`~forum_bridge.retention`,
:mod:`~forum_bridge.failed_logons` and :mod:`~forum_bridge.decision_gate`. Where a part changes
licence state (expiry, resync, gone nodes) it does so through this module's log-off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from forum_bridge.administration import Administration, validate_logon, validate_number
from forum_bridge.batching import apply_run
from forum_bridge.clocks import Clock, Monotonic, iso, utcnow
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
from forum_bridge.core.rules import Decision, LogonState, Reason, decide_call
from forum_bridge.decision_gate import DecisionGate, DecisionTicket, Superseded
from forum_bridge.errors import DecisionAbandoned, ForumBridgeError, StoreError
from forum_bridge.failed_logons import FailedLogons
from forum_bridge.keepalive import KeepaliveClock
from forum_bridge.pool_watch import PoolWatch
from forum_bridge.resync import CallSnapshot, Resync, ResyncReport
from forum_bridge.retention import PRUNE_BATCH, PruneReport, Retention
from forum_bridge.status_document import StatusDocuments
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from forum_bridge.store.models import RegistrationRow, SubscriberRow, stored

# Names callers import from here since before the parts had modules of their own.
__all__ = [
    "BridgeService",
    "CallQuestion",
    "CallRecord",
    "CallSnapshot",
    "Clock",
    "DecisionTicket",
    "Monotonic",
    "Outcome",
    "PruneReport",
    "ResyncReport",
    "iso",
    "utcnow",
    "validate_logon",
    "validate_number",
]

log = logging.getLogger("forum_bridge.decision")
service_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallRecord:
    """A decision on one call leg, handed to listeners (metrics) after the transaction."""

    logon: str
    number: str
    direction: Direction
    decision: Decision
    channel: str = ""


@dataclass(frozen=True)
class CallQuestion:
    """One call leg to decide, as :meth:`BridgeService.authorize` takes it (for a group of them)."""

    logon: str
    number: str
    direction: Direction = Direction.OUTBOUND
    channel: str = ""
    ticket: DecisionTicket | None = None


@dataclass(frozen=True)
class _LicenceWithCommit(Decision):
    """A call decision whose licence is claimed with the COMMIT (PostgreSQL): until the commit it
    reads as the denial, and :func:`_settled` gives the server's answer after it."""

    granted: Decision | None = None
    claim: ops.LicenceClaim | None = None


def _settled(decision: Decision) -> Decision:
    """``decision`` as committed: for a licence claimed with the COMMIT, the granted decision when
    the claim got a slot, else the denial (also when it never reached the server)."""
    if not isinstance(decision, _LicenceWithCommit):
        return decision
    if decision.granted is not None and decision.claim is not None and decision.claim.slot is not None:
        return decision.granted
    return Decision(decision.allowed, decision.reason)


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
        self._failed_decisions = 0
        # Off for one-shot commands: their log goes nowhere, so a crossing they made is left for a
        # running bridge to find (its keepalive sweep looks at the pool every second).
        self._pool_watch = (
            PoolWatch(self.database, settings.licence_warn_at, self.node, clock) if watch_pool else None
        )
        self._gate = DecisionGate()
        self.failed_logons = FailedLogons(self.database, self.node, clock)
        self.failure_digest = self.failed_logons.digest
        # The keepalive sweep logs contacts off through _logged_off, as events do (a resync frees
        # the licences of the log-ons it logs off the same way, set-based: see Resync).
        self.keepalive_clock = KeepaliveClock(self.database, settings, clock, monotonic, self._logged_off)
        self._resync = Resync(self.database, self.node, clock, monotonic, self.keepalive_clock)
        self.administration = Administration(self.database, settings, clock)
        self.documents = StatusDocuments(self.database, self.node)
        self.retention = Retention(self.database, settings, clock)

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
        self.administration.warn_about_hidden_names()

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

    @property
    def failed_decisions(self) -> int:
        """How many call decisions found the database failing so far (emergency calls included)."""
        return self._failed_decisions

    def _decision_failed(self) -> None:
        self._failed_decisions += 1
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
        return self.keepalive_clock.backlog()

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
            self.keepalive_clock.batch_applied(events, together)
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
        self.keepalive_clock.contact_refreshed(event.logon, event.contact, event.at)
        if new:
            service_log.info("logged on logon=%s contact=%s node=%s", event.logon, event.contact, self.node)
            contacts = ops.logon_contacts(session, self.node, event.logon)
            # Compared as stored: an over-long contact is stored fitted, and is still this one.
            own = stored(RegistrationRow.contact, event.contact)
            others = tuple(c for c in contacts if c != own)
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
        """Audit and log one failed log-on (see :meth:`FailedLogons.record`)."""
        self.failed_logons.record(session, event, managed=managed)

    def flush_failure_summary(self, now: datetime | None = None) -> bool:
        """Write the summary of a failure window that has ended (the sweep calls this); True if one was."""
        return self.failed_logons.flush_summary(now)

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
            self.keepalive_clock.logon_refreshed(event.logon, event.at)
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
        decision, after = self._decide_leg(logon, number, direction, channel, ticket)
        if after is not None:
            after()
        return decision

    def _decide_leg(
        self, logon: str, number: str, direction: Direction, channel: str, ticket: DecisionTicket | None
    ) -> tuple[Decision, Callable[[], None] | None]:
        """:meth:`authorize`'s decision, and what remains to do once the caller has it (give a
        late licence back, the log line, the listeners), or None when nothing does."""
        emergency = direction is Direction.OUTBOUND and self.is_emergency(number)
        keys, answered = self._gate.standing(channel, ticket, emergency=emergency)
        if answered is not None:
            # The leg was answered without the database before; that answer stands.
            return answered, None
        now = self.clock()
        committing = False
        late: Decision | None = None
        try:
            with self.database.begin(ticket.deadline if ticket else None) as session:
                facts = ops.decision_facts(session, self.node, logon, channel)
                if facts.earlier is not None:
                    # The same leg seen twice (AMI event and dialplan hook): one decision, one audit line.
                    return facts.earlier, None
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
                decision = self._apply_decision(
                    session, logon, number, direction, decision, now, facts.reserved, channel
                )
                if channel:
                    ops.record_call_decision(
                        session, self.node, channel, logon, number, direction.value, now, decision
                    )
                self._gate.begin_commit(keys, ticket)  # or Superseded, or DecisionAbandoned
                committing = True
            committing = False
            decision = _settled(decision)
            late = self._gate.end_commit(keys)
        except Superseded as superseded:
            return superseded.decision, None
        except StoreError:
            if committing:
                self._gate.end_commit(keys)
            self._decision_failed()
            if not emergency:
                raise
            service_log.exception("database failed during an emergency call; letting it through")
            decision = Decision(True, Reason.EMERGENCY)
        give_back = late is not None and not late.allowed and decision.reason is Reason.LICENCE_ACQUIRED

        def after() -> None:
            if give_back:
                self._undo_late_licence(logon, channel)
            self._report(logon, number, direction, decision, channel)

        return decision, after

    def authorize_group(
        self,
        questions: Sequence[CallQuestion],
        answered: Callable[[list[Decision | ForumBridgeError]], object] | None = None,
    ) -> list[Decision | ForumBridgeError]:
        """Decide several call legs asked for at once in one transaction; one answer per question.

        Each answer is the one :meth:`authorize` would give (its exception, StoreError or
        DecisionAbandoned, in place of a Decision): each leg is decided once, under its log-on's
        lock, by the same rules, in the order asked, so a later question sees what an earlier one
        took. The FastAGI hook sends the questions that queued while the previous group was being
        decided: a commit, and on PostgreSQL a BEGIN and the log-on locks, are paid once per group.

        A question whose caller gave up, or whose leg was answered meanwhile, is settled before its
        writes begin (the gate is passed first), so nothing of it has to be undone. When the group's
        transaction fails, nothing of it was committed and each question is decided again alone, so
        one question the database refuses costs the others nothing.

        ``answered(answers)``, if given, is called as soon as the answers are known, before the
        decision log lines and listeners (and before a late licence is given back), so a caller
        can hand them on while this thread does the rest.
        """
        answers: list[Decision | ForumBridgeError] | None = None
        if len(questions) > 1:
            answers = self._decide_together(questions, answered)
        if answers is None:
            outcomes = [self._authorize_one(question) for question in questions]
            answers = [answer for answer, _after in outcomes]
            if answered is not None:
                answered(answers)
            for _answer, after in outcomes:
                if after is not None:
                    after()
        return answers

    def _authorize_one(
        self, question: CallQuestion
    ) -> tuple[Decision | ForumBridgeError, Callable[[], None] | None]:
        try:
            return self._decide_leg(
                question.logon, question.number, question.direction, question.channel, question.ticket
            )
        except (StoreError, DecisionAbandoned) as exc:
            return exc, None

    def _decide_together(
        self,
        questions: Sequence[CallQuestion],
        answered: Callable[[list[Decision | ForumBridgeError]], object] | None,
    ) -> list[Decision | ForumBridgeError] | None:
        """The group's transaction; None when it failed (nothing committed, nothing reported)."""
        answers: list[Decision | ForumBridgeError | None] = [None] * len(questions)
        pending: list[tuple[int, bool, list[str]]] = []
        for index, question in enumerate(questions):
            emergency = question.direction is Direction.OUTBOUND and self.is_emergency(question.number)
            try:
                keys, standing = self._gate.standing(question.channel, question.ticket, emergency=emergency)
            except DecisionAbandoned as exc:
                answers[index] = exc
                continue
            if standing is not None:
                answers[index] = standing
            else:
                pending.append((index, emergency, keys))
        if not pending:
            settled = [answer if answer is not None else StoreError("no answer") for answer in answers]
            if answered is not None:
                answered(settled)
            return settled
        tickets = [questions[i].ticket for i, _e, _k in pending]
        # SQLite's writer is waited for as long as the most patient caller waits.
        deadline = (
            None if any(t is None for t in tickets) else max((t.deadline for t in tickets if t), default=0.0)
        )
        now = self.clock()
        committing: list[list[str]] = []
        decided: list[int] = []
        try:
            with self.database.begin(deadline) as session:
                # The locks and every read in one round trip on PostgreSQL (see group_facts).
                asked = [(questions[i].logon, questions[i].channel) for i, _e, _k in pending]
                read = ops.group_facts(session, self.node, asked)
                took_licence = False
                for (index, emergency, keys), known in zip(pending, read, strict=True):
                    question = questions[index]
                    facts = known if not took_licence else None
                    if facts is None:
                        facts = ops.decision_facts(
                            session, self.node, question.logon, question.channel, locked=True
                        )
                    if facts.earlier is not None:
                        answers[index] = facts.earlier  # the leg was decided before: one decision
                        continue
                    decision = decide_call(
                        facts.state,
                        direction=question.direction,
                        is_emergency=emergency,
                        licence_free=True,  # as in authorize(): acquire() decides
                        block_after_failed_logon=self.settings.block_after_failed_logon,
                    )
                    try:
                        # Before the writes: past this point the caller waits for the commit.
                        self._gate.begin_commit(keys, question.ticket)
                    except Superseded as superseded:
                        answers[index] = superseded.decision
                        continue
                    except DecisionAbandoned as exc:
                        answers[index] = exc
                        continue
                    committing.append(keys)
                    decision = self._apply_decision(
                        session,
                        question.logon,
                        question.number,
                        question.direction,
                        decision,
                        now,
                        facts.reserved,
                        question.channel,
                    )
                    took_licence = took_licence or decision.reason is Reason.LICENCE_ACQUIRED
                    if question.channel:
                        ops.record_call_decision(
                            session,
                            self.node,
                            question.channel,
                            question.logon,
                            question.number,
                            question.direction.value,
                            now,
                            decision,
                        )
                    answers[index] = decision
                    decided.append(index)
        except StoreError as exc:
            for keys in committing:
                self._gate.end_commit(keys)
            service_log.warning(
                "%d call decisions could not be made together (%s); deciding each alone", len(pending), exc
            )
            return None
        except BaseException:
            for keys in committing:  # a bug: at least let the legs be answered by their callers
                self._gate.end_commit(keys)
            raise
        lates = [self._gate.end_commit(keys) for keys in committing]
        answers = [_settled(answer) if isinstance(answer, Decision) else answer for answer in answers]
        result = [answer if answer is not None else StoreError("no answer") for answer in answers]
        if answered is not None:
            answered(result)
        for index, late in zip(decided, lates, strict=True):
            question = questions[index]
            final = result[index]
            assert isinstance(final, Decision)
            if late is not None and not late.allowed and final.reason is Reason.LICENCE_ACQUIRED:
                self._undo_late_licence(question.logon, question.channel)
            self._report(question.logon, question.number, question.direction, final, question.channel)
        return result

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
        reserved: bool | None = None,
        channel: str = "",
    ) -> Decision:
        if decision.takes_licence and reserved is False and ops.claims_with_commit(session):
            # The claim, its audit line and the leg's record travel with the COMMIT: the answer
            # is known after it (see _settled); a reserved log-on may take over a licence, below.
            denial = Decision(False, Reason.EMERGENCY_ONLY)
            claim = ops.acquire_for_call_with_commit(
                session,
                logon,
                self.node,
                now,
                number,
                direction.value,
                channel,
                denied=denial.reason,
                granted=decision.reason,
            )
            return _LicenceWithCommit(denial.allowed, denial.reason, granted=decision, claim=claim)
        if decision.takes_licence:
            # Writes the audit line of the acquisition too.
            slot = ops.acquire_for_call(
                session, logon, self.node, now, number, direction.value, reserved=reserved
            )
            if slot is None:  # lost the last licence to a concurrent call
                decision = Decision(False, Reason.EMERGENCY_ONLY)
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

    def licensed_logons(self) -> list[str]:
        """The log-ons holding a licence now, by name: their calls need no licence decision.

        The Asterisk adapter copies this set into the PBX so that its dialplan can let those calls
        through without asking (``asterisk.enforce = both``).
        """
        with self.database.read() as session:
            return ops.licence_holders(session)

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
            state = ops.logon_state(session, logon)
            return decide_call(
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

    # --- the parts: one-line delegations, so callers keep one object --------------------------

    def expire_keepalives(self, now: datetime | None = None) -> list[str]:
        """Log off every contact that missed its keepalive; return the log-ons freed.

        See :meth:`KeepaliveClock.expire`: ``now`` is the moment up to which the adapter has applied
        every event; the sweep also counts this node's heartbeat and expires gone nodes' contacts.
        """
        return self.keepalive_clock.expire(now)

    def resync(
        self, registrations: Sequence[ops.Registration], calls: Sequence[CallSnapshot]
    ) -> ResyncReport:
        """Make this node's registrations and calls match what the PBX reports now."""
        return self._resync.run(registrations, calls)

    def prune_history(self, batch: int | None = None) -> PruneReport:
        """Delete audit lines and licence-use rows older than ``[retention]`` allows.

        At most ``batch`` (default :data:`~forum_bridge.retention.PRUNE_BATCH`) rows of each table
        per call, in one short transaction; ``more`` says whether old rows are left.
        """
        return self.retention.prune_history(batch or PRUNE_BATCH)

    def prune_if_due(self) -> PruneReport | None:
        """:meth:`prune_history` once an hour, and at every call while old rows are left; never raises."""
        return self.retention.prune_if_due(self.prune_history)

    def reset_licences(self, actor: str) -> int:
        """Free every licence now; calls in progress go on and take a licence at their next connection."""
        return self.administration.reset_licences(actor)

    def add_subscriber(
        self, logon: str, number: str, profile: str | None = None, *, reserved: bool = False
    ) -> None:
        """Provision a log-on with its call number; ``reserved`` keeps a licence for it."""
        self.administration.add_subscriber(logon, number, profile, reserved=reserved)

    def set_reserved(self, logon: str, reserved: bool) -> bool:
        """Reserve a licence for ``logon`` or give it back; False when it was so already."""
        return self.administration.set_reserved(logon, reserved)

    def remove_subscriber(self, logon: str) -> None:
        """Stop managing a log-on; its licence is freed (reason: removal)."""
        self.administration.remove_subscriber(logon)

    def import_subscribers(self, text: str) -> int:
        """Import ``logon,number[,profile[,reserved]]`` CSV rows in one transaction: all or nothing."""
        return self.administration.import_subscribers(text)

    def set_profile(self, name: str, keepalive: int) -> None:
        """Create or change a profile's keepalive interval (seconds)."""
        self.administration.set_profile(name, keepalive)

    def profiles(self) -> list[dict[str, Any]]:
        """Every profile with its keepalive and how many subscribers use it."""
        return self.administration.profiles()

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
        # The one call that builds a document inside status()'s read transaction.
        return self.documents.compose(session, now, history_hours, failures, search, offset, limit)

    def shared_status(self, *, search: str = "", offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """:meth:`status` for many readers at once (the status page, ``/status.json``); read-only.

        Readers asking for the same listing at the same moment share one computation; a document
        is reused while this process changed nothing and it is younger than a second (changes made
        by other processes, e.g. another node, show within that second).
        """
        return self.documents.shared(
            search, offset, limit, lambda: self.status(search=search, offset=offset, limit=limit)
        )

    def counts(self) -> dict[str, Any]:
        """The status summary's numbers from count queries alone (``/metrics`` reads this)."""
        return self.documents.counts()

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit lines, newest first."""
        return self.documents.audit_log(limit)
