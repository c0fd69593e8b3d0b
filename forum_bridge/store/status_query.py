"""The status document, read with plain SQL on the database driver's own connection.

With 10,000 subscribers, building the document through SQLAlchemy (a typed row per subscriber, a
converter per column and value) cost most of a second and held the interpreter meanwhile, which a
running bridge shares with its call hook. Here the database formats every time as the document
writes it, rows come back as the driver's tuples, and what is left to Python is one dict per
subscriber. The counts come from one statement of sub-selects.

The same code serves a running bridge (on its read transaction's connection, see
:meth:`forum_bridge.service.BridgeService.status`) and ``forum-bridge status``, which opens the
driver alone (:func:`open_reader`) so that it does not pay for importing SQLAlchemy and Alembic. So
this module imports neither; it speaks SQL that SQLite and PostgreSQL read alike, apart from the
few expressions :class:`Reader` writes per dialect.
"""

# The statements are joined from constant fragments of this module; values are always parameters.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from forum_bridge.clocks import iso, utcnow
from forum_bridge.errors import StoreError

__all__ = [
    "HEAD_REVISION",
    "SUMMARY_KIND",
    "Counts",
    "Reader",
    "counts",
    "open_reader",
    "status_document",
    "subscriber_items",
    "utcnow",
]

HEAD_REVISION = "0005"
"""The Alembic revision this code needs (``migrations/versions``); ``store.database`` checks it too."""

SUMMARY_KIND = "logon_failed_summary"
"""The audit kind of a summary of failed log-ons of unknown log-ons (written by ``batching``)."""

_FAILURE_KINDS = ("logon_failed", SUMMARY_KIND)


@dataclass(frozen=True)
class PoolCounts:
    """The licence pool split into reserved and floating licences."""

    total: int  # licence rows (licences.count as applied)
    used: int  # rows held by anyone
    reserved: int  # log-ons with a reservation
    reserved_used: int  # rows held by those log-ons

    @property
    def floating(self) -> int:
        """Licences that log-ons without a reservation share (never below zero)."""
        return max(0, self.total - self.reserved)

    @property
    def floating_used(self) -> int:
        """Licences held by log-ons without a reservation."""
        return self.used - self.reserved_used

    @property
    def free(self) -> int:
        """Licences a log-on without a reservation can take now."""
        return max(0, min(self.floating - self.floating_used, self.total - self.used))


@dataclass(frozen=True)
class Counts(PoolCounts):
    """What ``/metrics`` and the document's summary count, without reading a row per subscriber."""

    subscribers: int
    logon_failed: int
    logged_on: int
    unmanaged: int  # log-ons registered but not provisioned

    def licences(self) -> dict[str, int]:
        """The document's ``licences`` object."""
        return {"total": self.total, "used": self.used, "free": self.free, "reserved": self.reserved}

    def states(self) -> dict[str, int]:
        """Subscribers by state, as the document's ``summary`` counts them."""
        return {
            "logged_on": self.logged_on,
            "logged_off": self.subscribers - self.logon_failed - self.logged_on,
            "logon_failed": self.logon_failed,
        }


