"""Measure: how much the audit log and the licence-use history add to the database per month.

    .venv/bin/python bench/bench_db_growth.py [--postgres URL] [--phones 1000] [--days 30]

Writes, through the bridge's own store, what ``--phones`` phones produce in ``--days`` days under
a deliberately busy model: each phone and day one licence taken and one freed (two audit lines and
two licence-use rows), one call denied and one failed log-on (two more audit lines), with realistic
names, numbers and addresses. Then prints the growth of the two tables, indexes included: the file
growth on SQLite, ``pg_total_relation_size`` on PostgreSQL. The README's "Database size" figures
come from this command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from forum_bridge.store.models import UsageRow

AUDIT_PER_PHONE_DAY = 4
USAGE_PER_PHONE_DAY = 2


def _size(database: Database) -> int:
    if database.dialect == "sqlite":
        raw = database.engine.raw_connection()  # outside the store's BEGIN IMMEDIATE
        try:
            cursor = raw.cursor()
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            values = []
            for pragma in ("page_count", "freelist_count", "page_size"):
                cursor.execute(f"PRAGMA {pragma}")
                values.append(int(cursor.fetchone()[0]))
            pages, free, size = values
            return (pages - free) * size
        finally:
            raw.close()
    with database.engine.connect() as connection:
        connection.commit()
        query = "SELECT pg_total_relation_size('audit') + pg_total_relation_size('licence_usage')"
        return int(connection.execute(text(query)).scalar() or 0)


def _write(database: Database, phones: int, days: int) -> tuple[int, int]:
    start = datetime(2026, 1, 5, 7, 0, tzinfo=UTC)
    audit = usage = 0
    for day in range(days):
        with database.transaction() as session:
            for phone in range(phones):
                logon, at = f"{2000 + phone}-desk", start + timedelta(days=day, seconds=phone * 7)
                number = f"0049301234{phone % 1000:03d}"
                ops.audit(
                    session,
                    at,
                    "acquire",
                    logon=logon,
                    number=number,
                    reason="outbound",
                    node="pbx1",
                    detail=f"slot {phone % 400 + 1}",
                )
                ops.audit(
                    session,
                    at + timedelta(hours=10),
                    "release",
                    logon=logon,
                    reason="keepalive",
                    node="pbx1",
                    detail=f"slot {phone % 400 + 1}",
                )
                ops.audit(
                    session,
                    at + timedelta(hours=2),
                    "deny",
                    logon=logon,
                    number=number,
                    reason="emergency_only",
                    node="pbx1",
                    detail="outbound",
                )
                ops.audit(
                    session,
                    at + timedelta(hours=1),
                    "logon_failed",
                    logon=logon,
                    reason="wrong_password",
                    node="pbx1",
                    detail=f"192.0.2.{phone % 250}:5060",
                )
                session.add(UsageRow(at=at, used=phone % 400, total=400))
                session.add(UsageRow(at=at + timedelta(hours=10), used=phone % 400, total=400))
                audit, usage = audit + AUDIT_PER_PHONE_DAY, usage + USAGE_PER_PHONE_DAY
    return audit, usage


def measure(url: str, phones: int, days: int) -> dict[str, float]:
    """Growth of the two history tables for ``phones`` phones over ``days`` days on ``url``."""
    database = Database(url)
    try:
        database.upgrade()
        before = _size(database)
        audit, usage = _write(database, phones, days)
        grown = _size(database) - before
    finally:
        database.dispose()
    return {
        "audit_rows": audit,
        "usage_rows": usage,
        "bytes": grown,
        "bytes_per_audit_and_usage_day_per_phone": grown / (phones * days),
        "mb_per_1000_phones_per_month": grown / phones * 1000 / days * 30 / 1e6,
    }


def main() -> int:
    """Print the growth on SQLite (and PostgreSQL with ``--postgres``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", metavar="URL", help="also measure on this empty PostgreSQL database")
    parser.add_argument("--phones", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        targets = [("sqlite", f"sqlite:///{Path(directory) / 'growth.db'}")]
        if args.postgres:
            targets.append(("postgresql", args.postgres))
        for name, url in targets:
            result = measure(url, args.phones, args.days)
            print(
                f"{name}: {args.phones} phones x {args.days} days: {result['audit_rows']} audit lines, "
                f"{result['usage_rows']} licence-use rows, {result['bytes'] / 1e6:.1f} MB; "
                f"{result['mb_per_1000_phones_per_month']:.1f} MB per 1,000 phones per month"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
