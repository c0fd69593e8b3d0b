"""The status document (``status --json``, the status page, ``/status.json``), counts and the audit log.

Read-only: every method reads in one read transaction and changes nothing. The status page's many
pollers share one computation of the document (:class:`SharedDocument`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from forum_bridge.batching import SUMMARY_KIND
from forum_bridge.clocks import iso
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from forum_bridge.store.models import AuditRow, CallRow, LicenceRow, RegistrationRow, SubscriberRow, UsageRow

STATUS_MAX_AGE = 1.0  # seconds a shared status document serves readers when nothing changed here

_SHARED_DOCUMENTS = 16  # listings kept at once (searches and pages of the status page)


class SharedDocument:
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


class StatusDocuments:
    """Builds the status document and the counts of one node's view of the shared database."""

    def __init__(self, database: Database, node: str) -> None:
        """Documents read ``database`` and name ``node``."""
        self.database = database
        self.node = node
        self._shared = SharedDocument(STATUS_MAX_AGE)

    def shared(
        self, search: str, offset: int, limit: int | None, compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """The document for this listing shared by concurrent readers; ``compute`` makes a new one."""
        return self._shared.get((self.database.generation, search, offset, limit), compute)

    def compose(
        self,
        session: Session,
        now: datetime,
        history_hours: int,
        failures: int,
        search: str,
        offset: int,
        limit: int | None,
    ) -> dict[str, Any]:
        """The status document read in ``session`` at ``now`` (see :meth:`BridgeService.status`)."""
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
        summary = state_counts(session)
        managed = summary["subscribers"]
        used = len(holders)
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
            # Counted over the whole pool (a page lists only some of the reserved log-ons).
            "licences": summary["licences"],
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
            "failed_logons": [failure_doc(a) for a in failed],
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
            counted = state_counts(session)
        return {
            "licences": counted["licences"],
            "subscribers": counted["states"],
            "unmanaged": counted["unmanaged"],
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


def state_counts(session: Session) -> dict[str, Any]:
    """The pool, the subscribers by state and the unmanaged endpoints, from count queries alone."""
    pool = ops.pool_counts(session)
    registered = select(RegistrationRow.logon).distinct().subquery()
    managed = session.scalar(select(func.count()).select_from(SubscriberRow)) or 0
    failed = (
        session.scalar(
            select(func.count()).select_from(SubscriberRow).where(SubscriberRow.last_logon_failed.is_(True))
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


def failure_doc(row: AuditRow) -> dict[str, Any]:
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