class Reader:
    """Queries on one DB-API connection (``sqlite3`` or ``psycopg``), inside the caller's transaction."""

    def __init__(
        self,
        connection: Any,
        dialect: str,
        errors: tuple[type[Exception], ...],
        redact: Callable[[str], str],
    ) -> None:
        """``errors``: the driver's exception classes; ``redact`` takes secrets out of their text."""
        self._connection = connection
        self.dialect = dialect
        self._errors = errors
        self._redact = redact

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql`` (placeholders written ``?``) and return every row."""
        if self.dialect == "postgresql":
            sql = sql.replace("?", "%s")  # no statement here holds a literal ? or %
        try:
            cursor = self._connection.cursor()
            try:
                cursor.execute(sql, tuple(params))
                return list(cursor.fetchall())
            finally:
                cursor.close()
        except self._errors as exc:
            raise StoreError(f"database error: {self._redact(first_line(exc))}") from exc

    def text(self, sql: str, params: Sequence[Any] = ()) -> str | None:
        """The first column of the first row of ``sql``, a text (None when there is no row or it is NULL).

        On the libpq connection it arrives as the server wrote it, without the JSON wrapping
        :meth:`rows` uses, so a document of megabytes is not parsed again.
        """
        direct = getattr(self._connection, "text", None)
        if direct is None:
            found = self.rows(sql, params)
            return None if not found or found[0][0] is None else str(found[0][0])
        try:
            value: str | None = direct(sql.replace("?", "%s"), params)
        except self._errors as exc:
            raise StoreError(f"database error: {self._redact(first_line(exc))}") from exc
        return value

    def json_text(self, expression: str) -> str:
        """An SQL expression: ``expression`` (text or NULL) as a JSON string or ``null``, as Python writes it.

        Both databases escape ``"``, ``\\`` and control characters as :mod:`json` does with
        ``ensure_ascii=False`` (short forms for ``\\b \\f \\n \\r \\t``, ``\\u00xx`` for the rest) and
        pass every other character through.
        """
        if self.dialect == "sqlite":
            return f"json_quote({expression})"
        return f"coalesce(to_json({expression})::text, 'null')"

    def iso(self, column: str) -> str:
        """An SQL expression formatting ``column`` (a stored UTC time) as :func:`iso` does."""
        if self.dialect == "sqlite":
            # SQLAlchemy stores "YYYY-MM-DD HH:MM:SS.ffffff" (UTC); %S drops the fraction as iso() does.
            return f"strftime('%Y-%m-%dT%H:%M:%SZ', {column})"
        return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

    def time_param(self, value: datetime) -> Any:
        """``value`` as the database compares it with a stored time."""
        value = value.astimezone(UTC)
        if self.dialect == "sqlite":
            return value.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
        return value

    def revision(self) -> str | None:
        """The schema revision recorded by Alembic, or None when there is none (or no such table)."""
        try:
            found = self.rows("SELECT version_num FROM alembic_version")
        except StoreError:  # no such table yet: the caller takes the full path
            return None
        return str(found[0][0]) if len(found) == 1 else None


def counts(reader: Reader) -> Counts:
    """Every count of the summary in one statement."""
    (row,) = reader.rows(
        "SELECT"
        " (SELECT count(*) FROM licences),"
        " (SELECT count(*) FROM licences WHERE logon IS NOT NULL),"
        " (SELECT count(*) FROM subscribers WHERE reserved),"
        " (SELECT count(*) FROM licences l JOIN subscribers s ON s.logon = l.logon WHERE s.reserved),"
        " (SELECT count(*) FROM subscribers),"
        " (SELECT count(*) FROM subscribers WHERE last_logon_failed),"
        " (SELECT count(*) FROM subscribers WHERE NOT last_logon_failed"
        "   AND logon IN (SELECT logon FROM registrations)),"
        " (SELECT count(DISTINCT logon) FROM registrations"
        "   WHERE logon NOT IN (SELECT logon FROM subscribers))"
    )
    return Counts(*(int(v or 0) for v in row))


def first_line(exc: BaseException) -> str:
    """A driver's message, one line, for an error of our own (never a statement or its values)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _like(text: str) -> str:
    """``%text%`` for LIKE ... ESCAPE '/', with the pattern characters of ``text`` taken literally."""
    return "%" + text.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


def _marks(count: int) -> str:
    return ", ".join("?" * count) if count else "NULL"


