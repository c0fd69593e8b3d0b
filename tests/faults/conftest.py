"""Fixtures of the fault suite: a PostgreSQL server of its own that a test may stop and start."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _postgres_bindir
from tests.sandbox.asterisk import free_tcp_port


class StoppablePostgres:
    """A throwaway PostgreSQL server (Debian's binaries) that can be stopped and started again."""

    def __init__(self) -> None:
        self.bindir = _postgres_bindir()
        self.workdir = Path(tempfile.mkdtemp(prefix="forum-bridge-pg-fault-"))
        self.data, self.sockets = self.workdir / "data", self.workdir / "run"
        self.sockets.mkdir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_tcp_port()
        init = self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        if init.returncode != 0:
            pytest.fail(f"initdb failed: {init.stderr.strip()[-500:]}", pytrace=False)

    @property
    def url(self) -> str:
        """The URL of the database ``postgres`` on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [*self.as_user, str(self.bindir / tool), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> None:
        """Start (again, on the same port); fail the test when it does not come up."""
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.workdir / "log")
        started = self._pg(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "-t", "60", "start"
        )
        if started.returncode != 0:
            pytest.fail(f"PostgreSQL did not start: {started.stderr.strip()[-300:]}", pytrace=False)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` ends the sessions, ``immediate`` is a crash)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop and delete everything."""
        self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def stoppable_postgres() -> Iterator[StoppablePostgres]:
    """A started PostgreSQL server of this test's own."""
    server = StoppablePostgres()
    server.start()
    try:
        yield server
    finally:
        server.remove()
