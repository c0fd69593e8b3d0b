"""The licence pool's counts in one row, so taking a licence no longer counts the pool.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``licence_pool`` and fill its one row from a full count of the pool as it is now."""
    op.create_table(
        "licence_pool",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.Column("reserved", sa.Integer(), nullable=False),
        sa.Column("reserved_used", sa.Integer(), nullable=False),
        sa.Column("warned", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_licence_pool"),
    )
    # The same statement the bridge runs to recount the row (store.operations.recount_pool).
    op.execute(
        "INSERT INTO licence_pool (id, total, used, reserved, reserved_used, warned) SELECT 1,"
        " (SELECT count(*) FROM licences),"
        " (SELECT count(*) FROM licences WHERE logon IS NOT NULL),"
        " (SELECT count(*) FROM subscribers WHERE reserved),"
        " (SELECT count(*) FROM licences l JOIN subscribers s ON s.logon = l.logon WHERE s.reserved),"
        " COALESCE((SELECT warned FROM pool_state WHERE id = 1), false)"
    )


def downgrade() -> None:
    """Drop the counts (the pool is counted from the licence rows again)."""
    op.drop_table("licence_pool")
