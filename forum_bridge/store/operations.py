"""Transactional operations on the bridge's state.

Every function takes an open :class:`~sqlalchemy.orm.Session` (inside ``Database.transaction()``) so
the service can combine several steps into one atomic change. Licence acquisition is the only
contended step. The unique constraint on ``licences.logon`` is the last line of defence: no log-on
can ever hold two licences.

Reserved log-ons share the same licence rows: a log-on without a reservation may take a free row
only while fewer than ``count - reserved`` rows are held by such log-ons (the floating pool). That
is a fact about the whole pool, kept in one row (``licence_pool``): taking a licence first counts
itself into that row with one conditional UPDATE (room left, or no row), then claims a free licence
row; freeing one counts itself out. Every such change holds the row from its UPDATE to its commit,
so two processes can never both take the last floating licence, and nothing else waits.

Changes of the pool's shape (slots, reservations, a reset, a removed reserved log-on) call
:func:`lock_pool`: on PostgreSQL it waits until no licence is being taken or freed (those hold a
shared lock, see :func:`share_pool`) and keeps them out until commit, and the row is recounted from
the licence rows just before the commit. SQLite needs no lock: ``BEGIN IMMEDIATE`` serialises
writers.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, text, update
from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from forum_bridge.core.rules import Decision, LogonState, Reason
from forum_bridge.errors import ConfigError, InvalidInputError, NotFoundError
from forum_bridge.store import write_behind
from forum_bridge.store.models import (
    AuditRow,
    Bounded,
    CallRow,
    LicencePoolRow,
    LicenceRow,
    NodeRow,
    PoolStateRow,
    ProfileRow,
    RegistrationRow,
    SubscriberRow,
    UsageRow,
    UTCDateTime,
    stored,
)
from forum_bridge.store.status_query import PoolCounts

log = logging.getLogger(__name__)

T = TypeVar("T")

# session.info key: set when a transaction changed who holds licences or how many are reserved, so
# the pool-pressure watch (forum_bridge.pool_watch) looks at the pool once before it commits.
POOL_CHANGED = "forum_bridge.pool_changed"
# session.info key: lock_pool was called, so the pool's row is recounted just before commit.
POOL_RECOUNT = "forum_bridge.pool_recount"
# session.info key: (PoolCounts, warned) as this transaction last wrote the pool's row (it holds the
# row until commit, so that is the pool as it commits).
POOL_ROW = "forum_bridge.pool_row"
# session.info key: [write_behind.Result] of statements queued for the commit that change the pool's
# row; their rows (read after the commit) feed the pool watch instead of POOL_ROW.
POOL_ROWS_LATER = "forum_bridge.pool_rows_later"
# session.info key: this transaction holds the pool lock, shared or exclusive (PostgreSQL).
_POOL_HELD = "forum_bridge.pool_held"
# Any fixed number: the key of the pool-wide advisory lock on PostgreSQL.
_POOL_LOCK_KEY = 0x464F52554D
# Percentage points the pool must fall below licences.warn_at before the warning is cleared.
POOL_WARNING_HYSTERESIS = 5


def _rowcount(result: object) -> int:
    """Rows touched by an UPDATE or DELETE (``Session.execute`` is typed as returning any Result)."""
    return result.rowcount if isinstance(result, CursorResult) else 0


@dataclass(frozen=True)
class Registration:
    """A registered contact as a PBX reports it during a resync."""

    logon: str
    contact: str
    source: str = ""
    user_agent: str = ""


def audit(
    session: Session,
    at: datetime,
    kind: str,
    *,
    logon: str = "",
    number: str = "",
    reason: str = "",
    node: str = "",
    actor: str = "",
    detail: str = "",
) -> None:
    """Append one line to the audit log (without the ORM's unit of work; on PostgreSQL it travels
    with the transaction's next round trip, see :mod:`forum_bridge.store.write_behind`)."""
    write_behind.defer(
        session.connection(),
        _AUDIT,
        {
            "at": at,
            "kind": kind,
            "logon": logon,
            "number": number,
            "reason": reason,
            "node": node,
            "actor": actor,
            "detail": detail,
        },
    )


_AUDIT_COLUMNS = [c for c in AuditRow.__table__.c if c.name != "id"]
# Every value bound with its column's type, so it is fitted exactly as the ORM would store it.
_AUDIT = text(
    "INSERT INTO audit (at, kind, logon, number, reason, node, actor, detail)"
    " VALUES (:at, :kind, :logon, :number, :reason, :node, :actor, :detail)"
).bindparams(*(bindparam(c.name, type_=c.type) for c in _AUDIT_COLUMNS))


# --- licences ---------------------------------------------------------------------------------


def licence_counts(session: Session) -> tuple[int, int]:
    """(total, used) licences."""
    counts = pool_counts(session)
    return counts.total, counts.used


_USAGE = text("INSERT INTO licence_usage (at, used, total) VALUES (:at, :used, :total)").bindparams(
    bindparam("at", type_=UTCDateTime())
)


def record_usage(session: Session, at: datetime) -> None:
    """Note how many licences are in use now (drives the 24-hour chart)."""
    snapshot = session.info.get(POOL_ROW)
    counts = snapshot[0] if snapshot is not None else pool_counts(session)
    session.connection().execute(_USAGE, {"at": at, "used": counts.used, "total": counts.total})
    mark_pool_changed(session)


def mark_pool_changed(session: Session) -> None:
    """Tell the pool-pressure watch that this transaction changed the pool."""
    session.info[POOL_CHANGED] = True


def _postgresql(session: Session) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


def lock_pool(session: Session) -> None:
    """Serialise a change of the pool's shape (slots, reservations, a reset) with every licence change.

    The pool's row is recounted from the licence rows just before this transaction commits
    (:func:`recount_pool`, run by the database's commit hook), so whatever the change did to slots
    or reservations, the row is exact afterwards. On PostgreSQL an exclusive advisory lock waits
    for the transactions taking or freeing licences (they hold it shared) and keeps new ones out
    until commit, so the recount sees no change in flight. SQLite needs nothing: ``BEGIN IMMEDIATE``
    already serialises writers.
    """
    if _postgresql(session) and session.info.get(_POOL_HELD) != "exclusive":
        session.execute(select(func.pg_advisory_xact_lock(_POOL_LOCK_KEY)))
    session.info[_POOL_HELD] = "exclusive"
    session.info[POOL_RECOUNT] = True
    mark_pool_changed(session)


def share_pool(session: Session) -> None:
    """Hold the pool lock shared (PostgreSQL) before taking or freeing a licence; once per transaction.

    Many transactions hold it at once; only :func:`lock_pool` waits for them. It keeps a log-on's
    reservation from changing between a licence change reading it and committing.
    """
    if session.info.get(_POOL_HELD):
        return
    if _postgresql(session):
        session.execute(select(func.pg_advisory_xact_lock_shared(_POOL_LOCK_KEY)))
    session.info[_POOL_HELD] = "shared"


# A log-on's reservation is read in the statement that counts it.
_TAKE = text(
    "UPDATE licence_pool SET used = used + 1, reserved_used = reserved_used"
    " + (SELECT count(*) FROM subscribers WHERE logon = :logon AND reserved)"
    " WHERE id = 1 AND used < total AND NOT EXISTS (SELECT 1 FROM licences WHERE logon = :logon)"
    " AND ((SELECT count(*) FROM subscribers WHERE logon = :logon AND reserved) = 1"
    " OR used - reserved_used < total - reserved)"
    " RETURNING total, used, reserved, reserved_used, warned"
).bindparams(bindparam("logon", type_=Bounded(128)))
# PostgreSQL: the same count, the claim of a free row, the usage line and (for a call) the audit
# line in one round trip, since the pool's row is held from this statement to the commit.
_TAKE_AND_CLAIM_SQL = (
    "WITH r AS (SELECT count(*) AS n FROM subscribers WHERE logon = :logon AND reserved),"
    " p AS (UPDATE licence_pool SET used = used + 1, reserved_used = reserved_used + r.n"
    " FROM r WHERE id = 1 AND used < total AND NOT EXISTS (SELECT 1 FROM licences WHERE logon = :logon)"
    " AND (r.n = 1 OR used - reserved_used < total - reserved)"
    " RETURNING total, used, reserved, reserved_used, warned, r.n),"
    " c AS (UPDATE licences SET logon = :logon, since = :at, node = :node WHERE logon IS NULL AND slot ="
    " (SELECT slot FROM licences WHERE logon IS NULL AND EXISTS (SELECT 1 FROM p)"
    " ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING slot),"
    " u AS (INSERT INTO licence_usage (at, used, total) SELECT :at, p.used, p.total FROM p, c)"
    "{audit}"
    " SELECT p.total, p.used, p.reserved, p.reserved_used, p.warned, p.n, c.slot FROM p LEFT JOIN c ON true"
)
_TAKE_PARAMS = (
    bindparam("logon", type_=Bounded(128)),
    bindparam("at", type_=UTCDateTime()),
    bindparam("node", type_=Bounded(128)),
)
_TAKE_AND_CLAIM = text(_TAKE_AND_CLAIM_SQL.format(audit="")).bindparams(*_TAKE_PARAMS)
_TAKE_AND_CLAIM_AUDITED = text(
    _TAKE_AND_CLAIM_SQL.format(
        audit=", a AS (INSERT INTO audit (at, kind, logon, number, reason, node, actor, detail)"
        " SELECT :at, 'acquire', :logon, :number, :reason, :node, '', 'slot ' || c.slot FROM c)"
    )
).bindparams(*_TAKE_PARAMS, bindparam("number", type_=Bounded(64)), bindparam("reason", type_=Bounded(64)))
# Freed licences are counted out of the pool's row just before commit, all at once, so the row is
# held only for that last statement.
_GIVE = text(
    "UPDATE licence_pool SET used = used - :freed, reserved_used = reserved_used - :reserved"
    " WHERE id = 1 RETURNING total, used, reserved, reserved_used, warned"
)
_GIVE_WITH_USAGE = text(
    "WITH p AS (UPDATE licence_pool SET used = used - :freed, reserved_used = reserved_used - :reserved"
    " WHERE id = 1 RETURNING total, used, reserved, reserved_used, warned),"
    " u AS (INSERT INTO licence_usage (at, used, total) SELECT :at, used, total FROM p)"
    " SELECT total, used, reserved, reserved_used, warned FROM p"
).bindparams(bindparam("at", type_=UTCDateTime()))
_COUNT = (
    "SELECT (SELECT count(*) FROM licences), (SELECT count(*) FROM licences WHERE logon IS NOT NULL),"
    " (SELECT count(*) FROM subscribers WHERE reserved),"
    " (SELECT count(*) FROM licences l JOIN subscribers s ON s.logon = l.logon WHERE s.reserved)"
)
_RECOUNT = text(
    "UPDATE licence_pool SET total = (SELECT count(*) FROM licences),"
    " used = (SELECT count(*) FROM licences WHERE logon IS NOT NULL),"
    " reserved = (SELECT count(*) FROM subscribers WHERE reserved),"
    " reserved_used = (SELECT count(*) FROM licences l JOIN subscribers s ON s.logon = l.logon"
    " WHERE s.reserved)"
    " WHERE id = 1 RETURNING total, used, reserved, reserved_used, warned"
)
_READ_POOL = "SELECT total, used, reserved, reserved_used, warned FROM licence_pool WHERE id = 1"
_CLAIM_SET = "UPDATE licences SET logon = :logon, since = :at, node = :node WHERE logon IS NULL AND slot = "
_CLAIMS = {
    dialect: text(_CLAIM_SET + free + " RETURNING slot").bindparams(
        bindparam("logon", type_=Bounded(128)),
        bindparam("at", type_=UTCDateTime()),
        bindparam("node", type_=Bounded(128)),
    )
    for dialect, free in (
        ("sqlite", "(SELECT min(slot) FROM licences WHERE logon IS NULL)"),
        # Never waits for a row another transaction is claiming or freeing.
        (
            "postgresql",
            "(SELECT slot FROM licences WHERE logon IS NULL ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED)",
        ),
    )
}
_FREE = text(
    "UPDATE licences SET logon = NULL, since = NULL, node = NULL WHERE logon = :logon RETURNING slot"
).bindparams(bindparam("logon", type_=Bounded(128)))
_FREE_PG = text(
    "UPDATE licences SET logon = NULL, since = NULL, node = NULL WHERE logon = :logon"
    " RETURNING slot, (SELECT count(*) FROM subscribers WHERE logon = :logon AND reserved)"
).bindparams(bindparam("logon", type_=Bounded(128)))
# session.info key: [licences freed, of them by reserved log-ons, when] not yet counted out of the row.
_PENDING = "forum_bridge.pool_pending"


def _pool_row(session: Session, row: Any) -> PoolCounts:
    """Remember the row this transaction wrote (for the usage chart and the pool watch)."""
    total, used, reserved, reserved_used, warned = row
    counts = PoolCounts(total=total, used=used, reserved=reserved, reserved_used=reserved_used)
    session.info[POOL_ROW] = (counts, bool(warned))
    # Written after any statement still queued for the commit was sent: this row is the newer.
    session.info.pop(POOL_ROWS_LATER, None)
    return counts


def _pool_row_later(session: Session, result: write_behind.Result) -> None:
    """Remember a statement queued for the commit whose row starts with the pool's row as it left
    it (total, used, reserved, reserved_used, warned; NULLs when it did not change the row)."""
    session.info.pop(POOL_ROW, None)  # no longer the pool as this transaction leaves it
    session.info.setdefault(POOL_ROWS_LATER, []).append(result)
    mark_pool_changed(session)


def pool_row_with_commit(session: Session) -> bool:
    """Whether the pool's row as this transaction leaves it is known only once it has committed
    (PostgreSQL: the statement that writes it travels with the COMMIT)."""
    return bool(session.info.get(POOL_ROWS_LATER))


def committed_pool_row(session: Session) -> tuple[PoolCounts, bool] | None:
    """After the commit: the pool's row (counts, warned) as the last statement of this transaction
    that changed it left it, or None when none did (a claim refused) or none was sent."""
    results: list[write_behind.Result] = session.info.pop(POOL_ROWS_LATER, None) or []
    for result in reversed(results):
        row = result.row if result.sent else None
        if row is not None and row[0] is not None:
            total, used, reserved, reserved_used, warned = row[:5]
            counts = PoolCounts(total=total, used=used, reserved=reserved, reserved_used=reserved_used)
            return counts, bool(warned)
    return None


def warning_crossing(counts: PoolCounts, warned: bool, warn_at: int) -> bool:
    """Whether a pool at ``counts``, with the warning ``warned``, crosses ``warn_at`` (a hint:
    :func:`pool_warning` decides under the locks)."""
    return _warning_wanted(counts, warned, warn_at) != warned


def pool_counts(session: Session) -> PoolCounts:
    """The pool: as this transaction left its row after taking or freeing a licence, else counted.

    The count (one statement, no row loaded) reads the licence rows themselves, so the status
    document, ``check`` and ``/metrics`` never depend on the pool's row.
    """
    flush_pool(session)
    snapshot = session.info.get(POOL_ROW)
    if snapshot is not None:
        return snapshot[0]  # type: ignore[no-any-return]
    row = session.connection().execute(text(_COUNT)).one()
    return PoolCounts(total=row[0], used=row[1], reserved=row[2], reserved_used=row[3])


def recount_pool(session: Session) -> PoolCounts:
    """Count the pool from the licence rows and reservations into its row (created if missing)."""
    session.info.pop(_PENDING, None)  # the count sees those licences freed already
    session.flush()
    connection = session.connection()
    row = connection.execute(_RECOUNT).first()
    if row is None:
        connection.execute(
            insert(LicencePoolRow),
            {"id": 1, "total": 0, "used": 0, "reserved": 0, "reserved_used": 0, "warned": False},
        )
        row = connection.execute(_RECOUNT).one()
    return _pool_row(session, row)


def flush_pool(session: Session, *, with_commit: bool = False) -> None:
    """Count the licences this transaction freed out of the pool's row (the commit hook calls it).

    ``with_commit`` (the commit hook, PostgreSQL): the count-out travels with the COMMIT, so the
    pool's row is held only while the server runs that last pipeline; the row it leaves is read
    after the commit (:func:`committed_pool_row`).
    """
    pending = session.info.pop(_PENDING, None)
    if pending is None:
        return
    freed, reserved, at = pending
    connection = session.connection()
    values = {"freed": freed, "reserved": reserved}
    if connection.dialect.name == "postgresql" and with_commit:
        given = _bound(connection, _GIVE_WITH_USAGE, {**values, "at": at})
        _pool_row_later(session, write_behind.defer_read(connection, _GIVE_WITH_USAGE, given))
        return
    if connection.dialect.name == "postgresql":
        # With the transaction's deferred writes (a release's audit line) in one round trip.
        given = _bound(connection, _GIVE_WITH_USAGE, {**values, "at": at})
        _pool_row(session, _one_round_trip(connection, [(_GIVE_WITH_USAGE_PG, given)]))
        return
    counts = _pool_row(session, connection.execute(_GIVE, values).one())
    connection.execute(_USAGE, {"at": at, "used": counts.used, "total": counts.total})


def is_reserved(session: Session, logon: str) -> bool:
    """True when ``logon`` is a managed log-on with a reserved licence."""
    return bool(session.scalar(select(SubscriberRow.reserved).where(SubscriberRow.logon == logon)))


def lock_logon(session: Session, logon: str) -> None:
    """Serialise decisions about one log-on until the transaction ends.

    Without it, two PostgreSQL transactions deciding for the same log-on at once would both see it
    without a licence; the loser of the row lock would then find no free slot and deny a log-on that
    does hold a licence. SQLite needs nothing: ``BEGIN IMMEDIATE`` already serialises writers.
    """
    if _postgresql(session):
        # The stored name, as a decision locks it (two spellings that fit to one log-on, one lock).
        session.connection().execute(_LOCK, {"logon": stored(SubscriberRow.logon, logon)})
        session.info.setdefault(_POOL_HELD, "shared")


def held_slot(session: Session, logon: str) -> int | None:
    """The slot ``logon`` holds, or None."""
    return session.scalar(select(LicenceRow.slot).where(LicenceRow.logon == logon))


def free_licence_exists(session: Session) -> bool:
    """True when at least one licence is free (a hint; :func:`acquire` decides)."""
    return session.scalar(select(LicenceRow.slot).where(LicenceRow.logon.is_(None)).limit(1)) is not None


def licence_available(session: Session, logon: str) -> bool:
    """True when ``logon`` could take a licence now (a hint; :func:`acquire` decides).

    A reserved log-on always can; any other needs a free licence of the floating pool.
    """
    if is_reserved(session, logon):
        return licence_counts(session)[0] > 0
    if not free_licence_exists(session):
        return False
    return pool_counts(session).free > 0


def acquire(session: Session, logon: str, node: str, at: datetime) -> int | None:
    """Give ``logon`` a licence; return its slot, or None when none may be taken.

    Idempotent: a log-on that holds a licence keeps the one it has. A log-on without a reservation
    takes one only within the floating pool. A reserved log-on takes any free licence; when there is
    none (the pool was full of floating holders when the reservation was made, or the count was
    lowered), it takes over the licence of a floating holder, which then loses it as at a reset:
    its call in progress goes on.
    """
    return _acquire(session, logon, node, at, None)


def acquire_for_call(
    session: Session,
    logon: str,
    node: str,
    at: datetime,
    number: str,
    direction: str,
    *,
    reserved: bool | None = None,
) -> int | None:
    """:func:`acquire` for a call to or from ``number``, with its audit line (kind ``acquire``).

    Written in the same statement as the claim where the database allows it: a call decision
    holds the pool's row from the claim to its commit, so the fewer statements after it the better.
    ``reserved``: whether the log-on has a reservation, when the caller read it in this
    transaction under the pool lock (:func:`decision_facts`), which keeps it from changing.
    """
    return _acquire(session, logon, node, at, {"number": number, "reason": direction}, reserved)


# PostgreSQL, a call's licence claimed with the COMMIT (see acquire_for_call_with_commit). First
# the pool's row is locked, so the claim's statement, which starts after that, sees every licence
# change committed before it (each holds that row until it commits): counted in, a free licence
# row is certain. Then one statement counts the log-on in (or finds the licence it holds), claims
# a free row, writes the usage line, the audit line (acquire, or the denial) and the leg's
# decision, and returns the pool's row with the slot; the server computes the answer. (The values
# are typed once, in v: a parameter used for columns of several lengths has no one type.)
# The lock also lets the claim run with the plan PostgreSQL keeps for a prepared statement
# (plan_cache_mode auto, for the rest of the transaction, which holds nothing after the claim but
# other decisions' key lookups and the COMMIT): the claim looks rows up by key, so one plan fits
# every value, and planning it at each execution (the connections' default, force_custom_plan,
# which the storm's batches need) was most of the server's work for a licence: the same
# transactions from pgbench went from 1,300-1,800 to 2,800-4,800 operations/s with cached plans.
# Switches the rest of a transaction to the plans PostgreSQL keeps for prepared statements; the
# COMMIT reverts it (the connections plan each execution, see database.py).
_CACHED_PLANS = "set_config('plan_cache_mode', 'auto', true)"
_LOCK_POOL_ROW = text(
    f"SELECT {_CACHED_PLANS} FROM licence_pool WHERE id = 1 FOR NO KEY UPDATE"  # noqa: S608 - constant text
)
_CLAIM_WITH_COMMIT = text(
    "WITH v AS (SELECT CAST(:logon AS text) AS logon, CAST(:node AS text) AS node,"
    " CAST(:number AS text) AS number, CAST(:direction AS text) AS direction,"
    " CAST(:channel AS text) AS channel, CAST(:denied AS text) AS denied,"
    " CAST(:granted AS text) AS granted),"
    " r AS (SELECT count(*) AS n FROM subscribers, v WHERE subscribers.logon = v.logon AND reserved),"
    " h AS (SELECT slot FROM licences, v WHERE licences.logon = v.logon),"
    " p AS (UPDATE licence_pool SET used = used + 1, reserved_used = reserved_used + r.n"
    " FROM r WHERE id = 1 AND used < total AND NOT EXISTS (SELECT 1 FROM h)"
    " AND (r.n = 1 OR used - reserved_used < total - reserved)"
    " AND EXISTS (SELECT 1 FROM licences WHERE logon IS NULL)"
    " RETURNING total, used, reserved, reserved_used, warned),"
    " c AS (UPDATE licences SET logon = v.logon, since = :at, node = v.node FROM v"
    " WHERE licences.logon IS NULL AND slot = (SELECT slot FROM licences WHERE logon IS NULL"
    " AND EXISTS (SELECT 1 FROM p) ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING slot),"
    " s AS (SELECT slot FROM c UNION ALL SELECT slot FROM h),"
    " o AS (SELECT s.slot, v.* FROM v LEFT JOIN s ON true),"
    " u AS (INSERT INTO licence_usage (at, used, total) SELECT :at, p.used, p.total FROM p, c),"
    " a AS (INSERT INTO audit (at, kind, logon, number, reason, node, actor, detail)"
    " SELECT :at, CASE WHEN slot IS NULL THEN 'deny' ELSE 'acquire' END, logon, number,"
    " CASE WHEN slot IS NULL THEN denied ELSE direction END, node, '',"
    " CASE WHEN slot IS NULL THEN direction ELSE 'slot ' || slot END FROM o),"
    " k AS (INSERT INTO calls (node, channel, logon, number, direction, started_at, allowed, reason)"
    " SELECT node, channel, logon, number, direction, :at, slot IS NOT NULL,"
    " CASE WHEN slot IS NULL THEN denied ELSE granted END FROM o WHERE channel <> ''"
    " ON CONFLICT (node, channel) DO UPDATE SET allowed = excluded.allowed, reason = excluded.reason)"
    " SELECT p.total, p.used, p.reserved, p.reserved_used, p.warned, o.slot FROM o LEFT JOIN p ON true"
).bindparams(
    bindparam("logon", type_=Bounded(128)),
    bindparam("node", type_=Bounded(128)),
    bindparam("number", type_=Bounded(64)),
    bindparam("direction", type_=Bounded(16)),
    bindparam("channel", type_=Bounded(256)),
    bindparam("denied", type_=Bounded(32)),
    bindparam("granted", type_=Bounded(32)),
    bindparam("at", type_=UTCDateTime()),
)


class LicenceClaim:
    """A call's licence claim that travels with its transaction's COMMIT (PostgreSQL)."""

    def __init__(self, result: write_behind.Result) -> None:
        self._result = result

    @property
    def sent(self) -> bool:
        """Whether the claim reached the server (after a successful commit it always has)."""
        return self._result.sent

    @property
    def slot(self) -> int | None:
        """The slot the log-on holds now, or None: refused, or not sent (never committed)."""
        row = self._result.row if self._result.sent else None
        return None if row is None or row[5] is None else int(row[5])


def claims_with_commit(session: Session) -> bool:
    """Whether :func:`acquire_for_call_with_commit` applies (PostgreSQL; SQLite has no round trips
    to save and keeps :func:`acquire_for_call`)."""
    return _postgresql(session)


def acquire_for_call_with_commit(
    session: Session,
    logon: str,
    node: str,
    at: datetime,
    number: str,
    direction: str,
    channel: str,
    *,
    denied: Reason,
    granted: Reason,
) -> LicenceClaim:
    """:func:`acquire_for_call` for a log-on without a reservation, sent with the COMMIT.

    Nothing is sent now: the claim travels after the transaction's deferred writes, in the same
    round trip as its COMMIT, so the pool's row is held only while the server runs that pipeline,
    never while a client waits for a core. The answer is the server's: the slot (claimed, or the
    one the log-on holds) or none; it writes the audit line (``acquire``, or ``deny`` with reason
    ``denied``) and, for a ``channel``, the leg's decision (``granted`` or ``denied``), replacing
    one the caller recorded before. A transaction that does not commit claims nothing. A reserved
    log-on uses :func:`acquire_for_call` (it may take over a floating licence).
    """
    share_pool(session)
    flush_pool(session)  # licences this transaction freed are counted out first, as _claim_free does
    connection = session.connection()
    write_behind.defer_read(connection, _LOCK_POOL_ROW, {})
    values = {
        "logon": logon,
        "node": node,
        "number": number,
        "direction": direction,
        "channel": channel,
        "denied": denied.value,
        "granted": granted.value,
        "at": at,
    }
    result = write_behind.defer_read(connection, _CLAIM_WITH_COMMIT, values)
    _pool_row_later(session, result)
    return LicenceClaim(result)


_HELD = text("SELECT slot FROM licences WHERE logon = :logon").bindparams(
    bindparam("logon", type_=Bounded(128))
)


def _acquire(
    session: Session,
    logon: str,
    node: str,
    at: datetime,
    call: dict[str, str] | None,
    reserved: bool | None = None,
) -> int | None:
    share_pool(session)
    slot = _claim_free(session, logon, node, at, call)
    if slot is None:
        # Checked only now: the claim itself is refused to a log-on holding a licence.
        slot = session.connection().execute(_HELD, {"logon": logon}).scalar()
        if slot is None and (is_reserved(session, logon) if reserved is None else reserved):
            slot = _take_over(session, logon, node, at, call)
        elif slot is not None and call is not None:
            _audit_acquire(session, logon, node, at, call, slot)
    return slot


def _audit_acquire(
    session: Session, logon: str, node: str, at: datetime, call: dict[str, str], slot: int
) -> None:
    audit(
        session,
        at,
        "acquire",
        logon=logon,
        number=call["number"],
        reason=call["reason"],
        node=node,
        detail=f"slot {slot}",
    )


def _claim_free(
    session: Session, logon: str, node: str, at: datetime, call: dict[str, str] | None
) -> int | None:
    """Count ``logon`` into the pool's row if there is room for it, then claim a free licence row.

    The row is counted in under its lock, after every change counted before it has committed, so
    a free licence row exists; a second look only covers a row freed while the first statement's
    snapshot was taken.
    """
    flush_pool(session)
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        for _attempt in range(3):
            values = {"logon": logon, "at": at, "node": node}
            statement = _TAKE_AND_CLAIM if call is None else _TAKE_AND_CLAIM_AUDITED
            values = _bound(connection, statement, values if call is None else {**values, **call})
            # With the group's earlier deferred writes, if any, in one round trip.
            row = _one_round_trip(connection, [(_psycopg_style(statement), values)])
            if row is None:
                return None  # no room: the pool's row says so, and nothing was changed
            *pool, reserved, slot = row
            if slot is not None:
                _pool_row(session, pool)
                mark_pool_changed(session)
                return int(slot)
            _pool_row(session, connection.execute(_GIVE, {"freed": 1, "reserved": reserved}).one())
        return None
    # On the driver: a first call of a log-on waits for these (see write_behind.on_driver).
    row = write_behind.run_on_driver(connection, _TAKE, {"logon": logon}, fetch=True)
    if row is None:
        return None
    counts = _pool_row(session, row)
    claimed = write_behind.run_on_driver(
        connection, _CLAIMS["sqlite"], {"logon": logon, "at": at, "node": node}, fetch=True
    )
    if claimed is None:  # the row was wrong (changed by hand?): give the count back
        log.error("the licence pool's row counts a free licence the licence rows lack; recounting it")
        recount_pool(session)
        return None
    slot = claimed[0]
    write_behind.defer(connection, _USAGE, {"at": at, "used": counts.used, "total": counts.total})
    if call is not None:
        _audit_acquire(session, logon, node, at, call, int(slot))
    mark_pool_changed(session)
    return int(slot)


def _take_over(
    session: Session, logon: str, node: str, at: datetime, call: dict[str, str] | None
) -> int | None:
    """Move the licence of a floating holder to reserved ``logon``; prefer a holder not in a call."""
    in_call = select(CallRow.logon).where(CallRow.logon == LicenceRow.logon).exists()
    victim = session.execute(
        select(LicenceRow.slot, LicenceRow.logon)
        .join(SubscriberRow, SubscriberRow.logon == LicenceRow.logon)
        .where(SubscriberRow.reserved.is_(False))
        .order_by(in_call, LicenceRow.since, LicenceRow.slot)
        .limit(1)
    ).first()
    if victim is None:
        return None
    slot, holder = victim
    release(session, holder or "", at, "reserved", node, detail=f"slot {slot} given to reserved {logon}")
    log.warning("licence taken over slot=%s from=%s to=%s reason=reserved node=%s", slot, holder, logon, node)
    return _claim_free(session, logon, node, at, call)


def release(
    session: Session,
    logon: str,
    at: datetime,
    reason: str,
    node: str = "",
    actor: str = "",
    detail: str = "",
) -> int | None:
    """Free the licence of ``logon``; return the slot that was freed, or None if it held none.

    The pool's row is updated once for all licences the transaction freed, just before it commits.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        if session.info.get(_POOL_HELD):
            freeing = _bound(connection, _FREE_PG, {"logon": logon})
            row = _one_round_trip(connection, [(_FREE_PG_SQL, freeing)])
        else:
            # The pool lock shared (as share_pool takes it), then the release, in one round trip.
            row = _one_round_trip(
                connection,
                [(_SHARE_PG, {}), (_FREE_PG_SQL, _bound(connection, _FREE_PG, {"logon": logon}))],
            )
            session.info[_POOL_HELD] = "shared"
        if row is None:
            return None
        slot, reserved = row
    else:
        share_pool(session)
        slot = connection.execute(_FREE, {"logon": logon}).scalar()
        if slot is None:
            return None
        reserved = 1 if is_reserved(session, logon) else 0
    pending = session.info.setdefault(_PENDING, [0, 0, at])
    pending[0] += 1
    pending[1] += reserved
    pending[2] = at
    session.info.pop(POOL_ROW, None)  # no longer the pool as this transaction leaves it
    audit(
        session,
        at,
        "release",
        logon=logon,
        reason=reason,
        node=node,
        actor=actor,
        detail=detail or f"slot {slot}",
    )
    mark_pool_changed(session)
    return int(slot)


def reset_licences(session: Session, at: datetime, actor: str, node: str) -> list[str]:
    """Free every licence at once; return the log-ons that held one."""
    lock_pool(session)
    holders = list(session.scalars(select(LicenceRow.logon).where(LicenceRow.logon.is_not(None))))
    session.execute(
        update(LicenceRow)
        .values(logon=None, since=None, node=None)
        .execution_options(synchronize_session=False)
    )
    for logon in holders:
        audit(session, at, "release", logon=logon or "", reason="reset", node=node, actor=actor)
    audit(
        session,
        at,
        "reset",
        reason="reset",
        node=node,
        actor=actor,
        detail=f"{len(holders)} licence(s) freed",
    )
    recount_pool(session)
    record_usage(session, at)
    return [h for h in holders if h]


def sync_slots(session: Session, count: int, at: datetime, node: str) -> None:
    """Make the licence rows match the purchased count; slots above it are released and dropped.

    A count below the number of reserved log-ons is refused (:class:`ConfigError` naming
    ``licences.count``) and changes nothing: the reservations were promised to those log-ons.
    """
    lock_pool(session)
    existing = list(session.scalars(select(LicenceRow).order_by(LicenceRow.slot)))
    if len(existing) == count and all(row.slot == i + 1 for i, row in enumerate(existing)):
        return
    reserved = reserved_logons(session)
    if len(reserved) > count:
        shown = ", ".join(reserved[:5]) + (", ..." if len(reserved) > 5 else "")
        raise ConfigError(
            "licences.count",
            f"{count} is fewer than the {len(reserved)} reserved licences ({shown}); raise it, or run "
            "'forum-bridge subscriber unreserve LOGON' first",
        )
    numbers = {row.slot for row in existing}
    for row in existing:
        if row.slot > count:
            if row.logon:
                audit(session, at, "release", logon=row.logon, reason="licence_removed", node=node)
            session.delete(row)
    for slot in range(1, count + 1):
        if slot not in numbers:
            session.add(LicenceRow(slot=slot))
    recount_pool(session)
    record_usage(session, at)


def _warning_wanted(counts: PoolCounts, warned: bool, warn_at: int) -> bool:
    """Whether the warning should be raised with the pool at ``counts``, given it is ``warned`` now.

    Raised at ``warn_at`` percent of the floating pool in use and cleared below ``warn_at -
    POOL_WARNING_HYSTERESIS``, so a pool hovering at the threshold does not log a pair of lines per
    licence. ``warn_at`` 0 clears it for good.
    """
    percent = 100 * counts.floating_used / counts.floating if counts.floating else 0.0
    if warn_at <= 0:
        return False
    if warned:
        return percent >= warn_at - POOL_WARNING_HYSTERESIS
    return percent >= warn_at


def pool_warning_due(session: Session, warn_at: int) -> bool:
    """Whether the pool as this transaction leaves it may cross ``warn_at`` (a hint, without a lock).

    A transaction that took or freed a licence knows the pool's row already (it holds it), so this
    costs nothing; :func:`pool_warning` decides under the locks.
    """
    flush_pool(session)
    snapshot = session.info.get(POOL_ROW)
    if snapshot is None:
        row = session.connection().execute(text(_READ_POOL)).first()
        if row is None:
            return True
        counts = PoolCounts(total=row[0], used=row[1], reserved=row[2], reserved_used=row[3])
        snapshot = (counts, bool(row[4]))
    counts, warned = snapshot
    return _warning_wanted(counts, warned, warn_at) != warned


def pool_warning(session: Session, warn_at: int, at: datetime) -> tuple[bool, PoolCounts] | None:
    """Raise or clear the shared pool-pressure flag; return (raised, counts) when it flipped.

    The pool's row and then the flag row are locked before the pool is read, so bridges sharing the
    pool take turns and each sees every licence change committed before it: each crossing flips the
    flag exactly once, whichever process makes it (see :func:`_warning_wanted` for the threshold).
    """
    flush_pool(session)
    connection = session.connection()
    postgresql = connection.dialect.name == "postgresql"
    if POOL_ROW in session.info:
        counts = session.info[POOL_ROW][0]  # this transaction holds the pool's row already
    else:
        row = connection.execute(text(_READ_POOL + (" FOR UPDATE" if postgresql else ""))).first()
        counts = _pool_row(session, row) if row is not None else recount_pool(session)
    query = select(PoolStateRow).where(PoolStateRow.id == 1).execution_options(populate_existing=True)
    if postgresql:
        query = query.with_for_update()
    state = session.scalar(query)
    if state is None:
        try:
            with session.begin_nested():
                session.add(PoolStateRow(id=1, warned=False, changed_at=None))
        except IntegrityError:
            pass  # another bridge created it meanwhile
        state = session.scalar(query)
        assert state is not None
    raise_it = _warning_wanted(counts, state.warned, warn_at)
    # Keep the pool row's copy of the flag equal to the flag, so pool_warning_due stays a good hint.
    connection.execute(update(LicencePoolRow).where(LicencePoolRow.id == 1).values(warned=raise_it))
    session.info[POOL_ROW] = (counts, raise_it)
    if raise_it == state.warned:
        return None
    state.warned, state.changed_at = raise_it, at
    return raise_it, counts


# --- subscribers and profiles -----------------------------------------------------------------


def logon_state(session: Session, logon: str) -> LogonState:
    """What the rules need to know about ``logon`` (on every node)."""
    subscriber = session.get(SubscriberRow, logon)
    if subscriber is None:
        return LogonState(managed=False, logged_on=False, last_logon_failed=False, holds_licence=False)
    return LogonState(
        managed=True,
        logged_on=is_registered(session, logon),
        last_logon_failed=subscriber.last_logon_failed,
        holds_licence=held_slot(session, logon) is not None,
    )


def set_reserved(session: Session, logon: str, reserved: bool) -> bool:
    """Reserve a licence for ``logon`` or give it back; return False when nothing changed.

    Raises :class:`InvalidInputError` when a reservation would exceed the purchased licences.
    """
    lock_pool(session)
    row = session.get(SubscriberRow, logon)
    if row is None:
        raise NotFoundError(f"no subscriber {logon!r}")
    if row.reserved == reserved:
        return False
    if reserved:
        check_reservations(session, extra=1)
    row.reserved = reserved
    session.flush()
    mark_pool_changed(session)
    return True


def check_reservations(session: Session, extra: int) -> None:
    """Refuse ``extra`` more reservations when they would not fit into the purchased licences."""
    counts = recount_pool(session)
    if counts.reserved + extra > counts.total:
        raise InvalidInputError(
            f"cannot reserve {extra} more licence(s): {counts.reserved} of {counts.total} licences "
            "are reserved already (raise licences.count or unreserve a log-on first)"
        )


def reserved_logons(session: Session) -> list[str]:
    """Every log-on with a reserved licence, by name."""
    return list(
        session.scalars(
            select(SubscriberRow.logon).where(SubscriberRow.reserved.is_(True)).order_by(SubscriberRow.logon)
        )
    )


def licence_holders(session: Session) -> list[str]:
    """Every log-on holding a licence now, by name (one row per purchased licence at most)."""
    holders = session.scalars(select(LicenceRow.logon).where(LicenceRow.logon.is_not(None)))
    return sorted(h for h in holders if h)


def failed_logons(session: Session) -> list[str]:
    """Every managed log-on whose latest log-on attempt failed, by name."""
    return list(
        session.scalars(
            select(SubscriberRow.logon)
            .where(SubscriberRow.last_logon_failed.is_(True))
            .order_by(SubscriberRow.logon)
        )
    )


def subscribers_of_number(session: Session, number: str) -> list[SubscriberRow]:
    """Every log-on sharing call number ``number``, by log-on name."""
    return list(
        session.scalars(
            select(SubscriberRow).where(SubscriberRow.number == number).order_by(SubscriberRow.logon)
        )
    )


def upsert_profiles(session: Session, profiles: Iterable[tuple[str, int]]) -> None:
    """Create or update profiles (name, keepalive seconds)."""
    for name, keepalive in profiles:
        row = session.get(ProfileRow, name)
        if row is None:
            session.add(ProfileRow(name=name, keepalive_seconds=keepalive))
        else:
            row.keepalive_seconds = keepalive
    session.flush()


# --- registrations ----------------------------------------------------------------------------


def add_registration(
    session: Session, node: str, logon: str, contact: str, source: str, user_agent: str, at: datetime
) -> bool:
    """Record a registered contact; return True when it is new (False for a refresh)."""
    row = session.scalar(
        select(RegistrationRow).where(
            RegistrationRow.node == node, RegistrationRow.logon == logon, RegistrationRow.contact == contact
        )
    )
    if row is not None:
        row.last_seen = at
        row.source = source or row.source
        row.user_agent = user_agent or row.user_agent
        return False
    session.add(
        RegistrationRow(
            node=node,
            logon=logon,
            contact=contact,
            source=source,
            user_agent=user_agent,
            registered_at=at,
            last_seen=at,
        )
    )
    session.flush()
    return True


def node_contacts(session: Session, node: str) -> dict[tuple[str, str], int]:
    """Every registration of ``node``: (log-on, contact) -> its row id, in one statement."""
    query = select(RegistrationRow.logon, RegistrationRow.contact, RegistrationRow.id).where(
        RegistrationRow.node == node
    )
    return {(logon, contact): row_id for logon, contact, row_id in session.execute(query)}


# Values bound in one IN (...) list at most: far below SQLite's limit on parameters (32,766; 999
# before 3.32) and PostgreSQL's.
IN_CHUNK = 500


def in_chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    """``values`` in slices of at most :data:`IN_CHUNK`, one IN list each."""
    for start in range(0, len(values), IN_CHUNK):
        yield values[start : start + IN_CHUNK]


def delete_registrations_by_id(session: Session, ids: Sequence[int]) -> int:
    """Drop the registrations with these row ids; return how many."""
    removed = 0
    for chunk in in_chunks(ids):
        query = delete(RegistrationRow).where(RegistrationRow.id.in_(chunk))
        removed += _rowcount(session.execute(query.execution_options(synchronize_session=False)))
    return removed


def registered_among(session: Session, logons: Sequence[str]) -> set[str]:
    """The log-ons among ``logons`` that have a contact on any node."""
    found: set[str] = set()
    for chunk in in_chunks(logons):
        found.update(session.scalars(select(RegistrationRow.logon).where(RegistrationRow.logon.in_(chunk))))
    return found


def touch_node_registrations(session: Session, node: str, at: datetime) -> int:
    """Move the keepalive clock of every contact of ``node``; return how many."""
    query = update(RegistrationRow).where(RegistrationRow.node == node).values(last_seen=at)
    return _rowcount(session.execute(query.execution_options(synchronize_session=False)))


def remove_registrations(session: Session, node: str, logon: str, contact: str = "") -> int:
    """Drop one contact (or all, with ``contact=""``) of ``logon`` on ``node``; return how many."""
    query = delete(RegistrationRow).where(RegistrationRow.node == node, RegistrationRow.logon == logon)
    if contact:
        query = query.where(RegistrationRow.contact == contact)
    return _rowcount(session.execute(query.execution_options(synchronize_session=False)))


def is_registered(session: Session, logon: str) -> bool:
    """True while ``logon`` has a contact on any node."""
    return (
        session.scalar(select(RegistrationRow.id).where(RegistrationRow.logon == logon).limit(1)) is not None
    )


def touch_registrations(session: Session, node: str, logon: str, at: datetime) -> int:
    """Move the keepalive clock of every contact of ``logon`` on ``node``; return how many."""
    query = update(RegistrationRow).where(RegistrationRow.node == node, RegistrationRow.logon == logon)
    return _rowcount(session.execute(query.values(last_seen=at).execution_options(synchronize_session=False)))


def overdue_registrations(
    session: Session, node: str, now: datetime, default_profile: str, grace: int
) -> int:
    """How many contacts of ``node`` are past their profile's keepalive plus ``grace`` (one count per
    profile, no row loaded); unmanaged contacts run on ``default_profile``, as the sweep does."""
    keepalive = dict(session.execute(select(ProfileRow.name, ProfileRow.keepalive_seconds)).all())
    total = 0
    for name, seconds in keepalive.items():
        query = (
            select(func.count())
            .select_from(RegistrationRow)
            .outerjoin(SubscriberRow, SubscriberRow.logon == RegistrationRow.logon)
            .where(
                RegistrationRow.node == node,
                RegistrationRow.last_seen < now - timedelta(seconds=seconds + grace),
            )
        )
        if name == default_profile:
            query = query.where((SubscriberRow.profile == name) | SubscriberRow.logon.is_(None))
        else:
            query = query.where(SubscriberRow.profile == name)
        total += session.scalar(query) or 0
    return total


def logon_contacts(session: Session, node: str, logon: str) -> list[str]:
    """The contacts of one log-on this node knows."""
    query = select(RegistrationRow.contact).where(
        RegistrationRow.node == node, RegistrationRow.logon == logon
    )
    return sorted(session.scalars(query))


@dataclass(frozen=True, slots=True)
class NodeContact:
    """One contact of a node as the keepalive clock reads it: no ORM object, its log-on's profile."""

    logon: str
    contact: str
    last_seen: datetime | None  # None only for a contact the caller said it knows (``known``)
    profile: str | None  # None: the log-on is not provisioned (the default profile applies)


