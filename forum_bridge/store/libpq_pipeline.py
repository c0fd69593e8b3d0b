"""Statements sent in one round trip through libpq's pipeline mode, below psycopg (PostgreSQL).

A call decision sends two or three small pipelines per transaction. Sent through psycopg's own
pipeline (a cursor per statement, its generators, its prepared-statement bookkeeping), the client's
Python work for one such round trip cost more than the server's work for it: with four bridges
sharing one pool on two cores, that work was the limit. This module sends the same statements
through the same connection's libpq handle (``connection.pgconn``), with psycopg's own adapters
(:class:`psycopg.adapt.Transformer`) converting values both ways, so what reaches the server and
what comes back are what psycopg would send and return:

- each statement text is prepared once per connection, in the pipeline that first runs it, under
  a name of this module's own (``fb_<n>``, never psycopg's ``_pg3_<n>``); a preparation counts
  only once the server said it succeeded; at most :data:`PREPARED_LIMIT` per connection, the
  rest run unnamed;
- what a connection remembers (its prepared statements, a Transformer per statement text, as a
  psycopg cursor keeps one per query) is kept on the connection object and goes with it;
- statements without parameters (BEGIN, COMMIT) run unnamed;
- the transaction's BEGIN is sent first when none is open, as psycopg sends it before a statement;
- waiting for the server happens in :meth:`select.poll.poll`, which releases the GIL, so other
  threads (the hook's event loop) run meanwhile.

An error in one statement aborts the rest of the pipeline (the server skips them up to the sync
point); it is raised as psycopg's own exception for that result, which the callers map like any
other database error. A pipeline that fails with results still unread (the connection broke)
closes the connection, so the pool replaces it.
"""

from __future__ import annotations

import itertools
import re
import select
from collections.abc import Sequence
from typing import Any

from psycopg import abc, errors, pq
from psycopg.adapt import PyFormat, Transformer

__all__ = ["first_rows"]

_PARAMETER = re.compile(rb"%\((\w+)\)s|%%")
_IDLE = pq.TransactionStatus.IDLE
_FATAL = pq.ExecStatus.FATAL_ERROR
_ABORTED = pq.ExecStatus.PIPELINE_ABORTED
_SYNC = pq.ExecStatus.PIPELINE_SYNC
_BEGIN = b"BEGIN"
_UNKNOWN_STATEMENT = "26000"  # invalid_sql_statement_name
# At most this many statements are prepared on one connection (the decision path's texts are
# fixed and far fewer; the bound holds should that ever change).
PREPARED_LIMIT = 256

# SQL in psycopg's %(name)s style -> (SQL with $n placeholders, parameter names in $n order).
_CONVERTED: dict[str, tuple[bytes, tuple[str, ...]]] = {}


def _converted(sql: str) -> tuple[bytes, tuple[str, ...]]:
    known = _CONVERTED.get(sql)
    if known is not None:
        return known
    names: list[str] = []

    def placeholder(match: re.Match[bytes]) -> bytes:
        if match.group(1) is None:
            return b"%"
        name = match.group(1).decode()
        if name not in names:  # a name used twice is one parameter, as psycopg makes it
            names.append(name)
        return b"$%d" % (names.index(name) + 1)

    known = (_PARAMETER.sub(placeholder, sql.encode()), tuple(names))
    if len(_CONVERTED) < PREPARED_LIMIT:
        _CONVERTED[sql] = known
    return known


class _State:
    """What one connection remembers: its adapters per statement and the statements prepared."""

    __slots__ = ("connection", "names", "prepared", "transformers")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        # SQL -> the Transformer that converts its values and rows. One per statement text, as a
        # psycopg cursor keeps one per query: a Transformer may keep what it learnt of a query.
        self.transformers: dict[bytes, abc.Transformer] = {}
        # (SQL, parameter types) -> the name it was prepared under on this connection.
        self.prepared: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self.names = itertools.count()

    def transformer(self, query: bytes) -> abc.Transformer:
        known = self.transformers.get(query)
        if known is None:
            known = Transformer(self.connection)
            if len(self.transformers) < PREPARED_LIMIT:
                self.transformers[query] = known
        return known


# Kept on the connection object itself: a Transformer holds its connection, so a table of states
# keyed weakly by connection would keep every connection it ever saw alive.
_ATTRIBUTE = "_forum_bridge_pipeline"


def _state(connection: Any) -> _State:
    state: _State | None = getattr(connection, _ATTRIBUTE, None)
    if state is None:
        state = _State(connection)
        setattr(connection, _ATTRIBUTE, state)
    return state


