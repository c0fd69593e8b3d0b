"""Initial schema: profiles, subscribers, registrations, licences, calls, audit, licence usage.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create every table of the first release."""
    when = sa.DateTime(timezone=True)
    op.create_table(
        "profiles",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("keepalive_seconds", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_profiles"),
    )
    op.create_table(
        "subscribers",
        sa.Column("logon", sa.String(128), nullable=False),
        sa.Column("number", sa.String(64), nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("last_logon_failed", sa.Boolean(), nullable=False),
        sa.Column("last_failure_at", when, nullable=True),
        sa.Column("created_at", when, nullable=False),
        sa.ForeignKeyConstraint(["profile"], ["profiles.name"], name="fk_subscribers_profile_profiles"),
        sa.PrimaryKeyConstraint("logon", name="pk_subscribers"),
    )
    op.create_index("ix_subscribers_number", "subscribers", ["number"])
    op.create_table(
        "registrations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("logon", sa.String(128), nullable=False),
        sa.Column("contact", sa.String(512), nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("user_agent", sa.String(256), nullable=False),
        sa.Column("registered_at", when, nullable=False),
        sa.Column("last_seen", when, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_registrations"),
        sa.UniqueConstraint("node", "logon", "contact", name="uq_registrations_node_logon_contact"),
    )
    op.create_index("ix_registrations_logon", "registrations", ["logon"])
    op.create_table(
        "licences",
        sa.Column("slot", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("logon", sa.String(128), nullable=True),
        sa.Column("since", when, nullable=True),
        sa.Column("node", sa.String(128), nullable=True),
        sa.ForeignKeyConstraint(
            ["logon"], ["subscribers.logon"], name="fk_licences_logon_subscribers", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("slot", name="pk_licences"),
        sa.UniqueConstraint("logon", name="uq_licences_logon"),
    )
    op.create_table(
        "calls",
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(256), nullable=False),
        sa.Column("logon", sa.String(128), nullable=False),
        sa.Column("number", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("started_at", when, nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("node", "channel", name="pk_calls"),
    )
    op.create_index("ix_calls_logon", "calls", ["logon"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", when, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("logon", sa.String(128), nullable=False),
        sa.Column("number", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    op.create_index("ix_audit_kind", "audit", ["kind"])
    op.create_table(
        "licence_usage",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", when, nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_licence_usage"),
    )
    op.create_index("ix_licence_usage_at", "licence_usage", ["at"])


def downgrade() -> None:
    """Drop every table (the audit log goes with them)."""
    for index, table in (
        ("ix_licence_usage_at", "licence_usage"),
        ("ix_audit_kind", "audit"),
        ("ix_audit_at", "audit"),
        ("ix_calls_logon", "calls"),
        ("ix_registrations_logon", "registrations"),
        ("ix_subscribers_number", "subscribers"),
    ):
        op.drop_index(index, table_name=table)
    for table in ("licence_usage", "audit", "calls", "licences", "registrations", "subscribers", "profiles"):
        op.drop_table(table)