def node_registrations(
    session: Session, node: str, known: Container[tuple[str, str]] = ()
) -> list[NodeContact]:
    """Every contact ``node`` knows, with its log-on's profile, in one statement.

    ``known`` holds (log-on, contact) keys whose ``last_seen`` the caller does not need (it keeps
    its own clock for them); for those it is None unless read anyway. The keepalive sweep reads
    this every second: with 10,000 phones, ORM objects, a second query for every subscriber's
    profile and a parsed timestamp per row cost more than the rest of a registration storm.
    """
    registrations = cast(Table, RegistrationRow.__table__)
    subscribers = cast(Table, SubscriberRow.__table__)
    joined = registrations.outerjoin(subscribers, subscribers.c.logon == registrations.c.logon)
    mine = registrations.c.node == node
    session.flush()  # Core statements below: the ORM's pending changes first, as its own reads do
    connection = session.connection()
    rows = connection.execute(
        select(registrations.c.logon, registrations.c.contact, subscribers.c.profile)
        .select_from(joined)
        .where(mine)
    ).all()
    if all((logon, contact) in known for logon, contact, _ in rows):
        return [NodeContact(logon, contact, None, profile) for logon, contact, profile in rows]
    # Some clock is missing (after a start, or a contact another path added): read them all once.
    timed = connection.execute(
        select(
            registrations.c.logon, registrations.c.contact, registrations.c.last_seen, subscribers.c.profile
        )
        .select_from(joined)
        .where(mine)
    )
    return [NodeContact(logon, contact, seen, profile) for logon, contact, seen, profile in timed]


