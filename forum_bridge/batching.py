"""Applying many registration and security events in one transaction, and digesting failure floods.

After a PBX restart every phone registers again within seconds: ten thousand ``SuccessfulAuth`` and
``ContactStatus`` frames. Applied one transaction (and a dozen ORM round trips) per event, that took
over a minute. :func:`apply_run` applies a run of such events with a handful of set-based statements
instead: it reads the state of every log-on in the run once, replays the events in order in memory
with exactly the per-event rules of :class:`~forum_bridge.service.BridgeService`, and writes the
result back (deletes, then updates, then inserts). Licence releases, which are rare, go through the
ordinary store operations inside the same transaction.

:class:`FailureDigest` keeps a failed log-on flood (a SIP scanner trying thousands of user names)
from writing one audit row and one WARNING line per attempt: failures of log-ons that are not
provisioned are written one by one only up to a small budget per window; the rest are counted and
summarised (count, distinct names, a sample of names and sources) in one audit row and one WARNING
line when the window ends. Failures of managed log-ons are never summarised.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, cast

from sqlalchemy import Table, bindparam, delete, update
from sqlalchemy.orm import Session

from forum_bridge.core.events import CallEnded, Event, Keepalive, LoggedOff, LoggedOn, LogonFailed
from forum_bridge.store import batch_statements as batch_sql
from forum_bridge.store import operations as ops
from forum_bridge.store.models import CallRow, RegistrationRow, SubscriberRow, stored
from forum_bridge.store.status_query import SUMMARY_KIND  # the audit kind of a summary

if TYPE_CHECKING:
    from forum_bridge.service import BridgeService, Outcome

__all__ = ["DIGEST_INDIVIDUAL", "DIGEST_WINDOW_SECONDS", "SUMMARY_KIND", "FailureDigest", "apply_run"]

service_log = logging.getLogger("forum_bridge.service")

DIGEST_WINDOW_SECONDS = 60
"""Length of one failure window: at most one summary line per window."""
DIGEST_INDIVIDUAL = 10
"""Failures of unknown log-ons written one by one (audit row and WARNING) per window."""
_SAMPLE = 5  # names and sources kept in a summary
_DISTINCT_CAP = 10_000  # distinct names counted exactly per window; beyond, "at least"


def _fitter(name: str) -> Callable[[str], str]:
    """``stored(RegistrationRow.<name>, value)`` with the column looked up once, not per value.

    Asking a mapped attribute for its type goes through SQLAlchemy's attribute proxies, which cost
    more than the rest of a storm's bookkeeping together.
    """
    column = cast(Table, RegistrationRow.__table__).c[name]
    return functools.partial(stored, column)


_fit_logon = _fitter("logon")
_fit_contact = _fitter("contact")


@dataclass
class _Contact:
    """One registration row of this node as the run sees it."""

    id: int | None  # None: inserted by this run
    source: str
    user_agent: str
    last_seen: datetime | None = None  # set when this run moved it
    registered_at: datetime | None = None
    dirty: bool = False


@dataclass
class _Logon:
    """What the run knows about one log-on: its contacts here and elsewhere, its subscriber row."""

    contacts: dict[str, _Contact] = field(default_factory=dict)
    elsewhere: int = 0  # contacts on other nodes
    managed: bool = False
    failed: bool = False
    failure_at: datetime | None = None
    subscriber_dirty: bool = False


def _load(session: Session, node: str, logons: Sequence[str]) -> dict[str, _Logon]:
    state = {logon: _Logon() for logon in logons}
    for part in ops.in_chunks(logons):
        subscribers, contacts = batch_sql.read_state(session, part)
        for facts in subscribers:
            entry = state[facts.logon]
            entry.managed, entry.failed, entry.failure_at = True, facts.failed, facts.failure_at
        for row in contacts:
            if row.node == node:
                state[row.logon].contacts[row.contact] = _Contact(
                    id=row.id, source=row.source, user_agent=row.user_agent
                )
            else:
                state[row.logon].elsewhere += 1
    return state


def apply_run(service: BridgeService, session: Session, events: Sequence[Event]) -> list[Outcome]:
    """Apply ``events`` (no :class:`CallStarted`) in order inside ``session``; one Outcome per event.

    Same effects, logs and Outcomes as applying each with :meth:`BridgeService.apply`.
    """
    from forum_bridge.service import Outcome

    node = service.node
    block = service.settings.block_after_failed_logon
    # Names and contacts as stored (over-long values fitted, see store.models.fit), so that what
    # the run reads back from the database and what the events say are the same keys.
    logons = sorted({_fit_logon(e.logon) for e in events if not isinstance(e, CallEnded)})
    state = _load(session, node, logons)
    deleted: list[int] = []
    ended: list[str] = []
    outcomes: list[Outcome] = []

    def clear_block(entry: _Logon) -> bool | None:
        if not entry.managed or not entry.failed:
            return None
        entry.failed = False
        entry.subscriber_dirty = True
        return False if block else None

    def release_if_gone(logon: str, entry: _Logon, at: datetime, reason: str) -> None:
        if entry.contacts or entry.elsewhere:
            return
        ops.release(session, logon, at, reason, node)

    for event in events:
        if isinstance(event, CallEnded):
            ended.append(event.channel)
            outcomes.append(Outcome())
            continue
        entry = state[_fit_logon(event.logon)]
        if isinstance(event, Keepalive):
            for contact in entry.contacts.values():
                contact.last_seen, contact.dirty = event.at, True
            touched = bool(entry.contacts)
            # As BridgeService._keepalive: only a confirmed REGISTER, not newer than the latest
            # failure, lifts a block; an unconfirmed one asks the adapter to check.
            if not touched or not entry.managed or not entry.failed:
                outcomes.append(Outcome(unknown_registration=not touched))
            elif not event.clears_block:
                outcomes.append(Outcome(check_logon=True))
            elif entry.failure_at is not None and entry.failure_at > event.at:
                outcomes.append(Outcome())
            else:
                outcomes.append(Outcome(blocked=clear_block(entry)))
        elif isinstance(event, LoggedOn):
            key = _fit_contact(event.contact)
            known = entry.contacts.get(key)
            others: tuple[str, ...] = ()
            if known is not None:
                known.last_seen, known.dirty = event.at, True
                known.source = event.source or known.source
                known.user_agent = event.user_agent or known.user_agent
            else:
                entry.contacts[key] = _Contact(
                    id=None,
                    source=event.source,
                    user_agent=event.user_agent,
                    last_seen=event.at,
                    registered_at=event.at,
                )
                service_log.info("logged on logon=%s contact=%s node=%s", event.logon, event.contact, node)
                # As BridgeService._logged_on: the log-on's other contacts here, for the adapter.
                others = tuple(sorted(c for c in entry.contacts if c != key))
            outcomes.append(Outcome(blocked=clear_block(entry), other_contacts=others))
        elif isinstance(event, LoggedOff):
            removed_contact = _fit_contact(event.contact)
            gone = [c for c in entry.contacts if not event.contact or c == removed_contact]
            for name in gone:
                removed = entry.contacts.pop(name)
                if removed.id is not None:
                    deleted.append(removed.id)
            if gone:
                service_log.info(
                    "logged off logon=%s contact=%s reason=%s node=%s",
                    event.logon,
                    event.contact or "*",
                    event.reason,
                    node,
                )
            release_if_gone(event.logon, entry, event.at, event.reason)
            outcomes.append(Outcome())
        elif isinstance(event, LogonFailed):
            service.record_failure(session, event, managed=entry.managed)
            blocked = None
            if entry.managed:
                was_failed = entry.failed
                entry.failed, entry.failure_at, entry.subscriber_dirty = True, event.at, True
                if block:
                    # It may make no call at all now, so the licence would only be wasted.
                    ops.release(session, event.logon, event.at, "logon_failed", node)
                    blocked = None if was_failed else True
            outcomes.append(Outcome(blocked=blocked))
        else:  # pragma: no cover - apply_batch never passes CallStarted here
            raise TypeError(f"apply_run cannot apply {type(event).__name__}")
    _write(session, node, state, deleted, ended)
    return outcomes


def _write(
    session: Session, node: str, state: dict[str, _Logon], deleted: list[int], ended: list[str]
) -> None:
    """Write what the run changed: deletes first, so a contact removed and added again is re-inserted."""
    ops.delete_registrations_by_id(session, deleted)
    touched: list[batch_sql.TouchedContact] = []
    added: list[batch_sql.NewContact] = []
    subscribers: list[dict[str, object]] = []
    for logon, entry in state.items():
        if entry.subscriber_dirty:
            subscribers.append(
                {
                    "b_logon": logon,
                    "b_last_logon_failed": entry.failed,
                    "b_last_failure_at": entry.failure_at,
                }
            )
        for contact, row in entry.contacts.items():
            if row.id is None:
                assert row.registered_at is not None
                assert row.last_seen is not None
                added.append(
                    batch_sql.NewContact(
                        node, logon, contact, row.source, row.user_agent, row.registered_at, row.last_seen
                    )
                )
            elif row.dirty:
                assert row.last_seen is not None
                touched.append(batch_sql.TouchedContact(row.id, row.last_seen, row.source, row.user_agent))
    # One statement of a fixed text each, whatever the batch holds (see store.batch_statements).
    batch_sql.touch_contacts(session, touched)
    if subscribers:
        table = cast(Table, SubscriberRow.__table__)
        session.execute(
            update(table)
            .where(table.c.logon == bindparam("b_logon"))
            .values(
                last_logon_failed=bindparam("b_last_logon_failed"),
                last_failure_at=bindparam("b_last_failure_at"),
            ),
            subscribers,
        )
    batch_sql.insert_contacts(session, added)
    for chunk in ops.in_chunks(ended):
        session.execute(
            delete(CallRow)
            .where(CallRow.node == node, CallRow.channel.in_(chunk))
            .execution_options(synchronize_session=False)
        )


@dataclass
class _Window:
    start: datetime
    written: int = 0
    counted: int = 0
    names: set[str] = field(default_factory=set)
    overflow: bool = False
    sample: list[str] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Summary:
    """One window's failures that were counted instead of written."""

    start: datetime
    end: datetime
    count: int
    distinct: int
    distinct_exact: bool
    names: list[str]
    sources: list[tuple[str, int]]
    reason: str

    def detail(self) -> str:
        """The audit row's ``detail``: JSON, read back by the status document."""
        return json.dumps(
            {
                "count": self.count,
                "distinct": self.distinct,
                "distinct_exact": self.distinct_exact,
                "names": self.names,
                "sources": [[s, n] for s, n in self.sources],
                "since": self.start.isoformat(),
            }
        )


