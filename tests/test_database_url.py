"""A mistyped database URL gets one line and exit code 2, and no piece of its password is shown.

Run through the installed command in a child process, as an operator runs it: what reaches the
terminal (stdout and stderr) and, for ``run``, the log is what is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forum_bridge.config import load_settings, redact_url_secrets, url_secrets
from tests.conftest import PostgresServer
from tests.sandbox.asterisk import free_tcp_port

ROOT = Path(__file__).resolve().parents[1]


def forum_bridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command as a child process with a clean FORUM_BRIDGE_* environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", "from forum_bridge.cli import entry; entry()", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    out = (result.stdout + result.stderr).strip()
    assert "\n" not in out, out
    assert "Traceback" not in out
    return out


@pytest.mark.parametrize(
    "command", [["status"], ["db", "upgrade"], ["run", "asterisk"], ["run", "freeswitch"]]
)
def test_an_unescaped_at_in_the_password_is_refused_without_showing_it(command: list[str]) -> None:
    port = free_tcp_port()
    url = f"postgresql://bridge:pw@SecretTail99@127.0.0.1:{port}/forum_bridge"
    result = forum_bridge(
        "--database", url, *command, env={"FORUM_BRIDGE_ASTERISK_AMI_SECRET": "ami-Secret-1"}
    )
    out = one_line(result)
    assert result.returncode == 2, out
    assert "database.url" in out and "%40" in out
    assert "SecretTail99" not in out and "pw@" not in out


def test_the_same_url_from_the_environment_is_refused_alike() -> None:
    url = f"postgresql://bridge:pw@SecretTail99@127.0.0.1:{free_tcp_port()}/forum_bridge"
    result = forum_bridge("status", env={"FORUM_BRIDGE_DATABASE_URL": url})
    out = one_line(result)
    assert result.returncode == 2 and "SecretTail99" not in out


def test_a_port_that_is_not_a_number_is_one_line_with_exit_code_2() -> None:
    result = forum_bridge("--database", "postgresql://bridge:SecretPw42@127.0.0.1:fivefour/fb", "status")
    out = one_line(result)
    assert result.returncode == 2
    assert out == "Error: configuration key database.url: the port is not a number"


def test_a_database_that_cannot_be_reached_is_named_without_the_password() -> None:
    # A colon and a slash in the password, unescaped: a parser may split it anywhere.
    url = f"postgresql://bridge:Secret:Part/Two99@127.0.0.1:{free_tcp_port()}/fb"
    result = forum_bridge("--database", url, "status")
    out = one_line(result)
    assert result.returncode == 1
    assert out.startswith("Error: cannot open the database")
    for piece in ("Secret", "Part", "Two99"):
        assert piece not in out


def test_a_wrong_password_is_reported_without_it(postgres_server: PostgresServer) -> None:
    # The test server trusts every login, so ask for a user that does not exist instead: the
    # driver's own words come through, the password does not.
    url = f"postgresql://nobody-here:Pass@Word77@{postgres_server.host}:{postgres_server.port}/postgres"
    result = forum_bridge("--database", url.replace("Pass@Word77", "Pass%40Word77"), "status")
    out = one_line(result)
    assert result.returncode == 1
    assert "nobody-here" in out and "Word77" not in out and "Pass%40" not in out


def test_url_secrets_covers_the_pieces_a_parser_could_report() -> None:
    url = "postgresql://bridge:pw@SecretTail99@db.example.net:5432/fb"
    found = url_secrets(url)
    assert "pw@SecretTail99" in found and "SecretTail99" in found
    assert "SecretTail99@db.example.net:5432" not in redact_url_secrets(
        "failed to resolve host 'SecretTail99@db.example.net:5432'", url
    )
    assert url_secrets("postgresql://bridge@db/fb") == []
    assert url_secrets("sqlite:////var/lib/forum-bridge/forum-bridge.db") == []
    assert "p%40ss-word" in url_secrets("postgresql://u:p%40ss-word@h/fb")
    assert "p@ss-word" in url_secrets("postgresql://u:p%40ss-word@h/fb")


def test_the_database_password_is_one_of_the_secrets_the_log_redacts() -> None:
    settings = load_settings(
        environ={
            "FORUM_BRIDGE_DATABASE_URL": "postgresql://u:Hidden%2FPw55@db/fb",
            "FORUM_BRIDGE_WEB_TOKEN": "t" * 20,
        }
    )
    secrets = settings.secret_values()
    assert "Hidden/Pw55" in secrets and "Hidden%2FPw55" in secrets and "t" * 20 in secrets


def test_an_at_sign_in_a_sqlite_file_name_is_fine(tmp_path: Path) -> None:
    result = forum_bridge("--database", f"sqlite:///{tmp_path}/pbx@site/fb.db", "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pbx@site" / "fb.db").exists()


def test_a_slash_in_the_password_before_an_at_is_refused_too() -> None:
    result = forum_bridge("--database", "postgresql://bridge:Pa/rt@Tail77@127.0.0.1:5/fb", "status")
    out = one_line(result)
    assert result.returncode == 2 and "Tail77" not in out and "rt@" not in out
