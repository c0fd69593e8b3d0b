"""A registration storm on FreeSWITCH (every phone registers again after a restart).

The listener applies the events waiting in its queue together (one transaction per batch, not per
event), in the order FreeSWITCH sent them, and the socket hook decides a call only once the events
sent before it are applied, so a phone that registered a moment before calling is decided on that
registration however long the backlog: its own events are applied ahead of the backlog.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import gevent

from forum_bridge.adapters.freeswitch.listener import EslListener
from forum_bridge.adapters.freeswitch.offhub import OffHub
from forum_bridge.adapters.freeswitch.socket_hook import SocketHookServer
from forum_bridge.config import Settings
from forum_bridge.service import BridgeService
from tests.freeswitch.conftest import wait_until
from tests.freeswitch.fake_esl import (
    FakeEslServer,
    FakeSocketCall,
    channel_data,
    event_frame,
    register_event,
    unregister_event,
)

STORM = 2000
CALLER = "1000"
CALL_UUID = "7d0c2b8e-3f4a-4e61-9a2b-5c8d1e0f7a36"


def _storm_frames(count: int) -> bytes:
    return b"".join(event_frame(register_event(f"u{i}", 6000 + i % 1000)) for i in range(count))


def _counting_batches(service: BridgeService) -> list[int]:
    """Record the size of every batch of events the service is asked to apply."""
    sizes: list[int] = []
    real = service.apply_batch

    def counted(events: Any, **kwargs: Any) -> Any:
        sizes.append(len(events))
        return real(events, **kwargs)

    service.apply_batch = counted  # type: ignore[method-assign]
    return sizes


def _logged_on(service: BridgeService) -> int:
    return int(service.counts()["subscribers"]["logged_on"])


def test_a_storm_is_applied_in_batches_in_the_order_sent(
    fs_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    fake_esl: FakeEslServer,
) -> None:
    service = make_service(fs_settings(licences__count=10))
    service.import_subscribers("".join(f"u{i},{10000 + i}\n" for i in range(STORM)))
    sizes = _counting_batches(service)
    listener = EslListener(service, initial_backoff=0.01, command_timeout=5.0)
    greenlet = gevent.spawn(listener.run)
    try:
        wait_until(lambda: listener.connected, what="the listener to connect")
        # The storm, then u0 leaves again: applied in order, u0 ends logged off.
        frames = _storm_frames(STORM) + event_frame(unregister_event("u0", 6000))
        sender = threading.Thread(target=fake_esl.send_raw, args=(frames,), daemon=True)
        sender.start()
        wait_until(lambda: listener.events_handled >= STORM + 1, 60, "the storm to be applied")
        sender.join(timeout=10)
        assert _logged_on(service) == STORM - 1
        state = {s["logon"]: s["state"] for s in service.status()["subscribers"]}
        assert state["u0"] == "logged_off" and state["u1"] == "logged_on"
        assert listener.overflow_resyncs == 0
        # One transaction per event took over ten seconds for 10,000 phones.
        assert sum(sizes) == STORM + 1
        assert len(sizes) <= (STORM + 1) // 10, f"{len(sizes)} batches for {STORM + 1} events"
    finally:
        listener.stop()
        greenlet.join(timeout=5)


def test_a_call_right_after_its_register_behind_a_storm_is_decided_on_it(
    fs_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    fake_esl: FakeEslServer,
    slow_database: Callable[[BridgeService, float], OffHub],
) -> None:
    # The default hook_timeout (2 s) leaves the decision 0.75 s, of which it waits half at most.
    # Behind a database taking 0.1 s per batch the whole backlog takes about a second to apply:
    # only the caller's own events, applied ahead of it, arrive in time.
    settings = fs_settings(licences__count=10)
    bridge = make_service(settings)
    bridge.import_subscribers("".join(f"u{i},{10000 + i}\n" for i in range(STORM)))
    bridge.add_subscriber(CALLER, CALLER)
    service: Any = slow_database(bridge, 0.1)
    listener = EslListener(service, settings, initial_backoff=0.01, command_timeout=5.0)
    hook = SocketHookServer(service, settings, host="127.0.0.1", port=0, session_timeout=10)
    hook.before_decision = listener.caught_up  # as the runner wires them
    hook.start()
    greenlet = gevent.spawn(listener.run)
    try:
        wait_until(lambda: listener.connected, what="the listener to connect")
        # The storm, and behind it the caller's REGISTER; its call comes as soon as all was sent.
        frames = _storm_frames(STORM) + event_frame(register_event(CALLER, 5091))
        fake_esl.add_registration(CALLER, 5091)
        sender = threading.Thread(target=fake_esl.send_raw, args=(frames,), daemon=True)
        sender.start()
        wait_until(lambda: not sender.is_alive(), 30, "the storm to be sent")
        call = FakeSocketCall(hook.port, channel_data(CALL_UUID, CALLER, "600"))
        call.start()
        wait_until(call.finished.is_set, 10, "the hook to answer")
        assert call.error is None
        # Decided on the REGISTER just before it: allowed, with a licence; never not_logged_on.
        assert f"api uuid_setvar {CALL_UUID} forum_bridge_verdict allowed" in call.commands
        assert CALLER in bridge.licensed_logons()
        assert _logged_on(bridge) < STORM + 1  # the backlog was still being applied
        wait_until(lambda: _logged_on(bridge) == STORM + 1, 30, "the whole storm")
    finally:
        listener.stop()
        greenlet.join(timeout=5)
        hook.stop(timeout=1)


def test_caught_up_answers_at_once_without_a_connection(
    fs_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
) -> None:
    listener = EslListener(make_service(fs_settings()), initial_backoff=0.01)
    # Not connected: nothing to wait for (the hook decides on what the database knows).
    assert listener.caught_up(5.0) is False