def failure_doc(at: str | None, logon: str, reason: str, detail: str, node: str, kind: str) -> dict[str, Any]:
    """One entry of the document's ``failed_logons``: a failure, or a summary of many.

    A summary (failures of unknown log-ons beyond the per-window budget) carries ``count`` > 1, the
    number of ``distinct`` names, a ``sample`` of them and its ``since``; ``source`` is the busiest
    source. Single failures have ``count`` 1.
    """
    doc: dict[str, Any] = {
        "at": at,
        "logon": logon,
        "reason": reason,
        "source": detail,
        "node": node,
        "count": 1,
    }
    if kind == SUMMARY_KIND:
        try:
            data = json.loads(detail)
            sources = data.get("sources") or []
            doc.update(
                source=str(sources[0][0]) if sources else "",
                count=int(data["count"]),
                distinct=int(data.get("distinct", 0)),
                sample=[str(name) for name in data.get("names", [])],
                since=iso(datetime.fromisoformat(str(data["since"]))),
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            doc["source"] = ""
    return doc


def status_document(
    reader: Reader,
    *,
    node: str,
    now: datetime,
    history_hours: int = 24,
    failures: int = 50,
    search: str = "",
    offset: int = 0,
    limit: int | None = None,
    listed: bool = True,
) -> dict[str, Any]:
    """The status document (README, "Command line"): every field the CLI, page and JSON show.

    ``subscribers`` lists every subscriber by log-on name, unless ``search`` (a part of a log-on or
    call number) or ``limit`` asks for one page of them from ``offset``. Without ``listed`` it is
    left empty (and not read) for a caller that has the database encode it (:func:`subscriber_items`).
    """
    search = search.strip()
    offset = max(offset, 0)
    paged = bool(search) or limit is not None
    where, params = "", list[Any]()
    if search:
        where = " WHERE logon LIKE ? ESCAPE '/' OR number LIKE ? ESCAPE '/'"
        params = [_like(search), _like(search)]
    matched = None
    if paged:
        matched = int(reader.rows("SELECT count(*) FROM subscribers" + where, params)[0][0])
    listing = (
        "SELECT logon, number, profile, last_logon_failed, "
        + reader.iso("last_failure_at")
        + ", reserved FROM subscribers"
        + where
        + " ORDER BY logon"
    )
    if paged:
        listing += " LIMIT ? OFFSET ?"
        params += [(-1 if reader.dialect == "sqlite" else None) if limit is None else limit, offset]
    subscribers = {row[0]: row for row in reader.rows(listing, params)} if listed else {}

    registered = (
        "SELECT logon, contact, user_agent, source, node, " + reader.iso("last_seen") + " FROM registrations"
    )
    reg_params: list[Any] = []
    if paged or not listed:
        # This page's subscribers and the unmanaged endpoints, not every registration.
        registered += f" WHERE logon IN ({_marks(len(subscribers))})"
        registered += " OR logon NOT IN (SELECT logon FROM subscribers)"
        reg_params = list(subscribers)
    registrations: dict[str, list[tuple[Any, ...]]] = {}
    for reg in reader.rows(registered + " ORDER BY last_seen DESC, id", reg_params):
        registrations.setdefault(reg[0], []).append(reg)

    licences = reader.rows(
        "SELECT l.slot, l.logon, s.number, "
        + reader.iso("l.since")
        + ", l.node FROM licences l LEFT JOIN subscribers s ON s.logon = l.logon ORDER BY l.slot"
    )
    holders = {row[1] for row in licences if row[1]}
    counted = counts(reader)

    subscriber_docs = []
    for logon, (_, number, profile, last_failed, failure_at, reserved) in subscribers.items():
        regs = registrations.get(logon)
        if regs:
            latest = regs[0]
            state = "logon_failed" if last_failed else "logged_on"
            seen, contact, agent, source, where_node = latest[5], latest[1], latest[2], latest[3], latest[4]
            contacts = [r[1] for r in regs]
        else:
            state = "logon_failed" if last_failed else "logged_off"
            seen = contact = agent = source = where_node = None
            contacts = []
        subscriber_docs.append(
            {
                "logon": logon,
                "number": number,
                "profile": profile,
                "state": state,
                "licensed": logon in holders,
                "reserved": bool(reserved),
                "last_seen": seen,
                "contact": contact,
                "contacts": contacts,
                "user_agent": agent,
                "source": source,
                "node": where_node,
                "last_failure": failure_at,
            }
        )
    unmanaged = [
        {
            "logon": logon,
            "contact": regs[0][1],
            "user_agent": regs[0][2],
            "source": regs[0][3],
            "node": regs[0][4],
            "last_seen": regs[0][5],
        }
        for logon, regs in sorted(registrations.items())
        if logon not in subscribers
    ]
    failed = reader.rows(
        "SELECT " + reader.iso("at") + ", logon, reason, detail, node, kind FROM audit"
        " WHERE kind IN (?, ?) ORDER BY id DESC LIMIT ?",
        [*_FAILURE_KINDS, failures],
    )
    since = now - timedelta(hours=history_hours)
    before = reader.rows(
        "SELECT used, total FROM licence_usage WHERE at < ? ORDER BY at DESC LIMIT 1",
        [reader.time_param(since)],
    )
    history = [{"at": iso(since), "used": before[0][0], "total": before[0][1]}] if before else []
    history += [
        {"at": at, "used": used, "total": total}
        for at, used, total in reader.rows(
            "SELECT " + reader.iso("at") + ", used, total FROM licence_usage WHERE at >= ? ORDER BY at, id",
            [reader.time_param(since)],
        )
    ]
    history.append({"at": iso(now), "used": len(holders), "total": len(licences)})
    calls = reader.rows(
        "SELECT channel, logon, number, direction, node, "
        + reader.iso("started_at")
        + " FROM calls ORDER BY started_at"
    )
    return {
        "node": node,
        "generated_at": iso(now),
        "licences": counted.licences(),
        "assignments": [
            {"slot": slot, "logon": logon, "number": number, "since": held_since, "node": held_by}
            for slot, logon, number, held_since, held_by in licences
            if logon
        ],
        "summary": {"subscribers": counted.subscribers, **counted.states(), "unmanaged": counted.unmanaged},
        "subscriber_page": {
            "search": search,
            "offset": offset if paged else 0,
            "limit": limit,
            "matched": matched if matched is not None else counted.subscribers,
        },
        "subscribers": subscriber_docs,
        "unmanaged": unmanaged,
        "failed_logons": [failure_doc(*row) for row in failed],
        "calls": [
            {"channel": c[0], "logon": c[1], "number": c[2], "direction": c[3], "node": c[4], "since": c[5]}
            for c in calls
        ],
        "usage_history": history,
    }


def subscriber_items(reader: Reader, separator: str) -> str:
    """The status document's ``subscribers``, each encoded as JSON by the database, joined by ``separator``.

    The same objects as :func:`status_document` lists (every subscriber, by log-on name), written
    as ``json.JSONEncoder(ensure_ascii=False)`` writes them (``", "`` and ``": "`` between items and
    keys), so that ``status --json`` prints 10,000 subscribers without building and encoding 10,000
    dicts in Python. Empty text when there is no subscriber.
    """
    q = reader.json_text
    if reader.dialect == "sqlite":
        latest = (
            " LEFT JOIN registrations r ON r.id = (SELECT x.id FROM registrations x"
            " WHERE x.logon = s.logon ORDER BY x.last_seen DESC, x.id LIMIT 1)"
        )
        # One aggregate over an ordered subquery reads the rows in that order. Most log-ons have
        # one registration, the latest: its list is written without that subquery's sort.
        contacts = (
            "CASE WHEN r.id IS NULL THEN '[]'"
            " WHEN NOT EXISTS (SELECT 1 FROM registrations x WHERE x.logon = s.logon AND x.id <> r.id)"
            " THEN '[' || json_quote(r.contact) || ']'"
            " ELSE (SELECT '[' || group_concat(c, ', ') || ']' FROM (SELECT json_quote(x.contact) AS c"
            " FROM registrations x WHERE x.logon = s.logon ORDER BY x.last_seen DESC, x.id)) END"
        )
        prefix = ""
    else:
        # Registrations grouped once (a hash join) rather than looked up per subscriber. Sorted
        # once before grouping: an ORDER BY inside the aggregates sorted each log-on's rows apart,
        # two sorts per subscriber, a third of the statement's time; the aggregates read the rows
        # in the order the subquery returns them (as json_agg does in store.libpq).
        prefix = (
            "WITH regs AS (SELECT logon, json_agg(contact)::text AS contacts, (array_agg(id))[1] AS latest"
            " FROM (SELECT logon, contact, id FROM registrations ORDER BY logon, last_seen DESC, id) newest"
            " GROUP BY logon) "
        )
        latest = " LEFT JOIN regs g ON g.logon = s.logon LEFT JOIN registrations r ON r.id = g.latest"
        contacts = "coalesce(g.contacts, '[]')"
    item = (
        """'{"logon": ' || """ + q("s.logon")
        + """ || ', "number": ' || """ + q("s.number")
        + """ || ', "profile": ' || """ + q("s.profile")
        + """ || ', "state": ' || CASE WHEN s.last_logon_failed THEN '"logon_failed"'"""
        + """ WHEN r.id IS NOT NULL THEN '"logged_on"' ELSE '"logged_off"' END"""
        + """ || ', "licensed": ' || CASE WHEN s.logon IN"""
        + """ (SELECT logon FROM licences WHERE logon <> '') THEN 'true' ELSE 'false' END"""
        + """ || ', "reserved": ' || CASE WHEN s.reserved THEN 'true' ELSE 'false' END"""
        + """ || ', "last_seen": ' || """ + q(reader.iso("r.last_seen"))
        + """ || ', "contact": ' || """ + q("r.contact")
        + """ || ', "contacts": ' || """ + contacts
        + """ || ', "user_agent": ' || """ + q("r.user_agent")
        + """ || ', "source": ' || """ + q("r.source")
        + """ || ', "node": ' || """ + q("r.node")
        + """ || ', "last_failure": ' || """ + q(reader.iso("s.last_failure_at"))
        + " || '}'"
    )  # fmt: skip
    if reader.dialect == "sqlite":
        # Named: a driver's message names the column (undecodable text), never the statement.
        rows = reader.rows(
            "SELECT " + item + " AS subscriber FROM subscribers s" + latest + " ORDER BY s.logon"
        )
        return separator.join([row[0] for row in rows])
    listing = prefix + "SELECT string_agg(" + item + ", ? ORDER BY s.logon) FROM subscribers s" + latest
    text = reader.text(listing, [separator])
    return text or ""


def _sqlite_path(url: str) -> str | None:
    """The file of a plain ``sqlite:///PATH`` URL, or None for anything else (memory, options)."""
    rest = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
    if not rest or "?" in rest or rest == ":memory:":
        return None
    return rest


def _postgres_conninfo(url: str) -> str | None:
    """A libpq URI for a plain PostgreSQL URL, or None when only SQLAlchemy's checks should judge it."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
        return None
    parts = urlsplit("postgresql://" + rest)
    try:
        parts.port  # noqa: B018  # raises for a port that is not a number
    except ValueError:
        return None
    # An unescaped "@" or a password that runs into the host: make_engine explains those.
    if parts.netloc.count("@") > 1 or "@" in unquote(parts.path):
        return None
    return "postgresql://" + rest


def _postgres_connection(
    conninfo: str, redact: Callable[[str], str]
) -> tuple[Any, tuple[type[Exception], ...]]:
    """A read-only connection through libpq alone (see ``store.libpq``), else through psycopg."""
    from forum_bridge.store import libpq

    try:
        plain = libpq.connect(conninfo, connect_timeout=10)
    except libpq.PqError as exc:
        raise StoreError(f"cannot open the database: {redact(first_line(exc))}") from exc
    if plain is not None:
        return plain, (libpq.PqError,)
    import psycopg

    try:
        connection = psycopg.connect(conninfo, connect_timeout=10)
        connection.read_only = True
    except psycopg.Error as exc:
        raise StoreError(f"cannot open the database: {redact(first_line(exc))}") from exc
    return connection, (psycopg.Error,)


@contextmanager
def open_reader(url: str, redact: Callable[[str], str]) -> Iterator[Reader | None]:
    """A :class:`Reader` on a read-only snapshot of the database at ``url``, opened with its driver alone.

    Yields None when this shortcut cannot judge the URL or the database (a URL form it does not
    know, a missing file, a schema not at :data:`HEAD_REVISION`): the caller then takes the full
    path, which creates, refuses or explains exactly as every other command does. ``redact`` takes
    secrets of the URL out of a driver's message.
    """
    connection: Any
    dialect: str
    errors: tuple[type[Exception], ...]
    path = _sqlite_path(url) if url.startswith("sqlite:") else None
    conninfo = _postgres_conninfo(url) if path is None else None
    if path is not None:
        import os
        import sqlite3

        if "%" in path or not os.path.isfile(path):
            yield None
            return
        try:
            connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            connection.execute("BEGIN")  # a snapshot; in WAL mode it waits for no writer
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database: {redact(first_line(exc))}") from exc
        dialect, errors = "sqlite", (sqlite3.Error,)
    elif conninfo is not None:
        connection, errors = _postgres_connection(conninfo, redact)
        dialect = "postgresql"
    else:
        yield None
        return
    try:
        reader = Reader(connection, dialect, errors, redact)
        if reader.revision() != HEAD_REVISION:
            connection.rollback()
            yield None
        else:
            yield reader
    finally:
        connection.close()
