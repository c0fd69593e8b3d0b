"""Writes sent with the next round trip instead of alone (PostgreSQL).

A call decision ends with writes whose results nobody reads (the leg's record, an audit line).
Sent one by one, each is a network round trip and two context switches on a host the server
shares. Instead :func:`defer` queues them on the connection, and they travel, in the order they
were made, with whatever the transaction sends next: the COMMIT (one pipeline, see
:func:`commit`), a pipelined round trip of the decision path (:func:`with_deferred`), or, as a
guard, just before any other statement or savepoint (:func:`send`), so no statement ever runs
before a write made earlier in its transaction. A rollback drops the queue.

The statements are the same texts SQLAlchemy would run, bound with the same column types; an
error in one of them surfaces at the commit (or the next statement) as a DBAPIError, which the
database layer maps to StoreError like any other, and nothing of the transaction is committed.
SQLite has no round trips to save: there :func:`defer` executes at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import TextClause
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

# Connection.info key: [(SQL in psycopg's style, bound values)] not sent yet.
QUEUE = "forum_bridge.deferred_writes"
# The COMMIT that ends a pipeline of deferred writes (psycopg then has nothing left to commit).
_COMMIT = "COMMIT"

_STYLES: dict[int, tuple[TextClause, str]] = {}


def psycopg_style(statement: TextClause) -> str:
    """``statement``'s SQL with psycopg's own parameter style, for its pipeline mode."""
    known = _STYLES.get(id(statement))
    if known is not None and known[0] is statement:
        return known[1]
    sql = re.sub(r"(?<!:):(\w+)", r"%(\1)s", str(statement))
    _STYLES[id(statement)] = (statement, sql)
    return sql


# (statement, dialect) -> the statement, each parameter's bind processor (or None); made once,
# since building a type's processor costs more than running it.
_PROCESSORS: dict[tuple[int, str], tuple[TextClause, dict[str, Any]]] = {}


def bound(connection: Connection, statement: TextClause, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as ``statement``'s bound types store them (e.g. fitted to the column's length)."""
    dialect = connection.dialect
    key = (id(statement), dialect.name)
    known = _PROCESSORS.get(key)
    if known is None or known[0] is not statement:
        processors = {
            name: parameter.type.bind_processor(dialect) for name, parameter in statement._bindparams.items()
        }
        known = _PROCESSORS[key] = (statement, processors)
    processors = known[1]
    result: dict[str, Any] = {}
    for name, value in values.items():
        process = processors.get(name)
        result[name] = process(value) if process is not None else value
    return result


def defer(connection: Connection, statement: TextClause, values: dict[str, Any]) -> None:
    """Run ``statement`` (a write whose result is not needed) now on SQLite, with the next round
    trip on PostgreSQL."""
    if connection.dialect.name != "postgresql":
        connection.execute(statement, values)
        return
    queue: list[tuple[str, dict[str, Any]]] = connection.info.setdefault(QUEUE, [])
    queue.append((psycopg_style(statement), bound(connection, statement, values)))


def pending(connection: Connection) -> int:
    """How many deferred writes wait on ``connection`` (for tests and diagnostics)."""
    return len(connection.info.get(QUEUE, ()))


def drop(connection: Connection) -> None:
    """Forget the deferred writes (the transaction is being rolled back)."""
    connection.info.pop(QUEUE, None)


def with_deferred(
    connection: Connection, statements: Sequence[tuple[str, dict[str, Any]]]
) -> list[tuple[str, dict[str, Any]]]:
    """The deferred writes (now taken off the queue) followed by ``statements``, to send together."""
    queue = connection.info.pop(QUEUE, None)
    return [*queue, *statements] if queue else list(statements)


def pipeline(connection: Connection, statements: Sequence[tuple[str, dict[str, Any]]]) -> Any:
    """PostgreSQL: run ``statements`` in order, sent together in psycopg's pipeline mode (with the
    BEGIN the driver opens a transaction with); the first row of the last one, or None.

    The server still runs them one after the other, each with its own snapshot, so a statement
    after a lock sees what was committed before the lock was granted.
    """
    dialect = connection.dialect
    raw: Any = connection.connection.dbapi_connection
    try:
        cursors = [raw.cursor() for _statement in statements]
        try:
            with raw.pipeline():
                for cursor, (sql, values) in zip(cursors, statements, strict=True):
                    cursor.execute(sql, values)
            last = cursors[-1]
            return last.fetchone() if last.description is not None else None
        finally:
            for cursor in cursors:
                cursor.close()
    except dialect.loaded_dbapi.Error as exc:
        # Mapped like any statement's error, so the transaction's caller sees a StoreError.
        raise DBAPIError.instance(None, None, exc, dialect.loaded_dbapi.Error) from exc


def send(connection: Connection) -> None:
    """Send the deferred writes now, in one round trip (before another statement or a savepoint)."""
    queue = connection.info.pop(QUEUE, None)
    if queue:
        pipeline(connection, queue)


def commit(connection: Connection) -> None:
    """Send the deferred writes and the COMMIT in one round trip; the driver's own commit then has
    nothing left to do. Without deferred writes the driver commits as usual."""
    queue = connection.info.pop(QUEUE, None)
    if queue:
        pipeline(connection, [*queue, (_COMMIT, {})])
