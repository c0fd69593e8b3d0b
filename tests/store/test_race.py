"""Licence acquisition is race-free across processes, on SQLite and on PostgreSQL.

Several processes wait at a barrier and then ask for the last free licence at the same instant.
Exactly one must win, every round; and one log-on asked for from every process at once (with
licences to spare) must end up holding exactly one. With reserved log-ons in the same rush, every
reserved one gets its licence and the floating ones share exactly what is left.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
from typing import Any

import pytest

from forum_bridge.config import load_settings
from forum_bridge.core import LoggedOff, LoggedOn
from forum_bridge.service import BridgeService, utcnow
from forum_bridge.store.database import Database

WORKERS = 6
ROUNDS = 8


def _worker(url: str, index: int, barrier: Any, results: Any, rounds: int) -> None:
    settings = load_settings(
        environ={}, overrides={"database.url": url, "licences.count": 1, "node.name": f"n{index}"}
    )
    service = BridgeService(settings)
    for round_ in range(rounds):
        logon = f"u{index}" if round_ % 2 == 0 else "shared"
        barrier.wait(timeout=60)
        decision = service.authorize(logon, "600")
        results.put((round_, index, decision.allowed, decision.reason.value))
        barrier.wait(timeout=60)  # the parent checks and resets between rounds
        barrier.wait(timeout=60)
    service.database.dispose()


def _mixed_worker(url: str, index: int, barrier: Any, results: Any, rounds: int) -> None:
    settings = load_settings(
        environ={},
        overrides={"database.url": url, "licences.count": MIXED_LICENCES, "node.name": f"n{index}"},
    )
    service = BridgeService(settings)
    logon = f"res{index}" if index < MIXED_RESERVED else f"u{index}"
    for round_ in range(rounds):
        barrier.wait(timeout=60)
        decision = service.authorize(logon, "600")
        results.put((round_, logon, decision.allowed, decision.reason.value))
        barrier.wait(timeout=60)
        barrier.wait(timeout=60)
    service.database.dispose()


MIXED_LICENCES = 4
MIXED_RESERVED = 2


def _warning_worker(url: str, index: int, barrier: Any, results: Any, rounds: int) -> None:
    # Every pool warning this process logs goes to the parent through the queue, stamped with the round.
    current = {"round": -1}

    def stamp(record: logging.LogRecord) -> bool:
        record.round = current["round"]
        return True

    handler = logging.handlers.QueueHandler(results)
    handler.addFilter(stamp)
    logger = logging.getLogger("forum_bridge.service")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    settings = load_settings(
        environ={},
        overrides={
            "database.url": url,
            "licences.count": WORKERS,
            "licences.warn_at": 50,
            "node.name": f"n{index}",
        },
    )
    service = BridgeService(settings)
    logon = f"u{index}"
    for round_ in range(rounds):
        current["round"] = round_
        service.apply(LoggedOn(logon, at=utcnow(), contact=f"sip:{logon}@n{index}"))
        barrier.wait(timeout=60)
        service.authorize(logon, "600")  # all at once: the pool goes from 0 to 100 %
        barrier.wait(timeout=60)
        barrier.wait(timeout=60)
        service.apply(LoggedOff(logon, at=utcnow()))  # all at once again: back to 0 %
        barrier.wait(timeout=60)
        barrier.wait(timeout=60)
    service.database.dispose()


def _prepare(url: str, licences: int) -> BridgeService:
    settings = load_settings(
        environ={}, overrides={"database.url": url, "licences.count": licences, "node.name": "p"}
    )
    db = Database(url)
    db.upgrade()
    service = BridgeService(settings, db)
    service.start()
    service.import_subscribers("".join(f"u{i},{100 + i}\n" for i in range(WORKERS)) + "shared,200\n")
    for i in range(WORKERS):
        service.apply(LoggedOn(f"u{i}", at=utcnow(), contact=f"sip:u{i}@h"))
    service.apply(LoggedOn("shared", at=utcnow(), contact="sip:shared@h"))
    return service


@pytest.mark.timeout(240)
def test_exactly_one_process_wins_the_last_licence(database_url: str) -> None:
    service = _prepare(database_url, licences=1)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(database_url, i, barrier, results, ROUNDS)) for i in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    try:
        for round_ in range(ROUNDS):
            barrier.wait(timeout=120)  # go
            barrier.wait(timeout=120)  # all decided
            answers = [results.get(timeout=30) for _ in range(WORKERS)]
            assert {a[0] for a in answers} == {round_}
            status = service.status()
            assert status["licences"]["used"] == 1
            holders = [a["logon"] for a in status["assignments"]]
            if round_ % 2 == 0:  # six log-ons, one licence: one wins, five get emergency only
                winners = [a for a in answers if a[2]]
                assert len(winners) == 1, f"round {round_}: {answers}"
                assert holders == [f"u{winners[0][1]}"]
                assert sorted(a[3] for a in answers if not a[2]) == ["emergency_only"] * (WORKERS - 1)
            else:  # one log-on from six processes: it takes the licence once, the others see it held
                assert holders == ["shared"]
                assert sorted(a[3] for a in answers) == ["licence_acquired"] + ["licensed"] * (WORKERS - 1)
            service.reset_licences("test")
            barrier.wait(timeout=120)  # next round
    finally:
        for proc in procs:
            proc.join(timeout=60)
        service.database.dispose()
    assert [p.exitcode for p in procs] == [0] * WORKERS


@pytest.mark.timeout(240)
def test_one_log_on_never_holds_two_licences(database_url: str) -> None:
    service = _prepare(database_url, licences=WORKERS)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS + 1)
    results = ctx.Queue()
    # Round 1 of the worker asks for "shared" from every process at once.
    procs = [ctx.Process(target=_worker, args=(database_url, i, barrier, results, 2)) for i in range(WORKERS)]
    for proc in procs:
        proc.start()
    try:
        for round_ in range(2):
            barrier.wait(timeout=120)
            barrier.wait(timeout=120)
            answers = [results.get(timeout=30) for _ in range(WORKERS)]
            assert all(a[2] for a in answers), answers
            holders = [a["logon"] for a in service.status()["assignments"]]
            if round_ == 1:
                assert holders == ["shared"]
                assert sorted(a[3] for a in answers) == ["licence_acquired"] + ["licensed"] * (WORKERS - 1)
            else:
                assert sorted(holders) == sorted(f"u{i}" for i in range(WORKERS))
            service.reset_licences("test")
            barrier.wait(timeout=120)
    finally:
        for proc in procs:
            proc.join(timeout=60)
        service.database.dispose()
    assert [p.exitcode for p in procs] == [0] * WORKERS


@pytest.mark.timeout(240)
def test_reserved_and_floating_log_ons_rushing_together_get_exactly_their_share(database_url: str) -> None:
    service = _prepare(database_url, licences=MIXED_LICENCES)
    for i in range(MIXED_RESERVED):
        service.add_subscriber(f"res{i}", f"90{i}", reserved=True)
        service.apply(LoggedOn(f"res{i}", at=utcnow(), contact=f"sip:res{i}@h"))
    floating = MIXED_LICENCES - MIXED_RESERVED
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_mixed_worker, args=(database_url, i, barrier, results, ROUNDS))
        for i in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    try:
        for round_ in range(ROUNDS):
            barrier.wait(timeout=120)
            barrier.wait(timeout=120)
            answers = [results.get(timeout=30) for _ in range(WORKERS)]
            assert {a[0] for a in answers} == {round_}
            reserved = sorted(a[1:] for a in answers if a[1].startswith("res"))
            assert reserved == [(f"res{i}", True, "licence_acquired") for i in range(MIXED_RESERVED)], answers
            rushing = [a for a in answers if not a[1].startswith("res")]
            winners = sorted(a[1] for a in rushing if a[2])
            assert len(winners) == floating, f"round {round_}: {answers}"
            assert sorted(a[3] for a in rushing if not a[2]) == ["emergency_only"] * (len(rushing) - floating)
            status = service.status()
            assert status["licences"] == {
                "total": MIXED_LICENCES,
                "used": MIXED_LICENCES,
                "free": 0,
                "reserved": MIXED_RESERVED,
            }
            assert sorted(a["logon"] for a in status["assignments"]) == sorted(
                [f"res{i}" for i in range(MIXED_RESERVED)] + winners
            )
            service.reset_licences("test")
            barrier.wait(timeout=120)
    finally:
        for proc in procs:
            proc.join(timeout=60)
        service.database.dispose()
    assert [p.exitcode for p in procs] == [0] * WORKERS


@pytest.mark.timeout(240)
def test_processes_crossing_warn_at_together_log_it_once(database_url: str) -> None:
    service = _prepare(database_url, licences=WORKERS)
    for i in range(WORKERS):  # the workers log on and off on their own nodes
        service.apply(LoggedOff(f"u{i}", at=utcnow()))
    rounds = ROUNDS // 2
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_warning_worker, args=(database_url, i, barrier, results, rounds))
        for i in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    try:
        for _round in range(rounds):
            barrier.wait(timeout=120)  # go: every process takes a licence
            barrier.wait(timeout=120)
            assert service.status()["licences"]["used"] == WORKERS
            barrier.wait(timeout=120)  # go: every process logs off
            barrier.wait(timeout=120)
            assert service.status()["licences"]["used"] == 0
            barrier.wait(timeout=120)
    finally:
        for proc in procs:
            proc.join(timeout=60)
        service.database.dispose()
    assert [p.exitcode for p in procs] == [0] * WORKERS
    records = []
    while not results.empty():  # every worker has exited, so everything it logged is here
        records.append(results.get(timeout=5))
    lines = sorted((r.round, r.getMessage().split(" used=")[0]) for r in records)
    expected = [(n, "licence pool above warn_at") for n in range(rounds)]
    expected += [(n, "licence pool back below warn_at") for n in range(rounds)]
    assert lines == sorted(expected)
