"""The pool-pressure warning: one log line when the floating pool crosses ``licences.warn_at``.

The watch hooks into every transaction of a :class:`~forum_bridge.store.database.Database`: a
transaction that changed the pool (it took or freed a licence, or changed a reservation; see
``store.operations.mark_pool_changed``) looks at the pool just before it commits, through
:func:`~forum_bridge.store.operations.pool_warning`, and the line is logged once the change is
committed. The raised/cleared flag lives in the database, so bridges sharing one pool log each
crossing once between them, whichever bridge made it.

On PostgreSQL a call's licence claim and a release's count-out travel with the COMMIT, so the pool
as such a transaction leaves it is known only after it committed: the watch then reads the row
those statements returned, and when it shows a possible crossing it looks again in a transaction
of its own (:meth:`PoolWatch.check`), which locks the rows and decides as above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from forum_bridge.errors import StoreError
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from forum_bridge.store.status_query import PoolCounts

log = logging.getLogger("forum_bridge.service")

# session.info key: the crossing found before commit, logged after it.
_FLIP = "forum_bridge.pool_flip"
# session.info key: the pool's row comes back with the COMMIT; look at it after the commit.
_AFTER = "forum_bridge.pool_after_commit"


class PoolWatch:
    """Raises and clears the shared pool-pressure warning of one bridge process."""

    def __init__(self, database: Database, warn_at: int, node: str, clock: Callable[[], datetime]) -> None:
        self.database = database
        self.warn_at = warn_at
        self.node = node
        self.clock = clock
        database.add_commit_hooks(self._before_commit, self._after_commit)

    def check(self) -> None:
        """Look at the pool now (at start; the keepalive sweep also marks its transactions)."""
        with self.database.transaction() as session:
            ops.mark_pool_changed(session)

    def _before_commit(self, session: Session) -> None:
        if not session.info.pop(ops.POOL_CHANGED, False):
            return
        if ops.pool_row_with_commit(session):
            session.info[_AFTER] = True
            return
        try:
            if not ops.pool_warning_due(session, self.warn_at):
                return  # no crossing: nothing to lock or write
            with session.begin_nested():
                flip = ops.pool_warning(session, self.warn_at, self.clock())
        except SQLAlchemyError:
            # A warning must never cost a call its licence: the change commits without it.
            log.exception("could not update the pool-pressure warning")
            return
        if flip is not None:
            session.info[_FLIP] = flip

    def _after_commit(self, session: Session) -> None:
        if session.info.pop(_AFTER, False):
            committed = ops.committed_pool_row(session)
            if committed is not None and ops.warning_crossing(*committed, self.warn_at):
                try:
                    self.check()  # its own transaction, under the locks; it logs a flip itself
                except StoreError:
                    log.exception("could not update the pool-pressure warning")
        flip: tuple[bool, PoolCounts] | None = session.info.pop(_FLIP, None)
        if flip is None:
            return
        raised, counts = flip
        percent = round(100 * counts.floating_used / counts.floating) if counts.floating else 0
        log.warning(
            "licence pool %s used=%d floating=%d percent=%d warn_at=%d reserved=%d total=%d node=%s",
            "above warn_at" if raised else "back below warn_at",
            counts.floating_used,
            counts.floating,
            percent,
            self.warn_at,
            counts.reserved,
            counts.total,
            self.node,
        )
