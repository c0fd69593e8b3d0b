"""Benchmark: call decisions per second through the service, on SQLite (and PostgreSQL if given).

    .venv/bin/python bench/bench_decisions.py [--postgres URL] [--runs 5] [--calls 2000]

Each run provisions 200 logged-on subscribers and a pool of 100 licences on a fresh database, then
times ``authorize`` for a mix of calls: licensed log-ons calling again, new log-ons taking a licence,
emergency calls, and denials once the pool is full. It prints the median over the runs beside the
floor it is compared with: a busy PBX places far fewer than 50 new calls per second, so the floor is
200 decisions per second (four times that) on one core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from forum_bridge.config import load_settings
from forum_bridge.core import LoggedOn
from forum_bridge.service import BridgeService, utcnow
from forum_bridge.store.database import Database

FLOOR_PER_SECOND = 200.0
SUBSCRIBERS = 200


def one_run(url: str, calls: int) -> float:
    """Decisions per second for one fresh database."""
    settings = load_settings(
        environ={}, overrides={"database.url": url, "licences.count": 100, "node.name": "b"}
    )
    database = Database(url)
    database.upgrade()
    service = BridgeService(settings, database)
    service.start()
    service.import_subscribers("".join(f"u{i},{1000 + i}\n" for i in range(SUBSCRIBERS)))
    for i in range(SUBSCRIBERS):
        service.apply(LoggedOn(f"u{i}", at=utcnow(), contact=f"sip:u{i}@192.0.2.1"))
    started = time.perf_counter()
    for n in range(calls):
        number = "112" if n % 10 == 0 else "600"
        service.authorize(f"u{n % SUBSCRIBERS}", number)
    elapsed = time.perf_counter() - started
    database.downgrade()
    database.dispose()
    return calls / elapsed


def main() -> int:
    """Run the benchmark and print medians beside the floor; exit 1 if a median is below it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", help="a PostgreSQL URL of an empty database")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    targets: list[tuple[str, str | None]] = [("sqlite", None)]
    if args.postgres:
        targets.append(("postgresql", args.postgres))
    failed = False
    for name, url in targets:
        rates = []
        for run in range(args.runs):
            if url is None:
                with tempfile.TemporaryDirectory() as tmp:
                    rates.append(one_run(f"sqlite:///{Path(tmp) / f'bench{run}.db'}", args.calls))
            else:
                rates.append(one_run(url, args.calls))
        median = statistics.median(rates)
        verdict = "ok" if median >= FLOOR_PER_SECOND else "BELOW FLOOR"
        print(
            f"{name}: median {median:.0f} decisions/s over {args.runs} runs of {args.calls} "
            f"(min {min(rates):.0f}, max {max(rates):.0f}); floor {FLOOR_PER_SECOND:.0f}/s: {verdict}"
        )
        failed |= median < FLOOR_PER_SECOND
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
