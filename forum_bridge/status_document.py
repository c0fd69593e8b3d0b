"""The status document (``status --json``, the status page, ``/status.json``), counts and the audit log.

Read-only: every method reads in one read transaction and changes nothing. The status page's many
pollers share one computation of the document (:class:`SharedDocument`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from forum_bridge.clocks import iso
from forum_bridge.store import status_query
from forum_bridge.store.database import Database
from forum_bridge.store.models import AuditRow

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
        """The status document read in ``session`` at ``now`` (see :meth:`BridgeService.status`).

        Plain SQL on the session's own driver connection (:mod:`forum_bridge.store.status_query`,
        which ``forum-bridge status`` also reads through without the rest of the bridge).
        """
        return status_query.status_document(
            self.database.reader(session),
            node=self.node,
            now=now,
            history_hours=history_hours,
            failures=failures,
            search=search,
            offset=offset,
            limit=limit,
        )

    def counts(self) -> dict[str, Any]:
        """The numbers of the status summary from count queries alone (``/metrics`` reads this).

        ``licences`` (total, used, free), ``subscribers`` by state (as in the status document) and
        ``unmanaged`` endpoints, without reading a row per subscriber.
        """
        with self.database.read() as session:
            counted = status_query.counts(self.database.reader(session))
        return {
            "licences": counted.licences(),
            "subscribers": counted.states(),
            "unmanaged": counted.unmanaged,
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
