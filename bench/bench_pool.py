"""Benchmark: a licence pool shared by several bridge processes on one database.

    .venv/bin/python bench/bench_pool.py --runs N [--size small|full] [--postgres URL]

Four processes (one per PBX node) share 40 licences between 200 log-ons, 50 per node. Each
process loops over its own log-ons: a call decision takes a licence (``authorize``, the hook's
path: per-log-on lock, SKIP LOCKED claim, audit line) and then frees it again (the release a
log-off makes), for a fixed time. The figure is acquisitions plus releases per second, all
processes together. Afterwards the audit log is replayed in order: a slot acquired while another
log-on still held it would be a licence held twice, and the run fails.

The target is stated for PostgreSQL (the shared pool); SQLite, one file on one host, is shown
beside it for comparison.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

PROCESSES = 4
LOGONS_PER_PROCESS = 50
LICENCES = 40


def worker(url: str, index: int, seconds: float, ready: Any, start: Any, results: Any) -> None:
    """One node: acquire and release licences of its own log-ons until ``seconds`` have passed."""
    from forum_bridge.config import load_settings
    from forum_bridge.service import BridgeService
    from forum_bridge.store import operations as ops

    settings = load_settings(
        environ={}, overrides={"database.url": url, "licences.count": LICENCES, "node.name": f"node{index}"}
    )
    service = BridgeService(settings)
    logons = [f"u{index * LOGONS_PER_PROCESS + i}" for i in range(LOGONS_PER_PROCESS)]
    operations = denied = 0
    # Warm up (connect, prepare the statements) before the clock starts.
    service.authorize(logons[0], "600")
    with service.database.transaction() as session:
        ops.release(session, logons[0], service.clock(), "logoff", service.node)
    ready.put(index)
    start.wait(120)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        logon = logons[i % len(logons)]
        i += 1
        decision = service.authorize(logon, "600")
        operations += 1
        if decision.reason.value != "licence_acquired":
            denied += 1
            continue
        with service.database.transaction() as session:
            ops.release(session, logon, service.clock(), "logoff", service.node)
        operations += 1
    results.put((index, operations, denied))
    service.database.dispose()


def replay(url: str) -> tuple[int, int]:
    """Replay the audit log; (acquisitions seen, acquisitions of a slot another log-on held)."""
    from sqlalchemy import select

    from forum_bridge.store.database import Database
    from forum_bridge.store.models import AuditRow

    database = Database(url)
    held: dict[str, str] = {}
    acquired = twice = 0
    with database.read() as session:
        rows = session.execute(
            select(AuditRow.kind, AuditRow.logon, AuditRow.detail)
            .where(AuditRow.kind.in_(("acquire", "release")))
            .order_by(AuditRow.id)
        ).all()
    for kind, logon, detail in rows:
        if kind == "acquire":
            acquired += 1
            if held.get(detail, logon) != logon:
                twice += 1
            held[detail] = logon
        else:
            held.pop(detail, None)
    database.dispose()
    return acquired, twice


def pgbench_script() -> str:
    """pgbench's script: one acquisition and one release of a client's own log-on, as the bridge
    sends them (the same statement texts, taken from forum_bridge.store.operations), each round
    trip of the bridge one pgbench pipeline: an acquisition is BEGIN with the log-on's lock and its
    facts, then the pool row's lock and the claim with the COMMIT; a release is BEGIN with the pool
    lock and the licence freed, then its audit line and the pool's count-out with the COMMIT."""
    from forum_bridge.store import operations as ops

    values = {
        "logon": "('u' || :n)",
        "node": "('node' || :client_id)",
        "channel": "''",
        "at": "now()",
        "number": "'600'",
        "reason": "'outbound'",
        "direction": "'outbound'",
        "denied": "'emergency_only'",
        "granted": "'licence_acquired'",
        "freed": "1",
        "reserved": "0",
        "kind": "'release'",
        "actor": "''",
        "detail": "'slot'",
    }

    def sql(statement: Any) -> str:
        return re.sub(r"(?<!:):(\w+)", lambda m: values[m.group(1)], str(statement)) + ";"

    return "\n".join(
        [
            f"\\set n :client_id * {LOGONS_PER_PROCESS} + random(0, {LOGONS_PER_PROCESS - 1})",
            "\\startpipeline",
            "BEGIN;",
            sql(ops._LOCK_FOR_FACTS),
            sql(ops._FACTS),
            "\\endpipeline",
            "\\startpipeline",
            sql(ops._LOCK_POOL_ROW),
            sql(ops._CLAIM_WITH_COMMIT),
            "COMMIT;",
            "\\endpipeline",
            "\\startpipeline",
            "BEGIN;",
            ops._SHARE_PG + ";",
            sql(ops._FREE_PG),
            "\\endpipeline",
            "\\startpipeline",
            sql(ops._AUDIT),
            sql(ops._GIVE_WITH_USAGE),
            "COMMIT;",
            "\\endpipeline",
            "",
        ]
    )


