"""Commands that only read never resize the licence pool the running bridges share.

Every command used to apply the configuration to the database first. ``forum-bridge --database
URL status`` without a configuration file thus rewrote a pool of 10 licences to the default 4,
releasing the licences of slots 5-10 under live calls. Now only ``run``, ``db upgrade`` and the
commands that change subscribers, profiles or licences apply it, and those only from a
configuration file (see README, "Which commands apply the configuration").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from forum_bridge.cli import main
from forum_bridge.config import load_settings
from forum_bridge.core import LoggedOn
from forum_bridge.service import BridgeService, utcnow
from forum_bridge.store.database import Database

LOGONS = [f"{40 + i}-desk" for i in range(8)]


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FORUM_BRIDGE_"):
            monkeypatch.delenv(name)


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result.output


def pool_of_ten(url: str) -> BridgeService:
    """Ten licences, eight of them held (slots 1-8), as a running bridge with count = 10 leaves it."""
    settings = load_settings(environ={}, overrides={"database.url": url, "licences.count": 10})
    database = Database(url)
    database.upgrade()
    service = BridgeService(settings, database, watch_pool=False)
    service.start()
    service.import_subscribers("".join(f"{logon},{40 + i}\n" for i, logon in enumerate(LOGONS)))
    for logon in LOGONS:
        service.apply(LoggedOn(logon, at=utcnow(), contact=f"sip:{logon}@127.0.0.1:5090"))
        assert service.authorize(logon, "600").allowed
    return service


def slots(service: BridgeService) -> tuple[dict[str, int], list[tuple[int, str]]]:
    status = service.status()
    return status["licences"], [(a["slot"], a["logon"]) for a in status["assignments"]]


def test_read_only_commands_with_only_a_database_url_leave_the_pool_alone(database_url: str) -> None:
    service = pool_of_ten(database_url)
    try:
        before = slots(service)
        assert before[0]["total"] == 10 and len(before[1]) == 8
        doc = json.loads(cli("--database", database_url, "status", "--json"))
        assert doc["licences"]["total"] == 10 and len(doc["assignments"]) == 8
        cli("--database", database_url, "status")
        cli("--database", database_url, "subscriber", "list", "--json")
        cli("--database", database_url, "profile", "list")
        cli("--database", database_url, "audit", "--json")
        checked = json.loads(cli("--database", database_url, "check", LOGONS[0], "600", "--json"))
        assert checked["reason"] == "licensed"
        assert slots(service) == before
        assert not [a for a in service.audit_log(100) if a["reason"] == "licence_removed"]
    finally:
        service.database.dispose()


def test_a_change_without_a_configuration_file_does_not_resize_the_pool(database_url: str) -> None:
    service = pool_of_ten(database_url)
    try:
        before = slots(service)
        cli("--database", database_url, "subscriber", "add", "50-desk", "--number", "50")
        cli("--database", database_url, "subscriber", "remove", "50-desk")
        assert slots(service) == before
    finally:
        service.database.dispose()


def test_a_configuration_file_is_applied_by_changes_and_db_upgrade_not_by_status(
    database_url: str, tmp_path: Path
) -> None:
    service = pool_of_ten(database_url)
    config = tmp_path / "forum-bridge.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n[licences]\ncount = 12\n', encoding="utf-8")
    try:
        before = slots(service)
        cli("--config", str(config), "status")
        cli("--config", str(config), "check", LOGONS[0], "600")
        assert slots(service) == before
        cli("--config", str(config), "db", "upgrade")
        licences, held = slots(service)
        assert licences["total"] == 12 and held == before[1]
    finally:
        service.database.dispose()


def test_an_empty_database_still_gets_its_schema_and_slots_from_status(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    doc = json.loads(cli("--database", url, "status", "--json"))
    assert doc["licences"]["total"] == 4  # the default count: nothing existed to rewrite