# Log-ons per statement when the keepalive sweep confirms the contacts that came due: bounded
# statements (bind parameters) even when a whole storm's first deadlines come at once.
_CONFIRM_LOGONS = 500


def registrations_of(session: Session, node: str, keys: Collection[tuple[str, str]]) -> list[NodeContact]:
    """The contacts among ``keys`` (log-on, contact) that ``node`` still has, as stored now.

    What the keepalive sweep confirms before it logs a contact off: only the contacts whose
    deadline came (usually none), each with its ``last_seen`` and its log-on's profile, read by
    log-on through the (node, logon, contact) index, a few hundred log-ons a statement.
    """
    if not keys:
        return []
    wanted = set(keys)
    logons = sorted({logon for logon, _ in wanted})
    registrations = cast(Table, RegistrationRow.__table__)
    subscribers = cast(Table, SubscriberRow.__table__)
    joined = registrations.outerjoin(subscribers, subscribers.c.logon == registrations.c.logon)
    session.flush()  # Core statements below: the ORM's pending changes first, as its own reads do
    connection = session.connection()
    found: list[NodeContact] = []
    for start in range(0, len(logons), _CONFIRM_LOGONS):
        rows = connection.execute(
            select(
                registrations.c.logon,
                registrations.c.contact,
                registrations.c.last_seen,
                subscribers.c.profile,
            )
            .select_from(joined)
            .where(
                registrations.c.node == node,
                registrations.c.logon.in_(logons[start : start + _CONFIRM_LOGONS]),
            )
        )
        found += [
            NodeContact(logon, contact, seen, profile)
            for logon, contact, seen, profile in rows
            if (logon, contact) in wanted
        ]
    return found


