"""A flood of FreeSWITCH events (a SIP scanner's failed REGISTERs) is bounded and starves nobody."""

from __future__ import annotations

import threading
from collections.abc import Callable

import gevent

from forum_bridge.adapters.freeswitch.esl import EslClient
from forum_bridge.adapters.freeswitch.listener import EslListener
from forum_bridge.adapters.freeswitch.offhub import OffHub
from forum_bridge.adapters.freeswitch.socket_hook import SocketHookServer
from forum_bridge.config import Settings
from forum_bridge.service import BridgeService
from tests.conftest import FakeClock
from tests.freeswitch.conftest import wait_until
from tests.freeswitch.fake_esl import (
    FakeEslServer,
    FakeSocketCall,
    channel_data,
    event_frame,
    register_failure_event,
)

FLOOD = 6000
QUEUE = 200


def test_a_flood_is_bounded_resynced_and_leaves_the_hook_responsive(
    fs_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    fake_esl: FakeEslServer,
    clock: FakeClock,
    slow_database: Callable[[BridgeService, float], OffHub],
) -> None:
    # Behind a database this slow, the listener falls behind the flood and its queue overflows.
    service = slow_database(make_service(fs_settings()), 0.05)
    for logon in ("1000", "1001"):
        service.add_subscriber(logon, logon)
    fake_esl.add_registration("1000", 5091)  # the login resync logs it on
    clients: list[EslClient] = []
    listener = EslListener(service, initial_backoff=0.01, command_timeout=5.0, max_queued=QUEUE)
    real_client = EslClient

    def recording_client(*args: object, **kwargs: object) -> EslClient:
        client = real_client(*args, **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    import forum_bridge.adapters.freeswitch.listener as listener_module

    listener_module.EslClient = recording_client  # type: ignore[assignment,misc]
    hook = SocketHookServer(service, host="127.0.0.1", port=0, session_timeout=10)
    hook.start()
    greenlet = gevent.spawn(listener.run)
    try:
        wait_until(lambda: listener.connected, what="the listener to connect")
        # The scanner's burst, as one stream of frames; meanwhile 1001 registers, and its event is
        # lost in the flood: only FreeSWITCH's table has it.
        frames = b"".join(event_frame(register_failure_event(f"scan{i}")) for i in range(FLOOD))
        fake_esl.add_registration("1001", 5092)
        sender = threading.Thread(target=fake_esl.send_raw, args=(frames,), daemon=True)
        sender.start()
        wait_until(lambda: listener.events_handled > 50, 30, "the flood to arrive")
        # A call during the flood is answered within the hook's own deadline.
        before = hook.sessions
        call = FakeSocketCall(hook.port, channel_data("4f1c0e2a-7f7b-4c55-9d1e-2b8f0a6c9e11", "1000", "600"))
        call.start()
        wait_until(lambda: call.finished.is_set() and hook.sessions > before, 10, "the hook session")
        assert call.error is None and "resume" in call.commands
        wait_until(lambda: listener.overflow_resyncs >= 1, 60, "a resync after the overflow")
        wait_until(lambda: not sender.is_alive(), 60, "the flood to be sent")
        client = clients[-1]
        assert client.dropped > 0
        assert client.peak_queued <= QUEUE + 1
        state = {s["logon"]: s["state"] for s in service.status()["subscribers"]}
        assert state["1001"] == "logged_on"  # restored by the resync, though its event was dropped
    finally:
        listener_module.EslClient = real_client  # type: ignore[misc]
        listener.stop()
        greenlet.join(timeout=5)
        hook.stop(timeout=1)
