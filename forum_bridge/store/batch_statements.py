"""The statements a batch of registration events reads and writes, in the driver's own SQL.

A registration storm is applied in transactions of a few hundred events (see
:mod:`forum_bridge.batching`). Through SQLAlchemy's compiler each of them cost a statement as long
as its batch (an ``IN`` list of every log-on, a multi-row ``VALUES`` or one execution per row) and a
type conversion per value; on PostgreSQL each such statement was also parsed and planned afresh,
and a row-by-row insert paid the server a round of work per row. Here every statement has one
fixed text whatever the batch holds, and the batch travels as one JSON document (the driver's
array adaptation converts value by value in Python, which cost more than the statement itself).
PostgreSQL unpacks it with ``json_array_elements``, and looks log-ons up with
``= ANY(ARRAY(...))`` rather than ``IN (...)``, which the planner answers from the index even
before the tables have statistics (a storm after a restart fills an empty table). SQLite reads
the log-ons with ``json_each`` and takes new rows through the driver's ``executemany``. Values are
fitted to their columns here (:func:`~forum_bridge.store.models.fit`), as the ORM's column types
do on every other path, so both databases store the same text (and no NUL, which PostgreSQL's JSON
refuses).

The statements run on the session's connection through ``exec_driver_sql``: inside its
transaction, with a driver error surfacing as SQLAlchemy's, which the store maps to
:class:`~forum_bridge.errors.StoreError` as for every other statement.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy.orm import Session

from forum_bridge.errors import StoreError
from forum_bridge.store.models import fit

__all__ = [
    "ContactRow",
    "NewContact",
    "SubscriberFacts",
    "TouchedContact",
    "insert_contacts",
    "read_contacts",
    "read_state",
    "read_subscribers",
    "touch_contacts",
]

# Column lengths of ``registrations`` (store.models.RegistrationRow, migration 0001).
_NODE, _SOURCE, _USER_AGENT = 128, 128, 256


class SubscriberFacts(NamedTuple):
    """What a batch needs of one provisioned log-on: its failed log-on block."""

    logon: str
    failed: bool
    failure_at: datetime | None


class ContactRow(NamedTuple):
    """One stored registration of a log-on (on any node)."""

    id: int
    node: str
    logon: str
    contact: str
    source: str
    user_agent: str


class NewContact(NamedTuple):
    """A registration to insert; ``logon`` and ``contact`` already as stored."""

    node: str
    logon: str
    contact: str
    source: str
    user_agent: str
    registered_at: datetime
    last_seen: datetime


class TouchedContact(NamedTuple):
    """A stored registration seen again: its new last-seen time, source and user agent."""

    id: int
    last_seen: datetime
    source: str
    user_agent: str


def _aware(value: datetime) -> datetime:
    """``value`` in UTC; a naive time is refused, as the ORM's column type refuses it."""
    if value.tzinfo is None:
        # A StoreError like any refused statement: the batch is then applied event by event.
        raise StoreError("naive datetime given to the store; pass aware UTC times")
    return value.astimezone(UTC)