# --- calls ------------------------------------------------------------------------------------


def add_call(
    session: Session,
    node: str,
    channel: str,
    logon: str,
    number: str,
    direction: str,
    at: datetime,
    decision: Decision | None = None,
) -> None:
    """Remember a call leg in progress, with the decision taken on it if any."""
    row = session.get(CallRow, (node, channel))
    if row is None:
        row = CallRow(
            node=node, channel=channel, logon=logon, number=number, direction=direction, started_at=at
        )
        session.add(row)
    if decision is not None:
        row.allowed, row.reason = decision.allowed, decision.reason.value
    session.flush()


def call_decision(session: Session, node: str, channel: str) -> Decision | None:
    """The decision taken earlier on a call leg, or None when it was not decided yet."""
    row = session.get(CallRow, (node, channel))
    if row is None or row.allowed is None or not row.reason:
        return None
    return Decision(row.allowed, Reason(row.reason))


def end_call(session: Session, node: str, channel: str) -> CallRow | None:
    """Forget a call leg; return it if it was known."""
    row = session.get(CallRow, (node, channel))
    if row is not None:
        session.delete(row)
    return row


def replace_calls(session: Session, node: str, channels: Sequence[str]) -> int:
    """Keep only the given channels of ``node`` (after a resync); return how many were dropped."""
    query = delete(CallRow).where(CallRow.node == node)
    if channels:
        query = query.where(CallRow.channel.not_in(list(channels)))
    return _rowcount(session.execute(query.execution_options(synchronize_session=False)))


