"""SQLAlchemy 2 models of the bridge's state.

The schema is owned by the Alembic migrations in ``migrations/``; these models must match them (a
test compares both). Licences are rows, one per purchased slot; a log-on holds at most one, enforced
by a unique constraint, so no race can ever give one log-on two licences.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite forgets the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Audit details are free text from peers and people; the column is unbounded, the value is not.
MAX_DETAIL = 1024
_MARK = "\u2026"  # "…" then 8 hex digits of the whole value's hash: the tail of a shortened value


def fit(value: str, length: int) -> str:
    """``value`` as every database stores it in a column of ``length`` characters.

    Values come from peers (SIP headers, AMI and ESL fields, the dialled number): PostgreSQL refuses
    a value that is too long, or that holds a NUL or an unpaired surrogate, and fails the whole
    transaction, while SQLite stores anything. So both get the same, always storable, value: NUL
    becomes U+FFFD, an unpaired surrogate "?", and an over-long value keeps its head plus a hash of
    the whole, so two long values that differ only at the end stay two distinct values (a unique
    constraint on contacts must not merge two phones).
    """
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():  # the common case skips the encoding check
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
    if len(value) <= length:
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]
    keep = max(length - len(_MARK) - len(digest), 0)
    return (value[:keep] + _MARK + digest)[:length]


def stored(column: Any, value: str) -> str:
    """``value`` as it is stored in ``column`` (a mapped attribute such as ``RegistrationRow.contact``).

    For code that compares what a peer reports with what is stored, in Python rather than in SQL.
    """
    # Asking a mapped attribute for its type goes through SQLAlchemy's attribute proxies, which
    # cost more than a registration storm's own bookkeeping when done per event: look it up once.
    # Keyed by id() (mapped attributes overload ==), the column kept so that the id stays its own.
    entry = _LENGTHS.get(id(column))
    if entry is None or entry[0] is not column:
        kind = column.type
        entry = _LENGTHS[id(column)] = (
            column,
            kind.length if isinstance(kind, Bounded | BoundedText) else None,
        )
    length = entry[1]
    return value if length is None else fit(value, length)


_LENGTHS: dict[int, tuple[Any, int | None]] = {}


class Bounded(TypeDecorator[str]):
    """A string column whose values are made to fit on the way in (see :func:`fit`).

    Every write path (events, resync, hook, calls, audit) and every lookup by such a column goes
    through here, so a column's length is known in one place, and a lookup by an over-long value
    finds what storing that same value stored.
    """

    impl = String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else fit(value, self.length)


class BoundedText(TypeDecorator[str]):
    """A text column (no length in the schema) that still keeps each value to ``length`` characters."""

    impl = Text
    cache_ok = True

    def __init__(self, length: int = MAX_DETAIL) -> None:
        super().__init__()
        self.length = length

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else fit(value, self.length)


class Base(DeclarativeBase):
    """Declarative base with deterministic constraint names (Alembic needs them to drop constraints)."""

    metadata = MetaData(naming_convention=NAMING)


class ProfileRow(Base):
    """A log-on profile; its keepalive interval is the clock for automatic log-out."""

    __tablename__ = "profiles"

    name: Mapped[str] = mapped_column(Bounded(64), primary_key=True)
    keepalive_seconds: Mapped[int] = mapped_column(Integer)


class SubscriberRow(Base):
    """A managed SIP log-on: the user name of a user/password combination, and its call number."""

    __tablename__ = "subscribers"

    logon: Mapped[str] = mapped_column(Bounded(128), primary_key=True)
    number: Mapped[str] = mapped_column(Bounded(64), index=True)
    profile: Mapped[str] = mapped_column(ForeignKey("profiles.name"))
    last_logon_failed: Mapped[bool] = mapped_column(Boolean, default=False)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # A reserved log-on always finds a licence; the floating pool is the purchased count minus these.
    reserved: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), index=True)


class RegistrationRow(Base):
    """One registered contact of a log-on on one PBX node (managed or not)."""

    __tablename__ = "registrations"
    __table_args__ = (
        UniqueConstraint("node", "logon", "contact", name="uq_registrations_node_logon_contact"),
        # The keepalive sweep's reads and the overdue count select one node's contacts (migration 0005).
        Index("ix_registrations_node", "node"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node: Mapped[str] = mapped_column(Bounded(128))
    logon: Mapped[str] = mapped_column(Bounded(128), index=True)
    contact: Mapped[str] = mapped_column(Bounded(512))
    source: Mapped[str] = mapped_column(Bounded(128), default="")
    user_agent: Mapped[str] = mapped_column(Bounded(256), default="")
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())


class LicenceRow(Base):
    """One purchased licence (slot). ``logon`` is the log-on holding it, or NULL when free."""

    __tablename__ = "licences"

    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    logon: Mapped[str | None] = mapped_column(
        ForeignKey("subscribers.logon", ondelete="SET NULL"), nullable=True, unique=True
    )
    since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    node: Mapped[str | None] = mapped_column(Bounded(128), nullable=True)


class PoolStateRow(Base):
    """One row: whether the pool-pressure warning (``licences.warn_at``) is raised now.

    It lives in the database, not in a process, so that bridges sharing one pool log each crossing
    once between them.
    """

    __tablename__ = "pool_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    warned: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class LicencePoolRow(Base):
    """One row: the pool's counts, kept exact by every change of who holds a licence.

    Taking a licence updates this row with one conditional statement (room in the floating pool,
    checked and counted at once), so the floating limit serialises on one row for a moment instead
    of counting the pool under a pool-wide lock. Changes of the pool's shape (slots, reservations,
    a reset) recount it in their own transaction (see ``store.operations.lock_pool``).
    ``warned`` copies ``pool_state.warned`` as last flipped, so a change that moves the pool without
    crossing ``licences.warn_at`` needs no look at the warning state.
    """

    __tablename__ = "licence_pool"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    total: Mapped[int] = mapped_column(Integer)  # licence rows (licences.count as applied)
    used: Mapped[int] = mapped_column(Integer)  # rows held by anyone
    reserved: Mapped[int] = mapped_column(Integer)  # log-ons with a reservation
    reserved_used: Mapped[int] = mapped_column(Integer)  # rows held by those log-ons
    warned: Mapped[bool] = mapped_column(Boolean, default=False)


class CallRow(Base):
    """A call leg in progress on a PBX node."""

    __tablename__ = "calls"

    node: Mapped[str] = mapped_column(Bounded(128), primary_key=True)
    channel: Mapped[str] = mapped_column(Bounded(256), primary_key=True)
    logon: Mapped[str] = mapped_column(Bounded(128), index=True)
    number: Mapped[str] = mapped_column(Bounded(64))
    direction: Mapped[str] = mapped_column(Bounded(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The decision taken on this leg, so a leg seen twice (event and hook) is decided once.
    allowed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    reason: Mapped[str] = mapped_column(Bounded(32), default="")


class AuditRow(Base):
    """The audit log: every acquisition, release, denial, failed log-on and reset."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(Bounded(32), index=True)
    logon: Mapped[str] = mapped_column(Bounded(128), default="")
    number: Mapped[str] = mapped_column(Bounded(64), default="")
    reason: Mapped[str] = mapped_column(Bounded(64), default="")
    node: Mapped[str] = mapped_column(Bounded(128), default="")
    actor: Mapped[str] = mapped_column(Bounded(128), default="")
    detail: Mapped[str] = mapped_column(BoundedText(), default="")


class UsageRow(Base):
    """Licences in use after each change; the status page draws the last 24 hours from it."""

    __tablename__ = "licence_usage"
    __table_args__ = (Index("ix_licence_usage_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    used: Mapped[int] = mapped_column(Integer)
    total: Mapped[int] = mapped_column(Integer)


class NodeRow(Base):
    """One bridge of the (possibly shared) pool and its heartbeat.

    ``beats`` grows by one at every keepalive sweep of that node. Other nodes never compare
    ``seen_at`` with their own wall clock (hosts' clocks differ and step): they watch ``beats``
    change on their own monotonic clock. ``seen_at`` is for display only.
    """

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    beats: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
