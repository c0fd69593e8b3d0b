"""In-memory bookkeeping of the Asterisk side stays bounded however long the bridge runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from forum_bridge.adapters.asterisk.ami import AmiListener, RecentDecisions
from forum_bridge.config import Settings
from forum_bridge.core.rules import Decision, Reason
from forum_bridge.service import BridgeService


class _Answer(dict[str, str]):
    success = True


def test_hangups_sent_keeps_only_the_newest(
    make_settings: Callable[..., Settings], make_service: Callable[[Settings], BridgeService]
) -> None:
    settings = make_settings()
    listener = AmiListener(settings, make_service(settings))

    async def answered(action: Any, timeout: float | None = None) -> list[Any]:
        return [_Answer()]

    listener.send_action = answered  # type: ignore[method-assign]

    async def hang_up_many() -> None:
        for i in range(5000):
            assert await listener.hangup(f"PJSIP/21-desk-{i:08x}")

    asyncio.run(hang_up_many())
    assert 0 < len(listener.hangups_sent) <= 1000
    assert listener.hangups_sent[-1] == f"PJSIP/21-desk-{4999:08x}"


def test_ring_stamps_of_inbound_queries_without_calls_do_not_pile_up() -> None:
    now = [0.0]
    recent = RecentDecisions(ttl=10, clock=lambda: now[0])
    # An inbound query whose call never reaches the log-on leaves a stamp nobody takes.
    for i in range(20_000):
        recent.record_rung("21-desk")
        recent.record_rung(f"unknown-{i % 3000}")
    assert len(recent) <= 16 * 3001
    now[0] += 11  # the stamps are stale; the next record drops them
    recent.record_rung("22-desk")
    recent.record_call("PJSIP/22-desk-00000001", Decision(True, Reason.LICENSED))
    assert len(recent) == 2
    assert recent.take_rung("22-desk")
    assert not recent.take_rung("21-desk")


def test_decided_legs_expire_even_below_the_limit() -> None:
    now = [0.0]
    recent = RecentDecisions(ttl=10, limit=4096, clock=lambda: now[0])
    for i in range(1000):
        recent.record_call(f"PJSIP/21-desk-{i:08x}", Decision(True, Reason.LICENSED))
    assert len(recent) == 1000
    now[0] += 11
    recent.record_call("PJSIP/21-desk-ffffffff", Decision(True, Reason.LICENSED))
    assert len(recent) == 1
