"""The socket hook bounds what one connection may send and how many connections it holds at once."""

from __future__ import annotations

import socket
import threading

from forum_bridge.adapters.freeswitch.socket_hook import MAX_SESSION_BYTES, SocketHookServer
from tests.freeswitch.conftest import wait_until
from tests.freeswitch.fake_esl import FakeSocketCall, channel_data
from tests.freeswitch.test_socket_hook import HookFactory, allowed, place, start_hook

__all__ = ["start_hook"]  # the fixture, re-used


class Flooder(threading.Thread):
    """A peer that answers ``connect`` with an endless frame and counts what it got to send."""

    def __init__(self, port: int, header: bytes) -> None:
        super().__init__(name="flooder", daemon=True)
        self.port, self.header = port, header
        self.sent = 0
        self.done = threading.Event()

    def run(self) -> None:
        chunk = b"x" * 65536
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.recv(100)  # "connect"
                sock.sendall(self.header)
                while self.sent < 64 * 1024 * 1024:
                    sock.sendall(chunk)
                    self.sent += len(chunk)
        except OSError:
            pass  # the bridge closed the connection: what this test wants
        finally:
            self.done.set()


def test_a_connection_may_not_send_megabytes(start_hook: HookFactory) -> None:
    server, _service = start_hook()
    for header in (b"Content-Type: command/reply\nContent-Length: 60000000\n\n", b"Event-Name: "):
        before = server.sessions
        flooder = Flooder(server.port, header)
        flooder.start()
        wait_until(lambda: flooder.done.is_set() and server.sessions > before, 20, "the flood to be cut")  # noqa: B023
        # What the bridge read is far less; the kernel's socket buffers (a few MiB) hold the rest.
        assert flooder.sent < MAX_SESSION_BYTES + 16 * 1024 * 1024
    assert place(server, "c-1", "1000", "600").commands == allowed("c-1")


def test_silent_connections_give_way_to_a_real_call(start_hook: HookFactory) -> None:
    server, _service = start_hook()
    small = SocketHookServer(server.service, host="127.0.0.1", port=0, session_timeout=30, max_sessions=4)
    small.start()
    try:
        silent = [FakeSocketCall(small.port, b"", answer=False, timeout=30) for _ in range(4)]
        for peer in silent:
            peer.start()
        wait_until(lambda: all(p.commands == ["connect"] for p in silent), 10, "four silent sessions")
        assert place(small, "c-1", "1000", "600").commands == allowed("c-1")
        assert small.evicted == 1 and small.refused == 0
        wait_until(lambda: any(p.finished.is_set() for p in silent), 5, "a silent session to be dropped")
        assert sum(p.finished.is_set() for p in silent) == 1
    finally:
        small.stop(timeout=1)


def test_real_channel_data_fits_the_bounds() -> None:
    data = channel_data("4f1c0e2a-7f7b-4c55-9d1e-2b8f0a6c9e11", "1000", "600")
    assert len(data) * 8 < MAX_SESSION_BYTES


def test_an_address_outside_the_allow_list_gets_no_verdict_and_takes_no_licence(
    start_hook: HookFactory,
) -> None:
    server, service = start_hook(**{"freeswitch.socket_allow": ["127.0.0.2"]})
    stranger = FakeSocketCall(
        server.port, channel_data("4f1c0e2a-7f7b-4c55-9d1e-2b8f0a6c9e11", "1000", "600")
    )
    stranger.start()
    wait_until(stranger.finished.is_set, 5, "the stranger to be turned away")
    assert stranger.commands == []  # not even "connect"
    assert server.rejected == 1
    assert service.status()["assignments"] == []