class FailureDigest:
    """Counts failed log-ons of unknown log-ons per window; see the module docstring.

    Thread-safe: the Asterisk side applies events in one thread and sweeps in the same thread, but
    nothing here relies on that.
    """

    def __init__(
        self, window_seconds: int = DIGEST_WINDOW_SECONDS, individual: int = DIGEST_INDIVIDUAL
    ) -> None:
        """Write ``individual`` failures per ``window_seconds`` one by one; count the rest."""
        self.window = timedelta(seconds=window_seconds)
        self.individual = individual
        self._lock = threading.Lock()
        self._current: _Window | None = None
        self.total = 0  # failures of unknown log-ons seen, for metrics and tests

    def note(self, event: LogonFailed, at: datetime) -> tuple[bool, Summary | None]:
        """Count one failure of an unknown log-on at ``at``.

        Returns (write it one by one?, the summary of a window that ended before it, if any).
        """
        with self._lock:
            self.total += 1
            ended = None
            window = self._current
            if window is None or at >= window.start + self.window or at < window.start:
                ended = self._close(window, at)
                window = self._current = _Window(start=at)
            if window.written < self.individual:
                window.written += 1
                return True, ended
            window.counted += 1
            if not window.overflow:
                window.names.add(event.logon)
                if len(window.names) >= _DISTINCT_CAP:
                    window.overflow = True
            if len(window.sample) < _SAMPLE and event.logon not in window.sample:
                window.sample.append(event.logon[:64])
            if event.source and (event.source in window.sources or len(window.sources) < 256):
                window.sources[event.source] += 1
            window.reasons[event.reason] += 1
            return False, ended

    def due(self, now: datetime) -> Summary | None:
        """The summary of the current window if it ended by ``now`` (and counted anything)."""
        with self._lock:
            window = self._current
            if window is None or now < window.start + self.window:
                return None
            self._current = None
            return self._close(window, now)

    def _close(self, window: _Window | None, end: datetime) -> Summary | None:
        if window is None or window.counted == 0:
            return None
        reason = window.reasons.most_common(1)[0][0] if window.reasons else "unknown_user"
        return Summary(
            start=window.start,
            end=min(end, window.start + self.window),
            count=window.counted,
            distinct=len(window.names),
            distinct_exact=not window.overflow,
            names=list(window.sample),
            sources=window.sources.most_common(_SAMPLE),
            reason=reason,
        )
