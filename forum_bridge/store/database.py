"""Engines, transactions and migrations for SQLite and PostgreSQL.

SQLite write transactions start with ``BEGIN IMMEDIATE`` so that two processes competing for the
last licence are serialised by the database's write lock instead of racing between read and write.
Read transactions (:meth:`Database.read`) start with a plain ``BEGIN``: in WAL mode they read a
snapshot and never take or wait for the write lock, so a status page being read never delays a
call decision. Within one process, writers queue on a lock of their own before asking SQLite: the
queue hands over at once, where SQLite's busy handler would sleep and retry for milliseconds.
The schema belongs to Alembic (``migrations/``); nothing here calls ``create_all``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, String, column, create_engine, event, inspect, select, table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from forum_bridge.config import redact_url_secrets
from forum_bridge.errors import ConfigError, SchemaError, StoreError
from forum_bridge.store import write_behind
from forum_bridge.store.status_query import HEAD_REVISION, Reader

__all__ = ["HEAD_REVISION", "Database", "make_engine", "migrations_dir"]

log = logging.getLogger(__name__)

_VERSION_TABLE = "alembic_version"

SQLITE_BUSY_SECONDS = 30.0
"""How long a SQLite writer waits for the write lock (another process's, or this process's queue)."""

# Set while a read transaction begins, so the connection's BEGIN takes no write lock.
_READING: ContextVar[bool] = ContextVar("forum_bridge_reading", default=False)


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside an installed wheel, or at the project's top level."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError("the database migrations are missing from this installation")


def _normalised_url(url: str) -> str:
    # "postgresql://" would pick psycopg2, which is not installed; psycopg 3 is.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` with the per-dialect settings the store relies on.

    A URL that cannot be right is refused with a :class:`ConfigError` that never quotes it (it may
    hold a password).
    """
    try:
        parsed = make_url(_normalised_url(url))
    except ArgumentError as exc:
        raise ConfigError("database.url", "not a database URL") from exc
    except ValueError as exc:  # a port that is not a number
        raise ConfigError("database.url", "the port is not a number") from exc
    misplaced = parsed.host or ""
    if parsed.get_backend_name() != "sqlite":
        misplaced += (parsed.database or "").split("/", 1)[0]
    if "@" in misplaced:
        # The parser ended the password at its first "@" (or "/") and took the rest for the host
        # name or the database name.
        raise ConfigError(
            "database.url",
            "the user name or password holds an '@': write it as %40 (and ':' as %3A, '/' as %2F)",
        )
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False})
        _make_sqlite_serialisable(engine)
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError(
            "database.url", f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql"
        )
    engine = create_engine(
        parsed,
        connect_args={
            "connect_timeout": 10,
            # A commit returns before its WAL record is on disk (PostgreSQL's WAL writer syncs it
            # within milliseconds): the database stays consistent through a crash of its host,
            # which may forget the last moments' changes; the resync after it restores them.
            # Each commit waiting for fsync made the shared pool disk-bound.
            # psycopg prepares a statement run five times; PostgreSQL may then settle on a generic
            # plan, costed on the statistics of the moment (an empty registrations table after
            # an install): for a batch's IN list of 250 log-ons that plan took 400 ms instead of
            # 5. Planning each execution with its values costs a fraction of a millisecond.
            "options": "-c synchronous_commit=off -c plan_cache_mode=force_custom_plan",
            # The decision path prepares its statements itself (store.libpq_pipeline). psycopg
            # answers every ROLLBACK of a connection it prepared on with DEALLOCATE ALL, which
            # would drop those too; left to prepare nothing, it never sends one.
            "prepare_threshold": None,
        },
    )
    _ping_idle_connections(engine)
    _send_deferred_writes(engine)
    return engine


