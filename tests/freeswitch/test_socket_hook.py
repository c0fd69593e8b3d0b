"""The socket hook: a fake FreeSWITCH ``socket`` application connects and must be told allow or hang up."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from forum_bridge.adapters.freeswitch.socket_hook import SocketHookServer
from forum_bridge.config import Settings
from forum_bridge.core.events import LoggedOn
from forum_bridge.core.rules import Decision, Reason
from forum_bridge.errors import PbxConnectionError, StoreError
from forum_bridge.service import BridgeService, DecisionTicket
from tests.conftest import FakeClock
from tests.freeswitch.conftest import wait_until
from tests.freeswitch.fake_esl import FakeSocketCall, channel_data, channel_data_of

HookFactory = Callable[..., tuple[SocketHookServer, BridgeService]]


def allowed(uuid: str) -> list[str]:
    return ["connect", f"api uuid_setvar {uuid} forum_bridge_verdict allowed", "resume", "exit"]


def denied(uuid: str) -> list[str]:
    return [
        "connect",
        f"api uuid_setvar {uuid} forum_bridge_verdict denied",
        f"sendmsg {uuid}\ncall-command: hangup\nhangup-cause: CALL_REJECTED",
        "exit",
    ]


@pytest.fixture
def start_hook(
    fs_settings: Callable[..., Settings], make_service: Callable[[Settings], BridgeService], clock: FakeClock
) -> Iterator[HookFactory]:
    """A started hook server on a free port, with subscribers 1000 and 1001 logged on."""
    servers: list[SocketHookServer] = []

    def start(session_timeout: float = 5.0, **overrides: object) -> tuple[SocketHookServer, BridgeService]:
        service = make_service(fs_settings(**overrides))
        for logon in ("1000", "1001"):
            service.add_subscriber(logon, logon)
            service.apply(LoggedOn(logon, at=clock(), contact=f"sip:{logon}@127.0.0.1:5091"))
        server = SocketHookServer(service, host="127.0.0.1", port=0, session_timeout=session_timeout)
        server.start()
        servers.append(server)
        return server, service

    yield start
    for server in servers:
        server.stop(timeout=1)


def place(server: SocketHookServer, uuid: str, user: str, number: str, **kwargs: object) -> FakeSocketCall:
    """FreeSWITCH runs the socket application for a call and waits for the bridge's verdict."""
    before = server.sessions
    fake = FakeSocketCall(server.port, channel_data(uuid, user, number), **kwargs)  # type: ignore[arg-type]
    fake.start()
    wait_until(lambda: fake.finished.is_set() and server.sessions > before, what="the hook session")
    assert fake.error is None
    return fake


def test_an_allowed_call_sets_the_verdict_and_resumes_the_dialplan(start_hook: HookFactory) -> None:
    server, service = start_hook()
    fake = place(server, "c-1", "1000", "600")
    assert fake.commands == allowed("c-1")
    status = service.status()
    assert [(a["logon"], a["number"]) for a in status["assignments"]] == [("1000", "1000")]
    assert [(c["channel"], c["number"]) for c in status["calls"]] == [("c-1", "600")]


def test_a_denied_call_is_hung_up_with_call_rejected(start_hook: HookFactory) -> None:
    server, service = start_hook()
    place(server, "c-1", "1000", "600")
    fake = place(server, "c-2", "1001", "601")
    assert fake.commands == denied("c-2")
    assert [a["logon"] for a in service.status()["assignments"]] == ["1000"]


def test_an_emergency_call_passes_the_full_pool(start_hook: HookFactory) -> None:
    server, service = start_hook()
    place(server, "c-1", "1000", "600")
    assert place(server, "c-112", "1001", "112").commands == allowed("c-112")
    assert service.status()["licences"]["used"] == 1


def test_a_log_on_that_is_not_logged_on_is_denied(start_hook: HookFactory) -> None:
    server, service = start_hook()
    service.add_subscriber("1002", "1002")
    assert place(server, "c-3", "1002", "600").commands == denied("c-3")


def test_an_unmanaged_caller_passes(start_hook: HookFactory) -> None:
    server, service = start_hook()
    assert place(server, "c-9", "4711", "600").commands == allowed("c-9")
    assert service.status()["licences"]["used"] == 0


def undecided(uuid: str) -> list[str]:
    """No decision with fail_mode closed: rejected as undecided (503), like the dialplan's fail mode."""
    return [
        "connect",
        f"api uuid_setvar {uuid} forum_bridge_verdict unreachable",
        f"sendmsg {uuid}\ncall-command: hangup\nhangup-cause: NORMAL_TEMPORARY_FAILURE",
        "exit",
    ]


@pytest.mark.parametrize(("fail_mode", "expected"), [("closed", undecided), ("open", allowed)])
def test_database_failure_follows_fail_mode(
    start_hook: HookFactory,
    monkeypatch: pytest.MonkeyPatch,
    fail_mode: str,
    expected: Callable[[str], list[str]],
) -> None:
    server, service = start_hook(**{"freeswitch.fail_mode": fail_mode})

    def broken(*_args: object, **_kwargs: object) -> object:
        raise StoreError("database error: unable to open database file")

    monkeypatch.setattr(service, "authorize", broken)
    assert place(server, "c-1", "1000", "600").commands == expected("c-1")


