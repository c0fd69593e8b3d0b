"""An index on registrations by node and last refresh, for the keepalive sweep and its backlog.

The sweep's periodic full read and the overdue count (``/metrics``) select one node's contacts,
the count by ``last_seen`` too; with 10,000 phones a node's rows are found through this index
instead of the whole table. The sweep's confirming read (by node and log-on) uses the unique
(node, logon, contact) index that exists already.

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
    """Create ``ix_registrations_node_last_seen`` (the rows stay as they are)."""
    op.create_index("ix_registrations_node_last_seen", "registrations", ["node", "last_seen"])


def downgrade() -> None:
    """Drop the index again."""
    op.drop_index("ix_registrations_node_last_seen", table_name="registrations")
