"""The page under attack: DNS rebinding, token guessing, short tokens, a reverse proxy's password,
slow and idle clients, and errors that must stay inside the log's format."""

from __future__ import annotations

import http.client
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forum_bridge.errors import ConfigError
from forum_bridge.web import server as server_module
from forum_bridge.web.app import FailureLimit, host_name
from forum_bridge.web.server import WebServer, start_web
from tests.conftest import wait_until

from .conftest import TOKEN, Bridge, Client, make_bridge
from .test_web_app import held, reset_form, resets

ClientFor = Callable[[WebServer], Client]


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator[Callable[..., Bridge]]:
    """Build bridges with extra settings; every one is stopped afterwards."""
    made: list[Bridge] = []

    def build(**overrides: Any) -> Bridge:
        bridge = make_bridge(tmp_path, **overrides)
        made.append(bridge)
        return bridge

    yield build
    for bridge in made:
        for web in bridge._servers:
            web.stop()
        bridge.service.database.dispose()


def get(web: WebServer, path: str, host: str | None) -> tuple[int, bytes]:
    """GET with exactly this Host header (None: no Host header at all, as HTTP/1.0 scripts do)."""
    connection = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


# --- Host allow-list ------------------------------------------------------------------------------


def test_a_rebound_host_name_cannot_read_the_status(bridge: Bridge) -> None:
    held(bridge)
    web = bridge.serve()
    for path in ("/status.json", "/", "/metrics"):
        status, body = get(web, path, f"attacker.example:{web.port}")
        assert status == 400, path
        assert b"21-desk" not in body and b"licences" not in body
    for host in (f"127.0.0.1:{web.port}", f"localhost:{web.port}", "LOCALHOST.", None):
        status, body = get(web, "/status.json", host)
        assert status == 200, host
        assert b"21-desk" in body


def test_allowed_hosts_names_the_page_behind_a_proxy(bridges: Callable[..., Bridge]) -> None:
    bridge = bridges(web__allowed_hosts=["pbx1.example.net"])
    web = bridge.serve()
    assert get(web, "/healthz", "pbx1.example.net")[0] == 200
    assert get(web, "/healthz", "pbx1.example.net:443")[0] == 200
    assert get(web, "/healthz", f"localhost:{web.port}")[0] == 400  # the list replaces the defaults
    assert get(web, "/healthz", "pbx2.example.net")[0] == 400


def test_host_names_are_compared_without_port_case_or_trailing_dot() -> None:
    assert host_name("[::1]:8088") == "::1"
    assert host_name("PBX1.Example.NET.:443") == "pbx1.example.net"
    assert host_name("::1") == "::1"


# --- tokens -----------------------------------------------------------------------------------


def test_a_short_token_refuses_to_start_the_page_without_quoting_it(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path, token="short-secret")
    try:
        with pytest.raises(ConfigError, match=r"^configuration key web\.token: too short") as caught:
            start_web(bridge.service, bridge.settings, bridge.metrics)
    finally:
        bridge.service.database.dispose()
    assert "short-secret" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_reverse_proxys_basic_password_does_not_break_the_form(
    bridge: Bridge, client_for: ClientFor
) -> None:
    held(bridge)
    client = client_for(bridge.serve())
    form = reset_form(client)
    answer = client.request("/reset", data=form, headers={"Authorization": "Basic YWRtaW46cHJveHk="})
    assert answer.status == 303
    assert bridge.service.status()["licences"]["used"] == 0
    assert len(resets(bridge)) == 1


def test_wrong_tokens_are_rate_limited_per_client(bridge: Bridge, client_for: ClientFor) -> None:
    held(bridge)
    client = client_for(bridge.serve())
    json = {"Accept": "application/json"}
    for attempt in range(5):
        answer = client.request("/reset", data=reset_form(client, token=f"guess-{attempt}"), headers=json)
        assert answer.status == 403
    # Now even the right token waits: guessing must not go on at full speed.
    for refused in (
        client.request("/reset", data=reset_form(client), headers=json),
        client.request("/reset", method="POST", headers={"Authorization": f"Bearer {TOKEN}", **json}),
    ):
        assert refused.status == 429
        assert refused.json()["error"] == "too_many"
        assert 0 < int(refused.headers["Retry-After"]) <= 301
    assert bridge.service.status()["licences"]["used"] == 1
    assert resets(bridge) == []


def test_the_failure_limit_forgets_in_time_and_stays_bounded() -> None:
    now = [1000.0]
    limit = FailureLimit(limit=3, window=60, clients=4, clock=lambda: now[0])
    for _ in range(3):
        assert limit.wait("192.0.2.1") == 0
        limit.failed("192.0.2.1")
    assert limit.wait("192.0.2.1") == pytest.approx(60)
    assert limit.wait("192.0.2.2") == 0  # another client is not affected
    now[0] += 30
    assert limit.wait("192.0.2.1") == pytest.approx(30)
    now[0] += 31
    assert limit.wait("192.0.2.1") == 0
    for host in range(3):  # one IPv6 host rotating through its /64 is one client
        limit.failed(f"2001:db8::{host + 1}")
    assert limit.wait("2001:db8::ffff") > 0
    assert limit.wait("2001:db8:0:1::1") == 0
    for n in range(100):
        limit.failed(f"198.51.100.{n}")
    assert len(limit._failures) == 4


# --- slow and idle clients ------------------------------------------------------------------------


def test_a_client_trickling_its_headers_is_cut_off_at_the_deadline(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT", 1.0)
    web = bridge.serve()
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.settimeout(0.2)
        closed = False
        # One header line every 0.2 s: each read is quick, only a deadline for the whole request ends it.
        for n in range(100):
            try:
                sock.sendall(f"X-Slow-{n}: 1\r\n".encode())
                if sock.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                closed = True
                break
        assert closed, "the server kept a trickling client for 20 s"


def test_the_page_serves_a_capped_number_of_clients_and_recovers(
    bridges: Callable[..., Bridge], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT", 60.0)
    bridge = bridges(web__max_connections=2)
    web = bridge.serve()
    idle = [socket.create_connection(("127.0.0.1", web.port), timeout=10) for _ in range(2)]
    try:
        # Both slots are held by clients that say nothing; a third waits in the listen queue.
        waiting = http.client.HTTPConnection("127.0.0.1", web.port, timeout=1.5)
        waiting.request("GET", "/healthz")
        with pytest.raises(TimeoutError):
            waiting.getresponse()
        waiting.close()
        idle.pop().close()
        late = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
        late.request("GET", "/healthz")
        assert late.getresponse().status == 200
        late.close()
    finally:
        for sock in idle:
            sock.close()


def test_server_errors_go_to_the_log_not_to_bare_stderr(
    bridge: Bridge,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="forum_bridge.web")

    def broken(self: Any) -> None:
        raise RuntimeError("handler bug")

    monkeypatch.setattr(server_module._Handler, "handle", broken)
    web = bridge.serve()
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        wait_until(
            lambda: any("handler bug" in (r.exc_text or "") or r.exc_info for r in caplog.records),
            what="the error in the log",
        )
    err = capfd.readouterr().err
    assert "Traceback" not in err and "handler bug" not in err
    record = next(r for r in caplog.records if r.exc_info)
    assert record.levelno == logging.ERROR and record.name == "forum_bridge.web"