def _sqlite_time(value: datetime) -> str:
    """``value`` (aware, UTC) as SQLAlchemy's SQLite DATETIME stores it: no zone, microseconds always."""
    return value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _read_time(value: Any) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite returns text, PostgreSQL aware datetimes)."""
    if value is None:
        return None
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def read_subscribers(session: Session, logons: Sequence[str]) -> list[SubscriberFacts]:
    """The provisioned log-ons among ``logons`` (as stored), with their block state."""
    if not logons:
        return []
    connection = session.connection()
    if _postgres(session):
        rows = connection.exec_driver_sql(
            "SELECT logon, last_logon_failed, last_failure_at FROM subscribers"
            " WHERE logon = ANY(ARRAY(SELECT json_array_elements_text(%s::json)))",
            (json.dumps(list(logons)),),
        )
    else:
        rows = connection.exec_driver_sql(
            "SELECT logon, last_logon_failed, last_failure_at FROM subscribers"
            " WHERE logon IN (SELECT value FROM json_each(?))",
            (json.dumps(list(logons)),),
        )
    return [SubscriberFacts(logon, bool(failed), _read_time(at)) for logon, failed, at in rows]


def read_contacts(session: Session, logons: Sequence[str]) -> list[ContactRow]:
    """Every registration of ``logons`` (as stored), on every node."""
    if not logons:
        return []
    connection = session.connection()
    columns = "id, node, logon, contact, source, user_agent"
    if _postgres(session):
        rows = connection.exec_driver_sql(
            f"SELECT {columns} FROM registrations"  # noqa: S608 - constant text
            " WHERE logon = ANY(ARRAY(SELECT json_array_elements_text(%s::json)))",
            (json.dumps(list(logons)),),
        )
    else:
        rows = connection.exec_driver_sql(
            f"SELECT {columns} FROM registrations"  # noqa: S608 - constant text
            " WHERE logon IN (SELECT value FROM json_each(?))",
            (json.dumps(list(logons)),),
        )
    return [ContactRow._make(row) for row in rows]


def read_state(session: Session, logons: Sequence[str]) -> tuple[list[SubscriberFacts], list[ContactRow]]:
    """:func:`read_subscribers` and :func:`read_contacts` together; one round trip on PostgreSQL."""
    if not logons or not _postgres(session):
        return read_subscribers(session, logons), read_contacts(session, logons)
    names = json.dumps(list(logons))
    rows = session.connection().exec_driver_sql(
        "SELECT 0, logon, last_logon_failed, last_failure_at, NULL::integer, NULL::text, NULL::text,"
        " NULL::text, NULL::text FROM subscribers"
        " WHERE logon = ANY(ARRAY(SELECT json_array_elements_text(%s::json)))"
        " UNION ALL SELECT 1, logon, NULL::boolean, NULL::timestamptz, id, node, contact, source,"
        " user_agent FROM registrations"
        " WHERE logon = ANY(ARRAY(SELECT json_array_elements_text(%s::json)))",
        (names, names),
    )
    facts: list[SubscriberFacts] = []
    contacts: list[ContactRow] = []
    for kind, logon, failed, failure_at, row_id, node, contact, source, user_agent in rows:
        if kind == 0:
            facts.append(SubscriberFacts(logon, bool(failed), _read_time(failure_at)))
        else:
            contacts.append(ContactRow(row_id, node, logon, contact, source, user_agent))
    return facts, contacts


def insert_contacts(session: Session, rows: Iterable[NewContact]) -> None:
    """Insert new registrations: one statement on PostgreSQL, one ``executemany`` on SQLite."""
    fitted = [
        (
            fit(r.node, _NODE),
            r.logon,
            r.contact,
            fit(r.source, _SOURCE),
            fit(r.user_agent, _USER_AGENT),
            _aware(r.registered_at),
            _aware(r.last_seen),
        )
        for r in rows
    ]
    if not fitted:
        return
    connection = session.connection()
    if _postgres(session):
        document = json.dumps([(*row[:5], row[5].isoformat(), row[6].isoformat()) for row in fitted])
        connection.exec_driver_sql(
            "INSERT INTO registrations (node, logon, contact, source, user_agent, registered_at, last_seen)"
            " SELECT x->>0, x->>1, x->>2, x->>3, x->>4, (x->>5)::timestamptz, (x->>6)::timestamptz"
            " FROM json_array_elements(%s::json) AS x",
            (document,),
        )
    else:
        connection.exec_driver_sql(
            "INSERT INTO registrations (node, logon, contact, source, user_agent, registered_at, last_seen)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(*row[:5], _sqlite_time(row[5]), _sqlite_time(row[6])) for row in fitted],
        )


def touch_contacts(session: Session, rows: Iterable[TouchedContact]) -> None:
    """Store new last-seen times, sources and user agents of registrations, by id."""
    fitted = [
        (r.id, _aware(r.last_seen), fit(r.source, _SOURCE), fit(r.user_agent, _USER_AGENT)) for r in rows
    ]
    if not fitted:
        return
    connection = session.connection()
    if _postgres(session):
        document = json.dumps(
            [(row_id, at.isoformat(), source, agent) for row_id, at, source, agent in fitted]
        )
        connection.exec_driver_sql(
            "UPDATE registrations AS r SET last_seen = (x->>1)::timestamptz, source = x->>2,"
            " user_agent = x->>3 FROM json_array_elements(%s::json) AS x WHERE r.id = (x->>0)::integer",
            (document,),
        )
    else:
        connection.exec_driver_sql(
            "UPDATE registrations SET last_seen = ?, source = ?, user_agent = ? WHERE id = ?",
            [(_sqlite_time(at), source, agent, row_id) for row_id, at, source, agent in fitted],
        )
