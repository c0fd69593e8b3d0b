"""``forum-bridge status`` reads through the database driver alone when the schema is current.

Its start-up imports (SQLAlchemy above all) were most of the time an operator waits for it; the
document must stay exactly the one the running bridge serves, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forum_bridge.config import Settings
from forum_bridge.service import BridgeService
from tests.conftest import SettingsFactory
from tests.status_population import populated

ROOT = Path(__file__).resolve().parent.parent

# Runs the command in a fresh interpreter and reports which heavy modules it imported.
PROBE = """
import json, sys
from click.testing import CliRunner
from forum_bridge.cli import main
from forum_bridge.logsetup import configure_logging
configure_logging("ERROR")  # as the console script does
result = CliRunner().invoke(main, sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"sqlalchemy", "alembic", "panoramisk", "gevent", "psycopg",
                                                         "prometheus_client", "phonenumbers"})
print(json.dumps({"code": result.exit_code, "output": result.output, "heavy": heavy}))
"""


def run_cli(*args: str, licences: int = 3) -> dict[str, Any]:
    """``forum-bridge ARGS`` in a fresh interpreter: exit code, output and heavy modules imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    env["FORUM_BRIDGE_NODE_NAME"] = "pbx1"
    env["FORUM_BRIDGE_LICENCES_COUNT"] = str(licences)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without what depends on the reader's clock."""
    return {k: v for k, v in doc.items() if k not in ("generated_at", "usage_history")}


@pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_status_json_reads_without_sqlalchemy_and_equals_the_bridges_document(
    make_settings: SettingsFactory,
    make_service: Callable[[Settings], BridgeService],
    database_url: str,
) -> None:
    service = populated(make_settings, make_service, database_url)
    result = run_cli("--database", database_url, "status", "--json")
    assert result["code"] == 0, result["output"]
    assert result["heavy"] == []
    printed = json.loads(result["output"])
    expected = service.status()
    assert comparable(printed) == comparable(expected)
    assert printed["summary"] == {
        "subscribers": 4,
        "logged_on": 2,
        "logged_off": 1,
        "logon_failed": 1,
        "unmanaged": 1,
    }
    assert printed["licences"] == {"total": 3, "used": 2, "free": 1, "reserved": 1}
    by_logon = {s["logon"]: s for s in printed["subscribers"]}
    assert by_logon["21-desk"]["contact"] == "sip:21-desk@192.0.2.99:5060"  # the latest contact
    assert by_logon["21-desk"]["last_seen"] == "2026-11-24T08:00:01Z"
    # The table reads the same way; the search of the page takes % and _ literally.
    table = run_cli("--database", database_url, "status")
    assert table["code"] == 0 and table["heavy"] == [] and "21-desk" in table["output"]
    assert [s["logon"] for s in service.status(search="_x%")["subscribers"]] == ["23_x%"]
    assert service.status(search="x_")["subscriber_page"]["matched"] == 0
    # Another licences.count than the database holds: a look at the status never resizes the pool.
    other = run_cli("--database", database_url, "status", "--json", licences=4)
    assert other["code"] == 0 and other["heavy"] == []
    assert json.loads(other["output"])["licences"]["total"] == 3


def test_help_imports_nothing_heavy() -> None:
    result = run_cli("--help")
    assert result["code"] == 0 and result["heavy"] == []


def test_a_schema_not_at_head_takes_the_full_path(tmp_path: Path) -> None:
    # No file yet: the full path creates the schema (and so imports SQLAlchemy and Alembic).
    url = f"sqlite:///{tmp_path}/new.db"
    result = run_cli("--database", url, "status", "--json")
    assert result["code"] == 0, result["output"]
    assert json.loads(result["output"])["subscribers"] == []
    assert "sqlalchemy" in result["heavy"]
    # Now at head: the short path.
    assert run_cli("--database", url, "status", "--json")["heavy"] == []


def test_a_bad_postgres_url_is_explained_as_before() -> None:
    result = run_cli("--database", "postgresql://fb:Secret@Tail99@127.0.0.1:1/fb", "status")
    assert result["code"] == 2
    assert "%40" in result["output"] and "Tail99" not in result["output"]
    result = run_cli("--database", "postgresql://fb:Secret99@127.0.0.1:1/fb", "status")
    assert result["code"] == 1
    assert result["output"].startswith("Error: cannot open the database")
    assert "Secret99" not in result["output"] and len(result["output"].strip().splitlines()) == 1
