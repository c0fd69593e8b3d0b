"""Reserved licences and the shared pool-pressure warning state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``subscribers.reserved`` (existing log-ons float) and the ``pool_state`` table."""
    # A plain ADD COLUMN, not a batch copy: on SQLite a copy would drop and recreate ``subscribers``,
    # and with foreign keys on, dropping it would free every licence (ON DELETE SET NULL).
    op.add_column(
        "subscribers", sa.Column("reserved", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.create_index("ix_subscribers_reserved", "subscribers", ["reserved"])
    pool_state = op.create_table(
        "pool_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("warned", sa.Boolean(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_pool_state"),
    )
    # The one row every bridge locks before it looks at the pool (see store.operations.pool_warning).
    op.bulk_insert(pool_state, [{"id": 1, "warned": False, "changed_at": None}])


def downgrade() -> None:
    """Drop the reservations (every log-on floats again) and the warning state."""
    op.drop_table("pool_state")
    op.drop_index("ix_subscribers_reserved", table_name="subscribers")
    # SQLite 3.35+ drops a column in place; no table copy, so no foreign-key cascade either.
    op.drop_column("subscribers", "reserved")
