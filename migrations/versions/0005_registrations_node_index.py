"""An index on registrations by node, for the keepalive sweep's reads of one node's contacts.

The sweep's periodic full read, its confirming read and the overdue count (``/metrics``) select
one node's contacts. The index holds ``node`` only: a ``last_seen`` in it would make every
keepalive's update of that column an index update too (on PostgreSQL, no more in-place "HOT"
updates), thousands a minute with 10,000 phones, to speed up a count taken per scrape. The
confirming read by node and log-on can also use the unique (node, logon, contact) index.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create ``ix_registrations_node`` (the rows stay as they are)."""
    op.create_index("ix_registrations_node", "registrations", ["node"])


def downgrade() -> None:
    """Drop the index again."""
    op.drop_index("ix_registrations_node", table_name="registrations")
