"""The forum-bridge command for reserved licences: add --reserved, reserve, unreserve, list, status."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from forum_bridge.cli import main


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A configuration file with two licences on a fresh SQLite database."""
    for name in list(os.environ):
        if name.startswith("FORUM_BRIDGE_"):
            monkeypatch.delenv(name)
    path = tmp_path / "forum-bridge.toml"
    path.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path}/fb.db"\n[licences]\ncount = 2\n[node]\nname = "pbx1"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("FORUM_BRIDGE_CONFIG", str(path))
    return path


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result.output


def test_reserve_at_add_time_and_later(config: Path) -> None:
    assert "added lift with number 90, licence reserved" in run(
        "subscriber", "add", "lift", "--number", "90", "--reserved"
    )
    run("subscriber", "add", "21-desk", "--number", "21")
    run("subscriber", "add", "22-desk", "--number", "22")
    assert "licence reserved for 21-desk" in run("subscriber", "reserve", "21-desk")
    assert "21-desk has a reserved licence already" in run("subscriber", "reserve", "21-desk")
    doc = json.loads(run("status", "--json"))
    assert doc["licences"] == {"total": 2, "used": 0, "free": 0, "reserved": 2}
    assert {s["logon"]: s["reserved"] for s in doc["subscribers"]} == {
        "21-desk": True,
        "22-desk": False,
        "lift": True,
    }
    listed = run("subscriber", "list").splitlines()
    assert listed[0].split() == ["LOGON", "NUMBER", "PROFILE", "STATE", "LICENSED", "RESERVED"]
    assert [line.split()[-1] for line in listed[2:]] == ["yes", "no", "yes"]
    assert [s["reserved"] for s in json.loads(run("subscriber", "list", "--json"))] == [True, False, True]
    status = run("status")
    assert "Licences: 0 of 2 in use, 0 free, 2 reserved" in status
    assert "RESERVED" in status.splitlines()[4]
    assert "reservation of 21-desk given back" in run("subscriber", "unreserve", "21-desk")
    assert "21-desk has no reserved licence" in run("subscriber", "unreserve", "21-desk")
    assert json.loads(run("status", "--json"))["licences"]["free"] == 1


def test_too_many_reservations_are_one_line_and_change_nothing(config: Path) -> None:
    run("subscriber", "add", "a", "--number", "1", "--reserved")
    run("subscriber", "add", "b", "--number", "2", "--reserved")
    out = run("subscriber", "add", "c", "--number", "3", "--reserved", code=1)
    assert out.strip().splitlines() == [
        "Error: cannot reserve 1 more licence(s): 2 of 2 licences are reserved already "
        "(raise licences.count or unreserve a log-on first)"
    ]
    assert [s["logon"] for s in json.loads(run("subscriber", "list", "--json"))] == ["a", "b"]
    run("subscriber", "add", "c", "--number", "3")
    assert "reserved already" in run("subscriber", "reserve", "c", code=1)
    assert "no subscriber 'ghost'" in run("subscriber", "reserve", "ghost", code=1)


def test_a_count_below_the_reservations_stops_with_exit_2_until_unreserved(config: Path) -> None:
    run("subscriber", "add", "a", "--number", "1", "--reserved")
    run("subscriber", "add", "b", "--number", "2", "--reserved")
    config.write_text(config.read_text(encoding="utf-8").replace("count = 2", "count = 1"), encoding="utf-8")
    out = run("db", "upgrade", code=2)
    assert out.strip().splitlines() == [
        "Error: configuration key licences.count: 1 is fewer than the 2 reserved licences (a, b); "
        "raise it, or run 'forum-bridge subscriber unreserve LOGON' first"
    ]
    # A command that changes the database stops on it; a look at the status never resizes the pool.
    assert "licences.count" in run("subscriber", "add", "c", "--number", "3", code=2)
    assert json.loads(run("status", "--json"))["licences"]["total"] == 2
    # What the message says to do works, although the configuration does not apply yet.
    assert "reservation of b given back" in run("subscriber", "unreserve", "b")
    run("db", "upgrade")
    assert json.loads(run("status", "--json"))["licences"] == {
        "total": 1,
        "used": 0,
        "free": 0,
        "reserved": 1,
    }


def test_csv_import_takes_a_reserved_column(config: Path, tmp_path: Path) -> None:
    csv_file = tmp_path / "subs.csv"
    csv_file.write_text(
        "logon,number,profile,reserved\nlift,90,,yes\n21-desk,21,default,no\n", encoding="utf-8"
    )
    assert "imported 2" in run("subscriber", "import", str(csv_file))
    assert {s["logon"]: s["reserved"] for s in json.loads(run("subscriber", "list", "--json"))} == {
        "21-desk": False,
        "lift": True,
    }
