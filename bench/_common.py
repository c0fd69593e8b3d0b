"""What every benchmark script shares: options, the output convention, databases to run on.

Each ``bench_<name>.py`` prints one JSON object per line per figure on stdout::

    {"figure": "...", "unit": "...", "median": x, "runs": [...], "floor": x_or_null,
     "floor_note": "...", "target": "...", "met": true/false/null}

and human text on stderr. ``bench/run.py`` collects these lines into the table of bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def options(description: str, *, postgres: bool = True) -> argparse.Namespace:
    """The options every benchmark takes: --runs N, --size small|full and --postgres URL."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported")
    parser.add_argument(
        "--size", choices=("small", "full"), default="full", help="small: a quick correctness smoke test"
    )
    if postgres:
        parser.add_argument(
            "--postgres", help="URL of an empty PostgreSQL database; the figures are then also measured on it"
        )
    return parser.parse_args()


def say(text: str) -> None:
    """Human progress text (stderr, so stdout stays machine-readable)."""
    print(text, file=sys.stderr, flush=True)


def emit(
    figure: str,
    unit: str,
    runs: list[float],
    *,
    floor: float | None,
    floor_note: str,
    target: str,
    met: Callable[[float], bool] | None,
) -> dict[str, Any]:
    """Print one figure line (the median of ``runs``) and return it."""
    median = statistics.median(runs) if runs else None
    line = {
        "figure": figure,
        "unit": unit,
        "median": None if median is None else round(median, 4),
        "runs": [round(r, 4) for r in runs],
        "floor": None if floor is None else round(floor, 4),
        "floor_note": floor_note,
        "target": target,
        "met": None if met is None or median is None else bool(met(median)),
    }
    print(json.dumps(line), flush=True)
    say(f"{figure}: median {line['median']} {unit} (runs {line['runs']}); floor {line['floor']}; {target}")
    return line


def databases(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(name, URL) of each database to measure on; SQLite's URL is made fresh per run (None here)."""
    targets: list[tuple[str, str | None]] = [("sqlite", None)]
    if getattr(args, "postgres", None):
        targets.append(("postgresql", args.postgres))
    return targets


@contextlib.contextmanager
def database_for_run(url: str | None) -> Iterator[str]:
    """A fresh, empty database for one run: a new SQLite file, or the PostgreSQL one emptied after."""
    from forum_bridge.store.database import Database

    if url is None:
        with tempfile.TemporaryDirectory(prefix="forum-bridge-bench-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
        return
    try:
        yield url
    finally:
        database = Database(url)
        database.downgrade()
        database.dispose()


def provision(url: str, *, subscribers: int, licences: int, node: str = "bench") -> Any:
    """Create the schema, ``subscribers`` log-ons u0.. (all logged on) and ``licences`` licences."""
    from forum_bridge.config import load_settings
    from forum_bridge.service import BridgeService
    from forum_bridge.store.database import Database
    from forum_bridge.store.operations import Registration

    settings = load_settings(
        environ={}, overrides={"database.url": url, "licences.count": licences, "node.name": node}
    )
    database = Database(url)
    database.upgrade()
    service = BridgeService(settings, database)
    service.start()
    service.import_subscribers("".join(f"u{i},{10000 + i}\n" for i in range(subscribers)))
    service.resync([Registration(f"u{i}", f"sip:u{i}@192.0.2.1:5060") for i in range(subscribers)], [])
    return service


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a PostgreSQL server from Debian's binaries for the benchmarks; yield an admin URL.

    Default settings (fsync on), on a free port, in a temporary directory removed afterwards.
    """
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if not candidates:
        raise SystemExit("PostgreSQL server binaries are missing (Debian package 'postgresql')")
    bindir = candidates[0].parent
    workdir = Path(tempfile.mkdtemp(prefix="forum-bridge-bench-pg-"))
    data, sockets = workdir / "data", workdir / "run"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options_ = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections=100"
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options_, "-l", str(workdir / "log"), "-w", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(Exception):
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(workdir, ignore_errors=True)


def create_database(admin_url: str, name: str) -> str:
    """Create an empty database on the server of ``admin_url``; return its URL."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def wait_for_line(process: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The first line a child prints on stdout (its port), or SystemExit when it does not come."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = process.stdout.readline()
    if not line or time.monotonic() > deadline:
        raise SystemExit(f"a benchmark helper did not start (exit {process.poll()})")
    return line.strip()
