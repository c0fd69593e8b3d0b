"""start_web: a threaded wsgiref server on a free port, quiet logging, a clean stop; and the chart
geometry the page draws from the usage history."""

from __future__ import annotations

import logging
import socket
import threading
import urllib.request
from dataclasses import replace
from typing import Any

import pytest

from forum_bridge.core.events import LoggedOff
from forum_bridge.errors import ConfigError
from forum_bridge.web import page
from forum_bridge.web import server as server_module
from forum_bridge.web.app import make_app
from forum_bridge.web.server import start_web
from tests.conftest import wait_until

from .conftest import Bridge, Client


def test_port_zero_binds_a_free_port_and_stop_closes_it(bridge: Bridge) -> None:
    web = bridge.serve()
    assert web.host == "127.0.0.1"
    assert web.port > 0
    assert web.url == f"http://127.0.0.1:{web.port}/"
    with urllib.request.urlopen(web.url + "healthz", timeout=5) as answer:
        assert answer.read() == b"ok\n"
    web.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", web.port), timeout=2):
        pass
    assert not any(t.name == "forum-bridge-web" and t.is_alive() for t in threading.enumerate())


def test_a_taken_port_is_a_config_error(bridge: Bridge) -> None:
    web = bridge.serve()
    settings = replace(bridge.settings, web=replace(bridge.settings.web, port=web.port))
    with pytest.raises(ConfigError, match=r"web\.port.*cannot listen on 127\.0\.0\.1:"):
        start_web(bridge.service, settings, bridge.metrics)


def test_requests_are_served_concurrently(bridge: Bridge) -> None:
    web = bridge.serve()
    # A client that connects and says nothing must not hold up the next one.
    with (
        socket.create_connection(("127.0.0.1", web.port), timeout=5),
        urllib.request.urlopen(web.url + "healthz", timeout=5) as answer,
    ):
        assert answer.status == 200


def test_requests_are_logged_quietly_without_query_strings(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="forum_bridge.web")
    client = Client(bridge.serve().url)
    client.request("/status.json?token=abcdef")
    client.request("/missing")

    def logged() -> bool:
        return sum("http client=" in r.getMessage() for r in caplog.records) >= 2

    wait_until(logged, what="two request log lines")  # the server logs after the answer is sent
    requests = {r.getMessage(): r.levelno for r in caplog.records if "http client=" in r.getMessage()}
    assert all("abcdef" not in message for message in requests)
    ok = [m for m in requests if "method=GET path=/status.json status=200" in m]
    missing = [m for m in requests if "method=GET path=/missing status=404" in m]
    assert ok, requests
    assert missing, requests
    assert requests[ok[0]] == logging.DEBUG  # a page refreshing every few seconds stays out of the journal
    assert requests[missing[0]] == logging.INFO


def test_the_environment_says_multithreaded(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    real = make_app

    def spy(*args: Any, **kwargs: Any) -> Any:
        app = real(*args, **kwargs)

        def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
            seen["multithread"] = environ["wsgi.multithread"]
            return app(environ, start_response)

        return wrapped

    monkeypatch.setattr(server_module, "make_app", spy)
    Client(bridge.serve().url).request("/healthz")
    assert seen["multithread"] is True


# --- chart ----------------------------------------------------------------------------------------


def test_chart_is_a_step_curve_over_the_last_24_hours() -> None:
    history = [
        {"at": "2024-05-01T00:00:00Z", "used": 0, "total": 2},  # the value in force 24 h ago
        {"at": "2024-05-01T06:00:00Z", "used": 1, "total": 2},
        {"at": "2024-05-01T12:00:00Z", "used": 2, "total": 2},
        {"at": "2024-05-01T18:00:00Z", "used": 0, "total": 2},
        {"at": "2024-05-02T00:00:00Z", "used": 0, "total": 2},  # now
    ]
    c = page.chart(history, "2024-05-02T00:00:00Z")
    # x: 40 + fraction * 666; y: 12 + 162 - value / 2 * 162.
    assert c.used_path == "M40 174 H206.5 V93 H373 V12 H539.5 V174 H706 V174 H706"
    assert c.total_path == "M40 12 H206.5 V12 H373 V12 H539.5 V12 H706 V12 H706"
    assert c.area_path == c.used_path + " V174 H40 Z"
    assert c.y_ticks == (("174", 0), ("93", 1), ("12", 2))
    assert [label for _, label in c.x_ticks] == ["-24 h", "-18 h", "-12 h", "-6 h", "now"]
    assert (c.now_used, c.now_total, c.peak) == (0, 2, 2)
    assert c.busy_seconds == 6 * 3600
    assert (
        page.chart_summary(c)
        == "Now 0 of 2 in use. Peak in the last 24 h: 2. All licences busy for 6 h 0 min."
    )


def test_chart_clamps_points_older_than_the_window() -> None:
    history = [
        {"at": "2024-04-29T00:00:00Z", "used": 1, "total": 1},
        {"at": "2024-05-02T00:00:00Z", "used": 1, "total": 1},
    ]
    c = page.chart(history, "2024-05-02T00:00:00Z")
    assert c.used_path.startswith("M40 ")
    assert c.busy_seconds == 24 * 3600


def test_chart_from_the_service_history(bridge: Bridge) -> None:
    bridge.clock.advance(hours=-30)  # rewind before anything happens
    bridge.log_on("21-desk", "21")
    bridge.clock.advance(hours=20)  # 10 h ago
    assert bridge.service.authorize("21-desk", "600").takes_licence
    bridge.clock.advance(hours=4)  # 6 h ago
    bridge.service.apply(LoggedOff("21-desk", at=bridge.clock()))
    bridge.clock.advance(hours=6)  # now
    status = bridge.service.status()
    c = page.chart(status["usage_history"], status["generated_at"])
    # The curve starts at the first recorded change (nothing is known before it): 1 used from -10 h
    # (x = 40 + 14/24*666 = 428.5) to -6 h (x = 539.5), then 0 until now (x = 706).
    assert c.used_path.startswith("M428.5 93 H539.5 V174 ")
    assert c.used_path.endswith(" H706")
    assert c.peak == 1
    assert c.busy_seconds == 0  # one of two licences: never all busy


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 min"), (59, "0 min"), (61, "1 min"), (3600, "1 h 0 min"), (5430, "1 h 30 min")],
)
def test_duration(seconds: float, text: str) -> None:
    assert page.duration(seconds) == text
