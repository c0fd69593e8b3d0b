"""Benchmark: what the keepalive sweep costs every second at steady state with 10,000 phones.

    .venv/bin/python bench/bench_sweep.py --runs 3 [--size small|full] [--postgres URL]

``full`` = 10,000 provisioned log-ons (``small``: 500), each with one contact registered through
the bridge itself (as after a registration storm), all well inside their keepalive (120 s). The
bridge's keepalive sweep then runs once a second for a simulated minute (the clocks are moved by
hand, one second a sweep, so the minute holds every periodic pass the sweep makes, and nothing
expires). Figures, for each database:

* ``sweep_cpu_ms_per_second_<db>``: CPU time of the bridge process spent in the sweeps, per second
  of (simulated) time. Floor: the same sweep on a node with no contact at all (heartbeat, pool and
  profile reads only).
* ``sweep_wall_ms_per_second_<db>``: the same in elapsed time (includes the database server's work,
  and the database thread the sweep holds while it runs).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

SIZES = {"small": 500, "full": 10_000}
SECONDS = 60  # simulated seconds (one sweep each)


class HandClock:
    """Wall and monotonic time that move only when told (one second a sweep)."""

    def __init__(self) -> None:
        self.wall = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def tick(self) -> None:
        self.wall += timedelta(seconds=1)
        self.mono += 1.0


def one_run(url: str, count: int) -> tuple[float, float]:
    """CPU and elapsed milliseconds per simulated second of sweeps with ``count`` contacts."""
    from forum_bridge.config import load_settings
    from forum_bridge.core import LoggedOn
    from forum_bridge.service import BridgeService
    from forum_bridge.store.database import Database

    logging.disable(logging.WARNING)
    settings = load_settings(environ={}, overrides={"database.url": url, "licences.count": 100})
    database = Database(url)
    database.upgrade()
    hand = HandClock()
    service = BridgeService(settings, database, clock=hand.now, monotonic=hand.monotonic)
    try:
        service.start()
        if count:
            service.import_subscribers("".join(f"p{i:05d},{20000 + i}\n" for i in range(count)))
            events: list[Any] = [
                LoggedOn(f"p{i:05d}", hand.now(), contact=f"sip:p{i:05d}@192.0.2.{i % 250}:5060")
                for i in range(count)
            ]
            for start in range(0, count, 500):
                service.apply_batch(events[start : start + 500])
        service.expire_keepalives()  # the first sweep of a process (reads what is there)
        cpu = wall = 0.0
        for _ in range(SECONDS):
            hand.tick()
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            freed = service.expire_keepalives()
            cpu += time.process_time() - cpu_start
            wall += time.perf_counter() - wall_start
            assert freed == [], f"nothing should expire in the first minute, freed {freed!r}"
        return 1000 * cpu / SECONDS, 1000 * wall / SECONDS
    finally:
        database.dispose()


def main() -> int:
    """Measure the sweep ``--runs`` times per database and print the figures."""
    args = _common.options(__doc__.splitlines()[0] if __doc__ else "")
    count = SIZES[args.size]
    for name, url in _common.databases(args):
        floors: list[float] = []
        cpu: list[float] = []
        wall: list[float] = []
        for _ in range(args.runs):
            with _common.database_for_run(url) as run_url:
                floors.append(one_run(run_url, 0)[0])
            with _common.database_for_run(url) as run_url:
                run_cpu, run_wall = one_run(run_url, count)
            cpu.append(run_cpu)
            wall.append(run_wall)
        floor = statistics.median(floors)
        _common.emit(
            f"sweep_cpu_ms_per_second_{name}",
            "ms",
            cpu,
            floor=floor,
            floor_note="the same sweep with no contact on the node",
            target=f"steady state with {count} contacts, {SECONDS} sweeps",
            met=None,
        )
        _common.emit(
            f"sweep_wall_ms_per_second_{name}",
            "ms",
            wall,
            floor=None,
            floor_note="",
            target=f"steady state with {count} contacts, {SECONDS} sweeps",
            met=None,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
