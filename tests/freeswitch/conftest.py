"""Fixtures for the FreeSWITCH connector: a fake event socket, a service, and the listener under test.

The listener runs in this process on gevent *without* monkey-patching (the connector uses gevent
sockets itself), so nothing leaks into the asyncio tests of the same run. Tests wait for conditions
with :func:`wait_until`, which yields to gevent while it polls against a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import pytest
from gevent.threadpool import ThreadPool

from forum_bridge.adapters.freeswitch.listener import EslListener, KeepaliveSweeper
from forum_bridge.adapters.freeswitch.offhub import OffHub
from forum_bridge.config import Settings
from forum_bridge.service import BridgeService
from tests.conftest import FakeClock, SettingsFactory
from tests.freeswitch.fake_esl import FakeEslServer


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "the condition") -> None:
    """Poll ``predicate`` until it is true, yielding to gevent; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        gevent.sleep(0.005)


class FakeMetrics:
    """Records what the connector reports to the metrics module."""

    def __init__(self) -> None:
        self.connected: list[bool] = []
        self.lags: list[float] = []

    def set_connected(self, connected: bool) -> None:
        """Record the connection state."""
        self.connected.append(connected)

    def observe_event_lag(self, seconds: float) -> None:
        """Record one event's lag."""
        self.lags.append(seconds)


@dataclass
class Bridge:
    """A running listener (and keepalive sweeper) against the fake event socket."""

    service: BridgeService
    fake: FakeEslServer
    listener: EslListener
    clock: FakeClock
    metrics: FakeMetrics
    sweeper: KeepaliveSweeper
    greenlets: list[Any] = field(default_factory=list)

    def push(self, body: str) -> None:
        """Push one event and wait until the listener has handled it."""
        before = self.listener.events_handled
        assert self.fake.push_event(body) == 1, "the listener is not subscribed to this event"
        wait_until(lambda: self.listener.events_handled > before, what="the event to be handled")

    def register(self, user: str, port: int = 5091) -> None:
        """A phone registers (FreeSWITCH's table and the event); wait until it is handled."""
        before = self.listener.events_handled
        assert self.fake.register(user, port) == 1
        wait_until(lambda: self.listener.events_handled > before, what="the register event")

    def let_sweeps_run(self, count: int = 2) -> None:
        """Wait until the keepalive sweeper has swept ``count`` more times."""
        target = self.sweeper.sweeps + count
        wait_until(lambda: self.sweeper.sweeps >= target, what="keepalive sweeps")

    def subscriber(self, logon: str) -> dict[str, Any]:
        """The status document's entry for ``logon``."""
        return next(s for s in self.service.status()["subscribers"] if s["logon"] == logon)

    def licences(self) -> dict[str, int]:
        """``licences`` of the status document: total, used, free."""
        return dict(self.service.status()["licences"])

    def stop(self) -> None:
        """Stop the listener and the sweeper and check that they ended."""
        self.listener.stop()
        self.sweeper.stop()
        for greenlet in self.greenlets:
            greenlet.join(timeout=5)
        assert all(g.dead for g in self.greenlets), "the listener did not stop"


@pytest.fixture
def slow_database() -> Iterator[Callable[[BridgeService, float], OffHub]]:
    """``slow_database(service, seconds)``: ``service`` as the runner wraps it (database calls in a
    thread of their own, :class:`OffHub`), behind a database that takes ``seconds`` for each batch
    of events. The event socket is read meanwhile, so a flood fills the listener's queue."""
    pools: list[Any] = []

    def wrap(service: BridgeService, seconds: float) -> OffHub:
        real = service.apply_batch

        def slow_batch(events: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)  # in the database thread: a transaction that takes this long
            return real(events, **kwargs)

        service.apply_batch = slow_batch  # type: ignore[method-assign]
        pool = ThreadPool(1)
        pools.append(pool)
        return OffHub(service, pool)

    yield wrap
    for pool in pools:
        pool.kill()


@pytest.fixture
def fake_esl() -> Iterator[FakeEslServer]:
    """A fake FreeSWITCH event socket on 127.0.0.1, password ClueCon."""
    server = FakeEslServer().start()
    yield server
    server.stop()


@pytest.fixture
def fs_settings(make_settings: SettingsFactory, fake_esl: FakeEslServer) -> Callable[..., Settings]:
    """Settings pointing at the fake event socket: one licence, node fs1, quick reconnects."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "node.name": "fs1",
            "licences.count": 1,
            "freeswitch.esl_port": fake_esl.port,
            "freeswitch.esl_password": "ClueCon",
            "freeswitch.reconnect_max": 0.1,
            "web.enabled": False,
        }
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return make_settings(**{k.replace(".", "__"): v for k, v in values.items()})

    return build


@pytest.fixture
def start_bridge(
    fs_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    fake_esl: FakeEslServer,
    clock: FakeClock,
) -> Iterator[Callable[..., Bridge]]:
    """Start the listener (and a fast keepalive sweeper) with subscribers 1000-1003 on their own numbers."""
    started: list[Bridge] = []

    def start(
        *,
        wait: bool = True,
        subscribers: dict[str, str] | None = None,
        idle_probe: float = 30.0,
        **overrides: Any,
    ) -> Bridge:
        service = make_service(fs_settings(**overrides))
        for logon, number in (subscribers or {n: n for n in ("1000", "1001", "1002", "1003")}).items():
            service.add_subscriber(logon, number)
        metrics = FakeMetrics()
        listener = EslListener(
            service, metrics=metrics, initial_backoff=0.01, command_timeout=3.0, idle_probe=idle_probe
        )
        sweeper = KeepaliveSweeper(service, interval=0.01)
        bridge = Bridge(service, fake_esl, listener, clock, metrics, sweeper)
        bridge.greenlets = [gevent.spawn(listener.run), gevent.spawn(sweeper.run)]
        started.append(bridge)
        if wait:
            wait_until(lambda: listener.connected, what="the listener to connect")
        return bridge

    yield start
    for bridge in started:
        bridge.stop()