def test_a_silent_peer_times_out_and_the_server_keeps_serving(start_hook: HookFactory) -> None:
    server, _service = start_hook(session_timeout=0.2)
    silent = place(server, "c-0", "1000", "600", answer=False)
    assert silent.commands == ["connect"]  # it never sent CHANNEL_DATA; the bridge gave up and closed
    # Each session reads the bound when it starts. The next call's whole session (a decision in
    # the database included) need not fit into the silent peer's 0.2 s on a busy machine: it
    # gets the fixture's usual bound again; what is checked is that the server still serves.
    server.session_timeout = 5.0
    assert place(server, "c-1", "1000", "600").commands == allowed("c-1")


def test_garbage_instead_of_channel_data_is_refused_without_a_verdict(start_hook: HookFactory) -> None:
    server, service = start_hook()
    before = server.sessions
    fake = FakeSocketCall(
        server.port, b"Event-Name: CHANNEL_DATA\nContent-Type: command/reply\n\n"
    )  # no UUID
    fake.start()
    wait_until(lambda: fake.finished.is_set() and server.sessions > before, what="the hook session")
    assert (fake.error, fake.commands) == (None, ["connect"])  # closed without a verdict
    assert service.status()["calls"] == []
    assert place(server, "c-1", "1000", "600").commands == allowed("c-1")


def test_a_port_in_use_is_a_clear_error(start_hook: HookFactory) -> None:
    server, service = start_hook()
    clash = SocketHookServer(service, host="127.0.0.1", port=server.port)
    with pytest.raises(PbxConnectionError) as info:
        clash.start()
    assert f"127.0.0.1:{server.port}" in str(info.value)


def test_the_caller_is_who_freeswitch_authenticated_not_the_from_user(start_hook: HookFactory) -> None:
    server, service = start_hook()
    place(server, "c-1", "1000", "600")  # 1000 holds the only licence
    # 1001 authenticated with its own password and claims From: 1000.
    data = channel_data_of(
        "c-2", "1001", "601", {"variable_sip_from_user": "1000", "Caller-Username": "1000"}
    )
    fake = FakeSocketCall(server.port, data)
    before = server.sessions
    fake.start()
    wait_until(lambda: fake.finished.is_set() and server.sessions > before, what="the hook session")
    assert fake.commands == denied("c-2")
    denials = [(a["logon"], a["reason"]) for a in service.audit_log() if a["kind"] == "deny"]
    assert denials == [("1001", "emergency_only")]


def test_a_caller_freeswitch_did_not_authenticate_is_no_log_on(start_hook: HookFactory) -> None:
    server, service = start_hook()
    data = channel_data_of(
        "c-3", "1000", "600", remove=["variable_sip_auth_username", "variable_user_name"]
    )  # From: 1000, but nobody authenticated: a trunk or a gateway
    fake = FakeSocketCall(server.port, data)
    before = server.sessions
    fake.start()
    wait_until(lambda: fake.finished.is_set() and server.sessions > before, what="the hook session")
    assert fake.commands == allowed("c-3")
    assert service.status()["licences"]["used"] == 0


def _loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the socket hook logged at warning level or above."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == "forum_bridge.adapters.freeswitch.socket_hook"
    ]


def test_a_connect_and_close_health_check_is_not_logged_as_a_failure(
    start_hook: HookFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server, _service = start_hook()
    caplog.set_level(logging.DEBUG)
    before = server.sessions
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    wait_until(lambda: server.sessions > before, what="the probe's session to end")
    assert _loud(caplog) == []
    assert place(server, "c-1", "1000", "600").commands == allowed("c-1")


@pytest.mark.parametrize(("user", "closed_at"), [("1000", "resume"), ("1001", "sendmsg")])
def test_freeswitch_closing_a_decided_session_is_not_logged_as_a_failure(
    start_hook: HookFactory, caplog: pytest.LogCaptureFixture, user: str, closed_at: str
) -> None:
    # enforce = both: the event path kills the channel while the hook is still talking to it.
    server, _service = start_hook()
    place(server, "c-0", "1000", "600")
    caplog.set_level(logging.DEBUG)
    fake = place(server, "c-1", user, "601", close_after=closed_at)
    assert fake.commands[-1].startswith(closed_at)
    assert _loud(caplog) == []


def test_a_leg_left_undecided_by_its_event_is_rejected_as_undecided_not_denied(
    start_hook: HookFactory,
) -> None:
    # The leg's CHANNEL_CREATE came first while the database was down: its fail-mode answer
    # (closed) stands for the leg. The hook must then give the fail mode's 503, not a denial's 603.
    server, service = start_hook()
    ticket = DecisionTicket(time.monotonic() + 5, "c-1")
    assert service.give_up(ticket, Decision(False, Reason.BRIDGE_ERROR))
    assert place(server, "c-1", "1000", "600").commands == undecided("c-1")
    assert service.status()["licences"]["used"] == 0
