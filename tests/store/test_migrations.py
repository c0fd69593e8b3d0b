"""Alembic owns the schema: upgrade and downgrade work on both databases and match the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from forum_bridge.errors import SchemaError
from forum_bridge.store.database import HEAD_REVISION, Database
from forum_bridge.store.models import Base

TABLES = [
    "audit",
    "calls",
    "licence_pool",
    "licence_usage",
    "licences",
    "nodes",
    "pool_state",
    "profiles",
    "registrations",
    "subscribers",
]


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert db.current_revision() is None
        with pytest.raises(SchemaError, match="forum-bridge db upgrade"):
            db.require_current_schema()
        db.upgrade()
        assert db.current_revision() == HEAD_REVISION
        assert [t for t in db.table_names() if t != "alembic_version"] == TABLES
        db.require_current_schema()
        db.downgrade()
        assert [t for t in db.table_names() if t != "alembic_version"] == []
        assert db.current_revision() is None
        db.upgrade()
        assert db.current_revision() == HEAD_REVISION
    finally:
        db.dispose()


def test_schema_matches_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        db.upgrade()
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        db.dispose()


def test_reserved_licences_migration_keeps_every_log_on_and_licence(database_url: str) -> None:
    """0002 adds reservations (existing log-ons float) and takes them away again without losing data."""
    db = Database(database_url)
    try:
        db.upgrade("0001")
        with db.engine.begin() as connection:
            connection.execute(text("INSERT INTO profiles VALUES ('default', 120)"))
            for logon in ("21-desk", "22-desk"):
                connection.execute(
                    text(
                        "INSERT INTO subscribers (logon, number, profile, last_logon_failed, created_at) "
                        "VALUES (:logon, '21', 'default', false, '2026-11-24 08:00:00')"
                    ),
                    {"logon": logon},
                )
            connection.execute(text("INSERT INTO licences (slot, logon) VALUES (1, '21-desk'), (2, NULL)"))
        db.upgrade("0002")
        with db.engine.begin() as connection:
            assert connection.execute(
                text("SELECT logon, reserved FROM subscribers ORDER BY logon")
            ).all() == [("21-desk", False), ("22-desk", False)]
            assert connection.execute(text("SELECT id, warned FROM pool_state")).all() == [(1, False)]
            connection.execute(text("UPDATE subscribers SET reserved = true WHERE logon = '22-desk'"))
        db.downgrade("0001")
        assert db.current_revision() == "0001"
        assert "pool_state" not in db.table_names()
        with db.engine.begin() as connection:
            assert connection.execute(text("SELECT logon FROM subscribers ORDER BY logon")).all() == [
                ("21-desk",),
                ("22-desk",),
            ]
            # No table copy on SQLite: the licence holder survives (foreign keys would have freed it).
            assert connection.execute(text("SELECT slot, logon FROM licences ORDER BY slot")).all() == [
                (1, "21-desk"),
                (2, None),
            ]
        db.upgrade()
        assert db.current_revision() == HEAD_REVISION
    finally:
        db.dispose()


def test_licence_pool_migration_counts_the_pool_as_it_is(database_url: str) -> None:
    """0004 fills the pool's row from the licences held and reserved; downgrading drops only that row."""
    db = Database(database_url)
    try:
        db.upgrade("0003")
        with db.engine.begin() as connection:
            connection.execute(text("INSERT INTO profiles VALUES ('default', 120)"))
            for logon, reserved in (("lift", True), ("21-desk", False), ("22-desk", False)):
                connection.execute(
                    text(
                        "INSERT INTO subscribers (logon, number, profile, last_logon_failed, created_at,"
                        " reserved) VALUES (:logon, '21', 'default', false, '2026-11-24 08:00:00', :reserved)"
                    ),
                    {"logon": logon, "reserved": reserved},
                )
            connection.execute(
                text("INSERT INTO licences (slot, logon) VALUES (1, 'lift'), (2, '21-desk'), (3, NULL)")
            )
            connection.execute(text("UPDATE pool_state SET warned = true"))
        db.upgrade("0004")
        with db.engine.begin() as connection:
            assert connection.execute(
                text("SELECT id, total, used, reserved, reserved_used, warned FROM licence_pool")
            ).all() == [(1, 3, 2, 1, 1, True)]
        db.downgrade("0003")
        assert "licence_pool" not in db.table_names()
        with db.engine.begin() as connection:
            assert connection.execute(text("SELECT slot, logon FROM licences ORDER BY slot")).all() == [
                (1, "lift"),
                (2, "21-desk"),
                (3, None),
            ]
        db.upgrade()
        assert db.current_revision() == HEAD_REVISION
    finally:
        db.dispose()


def test_registrations_index_migration_keeps_every_registration(database_url: str) -> None:
    """0005 indexes registrations by node (the keepalive sweep); both ways keep every row."""
    db = Database(database_url)
    try:
        db.upgrade("0004")
        with db.engine.begin() as connection:
            for node, logon in (("pbx1", "21-desk"), ("pbx1", "22-desk"), ("pbx2", "21-desk")):
                connection.execute(
                    text(
                        "INSERT INTO registrations (node, logon, contact, source, user_agent, registered_at,"
                        " last_seen) VALUES (:node, :logon, :contact, '', '', '2026-11-24 08:00:00',"
                        " '2026-11-24 08:01:00')"
                    ),
                    {"node": node, "logon": logon, "contact": f"sip:{logon}"},
                )
        rows = "SELECT node, logon, contact FROM registrations ORDER BY node, logon"
        expected = [
            ("pbx1", "21-desk", "sip:21-desk"),
            ("pbx1", "22-desk", "sip:22-desk"),
            ("pbx2", "21-desk", "sip:21-desk"),
        ]
        db.upgrade("0005")
        assert "ix_registrations_node" in _indexes(db, "registrations")
        with db.engine.begin() as connection:
            assert connection.execute(text(rows)).all() == expected
        db.downgrade("0004")
        assert "ix_registrations_node" not in _indexes(db, "registrations")
        with db.engine.begin() as connection:
            assert connection.execute(text(rows)).all() == expected
        db.upgrade()
        assert db.current_revision() == HEAD_REVISION
    finally:
        db.dispose()


def _indexes(db: Database, table: str) -> set[str]:
    from sqlalchemy import inspect

    return {str(index["name"]) for index in inspect(db.engine).get_indexes(table)}
