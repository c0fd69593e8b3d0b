"""The socket hook answers by its deadline, and an answer given without the database is final.

FreeSWITCH's ``sched_transfer`` ends the wait on the hook after ``freeswitch.hook_timeout`` whole
seconds (as early as one second less). A decision still waiting for the database then must not take
a licence afterwards for a call FreeSWITCH has already rejected, and the leg's CHANNEL_CREATE must
get the same answer instead of being decided again.

The hook runs as in ``forum-bridge run freeswitch``: its service wrapped in :class:`OffHub` with one
database thread. Another client holds the database's write lock (SQLite) or locks the licences
(PostgreSQL) while the calls ask.
"""

from __future__ import annotations

from collections.abc import Callable

import gevent
from gevent.threadpool import ThreadPool

from forum_bridge.adapters.freeswitch.offhub import OffHub
from forum_bridge.adapters.freeswitch.socket_hook import SocketHookServer
from forum_bridge.config import Settings
from forum_bridge.core.events import CallStarted, Direction, LoggedOn
from forum_bridge.service import BridgeService, CallRecord
from tests.asterisk.test_hook_decisions import write_lock_held
from tests.freeswitch.conftest import wait_until
from tests.freeswitch.fake_esl import FakeSocketCall, channel_data, fs_url_encode
from tests.freeswitch.test_socket_hook import allowed, undecided

LOGONS = ["1000", "1001", "1002", "1003"]
UUIDS = [f"6a4c3e10-0000-4000-8000-00000000000{i}" for i in range(len(LOGONS))]


def inbound_data(uuid: str, number: str) -> bytes:
    """CHANNEL_DATA of the ``forum-bridge-inbound`` extension's socket (see test_inbound_hook)."""
    extra = {"socket_path": "inbound", "forum_bridge_number": number, "domain_name": "sandbox.test"}
    head, tail = channel_data(uuid, "90-trunk", number).decode().split("Content-Type:", 1)
    lines = "".join(f"variable_{name}: {fs_url_encode(value)}\n" for name, value in extra.items())
    return f"{head}{lines}Content-Type:{tail}".encode()


def test_a_late_decision_is_answered_by_the_fail_mode_and_never_takes_a_licence(
    make_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    database_url: str,
) -> None:
    settings = make_settings(
        **{
            "database.url": database_url,
            "licences.count": 10,
            "freeswitch.hook_timeout": 2,
            "freeswitch.fail_mode": "closed",
        }
    )
    service = make_service(settings)
    for logon in LOGONS:
        service.add_subscriber(logon, logon)
        service.apply(LoggedOn(logon, service.clock(), contact=f"sip:{logon}@127.0.0.1:5091"))
    records: list[CallRecord] = []
    service.add_listener(records.append)
    pool = ThreadPool(1)
    # A session time limit far beyond the deadline: only the deadline may end the wait.
    server = SocketHookServer(OffHub(service, pool), settings, host="127.0.0.1", port=0, session_timeout=30)
    assert server.decision_timeout < settings.freeswitch.hook_timeout - 1  # before the earliest transfer
    server.start()
    try:
        with write_lock_held(database_url):
            # Each leg's CHANNEL_CREATE usually comes over the event socket before its hook
            # session; the listener applies it through the same database thread, without a deadline.
            hub_service = OffHub(service, pool)
            created = [
                gevent.spawn(
                    hub_service.apply,
                    CallStarted(logon, uuid, "600", Direction.OUTBOUND, service.clock()),
                    enforce=True,
                )
                for uuid, logon in zip(UUIDS, LOGONS, strict=True)
            ]
            calls = [
                FakeSocketCall(server.port, channel_data(uuid, logon, "600"), timeout=30)
                for uuid, logon in zip(UUIDS, LOGONS, strict=True)
            ]
            ring = FakeSocketCall(server.port, inbound_data("6a4c3e10-0000-4000-8000-0000000000ff", "1000"))
            for call in [*calls, ring]:
                call.start()
            # Answered while the database is still locked: within the bound, not after it.
            wait_until(
                lambda: all(c.finished.is_set() for c in [*calls, ring]),
                10,
                "the hook to answer every call while the database is locked",
            )
        for call, uuid in zip(calls, UUIDS, strict=True):
            assert call.commands == undecided(uuid), call.commands
        assert (
            "api uuid_setvar 6a4c3e10-0000-4000-8000-0000000000ff forum_bridge_result error" in ring.commands
        )
        assert server.late == len(calls) + 1
        # The lock is gone: the decisions that were waiting for it run now and must roll back;
        # the events' own decisions give way to the answers the hook gave.
        wait_until(lambda: all(g.ready() for g in created), 60, "the events to be applied")
        for greenlet in created:
            outcome = greenlet.get()
            assert outcome.hangup
            assert outcome.decision is not None and outcome.decision.reason.value == "bridge_error"
        # The pool has one thread, so this read runs after every decision queued before it.
        status = hub_service.status()
        assert status["licences"]["used"] == 0, status["assignments"]
        assert not [a for a in service.audit_log(500) if a["kind"] == "acquire"]
        assert not [r for r in records if r.decision.allowed]
        # A leg's CHANNEL_CREATE seen again (after a reconnect) gets the same answer, not a new decision.
        for logon, uuid in zip(LOGONS, UUIDS, strict=True):
            outcome = service.apply(CallStarted(logon, uuid, "600", Direction.OUTBOUND, service.clock()))
            assert outcome.hangup
            assert outcome.decision is not None and outcome.decision.reason.value == "bridge_error"
        assert service.status()["licences"]["used"] == 0
        # With the database answering again, a new call is decided normally (and takes its licence).
        fresh = FakeSocketCall(
            server.port, channel_data("6a4c3e10-0000-4000-8000-000000000100", "1000", "600")
        )
        fresh.start()
        wait_until(fresh.finished.is_set, 10, "the hook to answer a new call")
        assert fresh.commands == allowed("6a4c3e10-0000-4000-8000-000000000100")
        assert [a["logon"] for a in service.status()["assignments"]] == ["1000"]
    finally:
        server.stop(timeout=1)
        pool.kill()
