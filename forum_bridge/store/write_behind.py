"""Writes sent with the next round trip instead of alone (PostgreSQL).

A call decision ends with writes whose results nobody reads (the leg's record, an audit line).
Sent one by one, each is a network round trip and two context switches on a host the server
shares. Instead :func:`defer` queues them on the connection, and they travel, in the order they
were made, with whatever the transaction sends next: the COMMIT (one pipeline, see
:func:`commit`), a pipelined round trip of the decision path (:func:`with_deferred`), or, as a
guard, just before any other statement or savepoint (:func:`send`), so no statement ever runs
before a write made earlier in its transaction. A rollback drops the queue.

A statement whose answer is needed only after the commit (a licence claim: it holds the pool's
row until the commit, so its round trip should be the COMMIT's) is queued with :func:`defer_read`:
it travels after the writes queued so far, and its first row is kept in a :class:`Result` read
once the commit (or an earlier round trip) sent it.

The statements are the same texts SQLAlchemy would run, bound with the same column types; an
error in one of them surfaces at the commit (or the next statement) as a DBAPIError, which the
database layer maps to StoreError like any other, and nothing of the transaction is committed.
SQLite has no round trips to save: there :func:`defer` executes at once, on the driver.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import TextClause
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from forum_bridge.store import libpq_pipeline

# Connection.info key: [(SQL in psycopg's style, bound values)] not sent yet.
QUEUE = "forum_bridge.deferred_writes"
# Connection.info key: [(SQL, bound values, Result)] sent after QUEUE, their rows read afterwards.
HELD = "forum_bridge.deferred_reads"
# The COMMIT that ends a pipeline of deferred writes (psycopg then has nothing left to commit).
_COMMIT = "COMMIT"

_STYLES: dict[int, tuple[TextClause, str]] = {}


def psycopg_style(statement: TextClause) -> str:
    """``statement``'s SQL in psycopg's parameter style (``%(name)s``), as the pipelines take it."""
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
        # The dialect's own form of each type, as SQLAlchemy's execution binds it (on SQLite a
        # DateTime becomes SQLAlchemy's text form, not sqlite3's).
        processors = {
            name: parameter.type.dialect_impl(dialect).bind_processor(dialect)
            for name, parameter in statement._bindparams.items()
        }
        known = _PROCESSORS[key] = (statement, processors)
    processors = known[1]
    result: dict[str, Any] = {}
    for name, value in values.items():
        process = processors.get(name)
        result[name] = process(value) if process is not None else value
    return result


_DRIVER_TEXTS: dict[int, tuple[TextClause, str]] = {}


def on_driver(connection: Connection, sql: str, values: dict[str, Any], *, fetch: bool) -> Any:
    """SQLite: run one statement on the session's driver connection, inside its transaction (the
    ``BEGIN IMMEDIATE`` was sent when the session took the connection); its first row when ``fetch``.

    SQLAlchemy's execution layer (compiled-statement cache, execution context, result wrapper)
    costs more than SQLite's own work for the one-row statements a call waits for. ``values`` come
    bound by the statement's column types (:func:`bound`), so they are fitted exactly as SQLAlchemy
    stores them; sqlite3 takes SQLAlchemy's ``:name`` parameters itself; a driver error is mapped
    like any statement's. A row of an ``UPDATE ... RETURNING`` is complete after the first step
    (SQLite makes every change then), so reading only the first row loses nothing.
    """
    dialect = connection.dialect
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, values)
        return cursor.fetchone() if fetch else None
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(None, None, exc, dialect.loaded_dbapi.Error) from exc
    finally:
        cursor.close()


def run_on_driver(
    connection: Connection, statement: TextClause, values: dict[str, Any], *, fetch: bool
) -> Any:
    """SQLite: :func:`on_driver` for ``statement`` with ``values`` bound by its types."""
    known = _DRIVER_TEXTS.get(id(statement))
    if known is None or known[0] is not statement:
        known = _DRIVER_TEXTS[id(statement)] = (statement, str(statement))
    return on_driver(connection, known[1], bound(connection, statement, values), fetch=fetch)


def defer(connection: Connection, statement: TextClause, values: dict[str, Any]) -> None:
    """Run ``statement`` (a write whose result is not needed) now on SQLite (on the driver), with
    the next round trip on PostgreSQL."""
    if connection.dialect.name != "postgresql":
        run_on_driver(connection, statement, values, fetch=False)
        return
    queue: list[tuple[str, dict[str, Any]]] = connection.info.setdefault(QUEUE, [])
    queue.append((psycopg_style(statement), bound(connection, statement, values)))


class Result:
    """The first row a statement queued by :func:`defer_read` returned, once it was sent."""

    __slots__ = ("row", "sent")

    def __init__(self) -> None:
        self.row: Any = None
        self.sent = False


# A queued statement: SQL in psycopg's style, its bound values, and where its row goes (or None).
Queued = tuple[str, dict[str, Any], "Result | None"]


def defer_read(connection: Connection, statement: TextClause, values: dict[str, Any]) -> Result:
    """PostgreSQL: queue ``statement`` to travel after the deferred writes, with the next round
    trip (usually the COMMIT); its first row is in the returned :class:`Result` once sent.

    Only for PostgreSQL: the caller reads the row after the commit, which SQLite's path never
    needs (it has no round trips to save).
    """
    result = Result()
    held: list[Queued] = connection.info.setdefault(HELD, [])
    held.append((psycopg_style(statement), bound(connection, statement, values), result))
    return result


def pending(connection: Connection) -> int:
    """How many deferred statements wait on ``connection`` (for tests and diagnostics)."""
    return len(connection.info.get(QUEUE, ())) + len(connection.info.get(HELD, ()))


def drop(connection: Connection) -> None:
    """Forget the deferred statements (the transaction is being rolled back); their results stay
    unsent."""
    connection.info.pop(QUEUE, None)
    connection.info.pop(HELD, None)


def _take(connection: Connection) -> list[Queued]:
    """Every deferred statement, taken off the queues: the writes in the order they were made,
    then the statements whose rows are read afterwards, in theirs."""
    queue = connection.info.pop(QUEUE, None) or []
    held = connection.info.pop(HELD, None) or []
    return [*((sql, values, None) for sql, values in queue), *held]


def with_deferred(
    connection: Connection, statements: Sequence[tuple[str, dict[str, Any]]]
) -> list[tuple[Any, ...]]:
    """The deferred statements (now taken off the queues) followed by ``statements``, to send
    together through :func:`pipeline`."""
    return [*_take(connection), *statements]


def first_rows(connection: Connection, statements: Sequence[tuple[Any, ...]]) -> list[Any]:
    """PostgreSQL: run ``statements`` ((SQL in psycopg's style, values[, Result]), ...) in order,
    sent together in one round trip (after the BEGIN, when the transaction has not begun); each
    one's first row, None for none.

    The server still runs them one after the other, each with its own snapshot, so a statement
    after a lock sees what was committed before the lock was granted. A :class:`Result` gets its
    statement's first row once the whole pipeline succeeded.
    """
    dialect = connection.dialect
    try:
        rows = libpq_pipeline.first_rows(connection.connection.dbapi_connection, statements)
    except dialect.loaded_dbapi.Error as exc:
        # Mapped like any statement's error, so the transaction's caller sees a StoreError.
        raise DBAPIError.instance(None, None, exc, dialect.loaded_dbapi.Error) from exc
    for statement, row in zip(statements, rows, strict=True):
        if len(statement) > 2 and statement[2] is not None:
            statement[2].row = row
            statement[2].sent = True
    return rows


def pipeline(connection: Connection, statements: Sequence[tuple[Any, ...]]) -> Any:
    """PostgreSQL: :func:`first_rows`, answering the first row of the last statement only."""
    rows = first_rows(connection, statements)
    return rows[-1] if rows else None


def send(connection: Connection) -> None:
    """Send the deferred statements now, in one round trip (before another statement or a
    savepoint)."""
    queue = _take(connection)
    if queue:
        pipeline(connection, queue)


def commit(connection: Connection) -> None:
    """Send the deferred statements and the COMMIT in one round trip; the driver's own commit then
    has nothing left to do. Without deferred statements the driver commits as usual.

    A statement that fails aborts the transaction: the server skips the rest of the pipeline, the
    COMMIT included, and the error surfaces here with nothing committed.
    """
    queue = _take(connection)
    if queue:
        pipeline(connection, [*queue, (_COMMIT, {})])
