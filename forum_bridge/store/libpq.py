"""A read-only PostgreSQL connection through libpq alone, for ``forum-bridge status``.

Importing psycopg takes about 0.3 s (its type system, error classes, asyncio, package metadata),
more than everything else ``status --json`` does with 10,000 subscribers. The status command needs
only to send a few SELECTs in one read-only snapshot, so this module loads the client library
psycopg itself is built on (``libpq``, through :mod:`ctypes`) and asks the server to return each
result as one JSON document (``json_agg``), which :func:`json.loads` turns into rows in one call:
booleans, numbers, text and NULL arrive as Python values without a converter per column. A
statement whose one value is text already (the subscriber listing ``status --json`` prints, see
:meth:`Connection.text`) comes back as that text, unparsed.

When libpq cannot be found, :func:`connect` returns None and the caller uses psycopg.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from forum_bridge.errors import StoreError

__all__ = ["Connection", "Cursor", "PqError", "connect"]

_CONNECTION_OK = 0
_COMMAND_OK, _TUPLES_OK = 1, 2


class PqError(StoreError):
    """The server or libpq refused a connection or a statement (the message is libpq's)."""


def _candidates() -> Iterator[str]:
    yield from ("libpq.so.5", "libpq.5.dylib", "libpq.so")
    # psycopg's binary wheel carries its own copy beside the package (found without importing it).
    # Looked for only when the system has none: importing importlib.util and pathlib costs more
    # than loading the library.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("psycopg_binary")
    if spec is not None and spec.origin:
        libs = Path(spec.origin).parent.parent / "psycopg_binary.libs"
        yield from sorted(str(p) for p in libs.glob("libpq*.so*"))


def _load() -> ctypes.CDLL | None:
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        c_void_p, c_char_p, c_int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        lib.PQconnectdbParams.restype = c_void_p
        lib.PQconnectdbParams.argtypes = [ctypes.POINTER(c_char_p), ctypes.POINTER(c_char_p), c_int]
        lib.PQstatus.restype = c_int
        lib.PQstatus.argtypes = [c_void_p]
        lib.PQerrorMessage.restype = c_char_p
        lib.PQerrorMessage.argtypes = [c_void_p]
        lib.PQfinish.restype = None
        lib.PQfinish.argtypes = [c_void_p]
        lib.PQexecParams.restype = c_void_p
        lib.PQexecParams.argtypes = [
            c_void_p,
            c_char_p,
            c_int,
            c_void_p,
            ctypes.POINTER(c_char_p),
            c_void_p,
            c_void_p,
            c_int,
        ]
        lib.PQresultStatus.restype = c_int
        lib.PQresultStatus.argtypes = [c_void_p]
        lib.PQresultErrorMessage.restype = c_char_p
        lib.PQresultErrorMessage.argtypes = [c_void_p]
        lib.PQntuples.restype = c_int
        lib.PQntuples.argtypes = [c_void_p]
        lib.PQgetisnull.restype = c_int
        lib.PQgetisnull.argtypes = [c_void_p, c_int, c_int]
        lib.PQgetvalue.restype = c_void_p  # read with ctypes.string_at: a c_char_p stops at NUL
        lib.PQgetvalue.argtypes = [c_void_p, c_int, c_int]
        lib.PQgetlength.restype = c_int
        lib.PQgetlength.argtypes = [c_void_p, c_int, c_int]
        lib.PQclear.restype = None
        lib.PQclear.argtypes = [c_void_p]
        return lib
    return None


def _text(value: Any) -> bytes | None:
    """A parameter as PostgreSQL's text input reads it (the server infers its type)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, datetime):
        return value.isoformat().encode()
    return str(value).encode()


def _message(raw: bytes | None) -> str:
    text = (raw or b"").decode("utf-8", "replace").strip()
    return text or "unknown libpq error"


class Connection:
    """One libpq connection inside one read-only snapshot, with the DB-API calls the status reader uses."""

    def __init__(self, lib: ctypes.CDLL, handle: int) -> None:
        """Take over ``handle`` (a connected ``PGconn``); start the snapshot."""
        self._lib = lib
        self._handle: int | None = handle
        self._run(b"BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY", ())

    def cursor(self) -> Cursor:
        """A cursor (statements run at once, rows are kept until fetched)."""
        return Cursor(self)

    def text(self, sql: str, params: Sequence[Any] = ()) -> str | None:
        """Run the SELECT ``sql`` (``%s`` placeholders); its first value as the server wrote it, or None.

        For a result that is one text already (the status listing as JSON): no parsing here.
        """
        return self._run(_numbered(sql).encode("utf-8"), params)

    def rollback(self) -> None:
        """End the snapshot."""
        self._run(b"ROLLBACK", ())

    def close(self) -> None:
        """Close the connection (the server rolls the snapshot back)."""
        if self._handle is not None:
            self._lib.PQfinish(self._handle)
            self._handle = None

    def _run(self, sql: bytes, params: Sequence[Any]) -> str | None:
        """Execute ``sql`` (``$n`` placeholders); the first column of the first row, or None."""
        if self._handle is None:
            raise PqError("the connection is closed")
        values = (ctypes.c_char_p * max(len(params), 1))(*(_text(p) for p in params))
        result = self._lib.PQexecParams(self._handle, sql, len(params), None, values, None, None, 0)
        if not result:
            raise PqError(_message(self._lib.PQerrorMessage(self._handle)))
        try:
            status = self._lib.PQresultStatus(result)
            if status not in (_COMMAND_OK, _TUPLES_OK):
                raise PqError(_message(self._lib.PQresultErrorMessage(result)))
            if status != _TUPLES_OK or self._lib.PQntuples(result) < 1 or self._lib.PQgetisnull(result, 0, 0):
                return None
            size = self._lib.PQgetlength(result, 0, 0)
            return ctypes.string_at(self._lib.PQgetvalue(result, 0, 0), size).decode("utf-8")
        finally:
            self._lib.PQclear(result)


def _numbered(sql: str) -> str:
    # DB-API's %s placeholders as libpq's $1, $2...
    pieces = sql.split("%s")
    return pieces[0] + "".join(f"${i}{piece}" for i, piece in enumerate(pieces[1:], 1))


def _tuple(pairs: list[tuple[str, Any]]) -> tuple[Any, ...]:
    # A row's values in column order (names may repeat or be "?column?": they are not keys here).
    return tuple(value for _, value in pairs)


class Cursor:
    """Runs one SELECT (``%s`` placeholders) and keeps its rows."""

    def __init__(self, connection: Connection) -> None:
        """A cursor on ``connection``."""
        self._connection = connection
        self._rows: list[tuple[Any, ...]] = []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run the SELECT ``sql``; its rows come back as one JSON array of the rows, in order."""
        numbered = _numbered(sql)
        # An aggregate over a subquery reads its rows in the order the subquery returns them, so
        # the statement's own ORDER BY holds in the array.
        # ``alias.*`` is the whole row even when a column has the alias's name.
        wrapped = f"SELECT json_agg(status_row_.*) FROM ({numbered}) status_row_"  # noqa: S608 - constant SQL
        document = self._connection._run(wrapped.encode("utf-8"), params)
        self._rows = [] if document is None else json.loads(document, object_pairs_hook=_tuple)

    def fetchall(self) -> list[tuple[Any, ...]]:
        """The rows of the last statement."""
        rows, self._rows = self._rows, []
        return rows

    def close(self) -> None:
        """Nothing to free: results are read at once."""


def connect(conninfo: str, connect_timeout: int) -> Connection | None:
    """Connect to ``conninfo`` (a libpq URI); None without libpq, :class:`PqError` when refused."""
    lib = _load()
    if lib is None:
        return None
    keys = (ctypes.c_char_p * 4)(b"dbname", b"connect_timeout", b"client_encoding", None)
    values = (ctypes.c_char_p * 4)(conninfo.encode("utf-8"), str(connect_timeout).encode(), b"UTF8", None)
    handle = lib.PQconnectdbParams(keys, values, 1)
    if not handle:
        raise PqError("out of memory")
    if lib.PQstatus(handle) != _CONNECTION_OK:
        message = _message(lib.PQerrorMessage(handle))
        lib.PQfinish(handle)
        raise PqError(message)
    return Connection(lib, handle)
