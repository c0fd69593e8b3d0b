"""Clients polling ``/status.json`` are answered from one recent document and cannot crowd out the hook.

Every call decision changes the state, so pollers asking all the time had the whole document made,
encoded and sent again and again in the interpreter the call hook needs. The page now answers from a
document at most a quarter of a second old (encoded once, with an ETag), and a reset made through the
page still shows at once.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from forum_bridge.web import app as web_app
from forum_bridge.web.app import make_app
from tests.conftest import wait_until
from tests.web.conftest import TOKEN, Bridge
from tests.web.test_web_app import held, wsgi_call


def test_pollers_share_one_recent_document_until_it_is_a_quarter_of_a_second_old(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    held(bridge)
    app = make_app(bridge.service, bridge.settings, bridge.metrics)
    now = [1000.0]
    monkeypatch.setattr(web_app.time, "monotonic", lambda: now[0])
    made: list[int] = []
    original = bridge.service.shared_status

    def counted(**kwargs: Any) -> dict[str, Any]:
        made.append(1)
        return original(**kwargs)

    monkeypatch.setattr(bridge.service, "shared_status", counted)
    _, headers, first = wsgi_call(app, "/status.json")
    assert json.loads(first)["licences"]["used"] == 1
    # A decision changes the state; within the quarter second pollers still get the same bytes.
    assert bridge.service.authorize("21-desk", "600").allowed
    bridge.log_on("22-soft", "22")
    assert bridge.service.authorize("22-soft", "600").takes_licence
    for _ in range(20):
        assert wsgi_call(app, "/status.json")[2] == first
    assert len(made) == 1
    now[0] += web_app.FRESH_SECONDS + 0.01
    _, later_headers, later = wsgi_call(app, "/status.json")
    assert json.loads(later)["licences"]["used"] == 2
    assert len(made) == 2
    assert later_headers["ETag"] != headers["ETag"]


def test_etag_answers_304_while_unchanged(bridge: Bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    held(bridge)
    # Every answer from a document made for it, so that the ETag alone decides.
    monkeypatch.setattr(web_app, "FRESH_SECONDS", 0.0)
    monkeypatch.setattr(web_app, "COST_SHARE", 0)
    app = make_app(bridge.service, bridge.settings, bridge.metrics)
    status, headers, body = wsgi_call(app, "/status.json")
    assert status.startswith("200") and headers["Cache-Control"] == "no-cache"
    etag = headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    # Made again later (the service shares a document for up to a second of real time): when it
    # was made is not part of the ETag.
    monkeypatch.setattr(bridge.service.documents._shared, "_max_age", 0.0)
    bridge.clock.advance(seconds=3)
    made_at = json.loads(body)["generated_at"]
    status, headers, body = wsgi_call(app, "/status.json", HTTP_IF_NONE_MATCH=f'"other", W/{etag}')
    assert json.loads(wsgi_call(app, "/status.json")[2])["generated_at"] != made_at
    assert status.startswith("304") and body == b"" and headers["ETag"] == etag
    assert "Content-Length" not in headers
    bridge.log_on("22-soft", "22")
    assert bridge.service.authorize("22-soft", "600").takes_licence
    status, headers, body = wsgi_call(app, "/status.json", HTTP_IF_NONE_MATCH=etag)
    assert status.startswith("200") and headers["ETag"] != etag
    assert json.loads(body)["licences"]["used"] == 2
    # A page of the listing has an ETag of its own.
    _, paged, _ = wsgi_call(app, "/status.json", QUERY_STRING="limit=1")
    assert paged["ETag"] != headers["ETag"]


def test_a_reset_through_the_page_shows_at_once(bridge: Bridge) -> None:
    held(bridge)
    app = make_app(bridge.service, bridge.settings, bridge.metrics)
    assert json.loads(wsgi_call(app, "/status.json")[2])["licences"]["used"] == 1
    status, _, _ = wsgi_call(app, "/reset", "POST", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert status.startswith("200")
    assert json.loads(wsgi_call(app, "/status.json")[2])["licences"]["used"] == 0


def test_at_most_two_answers_are_computed_at_once_and_healthz_never_waits(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    held(bridge)
    app = make_app(bridge.service, bridge.settings, bridge.metrics)
    monkeypatch.setattr(web_app, "FRESH_SECONDS", 0.0)
    monkeypatch.setattr(web_app, "COST_SHARE", 0)
    inside, most = [0], [0]
    lock = threading.Lock()
    release = threading.Event()
    original = bridge.service.shared_status

    def slow(**kwargs: Any) -> dict[str, Any]:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        release.wait(10)
        with lock:
            inside[0] -= 1
        return original(**kwargs)

    monkeypatch.setattr(bridge.service, "shared_status", slow)
    answers: list[str] = []
    threads = [
        threading.Thread(target=lambda: answers.append(wsgi_call(app, "/status.json")[0])) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: inside[0] == web_app.WORKERS, timeout=10, what="two answers under way")
    # A liveness probe does not queue behind them (it would wait here for ever).
    assert wsgi_call(app, "/healthz")[0].startswith("200")
    release.set()
    for thread in threads:
        thread.join(20)
    assert len(answers) == 8 and all(a.startswith("200") for a in answers)
    assert most[0] == web_app.WORKERS == 2