def _send_deferred_writes(engine: Engine) -> None:
    """Deferred writes (forum_bridge.store.write_behind) travel with the COMMIT, and never after a
    later statement or savepoint; a rollback drops them."""

    @event.listens_for(engine, "commit")
    def _on_commit(connection: Any) -> None:
        write_behind.commit(connection)

    @event.listens_for(engine, "rollback")
    def _on_rollback(connection: Any) -> None:
        write_behind.drop(connection)

    @event.listens_for(engine, "savepoint")
    def _on_savepoint(connection: Any, _name: Any) -> None:
        write_behind.send(connection)

    @event.listens_for(engine, "reset")
    def _on_reset(dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
        record = connection_record
        record.info.pop(write_behind.QUEUE, None)
        record.info.pop(write_behind.HELD, None)

    @event.listens_for(engine, "before_cursor_execute")
    def _on_statement(connection: Any, *_args: Any) -> None:
        if write_behind.pending(connection):
            write_behind.send(connection)


_PING_AFTER_IDLE = 1.0  # seconds a pooled connection may rest before it is checked on checkout


def _ping_idle_connections(engine: Engine) -> None:
    """Check a pooled connection before use only if it rested a while.

    ``pool_pre_ping`` would cost one round trip per transaction (a call decision is a handful).
    A connection used within the last second is trusted; an older one is pinged and replaced
    when the server went away meanwhile (a restart while the bridge was idle). A server that dies
    in the middle of busy traffic fails one transaction, after which the pool starts afresh.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["forum_bridge_used"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        used = record.info.get("forum_bridge_used")
        if used is not None and time.monotonic() - used < _PING_AFTER_IDLE:
            return
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
            dbapi_connection.rollback()
        except Exception as exc:
            # The pool retries the checkout with a new connection.
            raise DisconnectionError(str(exc)) from exc


def _make_sqlite_serialisable(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL syncs at checkpoints instead of at every commit: the database stays
        # consistent through a power cut, which may forget the last moments' changes (the PBX
        # restarts with it and the resync at start-up brings registrations and calls back).
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # On the driver itself: every call decision begins here, and SQLAlchemy's execution layer
        # cost more than the BEGIN. An error (a locked database) is mapped as SQLAlchemy maps one.
        dbapi = connection.dialect.loaded_dbapi
        try:
            connection.connection.dbapi_connection.execute("BEGIN" if _READING.get() else "BEGIN IMMEDIATE")
        except dbapi.Error as exc:
            raise DBAPIError.instance(None, None, exc, dbapi.Error) from exc


class Database:
    """One database: an engine, a session factory and the migration commands."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time: this process's writers queue here (see the module text).
        self._writer = threading.Lock() if self.engine.dialect.name == "sqlite" else None
        self._generation = 0
        self._generation_lock = threading.Lock()
        # First of the commit hooks: licences freed are counted out of the pool's row, and a change
        # of the pool's shape recounts it, before anything (the pool-pressure watch) reads it.
        event.listen(self._sessions, "before_commit", _recount_pool_if_marked)

    @property
    def generation(self) -> int:
        """How many write transactions this object has committed (readers use it to reuse results)."""
        return self._generation

    def _committed(self) -> None:
        with self._generation_lock:
            self._generation += 1

    def _redact(self, text: str) -> str:
        # Drivers quote host names and connection strings in their errors; a mistyped URL can put
        # a piece of the password there.
        return redact_url_secrets(text, self.url)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on any error."""
        with self._write_turn(None):
            try:
                with self._sessions.begin() as session:
                    yield session
            except SQLAlchemyError as exc:
                raise StoreError(f"database error: {self._redact(_describe(exc))}") from exc
            self._committed()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A transaction that only reads: on SQLite it takes no write lock and waits for no writer.

        Writing in it is a bug (SQLite would have to upgrade the lock and may refuse); nothing is
        committed.
        """
        token = _READING.set(True)
        try:
            with self._sessions() as session:
                yield session
                session.rollback()
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {self._redact(_describe(exc))}") from exc
        finally:
            _READING.reset(token)

    @contextmanager
    def begin(self, deadline: float | None = None) -> Iterator[Session]:
        """A write transaction for the hot call-decision path.

        Same rules as :meth:`transaction` (its commit hooks run too); the decision path runs its
        few statements on ``session.connection()`` without the ORM's cost. ``deadline`` (a
        ``time.monotonic()`` value) bounds the wait for SQLite's write lock in this process.
        """
        with self._write_turn(deadline):
            try:
                with self._sessions.begin() as session:
                    yield session
            except SQLAlchemyError as exc:
                raise StoreError(f"database error: {self._redact(_describe(exc))}") from exc
            self._committed()

    def reader(self, session: Session) -> Reader:
        """Plain SQL on ``session``'s own driver connection, inside its transaction (status reads)."""
        connection = session.connection().connection.dbapi_connection
        errors: tuple[type[Exception], ...] = (self.engine.dialect.loaded_dbapi.Error,)
        return Reader(connection, self.dialect, errors, self._redact)

    def add_commit_hooks(
        self, before: Callable[[Session], None], after: Callable[[Session], None], *, first: bool = False
    ) -> None:
        """Run ``before`` inside every transaction just before it commits, ``after`` once it has.

        ``before`` may still read and write through the session (its work commits with the rest);
        ``after`` must not touch the database. Used by the pool-pressure watch, and (``first``:
        ahead of the hooks added before, which may consume the session's marks) by the Asterisk
        adapter's licensed set.
        """
        event.listen(self._sessions, "before_commit", before, insert=first)
        event.listen(self._sessions, "after_commit", after, insert=first)

    @contextmanager
    def _write_turn(self, deadline: float | None) -> Iterator[None]:
        if self._writer is None:
            yield
            return
        wait = SQLITE_BUSY_SECONDS if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._writer.acquire(timeout=wait):
            raise StoreError("database error: database is locked")
        try:
            yield
        finally:
            self._writer.release()

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at, or None when it was never upgraded."""
        # Read Alembic's one-row table directly: importing Alembic costs a third of a second, which
        # every command (status included) would pay just for this check.
        try:
            with self.engine.connect() as connection:
                if not inspect(connection).has_table(_VERSION_TABLE):
                    return None
                query: Select[str] = select(column("version_num", String)).select_from(table(_VERSION_TABLE))
                versions = list(connection.execute(query).scalars())
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the database: {self._redact(_describe(exc))}") from exc
        if len(versions) > 1:
            raise SchemaError(f"the database records {len(versions)} schema revisions; expected one")
        return str(versions[0]) if versions else None

    def require_current_schema(self) -> None:
        """Stop with a clear message unless the schema is at the version this code needs."""
        revision = self.current_revision()
        if revision != HEAD_REVISION:
            found = "empty" if revision is None else f"at revision {revision}"
            raise SchemaError(f"the database is {found}; run 'forum-bridge db upgrade' first")

    def _alembic(self) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        config.attributes["engine"] = self.engine
        return config

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema up to ``revision`` (default: the newest)."""
        from alembic import command

        try:
            command.upgrade(self._alembic(), revision)
        except SQLAlchemyError as exc:
            raise StoreError(f"upgrade failed: {self._redact(_describe(exc))}") from exc

    def downgrade(self, revision: str = "base") -> None:
        """Take the schema back to ``revision`` (default: empty)."""
        from alembic import command

        try:
            command.downgrade(self._alembic(), revision)
        except SQLAlchemyError as exc:
            raise StoreError(f"downgrade failed: {self._redact(_describe(exc))}") from exc

    def table_names(self) -> list[str]:
        """The tables that exist now (for tests and diagnostics)."""
        return sorted(inspect(self.engine).get_table_names())

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _recount_pool_if_marked(session: Session) -> None:
    from forum_bridge.store import operations as ops

    if session.info.pop(ops.POOL_RECOUNT, False):
        ops.flush_pool(session)
        ops.recount_pool(session)
    else:
        # On PostgreSQL the count-out travels with the COMMIT (its row is read after it).
        ops.flush_pool(session, with_commit=True)


def _describe(exc: SQLAlchemyError) -> str:
    """The driver's own message, one line, without SQL statements or parameters (they may hold names)."""
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
