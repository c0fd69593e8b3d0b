"""The FreeSWITCH side of dropped events: a flood overflows the ESL queue more than once; every
dropped event is counted in ``forum_bridge_events_dropped_total{pbx="freeswitch"}`` and the burst
is logged once (see tests/test_dropped_events.py for the Asterisk side and the burst rules).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import gevent
import pytest

from forum_bridge.adapters.freeswitch.esl import EslClient
from forum_bridge.adapters.freeswitch.listener import EslListener
from forum_bridge.adapters.freeswitch.offhub import OffHub
from forum_bridge.config import Settings
from forum_bridge.metrics import Metrics
from forum_bridge.service import BridgeService
from tests.freeswitch.conftest import wait_until
from tests.freeswitch.fake_esl import FakeEslServer, event_frame, register_failure_event
from tests.test_dropped_events import START, SUMMARY, dropped_sample, lines


def test_freeswitch_overflows_are_counted_and_logged_once(
    fs_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    fake_esl: FakeEslServer,
    caplog: pytest.LogCaptureFixture,
    slow_database: Callable[[BridgeService, float], OffHub],
) -> None:
    # Behind a database this slow, the listener falls behind the flood and its queue overflows.
    service = slow_database(make_service(fs_settings()), 0.05)
    metrics = Metrics(service, pbx="freeswitch")
    clients: list[EslClient] = []
    real_client = EslClient

    def recording_client(*args: object, **kwargs: object) -> EslClient:
        client = real_client(*args, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    import forum_bridge.adapters.freeswitch.listener as listener_module

    listener_module.EslClient = recording_client  # type: ignore[assignment,misc]
    listener = EslListener(
        service, initial_backoff=0.01, command_timeout=5.0, max_queued=100, metrics=metrics
    )
    listener.drops.quiet = 5.0  # the overflows of this flood come well within that of each other
    greenlet = gevent.spawn(listener.run)
    caplog.set_level(logging.INFO)
    try:
        wait_until(lambda: listener.connected, what="the listener to connect")
        assert dropped_sample(metrics, "freeswitch") == 0  # exported before anything was dropped
        frames = b"".join(event_frame(register_failure_event(f"scan{i}")) for i in range(6000))
        sender = threading.Thread(target=fake_esl.send_raw, args=(frames,), daemon=True)
        sender.start()
        wait_until(lambda: not sender.is_alive(), 60, "the flood to be sent")
        wait_until(lambda: listener.overflow_resyncs >= 1, 60, "a resync after the overflows")
        wait_until(lambda: lines(caplog, SUMMARY), 30, "the burst to be summed up")
        dropped = clients[-1].dropped
        assert dropped > 100  # the queue holds 100: it overflowed more than once
        assert dropped_sample(metrics, "freeswitch") == dropped
        assert len(lines(caplog, START)) == 1  # though the queue overflowed more than once
        assert f"{dropped} events dropped in" in lines(caplog, SUMMARY)[0].getMessage()
    finally:
        listener_module.EslClient = real_client  # type: ignore[misc]
        listener.stop()
        greenlet.join(timeout=5)
