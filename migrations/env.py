"""Alembic environment: runs migrations on the engine forum_bridge hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, create_engine

from forum_bridge.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    """Migrate through the caller's engine (or ``sqlalchemy.url`` when run by the alembic tool)."""
    engine: Engine | None = config.attributes.get("engine")
    if engine is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        context.run_migrations()


run_migrations_online()