# --- retention --------------------------------------------------------------------------------


def prune_audit(session: Session, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` of the oldest audit lines older than ``before``; return how many.

    Bounded, so that one call never holds the write lock for long; call again while it returns
    ``limit``. The same statement works on SQLite and PostgreSQL.
    """
    oldest = select(AuditRow.id).where(AuditRow.at < before).order_by(AuditRow.id).limit(limit)
    query = delete(AuditRow).where(AuditRow.id.in_(oldest.scalar_subquery()))
    return _rowcount(session.execute(query.execution_options(synchronize_session=False)))


def prune_usage(session: Session, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` of the oldest licence-use rows older than ``before``; return how many.

    The newest row is always kept, however old: the chart starts from it.
    """
    newest = session.scalar(select(func.max(UsageRow.id)))
    if newest is None:
        return 0
    oldest = (
        select(UsageRow.id)
        .where(UsageRow.at < before, UsageRow.id < newest)
        .order_by(UsageRow.id)
        .limit(limit)
    )
    query = delete(UsageRow).where(UsageRow.id.in_(oldest.scalar_subquery()))
    return _rowcount(session.execute(query.execution_options(synchronize_session=False)))


# --- the call-decision path -------------------------------------------------------------------
#
# A call waits for these statements, so they are few, written once as SQL that both databases
# run unchanged, and executed on the session's connection without the ORM: one statement gathers
# every fact the rules need, and the leg's decision is one more. Taking a licence (rare: once per
# log-on until it is freed) goes through :func:`acquire`, which knows the reservations. Every
# value is bound with its column's type, so it is bounded exactly as the ORM would store it.

_CALLS = CallRow.__table__.c
_FACTS = text(
    "SELECT s.logon IS NOT NULL, s.last_logon_failed, s.reserved,"
    " EXISTS (SELECT 1 FROM registrations r WHERE r.logon = :logon),"
    " (SELECT l.slot FROM licences l WHERE l.logon = :logon),"
    " (SELECT c.allowed FROM calls c WHERE c.node = :node AND c.channel = :channel),"
    " (SELECT c.reason FROM calls c WHERE c.node = :node AND c.channel = :channel)"
    " FROM (SELECT 1 AS one) AS anchor LEFT JOIN subscribers s ON s.logon = :logon"
).bindparams(
    bindparam("logon", type_=SubscriberRow.__table__.c.logon.type),
    bindparam("node", type_=_CALLS.node.type),
    bindparam("channel", type_=_CALLS.channel.type),
)
_CALL = text(
    "INSERT INTO calls (node, channel, logon, number, direction, started_at, allowed, reason)"
    " VALUES (:node, :channel, :logon, :number, :direction, :at, :allowed, :reason)"
    " ON CONFLICT (node, channel) DO UPDATE SET allowed = excluded.allowed, reason = excluded.reason"
).bindparams(
    *(bindparam(c.name, type_=c.type) for c in _CALLS if c.name != "started_at"),
    bindparam("at", type_=UTCDateTime()),
)
# The log-on's own lock, and the pool lock shared (see share_pool) in the same round trip: a
# decision may take a licence.
_LOCK = text(
    f"SELECT pg_advisory_xact_lock(hashtext(:logon)), pg_advisory_xact_lock_shared({_POOL_LOCK_KEY})"
)
# What a decision runs after its locks looks rows up by key (its facts, the leg, a licence row), so
# one plan fits every value: the decision's transaction uses the plan PostgreSQL keeps for a
# prepared statement (plan_cache_mode auto until its COMMIT) instead of planning each execution,
# the connections' default for the batches (see database.py). Planning was most of the server's
# work for these statements (the claim's paragraph above).
_LOCK_FOR_FACTS = text(
    f"SELECT pg_advisory_xact_lock(hashtext(:logon)), pg_advisory_xact_lock_shared({_POOL_LOCK_KEY}),"
    f" {_CACHED_PLANS}"
)


_psycopg_style = write_behind.psycopg_style
_bound = write_behind.bound
_on_driver = write_behind.on_driver
_LOCK_FOR_FACTS_PG = _psycopg_style(_LOCK_FOR_FACTS)
_FACTS_PG = _psycopg_style(_FACTS)
# sqlite3 takes SQLAlchemy's ``:name`` parameters itself: the same texts, run on the driver.
_FACTS_SQLITE = str(_FACTS)


def _one_round_trip(connection: Connection, statements: Sequence[tuple[Any, ...]]) -> Any:
    """PostgreSQL: the deferred writes, then ``statements``, in one pipelined round trip (with the
    BEGIN the driver opens the transaction with); the first row of the last one, or None.

    One round trip instead of one per statement; each is two context switches on a host the
    server shares.
    """
    return write_behind.pipeline(connection, write_behind.with_deferred(connection, statements))


def _locked_facts(connection: Connection, logon: str, node: str, channel: str) -> Any:
    """PostgreSQL: the log-on's lock and then its facts, in one round trip with the BEGIN."""
    values = _bound(connection, _FACTS, {"logon": logon, "node": node, "channel": channel})
    locks = (_LOCK_FOR_FACTS_PG, {"logon": values["logon"]})
    return _one_round_trip(connection, [locks, (_FACTS_PG, values)])


@dataclass(frozen=True)
class DecisionFacts:
    """What a call decision reads first, in one statement: the log-on's state and the leg's past."""

    state: LogonState
    earlier: Decision | None
    # Whether the log-on has a reservation (only the pool lock, held shared, changes that).
    reserved: bool = False


# Several log-ons locked in one round trip (a group of decisions), always in the order of their
# lock keys: two groups on two nodes never wait for each other in a circle, and no group takes a
# log-on's lock after it touched the pool's row (a single decision that holds a log-on's lock may
# be waiting for that row).
# The pool lock is taken shared after every log-on's lock, as _LOCK does: waiting for a log-on's
# lock while holding it could close a circle with a change of the pool's shape queued for it.
# The group's transaction uses cached plans, as a single decision's does (_LOCK_FOR_FACTS).
_LOCK_MANY = text(
    f"SELECT pg_advisory_xact_lock_shared(CAST(:pool AS bigint)), {_CACHED_PLANS} FROM"  # noqa: S608 - constant text
    " (SELECT count(pg_advisory_xact_lock(k)) AS n FROM (SELECT DISTINCT hashtext(l) AS k"
    " FROM unnest(CAST(:logons AS text[])) AS l ORDER BY k) AS keys) AS locked"
)


_LOCK_MANY_PG = _psycopg_style(_LOCK_MANY)


def group_facts(session: Session, node: str, asked: Sequence[tuple[str, str]]) -> list[DecisionFacts | None]:
    """Lock the log-ons of a group of decisions and read each one's facts: one round trip on
    PostgreSQL (the deferred writes, every log-on's lock and the pool lock shared, every read).

    ``asked``: (log-on, channel) per decision, in the group's order. The answer for a decision
    whose log-on or channel (as stored) came earlier in the group is None: the earlier decision's
    writes may change it, so the caller reads it with :func:`decision_facts` (``locked=True``)
    when its turn comes. Every other read holds while the group writes only its own log-ons'
    legs; a decision that takes a licence may take it over from another log-on (a reservation),
    so after one the caller reads the rest again too.
    """
    connection = session.connection()
    values = [
        _bound(connection, _FACTS, {"logon": logon, "node": node, "channel": channel})
        for logon, channel in asked
    ]
    seen: set[tuple[str, str]] = set()
    first: list[bool] = []
    for bound in values:
        keys = (
            {("logon", bound["logon"]), ("channel", bound["channel"])}
            if bound["channel"]
            else {("logon", bound["logon"])}
        )
        first.append(not keys & seen)
        seen |= keys
    if connection.dialect.name == "postgresql":
        # Locked by their stored names, as a single decision's lock (_locked_facts) is.
        logons = sorted({bound["logon"] for bound in values})
        reads = [(_FACTS_PG, bound) for bound, fresh in zip(values, first, strict=True) if fresh]
        locks = (_LOCK_MANY_PG, {"logons": logons, "pool": _POOL_LOCK_KEY})
        rows = iter(
            write_behind.first_rows(connection, [*write_behind.with_deferred(connection, [locks]), *reads])[
                -len(reads) :
            ]
        )
        session.info.setdefault(_POOL_HELD, "shared")
        return [_facts_of(next(rows)) if fresh else None for fresh in first]
    return [
        _facts_of(_on_driver(connection, _FACTS_SQLITE, bound, fetch=True)) if fresh else None
        for bound, fresh in zip(values, first, strict=True)
    ]


def decision_facts(
    session: Session, node: str, logon: str, channel: str, *, locked: bool = False
) -> DecisionFacts:
    """Read what deciding a call of ``logon`` on ``channel`` needs (``channel`` may be empty).

    On PostgreSQL the log-on is locked first (as :func:`lock_logon` does), so two decisions about
    it queue; the facts are read in a later statement, after the lock is held. ``locked``: the
    transaction holds it already (:func:`group_facts`).
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql" and not locked:
        row = _locked_facts(connection, logon, node, channel)
        session.info.setdefault(_POOL_HELD, "shared")
    elif connection.dialect.name == "postgresql":
        # A group's later decision: the earlier ones' deferred writes travel with this read.
        values = _bound(connection, _FACTS, {"logon": logon, "node": node, "channel": channel})
        row = _one_round_trip(connection, [(_FACTS_PG, values)])
    else:
        values = _bound(connection, _FACTS, {"logon": logon, "node": node, "channel": channel})
        row = _on_driver(connection, _FACTS_SQLITE, values, fetch=True)
    return _facts_of(row)


def _facts_of(row: Any) -> DecisionFacts:
    """The :data:`_FACTS` statement's row as the rules read it."""
    managed, failed, reserved, registered, held, allowed, reason = row
    state = LogonState(
        managed=bool(managed),
        logged_on=bool(registered) and bool(managed),
        last_logon_failed=bool(failed),
        holds_licence=held is not None,
    )
    earlier = Decision(bool(allowed), Reason(reason)) if allowed is not None and reason else None
    return DecisionFacts(state, earlier, bool(reserved))


def record_call_decision(
    session: Session,
    node: str,
    channel: str,
    logon: str,
    number: str,
    direction: str,
    at: datetime,
    decision: Decision,
) -> None:
    """Store the decision on a call leg under its channel (the leg row is made if it is new).

    On PostgreSQL the write travels with the transaction's next round trip, usually its COMMIT;
    on SQLite it runs at once on the driver connection.
    """
    connection = session.connection()
    values = {
        "node": node,
        "channel": channel,
        "logon": logon,
        "number": number,
        "direction": direction,
        "at": at,
        "allowed": decision.allowed,
        "reason": decision.reason.value,
    }
    write_behind.defer(connection, _CALL, values)


# --- nodes ------------------------------------------------------------------------------------


def heartbeat(session: Session, node: str, at: datetime) -> int:
    """Count one more heartbeat of ``node`` (creating its row); return the new count."""
    row = session.get(NodeRow, node)
    if row is None:
        row = NodeRow(name=node, beats=0, seen_at=at)
        session.add(row)
    # Wraps long before the column would overflow; peers only look for a change.
    row.beats = (row.beats + 1) % 2_000_000_000
    row.seen_at = at
    session.flush()
    return row.beats


def node_beats(session: Session) -> dict[str, int]:
    """Every node's heartbeat count, by name."""
    return {row.name: row.beats for row in session.execute(select(NodeRow.name, NodeRow.beats))}


def lock_node(session: Session, node: str) -> bool:
    """Hold ``node``'s row until the transaction ends (so two peers never expire it at once).

    Returns False when the row is gone. SQLite's ``BEGIN IMMEDIATE`` already serialises writers.
    """
    query = select(NodeRow.name).where(NodeRow.name == node)
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        query = query.with_for_update()
    return session.scalar(query) is not None


# release()'s round trip on PostgreSQL (see _one_round_trip).
_SHARE_PG = f"SELECT pg_advisory_xact_lock_shared({_POOL_LOCK_KEY})"
_FREE_PG_SQL = _psycopg_style(_FREE_PG)
_GIVE_WITH_USAGE_PG = _psycopg_style(_GIVE_WITH_USAGE)
