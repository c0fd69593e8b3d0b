"""Alembic owns the schema: upgrade and downgrade work on both databases and match the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from forum_bridge.errors import SchemaError
from forum_bridge.store.database import HEAD_REVISION, Database
from forum_bridge.store.models import Base

TABLES = ["audit", "calls", "licence_usage", "licences", "profiles", "registrations", "subscribers"]


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
