"""Benchmark: reading the state with 10,000 subscribers: ``status --json``, the page, ``/metrics``.

    .venv/bin/python bench/bench_status.py --runs 5 [--size small|full] [--postgres URL]

The database holds ``full`` = 10,000 provisioned subscribers (``small``: 500), all logged on, 100
licences of which 50 are held, and a day of failed log-ons. Figures (one JSON object per line on
stdout, human text on stderr), for each database:

* ``status_cli_seconds_<db>``: ``forum-bridge status --json`` as a process, start to exit (what an
  operator or a script waits for). Floor: ``forum-bridge --help``, the same interpreter start and
  imports without reading the database.
* ``status_document_seconds_<db>``: :meth:`BridgeService.status` inside a running bridge (what
  ``/status.json`` and the page pay per request before encoding).
* ``page_seconds_<db>``: ``GET /`` through the WSGI application (status document and HTML).
* ``metrics_scrape_seconds_<db>``: ``GET /metrics`` (count queries only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"small": 500, "full": 10_000}
TARGET_CLI = 0.5


def prepare(url: str, count: int) -> None:
    """Schema, subscribers, registrations, a few licences and failures."""
    import logging

    logging.disable(logging.WARNING)  # the failures below are written one by one (a day apart)
    from forum_bridge.config import load_settings
    from forum_bridge.core import LoggedOn, LogonFailed
    from forum_bridge.service import BridgeService
    from forum_bridge.store.database import Database

    settings = load_settings(environ={}, overrides={"database.url": url, "licences.count": 100})
    database = Database(url)
    database.upgrade()
    service = BridgeService(settings, database)
    service.start()
    service.import_subscribers("".join(f"p{i:05d},{20000 + i}\n" for i in range(count)))
    now = service.clock()
    events: list[Any] = [
        LoggedOn(f"p{i:05d}", now, contact=f"sip:p{i:05d}@192.0.2.{i % 250}:5060", source="192.0.2.1:5060")
        for i in range(count)
    ]
    events += [
        LogonFailed(f"scan{i}", now - timedelta(minutes=i), source="203.0.113.9:5060", reason="unknown_user")
        for i in range(200)
    ]
    for start in range(0, len(events), 500):
        service.apply_batch(events[start : start + 500])
    for i in range(50):
        service.authorize(f"p{i:05d}", "600")
    database.dispose()


def timed(func: Callable[[], Any]) -> float:
    """Seconds one call of ``func`` takes."""
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def cli_seconds(url: str, *args: str) -> float:
    """Seconds ``forum-bridge --database URL ARGS`` takes as a process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    env["FORUM_BRIDGE_LICENCES_COUNT"] = "100"  # as provisioned: the CLI applies the count it is given
    command = [sys.executable, "-m", "forum_bridge", "--database", url, *args]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def check_cli_output(url: str, count: int) -> None:
    """``status --json`` prints every subscriber, logged on, as valid JSON (a smoke test, untimed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    env["FORUM_BRIDGE_LICENCES_COUNT"] = "100"
    command = [sys.executable, "-m", "forum_bridge", "--database", url, "status", "--json"]
    done = subprocess.run(command, check=True, env=env, cwd=ROOT, capture_output=True)
    doc = json.loads(done.stdout)
    subscribers = doc["subscribers"]
    assert len(subscribers) == count == doc["summary"]["logged_on"], (len(subscribers), doc["summary"])
    assert all(s["state"] == "logged_on" and s["contacts"] == [s["contact"]] for s in subscribers)
    assert sum(s["licensed"] for s in subscribers) == doc["licences"]["used"] == 50


def in_process(url: str, runs: int) -> dict[str, list[float]]:
    """Status document, page and metrics inside one process, as the running bridge serves them."""
    from forum_bridge.config import load_settings
    from forum_bridge.metrics import Metrics
    from forum_bridge.service import BridgeService
    from forum_bridge.store.database import Database
    from forum_bridge.web.app import make_app

    settings = load_settings(environ={}, overrides={"database.url": url, "licences.count": 100})
    database = Database(url)
    service = BridgeService(settings, database)
    service.start()
    metrics = Metrics(service, pbx="asterisk")
    app = make_app(service, settings, metrics)

    def get(path: str) -> None:
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8080",
            "HTTP_HOST": "127.0.0.1:8080",
            "wsgi.url_scheme": "http",
            "wsgi.input": BytesIO(),
        }
        statuses: list[str] = []
        body = b"".join(app(environ, lambda status, _headers, _exc=None: statuses.append(status)))  # type: ignore[arg-type]
        assert statuses[0].startswith("200"), (path, statuses)
        assert body

    out: dict[str, list[float]] = {"document": [], "page": [], "metrics": []}
    for _ in range(runs):
        out["document"].append(timed(service.status))
        out["page"].append(timed(lambda: get("/")))
        out["metrics"].append(timed(lambda: get("/metrics")))
    database.dispose()
    return out


def emit(
    figure: str, unit: str, runs: list[float], floor: float | None, note: str, target: str, met: bool | None
) -> None:
    """One figure as a JSON line."""
    print(
        json.dumps(
            {
                "figure": figure,
                "unit": unit,
                "median": statistics.median(runs),
                "runs": runs,
                "floor": floor,
                "floor_note": note,
                "target": target,
                "met": met,
            }
        ),
        flush=True,
    )


def measure(name: str, url: str, count: int, runs: int, full: bool) -> None:
    """Prepare ``url`` and print every figure for it."""
    prepare(url, count)
    check_cli_output(url, count)
    floor = [cli_seconds(url, "--help") for _ in range(runs)]
    cli = [cli_seconds(url, "status", "--json") for _ in range(runs)]
    inside = in_process(url, runs)
    met = statistics.median(cli) <= TARGET_CLI if full else None
    emit(
        f"status_cli_seconds_{name}",
        "s",
        cli,
        statistics.median(floor),
        "forum-bridge --help: interpreter start and imports",
        f"<= {TARGET_CLI} s with 10,000 subscribers",
        met,
    )
    emit(f"status_document_seconds_{name}", "s", inside["document"], None, "", "", None)
    emit(f"page_seconds_{name}", "s", inside["page"], None, "", "", None)
    emit(f"metrics_scrape_seconds_{name}", "s", inside["metrics"], None, "", "", None)
    print(
        f"{name}, {count} subscribers: status --json {statistics.median(cli):.3f}s (floor"
        f" {statistics.median(floor):.3f}s); status document {statistics.median(inside['document']):.3f}s;"
        f" page {statistics.median(inside['page']):.3f}s;"
        f" /metrics {statistics.median(inside['metrics']):.4f}s",
        file=sys.stderr,
    )


def main() -> int:
    """Run every figure on SQLite (and PostgreSQL when given)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--postgres", help="URL of an empty PostgreSQL database")
    args = parser.parse_args()
    count = SIZES[args.size]
    full = args.size == "full"
    with tempfile.TemporaryDirectory() as tmp:
        measure("sqlite", f"sqlite:///{Path(tmp) / 'status.db'}", count, args.runs, full)
    if args.postgres:
        from forum_bridge.store.database import Database

        try:
            measure("postgresql", args.postgres, count, args.runs, full)
        finally:
            database = Database(args.postgres)
            database.downgrade()
            database.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
