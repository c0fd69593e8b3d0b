"""Benchmark: call decisions per second through the service, in-process, one after the other.

    .venv/bin/python bench/bench_decisions.py --runs N [--size small|full] [--postgres URL]

Each run provisions 200 logged-on subscribers and a pool of 100 licences on a fresh database, then
times ``authorize`` for a mix of calls: licensed log-ons calling again, new log-ons taking a licence,
emergency calls, and denials once the pool is full. The floor is what a busy PBX needs: far fewer
than 50 new calls per second, so 200 decisions per second (four times that) on one core.
"""

from __future__ import annotations

import sys
import time

import _common

FLOOR_PER_SECOND = 200.0
SUBSCRIBERS = 200


def one_run(url: str, calls: int) -> float:
    """Decisions per second on one fresh database."""
    service = _common.provision(url, subscribers=SUBSCRIBERS, licences=100, node="b")
    started = time.perf_counter()
    for n in range(calls):
        number = "112" if n % 10 == 0 else "600"
        service.authorize(f"u{n % SUBSCRIBERS}", number, channel=f"PJSIP/u{n % SUBSCRIBERS}-{n:08x}")
    elapsed = time.perf_counter() - started
    service.database.dispose()
    return calls / elapsed


def main() -> int:
    """Run the benchmark on each database and print the figures."""
    args = _common.options(__doc__.splitlines()[0])
    calls = 2000 if args.size == "full" else 100
    for name, url in _common.databases(args):
        rates = []
        for _run in range(args.runs):
            with _common.database_for_run(url) as db_url:
                rates.append(one_run(db_url, calls))
        _common.emit(
            f"service_decisions_per_s_{name}",
            "decisions/s",
            rates,
            floor=FLOOR_PER_SECOND,
            floor_note="what a busy PBX needs (4x 50 new calls/s), one core",
            target=">= floor",
            met=lambda median: median >= FLOOR_PER_SECOND,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
