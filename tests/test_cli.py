"""The forum-bridge command: help everywhere, tables and JSON, one-line errors with exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from forum_bridge.cli import main
from forum_bridge.config import load_settings
from forum_bridge.core import LoggedOn
from forum_bridge.service import BridgeService, utcnow
from forum_bridge.store.database import HEAD_REVISION


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner whose configuration file points at a fresh SQLite database with two licences."""
    for name in list(os.environ):
        if name.startswith("FORUM_BRIDGE_"):
            monkeypatch.delenv(name)
    config = tmp_path / "forum-bridge.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/fb.db"\n[licences]\ncount = 2\n[node]\nname = "pbx1"\n'
        '[profiles.short]\nkeepalive = 30\n[asterisk]\nami_secret = "never-shown"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("FORUM_BRIDGE_CONFIG", str(config))
    runner = CliRunner()
    result = runner.invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    return runner


def run(cli: CliRunner, *args: str, code: int = 0, input: str | None = None) -> str:
    result = cli.invoke(main, list(args), input=input)
    assert result.exit_code == code, result.output
    return result.output


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        found.append(path)
        if isinstance(command, click.Group):
            found += all_commands(command, path)
    return found


def test_every_command_has_help() -> None:
    runner = CliRunner()
    commands = all_commands(main)
    assert ("subscriber", "import") in commands and ("licences", "reset") in commands
    for path in commands:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Usage:" in result.output
        command = main
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        assert command.help, f"{' '.join(path)} has no help text"


def test_status_json_has_the_documented_shape(cli: CliRunner, tmp_path: Path) -> None:
    run(cli, "subscriber", "add", "21-desk", "--number", "21")
    run(cli, "subscriber", "add", "22-soft", "--number", "21", "--profile", "short")
    service = BridgeService(load_settings())
    service.apply(LoggedOn("21-desk", at=utcnow(), contact="sip:21-desk@127.0.0.1:5081"))
    service.authorize("21-desk", "600")
    service.database.dispose()
    doc = json.loads(run(cli, "status", "--json"))
    assert doc["licences"] == {"total": 2, "used": 1, "free": 1, "reserved": 0}
    assignment = doc["assignments"][0]
    assert {"slot", "logon", "number", "since"} <= set(assignment)
    assert (assignment["slot"], assignment["logon"], assignment["number"]) == (1, "21-desk", "21")
    subscribers = {s["logon"]: s for s in doc["subscribers"]}
    for s in subscribers.values():
        assert {"logon", "number", "profile", "state", "licensed", "last_seen", "contact"} <= set(s)
    assert subscribers["21-desk"]["state"] == "logged_on" and subscribers["21-desk"]["licensed"] is True
    assert subscribers["21-desk"]["contact"] == "sip:21-desk@127.0.0.1:5081"
    assert (subscribers["22-soft"]["state"], subscribers["22-soft"]["licensed"]) == ("logged_off", False)
    assert subscribers["22-soft"]["profile"] == "short"
    table = run(cli, "status")
    assert "1 of 2 in use" in table and "21-desk" in table and "logged_off" in table


def test_check_takes_no_licence(cli: CliRunner) -> None:
    run(cli, "subscriber", "add", "21-desk", "--number", "21")
    doc = json.loads(run(cli, "check", "21-desk", "112", "--json"))
    assert (doc["allowed"], doc["reason"], doc["emergency"]) == (True, "emergency", True)
    doc = json.loads(run(cli, "check", "21-desk", "600", "--json"))
    assert (doc["allowed"], doc["reason"]) == (False, "not_logged_on")
    assert "denied, not_logged_on" in run(cli, "check", "21-desk", "600")
    assert json.loads(run(cli, "status", "--json"))["licences"]["used"] == 0


def test_subscriber_and_profile_commands(cli: CliRunner, tmp_path: Path) -> None:
    run(cli, "profile", "set", "night", "--keepalive", "600")
    profiles = {p["name"]: p["keepalive"] for p in json.loads(run(cli, "profile", "list", "--json"))}
    assert profiles == {"default": 120, "night": 600, "short": 30}
    csv_file = tmp_path / "subs.csv"
    csv_file.write_text("logon,number,profile\n31-desk,31,night\n32-desk,32\n", encoding="utf-8")
    assert "imported 2" in run(cli, "subscriber", "import", str(csv_file))
    listed = json.loads(run(cli, "subscriber", "list", "--json"))
    assert [(s["logon"], s["profile"]) for s in listed] == [("31-desk", "night"), ("32-desk", "default")]
    run(cli, "subscriber", "remove", "31-desk")
    assert "31-desk" not in run(cli, "subscriber", "list")


def test_reset_asks_unless_yes(cli: CliRunner) -> None:
    out = run(cli, "licences", "reset", input="n\n", code=1)
    assert "Aborted" in out
    assert "0 licence(s) freed" in run(cli, "licences", "reset", input="y\n")
    assert "0 licence(s) freed" in run(cli, "licences", "reset", "--yes")
    audit = json.loads(run(cli, "audit", "--json"))
    assert [a["kind"] for a in audit] == ["reset", "reset"]


def test_errors_are_one_line_without_traceback(cli: CliRunner, tmp_path: Path) -> None:
    for args, needle in [
        (("subscriber", "add", "a b", "--number", "1"), "invalid log-on"),
        (("subscriber", "add", "x", "--number", "1", "--profile", "nope"), "no profile named"),
        (("subscriber", "remove", "ghost"), "no subscriber"),
    ]:
        out = run(cli, *args, code=1)
        assert needle in out and "Traceback" not in out
        assert len(out.strip().splitlines()) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("41,41\nbad name,42\n", encoding="utf-8")
    assert "line 2" in run(cli, "subscriber", "import", str(bad), code=1)
    assert json.loads(run(cli, "subscriber", "list", "--json")) == []


def test_bad_configuration_exits_2_naming_the_key(cli: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[licences]\ncount = 'lots'\n", encoding="utf-8")
    out = run(cli, "--config", str(bad), "status", code=2)
    assert "licences.count" in out and len(out.strip().splitlines()) == 1


def test_an_empty_database_gets_the_schema_on_first_use(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/new.db"
    out = CliRunner().invoke(main, ["--database", url, "subscriber", "add", "21-desk", "--number", "21"])
    assert out.exit_code == 0, out.output
    assert CliRunner().invoke(main, ["--database", url, "db", "current"]).output.strip() == HEAD_REVISION
    doc = json.loads(CliRunner().invoke(main, ["--database", url, "status", "--json"]).output)
    assert [s["logon"] for s in doc["subscribers"]] == ["21-desk"]


def test_an_older_schema_is_not_migrated_behind_the_administrators_back(tmp_path: Path) -> None:
    from forum_bridge.store.database import Database

    url = f"sqlite:///{tmp_path}/old.db"
    db = Database(url)
    db.upgrade()
    with db.engine.begin() as connection:  # pretend the file comes from an older release
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    db.dispose()
    out = CliRunner().invoke(main, ["--database", url, "status"])
    assert out.exit_code == 1
    assert "at revision 0000" in out.output
    assert "forum-bridge db upgrade" in out.output


def test_secrets_never_printed(cli: CliRunner) -> None:
    for args in (("status",), ("status", "--json"), ("profile", "list"), ("audit",)):
        assert "never-shown" not in run(cli, *args)
