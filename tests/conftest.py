"""Fixtures shared by the whole suite: a controllable clock, settings, and real databases.

PostgreSQL is real: a throwaway server is started from the Debian packages on a free port, once
per test session. When it cannot start, the tests that need it fail with the reason; they never
skip silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from forum_bridge.config import Settings, load_settings
from forum_bridge.service import BridgeService
from forum_bridge.store.database import Database
from tests.sandbox.asterisk import free_tcp_port


class FakeClock:
    """A clock the test moves by hand, so keepalive rules are tested without sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 24, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        """Move the clock forward and return the new time."""
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """A fresh fake clock at a fixed morning."""
    return FakeClock()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds, failing after ``timeout`` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# --- PostgreSQL ---------------------------------------------------------------------------------


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL server."""

    host: str
    port: int
    user: str

    def url(self, database: str) -> str:
        """A SQLAlchemy URL for ``database`` on this server."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _postgres_bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if not candidates:
        pytest.fail(
            "PostgreSQL server binaries are missing (Debian package 'postgresql'); "
            "the test command installs them: run the README's test command",
            pytrace=False,
        )
    return candidates[0].parent


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for this test session (or FORUM_BRIDGE_TEST_POSTGRES, host:port:user)."""
    external = os.environ.get("FORUM_BRIDGE_TEST_POSTGRES")
    if external:
        host, port, user = external.split(":")
        yield PostgresServer(host, int(port), user)
        return
    bindir = _postgres_bindir()
    workdir = Path(tempfile.mkdtemp(prefix="forum-bridge-pg-"))
    data, sockets = workdir / "data", workdir / "run"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root; Debian's package creates the postgres user.
        if shutil.which("runuser") is None:
            pytest.fail("runuser is missing; cannot start PostgreSQL as root", pytrace=False)
        shutil.chown(workdir, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_tcp_port()

    def pg(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, **kwargs)

    init = pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    if init.returncode != 0:
        pytest.fail(f"initdb failed: {init.stderr.strip()[-500:]}", pytrace=False)
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
    start = pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-l",
        str(workdir / "log"),
        "-w",
        "-t",
        "60",
        "start",
    )
    if start.returncode != 0:
        log = (workdir / "log").read_text(errors="replace")[-800:] if (workdir / "log").exists() else ""
        pytest.fail(f"PostgreSQL did not start: {start.stderr.strip()[-300:]} {log}", pytrace=False)
    try:
        yield PostgresServer("127.0.0.1", port, "postgres")
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(workdir, ignore_errors=True)


_db_counter = 0


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    global _db_counter
    _db_counter += 1
    return postgres_server.create_database(f"fb_test_{os.getpid()}_{_db_counter}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file for one test."""
    return f"sqlite:///{tmp_path / 'forum-bridge.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Run a test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


# --- settings and service -------------------------------------------------------------------------


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(sqlite_url: str) -> SettingsFactory:
    """Build settings from dotted overrides, ignoring the caller's environment."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"database.url": sqlite_url, "node.name": "pbx1", "licences.count": 2}
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_settings(environ={}, overrides=values)

    return build


@pytest.fixture
def make_service(clock: FakeClock) -> Iterator[Callable[[Settings], BridgeService]]:
    """Upgrade the settings' database and return a started service on the fake clock."""
    made: list[Database] = []

    def build(settings: Settings) -> BridgeService:
        database = Database(settings.database_url)
        made.append(database)
        database.upgrade()
        service = BridgeService(settings, database, clock=clock)
        service.start()
        return service

    yield build
    for database in made:
        database.dispose()


@pytest.fixture
def databases() -> Iterator[list[Database]]:
    """A list the test appends the databases it opens to; each is disposed of afterwards."""
    made: list[Database] = []
    yield made
    for database in made:
        database.dispose()