def first_rows(connection: Any, statements: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Run ``statements`` ((SQL in psycopg's style, values), ...) in order in one round trip on
    the psycopg ``connection``; each one's first row as a tuple (None for no row).

    Opens the transaction first when none is open (the connection is never in autocommit here).
    Raises psycopg's exception for the first statement that failed; the server then skipped the
    ones after it.
    """
    pgconn = connection.pgconn
    state = _state(connection)
    # Every value is converted before anything is sent: a value psycopg refuses (a NUL in a text)
    # then leaves the connection as it was.
    queries: list[tuple[bytes, Any, Any, Any, tuple[Any, ...]]] = []
    for statement in statements:
        query, names = _converted(statement[0])
        if not names:
            queries.append((query, None, None, None, ()))
            continue
        values = statement[1]
        transformer = state.transformer(query)
        dumped = transformer.dump_sequence([values[name] for name in names], [PyFormat.AUTO] * len(names))
        queries.append((query, dumped, tuple(transformer.types or ()), transformer.formats, names))
    # One entry per query sent: ("prepare", key, name) or ("run", index of the statement) or None.
    sent: list[tuple[Any, ...] | None] = []
    # Prepared earlier in this pipeline (a statement sent several times is prepared once).
    preparing: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
    pgconn.enter_pipeline_mode()
    try:
        if pgconn.transaction_status == _IDLE:
            pgconn.send_query_params(_BEGIN, None)
            sent.append(None)
        for index, (query, dumped, types, formats, names) in enumerate(queries):
            key = (query, types)
            name = state.prepared.get(key) or preparing.get(key)
            # Only fixed statement texts come here; should that ever change, the connection's
            # prepared statements stay bounded and the rest run unnamed.
            if name is None and names and len(state.prepared) + len(preparing) < PREPARED_LIMIT:
                name = preparing[key] = b"fb_%d" % next(state.names)
                pgconn.send_prepare(name, query, param_types=types)
                sent.append(("prepare", key, name))
            if name is None:  # no parameters (BEGIN, COMMIT), or past the bound
                pgconn.send_query_params(query, dumped, param_types=types, param_formats=formats)
            else:
                pgconn.send_query_prepared(name, dumped, param_formats=formats)
            sent.append(("run", index))
        pgconn.pipeline_sync()
        results = _communicate(pgconn, len(sent))
    finally:
        if pgconn.pipeline_status:
            try:
                pgconn.exit_pipeline_mode()
            except errors.OperationalError:
                # Results were left unread: the connection broke, or waiting failed midway (that
                # error is the one raised). Left like this it could serve no other statement;
                # closed, the pool replaces it.
                connection.close()
    rows: list[Any] = [None] * len(statements)
    failure: errors.Error | None = None
    for entry, result in zip(sent, results, strict=True):
        if result is None:
            continue
        if result.status == _FATAL:
            failure = failure or errors.error_from_result(result, encoding=connection.info.encoding)
            if failure.sqlstate == _UNKNOWN_STATEMENT:
                # Something dropped this connection's prepared statements (DEALLOCATE ALL, DISCARD
                # ALL): this transaction fails, the next one prepares them again.
                state.prepared.clear()
            continue
        if entry is None:
            continue
        if entry[0] == "prepare":
            state.prepared[entry[1]] = entry[2]
        elif result.ntuples:
            transformer = state.transformer(queries[entry[1]][0])
            transformer.set_pgresult(result)
            rows[entry[1]] = transformer.load_row(0, tuple)
    if failure is not None:
        raise failure
    return rows


def _communicate(pgconn: Any, expected: int) -> list[Any]:
    """Send what is queued on ``pgconn`` and read ``expected`` queries' results and the sync; each
    query's last result (None for one the server skipped after an error)."""
    fd = pgconn.socket
    while pgconn.flush():
        if _wait(fd, select.POLLIN | select.POLLOUT) & select.POLLIN:
            pgconn.consume_input()
    results: list[Any] = []
    last: Any = None
    while True:
        while pgconn.is_busy():
            _wait(fd, select.POLLIN)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:  # the end of one query's results
            results.append(None if last is None or last.status == _ABORTED else last)
            last = None
            continue
        if result.status == _SYNC:
            break
        last = result
    if len(results) != expected:
        raise errors.InternalError(f"expected {expected} results in the pipeline, got {len(results)}")
    return results


def _wait(fd: int, events: int) -> int:
    """Block (without the GIL) until ``fd`` is ready for ``events``; the events that happened.

    poll, not select: a busy bridge holds more than 1,024 descriptors (hook clients, status page
    pollers), and select cannot watch one numbered above that.
    """
    poller = select.poll()
    poller.register(fd, events)
    happened = 0
    for _fd, mask in poller.poll():
        happened |= mask
    return happened
