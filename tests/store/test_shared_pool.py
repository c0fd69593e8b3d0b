"""A licence pool shared by four bridge processes: never one licence held by two log-ons.

Four processes (four PBX nodes) take and free licences of their own log-ons as fast as they can
on one database, with fewer licences than log-ons, so claims collide all the time. Afterwards the
audit log is replayed in order: every acquisition must find its slot free, and the final state
must match the replay.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest

from forum_bridge.config import load_settings
from forum_bridge.service import BridgeService
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database

PROCESSES = 4
LOGONS_PER_PROCESS = 6
LICENCES = 5
CYCLES = 60


def _node(url: str, index: int, start: Any, results: Any) -> None:
    settings = load_settings(
        environ={}, overrides={"database.url": url, "licences.count": LICENCES, "node.name": f"pbx{index}"}
    )
    service = BridgeService(settings)
    logons = [f"n{index}-{i}" for i in range(LOGONS_PER_PROCESS)]
    acquired = 0
    start.wait(120)
    for cycle in range(CYCLES):
        logon = logons[cycle % len(logons)]
        if service.authorize(logon, "600").reason.value == "licence_acquired":
            acquired += 1
            if cycle % 3:  # keep some licences a while, so the pool is often full
                with service.database.transaction() as session:
                    ops.release(session, logon, service.clock(), "logoff", service.node)
    results.put(acquired)
    service.database.dispose()


@pytest.mark.timeout(300)
def test_four_processes_sharing_a_pool_never_give_one_licence_to_two_log_ons(database_url: str) -> None:
    settings = load_settings(
        environ={}, overrides={"database.url": database_url, "licences.count": LICENCES, "node.name": "adm"}
    )
    database = Database(database_url)
    database.upgrade()
    admin = BridgeService(settings, database)
    admin.start()
    logons = [f"n{p}-{i}" for p in range(PROCESSES) for i in range(LOGONS_PER_PROCESS)]
    admin.import_subscribers("".join(f"{logon},{100 + n}\n" for n, logon in enumerate(logons)))
    admin.resync([ops.Registration(logon, f"sip:{logon}@127.0.0.1") for logon in logons], [])
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_node, args=(database_url, i, start, results)) for i in range(PROCESSES)]
    for proc in procs:
        proc.start()
    try:
        start.set()
        acquired = sum(results.get(timeout=240) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    audit = list(reversed(admin.audit_log(100_000)))
    holder: dict[str, str] = {}  # slot -> log-on
    for line in audit:
        if line["kind"] == "acquire":
            assert line["detail"] not in holder, f"{line['detail']} taken by {line['logon']} while {holder}"
            assert line["logon"] not in holder.values(), f"{line['logon']} got a second licence"
            holder[line["detail"]] = line["logon"]
        elif line["kind"] == "release":
            assert holder.pop(line["detail"], None) == line["logon"]
    assert sum(1 for line in audit if line["kind"] == "acquire") == acquired > LICENCES
    final = {f"slot {a['slot']}": a["logon"] for a in admin.status()["assignments"]}
    assert final == holder
    database.dispose()
