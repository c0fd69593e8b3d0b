"""Events dropped from a full queue are counted in /metrics and logged once per burst, on both PBXs.

A flood overflows the bounded event queue again and again; each overflow drops what was queued and
resyncs. ``forum_bridge_events_dropped_total{pbx, reason="queue_full"}`` counts every dropped event,
one ERROR line marks the start of the burst, and one WARNING sums it up once it is over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forum_bridge.adapters.asterisk import ami
from forum_bridge.config import Settings
from forum_bridge.dropped_events import DroppedEvents
from forum_bridge.metrics import Metrics
from forum_bridge.service import BridgeService
from tests.asterisk.aio import run
from tests.asterisk.conftest import fake_ami, running
from tests.asterisk.storm import unknown_user
from tests.conftest import FakeClock

START = "queued faster than they could be applied"
SUMMARY = "event flood over"


def dropped_sample(metrics: Metrics, pbx: str) -> float:
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == "forum_bridge_events_dropped_total" and s.labels == {
                "pbx": pbx,
                "reason": "queue_full",
            }:
                return float(s.value)
    raise AssertionError("forum_bridge_events_dropped_total is not exported")


def lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if needle in r.getMessage()]


def test_a_burst_is_logged_once_and_summed_up_when_it_is_over(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    counted: list[tuple[str, int]] = []

    class Sink:
        def count_dropped_events(self, reason: str, count: int) -> None:
            counted.append((reason, count))

    drops = DroppedEvents("FreeSWITCH", Sink(), quiet=60, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="forum_bridge.dropped_events")
    for _ in range(5):
        drops.dropped(1000)
        now[0] += 10
        drops.tick()
    assert len(lines(caplog, START)) == 1 and lines(caplog, START)[0].levelno == logging.ERROR
    assert counted == [("queue_full", 1000)] * 5
    now[0] += 49
    drops.tick()
    assert not lines(caplog, SUMMARY)  # 59 s without an overflow: not over yet
    now[0] += 2
    drops.tick()
    (summary,) = lines(caplog, SUMMARY)
    assert summary.levelno == logging.WARNING
    assert "5000 events dropped in 5 overflows within 40 s" in summary.getMessage()
    drops.dropped(7)  # a new burst is reported again
    assert len(lines(caplog, START)) == 2
    assert drops.total == 5007


def test_asterisk_overflows_are_counted_under_the_same_name(
    make_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    monkeypatch: pytest.MonkeyPatch,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(ami, "_MAX_BACKLOG", 50)
    caplog.set_level(logging.INFO)

    async def scenario() -> tuple[float, int]:
        async with fake_ami() as fake:
            settings = make_settings(
                **{
                    "asterisk.ami_port": fake.port,
                    "asterisk.ami_secret": "fake-ami-secret",
                    "asterisk.enforce": "ami",
                    "asterisk.reconnect_max": 0.2,
                }
            )
            service = make_service(settings)
            metrics = Metrics(service, pbx="asterisk")
            async with running(settings, service, observer=metrics) as listener:
                await listener.wait_until(lambda: listener.resyncs >= 1, 10)
                # Failures of unknown names: every frame is queued; 2,000 at once overflow 50 often.
                fake.push_bytes(b"".join(unknown_user(f"scan{i}", 6000 + i % 50, i) for i in range(2000)))
                await listener.wait_until(lambda: listener.drops.total > 0 and listener.frames >= 2000, 30)
                await asyncio.sleep(0)
                return dropped_sample(metrics, "asterisk"), listener.drops.total

    counted, total = run(scenario(), timeout=60)
    assert total > 0 and counted == total
    assert len(lines(caplog, START)) == 1