def pgbench_floor(url: str, seconds: float) -> float | None:
    """Operations per second of the same transactions sent by pgbench (4 clients, no Python), on
    the database as a run leaves it; None without pgbench. Commits as the bridge's do
    (``synchronous_commit = off``), so this is what the server and the disk allow."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)
    if not candidates:
        return None
    url = re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)  # libpq's form, for pgbench
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(pgbench_script())
    try:
        environ = {
            **os.environ,
            "PGOPTIONS": "-c synchronous_commit=off -c plan_cache_mode=force_custom_plan",
        }
        done = subprocess.run(
            [
                str(candidates[0]),
                "-n",
                "-M",
                "prepared",  # as psycopg does with a statement run five times
                "-c",
                str(PROCESSES),
                "-j",
                str(PROCESSES),
                "-T",
                str(max(1, round(seconds))),
                "-f",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            env=environ,
            check=False,
        )
    finally:
        os.unlink(script.name)
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    failed = re.search(r"number of failed transactions: ([1-9][0-9]*)", done.stdout)
    if done.returncode != 0 or found is None or failed:
        raise SystemExit(f"pgbench failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    return 2 * float(found.group(1))  # each of its transactions is one acquisition and one release


def one_run(url: str, seconds: float, *, floor: bool = False) -> tuple[float, int, float | None]:
    """(operations per second over all processes, licences held twice, pgbench's operations per
    second on the same database afterwards if ``floor``) on a fresh database."""
    service = _common.provision(
        url, subscribers=PROCESSES * LOGONS_PER_PROCESS, licences=LICENCES, node="setup"
    )
    service.database.dispose()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    ready, results = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(url, i, seconds, ready, start, results)) for i in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        start.set()
        answers = [results.get(timeout=seconds + 120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    if any(proc.exitcode != 0 for proc in procs):
        raise SystemExit(f"a pool worker failed: exit codes {[p.exitcode for p in procs]}")
    total = sum(ops for _index, ops, _denied in answers)
    _acquired, twice = replay(url)
    return total / seconds, twice, pgbench_floor(url, seconds) if floor else None


def main() -> int:
    """Run the pool on each database; print the figures. Exit 1 if a licence was ever held twice."""
    args = _common.options(__doc__.splitlines()[0])
    seconds = 10.0 if args.size == "full" else 1.0
    failed = False
    for name, url in _common.databases(args):
        rates: list[float] = []
        floors: list[float] = []
        doubles = 0
        postgres = name == "postgresql"
        for run in range(args.runs):
            with _common.database_for_run(url) as db_url:
                rate, twice, floor = one_run(db_url, seconds, floor=postgres)
            rates.append(rate)
            doubles += twice
            if floor is not None:
                floors.append(floor)
            _common.say(
                f"{name} run {run + 1}: {rate:.0f} operations/s, licences held twice: {twice}"
                + (f"; pgbench, the same transactions: {floor:.0f} operations/s" if floor else "")
            )
        _common.emit(
            f"pool_operations_per_s_4_processes_{name}",
            "operations/s",
            rates,
            floor=statistics.median(floors) if floors else None,
            floor_note=(
                "the same transactions from pgbench, 4 clients, same database, after each run"
                if floors
                else "no floor measured; each operation is one committed transaction"
            ),
            target=">= 2000/s" if postgres else "- (PostgreSQL is the shared pool)",
            met=(lambda median: median >= 2000) if postgres else None,
        )
        _common.emit(
            f"pool_licences_held_twice_{name}",
            "count",
            [float(doubles)],
            floor=None,
            floor_note="audit log replayed in order after every run",
            target="0",
            met=lambda median: median == 0,
        )
        failed |= doubles > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
