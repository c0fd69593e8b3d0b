"""The hook decides the calls that queued while the database was busy together, and answers each.

While one decision waits for the database, the hook's other callers queue; once it is done, the
queued ones are decided in one transaction (``BridgeService.authorize_group``) and every caller gets
its own answer. An emergency call never queues behind them. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import pytest

from forum_bridge.adapters.asterisk.agi import FastAgiServer
from forum_bridge.config import Settings
from forum_bridge.service import BridgeService, CallQuestion
from forum_bridge.store import operations as ops
from tests.asterisk.aio import run
from tests.asterisk.test_asterisk_agi import ask
from tests.asterisk.test_hook_decisions import provisioned, write_lock_held

ServiceFactory = Callable[[Settings], BridgeService]
SettingsFactory = Callable[..., Settings]


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait (without blocking the loop) until ``condition`` holds; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_calls_queued_behind_a_busy_database_are_decided_together_and_each_answered(
    make_settings: SettingsFactory,
    make_service: ServiceFactory,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(**{"database.url": database_url, "asterisk.agi_port": 0, "licences.count": 4})
    service = make_service(settings)
    logons = provisioned(service, 6)
    groups: list[list[str]] = []
    together = service.authorize_group

    def recorded(questions: list[CallQuestion], answered: Any = None) -> Any:
        groups.append([q.channel for q in questions])
        return together(questions, answered)

    monkeypatch.setattr(service, "authorize_group", recorded)
    channels = [f"PJSIP/{logon}-0000000{i}" for i, logon in enumerate(logons)]

    async def scenario() -> tuple[list[dict[str, str]], dict[str, str]]:
        server = FastAgiServer(settings, service, decision_timeout=20.0)
        await server.start()
        try:
            with write_lock_held(database_url):
                calls = [
                    asyncio.create_task(ask(server.port, "outbound", "600", channel=c)) for c in channels
                ]
                await until(lambda: len(groups) == 1 and server.requests == len(channels), "six questions")
                # Emergency calls do not queue behind the busy group: this one is asked alone.
                emergency = asyncio.create_task(
                    ask(server.port, "outbound", "112", channel=f"PJSIP/{logons[0]}-00000099")
                )
                await until(lambda: server.requests == len(channels) + 1, "the emergency call")
            return list(await asyncio.gather(*calls)), await emergency
        finally:
            await server.close()

    answers, emergency = run(scenario())

    # The database was held while the six were asked: whatever the first group took, the rest
    # waited behind it and went together in the second (no call is decided alone per thread).
    assert len(groups) <= 2 and max(len(g) for g in groups) >= len(channels) - 1, groups
    assert sorted(c for group in groups for c in group) == sorted(channels)
    assert not any("00000099" in c for group in groups for c in group)
    assert emergency == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "emergency"}
    # Four licences for six callers: the first four asked get one, the others are told why not.
    reasons = [answer["FORUM_BRIDGE_REASON"] for answer in answers]
    assert sorted(reasons) == ["emergency_only"] * 2 + ["licence_acquired"] * 4, answers
    status = service.status()
    assert status["licences"]["used"] == 4
    holders = {a["logon"] for a in status["assignments"]}
    winners = {logon for logon, reason in zip(logons, reasons, strict=True) if reason == "licence_acquired"}
    assert holders == winners


def test_on_postgresql_a_call_stuck_on_a_log_ons_lock_does_not_hold_up_the_others(
    make_settings: SettingsFactory, make_service: ServiceFactory, postgres_url: str
) -> None:
    """Another node hung in the middle of deciding one log-on keeps that log-on's lock: only that
    log-on's call waits; the calls of other log-ons asked after it are answered meanwhile."""
    settings = make_settings(**{"database.url": postgres_url, "asterisk.agi_port": 0, "licences.count": 4})
    service = make_service(settings)
    stuck, *others = provisioned(service, 4)
    hung_node = contextlib.ExitStack()
    session = hung_node.enter_context(service.database.transaction())
    ops.lock_logon(session, stuck)  # held until the "other node" ends its transaction

    async def scenario() -> tuple[dict[str, str], list[dict[str, str]]]:
        server = FastAgiServer(settings, service, decision_timeout=20.0)
        await server.start()
        try:
            waiting = asyncio.create_task(
                ask(server.port, "outbound", "600", channel=f"PJSIP/{stuck}-00000001")
            )
            await until(lambda: server.requests == 1, "the stuck log-on's call")
            answered = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        ask(server.port, "outbound", "600", channel=f"PJSIP/{logon}-0000001{i}")
                        for i, logon in enumerate(others)
                    )
                ),
                timeout=10.0,
            )
            assert not waiting.done()  # still waiting on the lock the other node holds
            hung_node.close()
            return await waiting, list(answered)
        finally:
            await server.close()

    with hung_node:  # ended in the scenario; again here only if it failed before that
        late, answered = run(scenario())
    assert [a["FORUM_BRIDGE_REASON"] for a in answered] == ["licence_acquired"] * len(others)
    assert late["FORUM_BRIDGE_REASON"] == "licence_acquired"


def _relay(stall: float) -> tuple[Any, list[tuple[int, int]], threading.Event]:
    """A _GroupDecider with four threads whose first group waits for the returned event; it records
    (thread, group size) per group and answers every call allowed."""
    from forum_bridge.adapters.asterisk.agi import _GroupDecider
    from forum_bridge.core import Decision, Reason

    release = threading.Event()
    groups: list[tuple[int, int]] = []

    def decide(questions: list[CallQuestion], answered: Callable[[list[Any]], None]) -> None:
        groups.append((threading.get_ident(), len(questions)))
        if len(groups) == 1:
            release.wait(10.0)
        answered([Decision(True, Reason.LICENSED)] * len(questions))

    return _GroupDecider(decide, threads=4, stall=stall), groups, release


def _question(n: int) -> CallQuestion:
    from forum_bridge.core import Direction

    return CallQuestion(f"u{n}", "600", Direction.OUTBOUND, f"PJSIP/u{n}-{n:08x}")


def test_decider_threads_relay_the_calls_queued_behind_a_group_into_one_group() -> None:
    """While a group is being decided, the calls queued behind it wait and go together in the next
    group, decided by one thread (no other thread takes them while the group is not stalled)."""
    decider, groups, release = _relay(stall=30.0)

    async def scenario() -> None:
        first = decider.submit(_question(0))
        await until(lambda: len(groups) == 1, "the first group")
        queued = [decider.submit(_question(n)) for n in range(1, 6)]
        await asyncio.sleep(0.05)  # time for another thread to take them, if one wrongly did
        assert len(groups) == 1 and not any(f.done() for f in queued)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *queued), 10.0)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        decider.close()
    assert [size for _thread, size in groups] == [1, 5]
    assert len({thread for thread, _size in groups}) == 1


def test_a_stalled_group_lets_another_thread_decide_the_calls_behind_it() -> None:
    """A group stuck for longer than the stall time (a lock another node holds) holds up the calls
    behind it no longer: another thread decides them while it is still stuck."""
    decider, groups, release = _relay(stall=0.05)

    async def scenario() -> None:
        first = decider.submit(_question(0))
        await until(lambda: len(groups) == 1, "the first group")
        others = [decider.submit(_question(n)) for n in range(1, 4)]
        await asyncio.wait_for(asyncio.gather(*others), 10.0)
        assert not first.done()  # still stuck
        release.set()
        await asyncio.wait_for(first, 10.0)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        decider.close()
    assert len({thread for thread, _size in groups}) >= 2
