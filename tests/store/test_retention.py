"""Retention: the audit log and the licence-use history are pruned by age, in bounded batches,
by the running bridge and by ``forum-bridge db prune``, alike on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from forum_bridge.adapters.asterisk.runner import Bridge
from forum_bridge.cli import main
from forum_bridge.config import Settings, load_settings
from forum_bridge.errors import ConfigError
from forum_bridge.service import BridgeService
from forum_bridge.store import operations as ops
from forum_bridge.store.models import AuditRow, UsageRow
from tests.asterisk.aio import run
from tests.asterisk.conftest import fake_ami
from tests.conftest import FakeClock, SettingsFactory

ServiceFactory = Callable[[Settings], BridgeService]


def age_history(service: BridgeService, clock: FakeClock, days: list[float]) -> None:
    """One audit line and one licence-use row for each age in ``days`` (relative to the clock)."""
    with service.database.transaction() as session:
        for age in days:
            at = clock() - timedelta(days=age)
            ops.audit(session, at, "deny", logon="21-desk", number="600", reason="emergency_only")
            session.add(UsageRow(at=at, used=1, total=2))


def counts(service: BridgeService) -> tuple[int, int]:
    with service.database.transaction() as session:
        audit = session.scalar(select(func.count()).select_from(AuditRow)) or 0
        usage = session.scalar(select(func.count()).select_from(UsageRow)) or 0
    return audit, usage


def oldest_ages(service: BridgeService, clock: FakeClock) -> tuple[float, float]:
    with service.database.transaction() as session:
        audit = session.scalar(select(func.min(AuditRow.at)))
        usage = session.scalar(select(func.min(UsageRow.at)))
    assert audit is not None and usage is not None
    return (clock() - audit) / timedelta(days=1), (clock() - usage) / timedelta(days=1)


@pytest.fixture
def svc(make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str) -> BridgeService:
    """Audit kept 30 days, licence use 7 days, on the database under test."""
    return make_service(
        make_settings(**{"database.url": database_url, "retention.audit_days": 30, "retention.usage_days": 7})
    )


def test_history_older_than_the_retention_is_deleted(svc: BridgeService, clock: FakeClock) -> None:
    clock.advance(86400 * 400)  # the rows the start-up wrote are old now too
    age_history(svc, clock, [400, 31, 29, 8, 6, 0.5])
    report = svc.prune_history()
    assert (report.audit, report.more) == (2, False)
    assert oldest_ages(svc, clock)[0] == pytest.approx(29)
    assert oldest_ages(svc, clock)[1] == pytest.approx(6)
    assert svc.prune_history().audit == 0  # nothing left to do


def test_pruning_goes_in_bounded_batches(svc: BridgeService, clock: FakeClock) -> None:
    clock.advance(86400 * 400)
    age_history(svc, clock, [100 + n for n in range(25)] + [1])
    before = counts(svc)
    first = svc.prune_history(batch=10)
    assert (first.audit, first.more) == (10, True)
    assert counts(svc)[0] == before[0] - 10
    while svc.prune_history(batch=10).more:
        pass
    assert oldest_ages(svc, clock)[0] == pytest.approx(1)


def test_the_newest_licence_use_row_is_kept_however_old(svc: BridgeService, clock: FakeClock) -> None:
    clock.advance(86400 * 400)
    svc.prune_history()
    assert counts(svc)[1] == 1  # the chart still knows how many licences were in use
    assert svc.status()["usage_history"][0]["used"] == 0


def test_zero_days_keeps_a_table_for_ever(
    make_settings: SettingsFactory, make_service: ServiceFactory, clock: FakeClock
) -> None:
    svc = make_service(make_settings(**{"retention.audit_days": 0, "retention.usage_days": 0}))
    age_history(svc, clock, [3000, 2000])
    assert svc.prune_history().audit == 0
    assert counts(svc) == (2, 3)


def test_prune_if_due_runs_hourly_and_again_at_once_while_rows_are_left(
    svc: BridgeService, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock.advance(86400 * 400)
    age_history(svc, clock, [100] * 5)
    monkeypatch.setattr("forum_bridge.service.PRUNE_BATCH", 3)
    first = svc.prune_if_due()
    assert first is not None and first.more
    second = svc.prune_if_due()  # rows were left: due again at once
    assert second is not None and not second.more
    assert svc.prune_if_due() is None  # then not for an hour


def test_prune_if_due_never_raises_when_the_database_fails(
    svc: BridgeService, caplog: pytest.LogCaptureFixture
) -> None:
    with svc.database.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE licence_usage")
    assert svc.prune_if_due() is None
    assert svc.prune_if_due() is None  # not retried at once
    assert sum("pruning history failed" in r.getMessage() for r in caplog.records) == 1


def test_retention_settings_are_checked() -> None:
    assert load_settings(environ={}).retention.audit_days == 400
    assert load_settings(environ={"FORUM_BRIDGE_RETENTION_USAGE_DAYS": "30"}).retention.usage_days == 30
    with pytest.raises(ConfigError, match=r"retention\.audit_days"):
        load_settings(environ={}, overrides={"retention.audit_days": -1})
    with pytest.raises(ConfigError, match=r"retention\.usage_days.*24 hours"):
        load_settings(environ={}, overrides={"retention.usage_days": 1})


def test_the_running_asterisk_bridge_prunes_by_itself(
    make_settings: SettingsFactory, make_service: ServiceFactory, clock: FakeClock
) -> None:
    async def scenario() -> None:
        async with fake_ami() as fake:
            settings = make_settings(
                **{
                    "asterisk.ami_port": fake.port,
                    "asterisk.ami_secret": "fake-ami-secret",
                    "asterisk.agi_port": 0,
                    "asterisk.reconnect_max": 0.2,
                    "retention.audit_days": 30,
                }
            )
            service = make_service(settings)
            clock.advance(86400 * 400)
            age_history(service, clock, [90, 60, 1])
            bridge = Bridge(settings, service)
            stop = asyncio.Event()
            task = asyncio.create_task(bridge.serve(stop))
            try:
                await asyncio.wait_for(bridge.started.wait(), 5)
                deadline = asyncio.get_running_loop().time() + 10
                while oldest_ages(service, clock)[0] > 30:
                    assert asyncio.get_running_loop().time() < deadline, "the bridge did not prune"
                    await asyncio.sleep(0.05)
            finally:
                stop.set()
                await asyncio.wait_for(task, 5)

    run(scenario())


def test_the_command_prunes_everything_due(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("FORUM_BRIDGE_")]:
        monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path}/fb.db"
    monkeypatch.setenv("FORUM_BRIDGE_DATABASE_URL", url)
    monkeypatch.setenv("FORUM_BRIDGE_RETENTION_AUDIT_DAYS", "10")
    runner = CliRunner()
    assert runner.invoke(main, ["db", "upgrade"]).exit_code == 0
    settings = load_settings()
    service = BridgeService(settings)
    clock = FakeClock()
    clock.now = service.clock()
    age_history(service, clock, [20.0] * 2500 + [1.0])  # more than one batch
    service.database.dispose()
    result = runner.invoke(main, ["db", "prune"])
    assert result.exit_code == 0, result.output
    assert "deleted 2500 audit line(s) older than 10 days" in result.output
    assert "licence-use row(s) older than 90 days" in result.output
    again = runner.invoke(main, ["db", "prune", "--json"])
    assert '"audit": 0' in again.output


def test_the_freeswitch_keepalive_clock_prunes_too(
    make_settings: SettingsFactory, make_service: ServiceFactory, clock: FakeClock
) -> None:
    from forum_bridge.adapters.freeswitch.listener import KeepaliveSweeper

    service = make_service(make_settings(**{"retention.audit_days": 30}))
    clock.advance(86400 * 400)
    age_history(service, clock, [90, 60, 1])
    KeepaliveSweeper(service).sweep_once()
    assert oldest_ages(service, clock)[0] == pytest.approx(1)
