"""The WSGI application without a browser: routes, the JSON and metrics documents, escaping, headers
and every refusal of the licence reset. Most tests go over real HTTP on 127.0.0.1; a few call the
WSGI callable directly, as any WSGI server would."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forum_bridge.core.events import LoggedOn, LogonFailed
from forum_bridge.errors import StoreError
from forum_bridge.web.app import CSRF_COOKIE, make_app
from forum_bridge.web.server import WebServer

from .conftest import TOKEN, Bridge, Client

ClientFor = Callable[[WebServer], Client]


def wsgi_call(app: Any, path: str, method: str = "GET", **environ: Any) -> tuple[str, dict[str, str], bytes]:
    """Call a WSGI application in-process; return status line, headers and body."""
    env: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": method, **environ}
    setup_testing_defaults(env)
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured["status"], captured["headers"] = status, dict(headers)
        return lambda data: None

    chunks: Iterable[bytes] = app(env, start_response)
    return captured["status"], captured["headers"], b"".join(chunks)


def held(bridge: Bridge) -> Bridge:
    """21-desk logged on and holding a licence."""
    bridge.log_on("21-desk", "21", user_agent="SIPp")
    assert bridge.service.authorize("21-desk", "600").takes_licence
    return bridge


def reset_form(client: Client, **fields: str) -> dict[str, str]:
    """A correct reset form for ``client`` (which gets its CSRF cookie now), with ``fields`` changed."""
    form = {"csrf": client.csrf(), "token": TOKEN, "confirm": "yes"}
    form.update(fields)
    return form


def resets(bridge: Bridge) -> list[dict[str, Any]]:
    """The audit log's reset lines."""
    return [row for row in bridge.service.audit_log() if row["kind"] == "reset"]


# --- documents ------------------------------------------------------------------------------------


def test_status_json_is_the_service_status_document(bridge: Bridge, client_for: ClientFor) -> None:
    held(bridge)
    bridge.service.apply(LogonFailed("22-soft", at=bridge.clock()))
    answer = client_for(bridge.serve()).request("/status.json")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    # The clock stands still, so the two reads must agree field by field.
    assert answer.json() == bridge.service.status()
    assert answer.json()["licences"] == {"total": 2, "used": 1, "free": 1, "reserved": 0}


def test_status_json_through_the_wsgi_callable(bridge: Bridge) -> None:
    held(bridge)
    app = make_app(bridge.service, bridge.settings, bridge.metrics)
    status, headers, body = wsgi_call(app, "/status.json")
    assert status == "200 OK"
    assert json.loads(body) == bridge.service.status()
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_metrics_parse_and_carry_the_fixed_series(bridge: Bridge, client_for: ClientFor) -> None:
    held(bridge)
    bridge.log_on("22-soft", "22")
    bridge.log_on("23-desk", "23")
    assert bridge.service.authorize("22-soft", "600").takes_licence
    assert not bridge.service.authorize("23-desk", "600").allowed  # every licence is held now
    bridge.service.apply(LoggedOn("trunk-a", at=bridge.clock(), contact="sip:trunk@10.0.0.9"))
    bridge.metrics.set_connected(True)
    bridge.metrics.observe_event_lag(0.2)
    answer = client_for(bridge.serve()).request("/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    assert {
        "forum_bridge_licences_total",
        "forum_bridge_licences_used",
        "forum_bridge_subscribers",
        "forum_bridge_decisions",  # the parser drops a counter's _total suffix from the family name
        "forum_bridge_pbx_connected",
        "forum_bridge_event_lag_seconds",
        "forum_bridge_unmanaged_endpoints",
    } <= set(families)
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert values[("forum_bridge_licences_total", ())] == 2
    assert values[("forum_bridge_licences_used", ())] == 2
    assert values[("forum_bridge_subscribers", (("state", "logged_on"),))] == 3
    assert values[("forum_bridge_subscribers", (("state", "logged_off"),))] == 0
    assert values[("forum_bridge_subscribers", (("state", "logon_failed"),))] == 0
    assert (
        values[("forum_bridge_decisions_total", (("reason", "licence_acquired"), ("result", "allowed")))] == 2
    )
    assert values[("forum_bridge_decisions_total", (("reason", "emergency_only"), ("result", "denied")))] == 1
    assert values[("forum_bridge_pbx_connected", (("pbx", "asterisk"),))] == 1
    assert values[("forum_bridge_event_lag_seconds_count", ())] == 1
    assert values[("forum_bridge_unmanaged_endpoints", ())] == 1


def test_metrics_absent_gives_404(bridge: Bridge) -> None:
    app = make_app(bridge.service, bridge.settings, None)
    status, _, _ = wsgi_call(app, "/metrics")
    assert status.startswith("404")


def test_healthz_not_found_and_methods(bridge: Bridge, client_for: ClientFor) -> None:
    client = client_for(bridge.serve())
    health = client.request("/healthz")
    assert (health.status, health.text) == (200, "ok\n")
    assert client.request("/nothing-here").status == 404
    wrong = client.request("/reset")
    assert wrong.status == 405
    assert wrong.headers["Allow"] == "POST"
    assert client.request("/", method="DELETE").status == 405
    head = client.request("/", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers["Content-Length"]) > 1000


# --- the page -------------------------------------------------------------------------------------


def test_page_shows_licences_assignment_subscribers_failures_and_unmanaged(
    bridge: Bridge, client_for: ClientFor
) -> None:
    held(bridge)
    bridge.service.add_subscriber("22-soft", "22")
    bridge.service.apply(LogonFailed("22-soft", at=bridge.clock()))
    bridge.service.apply(LogonFailed("nobody", at=bridge.clock(), reason="unknown_user"))
    bridge.service.apply(
        LoggedOn("trunk-a", at=bridge.clock(), contact="sip:trunk@10.0.0.9", user_agent="GW")
    )
    page = client_for(bridge.serve()).request("/").text
    assert re.search(r'id="lic-total" class="big">2<', page)
    assert re.search(r'id="lic-used" class="big">1<', page)
    assert re.search(r'id="lic-free" class="big">1<', page)
    assignments = page.split('id="assignments">')[1].split("</tbody>")[0]
    assert "<td>1</td><td>21-desk</td><td>21</td>" in assignments
    subscribers = page.split('id="subscribers">')[1].split("</tbody>")[0]
    assert 'st-logged_on">logged on' in subscribers
    assert 'lic-yes">slot 1' in subscribers
    assert 'st-logon_failed">log-on failed' in subscribers
    assert "SIPp" in subscribers
    assert "default" in subscribers
    assert "pbx1" in subscribers
    failed = page.split('id="failed">')[1].split("</tbody>")[0]
    assert "nobody" in failed
    assert "unknown user" in failed
    assert "wrong password" in failed
    unmanaged = page.split('id="unmanaged">')[1].split("</tbody>")[0]
    assert "trunk-a" in unmanaged
    assert "sip:trunk@10.0.0.9" in unmanaged
    assert '<svg id="chart"' in page
    assert re.search(r'<path class="used" d="M[\d.]+ [\d.]+', page)
    assert "Now 1 of 2 in use." in page


def test_page_escapes_attacker_controlled_names(bridge: Bridge, client_for: ClientFor) -> None:
    now = bridge.clock()
    bridge.service.apply(LogonFailed("<img src=x onerror=alert(1)>", at=now, source='"><b>src</b>'))
    bridge.service.apply(
        LoggedOn(
            "<script>alert(1)</script>", at=now, contact="sip:x'\"<i>@h", user_agent="UA<svg/onload=alert(2)>"
        )
    )
    answer = client_for(bridge.serve()).request("/")
    page = answer.text
    assert "<img src=x" not in page
    assert "<script>alert(1)" not in page
    assert "<svg/onload" not in page
    assert "<b>src</b>" not in page
    assert "<i>@h" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'title="UA&lt;svg/onload=alert(2)&gt;"' in page
    # Every script on the page carries the response's nonce, and the policy allows nothing else.
    policy = answer.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce is not None
    assert "unsafe-inline" not in policy
    assert re.findall(r"<script[^>]*>", page) == [f'<script nonce="{nonce.group(1)}">']


def test_security_headers_on_every_answer(bridge: Bridge, client_for: ClientFor) -> None:
    client = client_for(bridge.serve())
    for path in ("/", "/status.json", "/metrics", "/healthz", "/missing"):
        headers = client.request(path).headers
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Referrer-Policy"] == "same-origin", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
    first = client.request("/").headers["Content-Security-Policy"]
    second = client.request("/").headers["Content-Security-Policy"]
    assert first != second  # a fresh nonce per response


def test_csrf_cookie_is_strict_and_http_only(bridge: Bridge, client_for: ClientFor) -> None:
    answer = client_for(bridge.serve()).request("/")
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{CSRF_COOKIE}=")
    assert "SameSite=Strict" in cookie
    assert "HttpOnly" in cookie


def test_flash_comes_only_from_fixed_codes(bridge: Bridge, client_for: ClientFor) -> None:
    client = client_for(bridge.serve())
    assert "Licences reset: 3 freed." in client.request("/?reset=ok&freed=3").text
    crafted = client.request("/?reset=ok&freed=Call+0900+for+help").text
    assert "Call 0900" not in crafted
    assert "Licences reset: ? freed." in crafted
    assert 'class="flash"' in client.request("/?reset=Hacked").text  # unknown code: no message


# --- reset ----------------------------------------------------------------------------------------


def test_reset_with_the_right_token_frees_every_licence_and_writes_the_audit_log(
    bridge: Bridge, client_for: ClientFor
) -> None:
    held(bridge)
    web = bridge.serve()
    client = client_for(web)
    origin = web.url.rstrip("/")
    answer = client.request("/reset", data=reset_form(client), headers={"Origin": origin})
    assert answer.status == 303
    assert answer.headers["Location"] == "/?reset=ok&freed=1"
    assert bridge.service.status()["licences"] == {"total": 2, "used": 0, "free": 2, "reserved": 0}
    assert bridge.service.status()["assignments"] == []
    [reset] = resets(bridge)
    assert reset["actor"] == "web:127.0.0.1"
    assert reset["at"] == bridge.service.status()["generated_at"]  # the (frozen) clock's time
    assert "Licences reset: 1 freed." in client.request(answer.headers["Location"]).text


def test_reset_answers_json_when_asked(bridge: Bridge, client_for: ClientFor) -> None:
    held(bridge)
    client = client_for(bridge.serve())
    answer = client.request("/reset", data=reset_form(client), headers={"Accept": "application/json"})
    assert answer.status == 200
    assert answer.json() == {"ok": True, "freed": 1, "message": "Licences reset: 1 freed."}
    assert bridge.service.status()["licences"]["used"] == 0


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"token": "wrong"}, 403, "wrong_token"),
        ({"token": ""}, 403, "wrong_token"),
        ({"token": TOKEN + "x"}, 403, "wrong_token"),
        ({"csrf": ""}, 403, "csrf"),
        ({"csrf": "0" * 64}, 403, "csrf"),
        ({"confirm": "no"}, 400, "confirm"),
    ],
)
def test_reset_refusals_change_nothing(
    bridge: Bridge, client_for: ClientFor, change: dict[str, str], status: int, code: str
) -> None:
    held(bridge)
    client = client_for(bridge.serve())
    answer = client.request(
        "/reset", data=reset_form(client, **change), headers={"Accept": "application/json"}
    )
    assert answer.status == status
    assert answer.json()["error"] == code
    assert bridge.service.status()["licences"]["used"] == 1
    assert resets(bridge) == []


def test_a_script_resets_with_a_bearer_token(bridge: Bridge, client_for: ClientFor) -> None:
    held(bridge)
    client = client_for(bridge.serve())
    answer = client.request("/reset", method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200
    assert answer.json() == {"ok": True, "freed": 1, "message": "Licences reset: 1 freed."}
    assert bridge.service.status()["licences"]["used"] == 0
    assert [r["actor"] for r in resets(bridge)] == ["api:127.0.0.1"]


@pytest.mark.parametrize("header", ["Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer"])
def test_a_wrong_bearer_token_changes_nothing(bridge: Bridge, client_for: ClientFor, header: str) -> None:
    held(bridge)
    client = client_for(bridge.serve())
    answer = client.request(
        "/reset", method="POST", headers={"Authorization": header, "Accept": "application/json"}
    )
    assert answer.status == 403
    assert answer.json()["error"] == "wrong_token"
    assert bridge.service.status()["licences"]["used"] == 1
    assert resets(bridge) == []


def test_bearer_reset_without_a_configured_token_is_refused(
    read_only_bridge: Bridge, client_for: ClientFor
) -> None:
    held(read_only_bridge)
    client = client_for(read_only_bridge.serve())
    answer = client.request("/reset", method="POST", headers={"Authorization": "Bearer anything"})
    assert answer.status == 403
    assert read_only_bridge.service.status()["licences"]["used"] == 1


def test_wrong_token_from_a_plain_form_gets_a_403_page(bridge: Bridge, client_for: ClientFor) -> None:
    held(bridge)
    client = client_for(bridge.serve())
    answer = client.request("/reset", data=reset_form(client, token="guess"))
    assert answer.status == 403
    assert answer.headers["Content-Type"].startswith("text/html")
    assert "wrong administrator token" in answer.text
    assert bridge.service.status()["licences"]["used"] == 1


def test_reset_without_the_csrf_cookie_is_refused(bridge: Bridge, client_for: ClientFor) -> None:
    held(bridge)
    web = bridge.serve()
    form = reset_form(client_for(web))  # a token minted for another client's cookie
    answer = client_for(web).request("/reset", data=form, headers={"Accept": "application/json"})
    assert answer.status == 403
    assert answer.json()["error"] == "csrf"
    assert bridge.service.status()["licences"]["used"] == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # same host, other port: another origin
        {"Referer": "http://evil.example/page"},
    ],
)
def test_cross_site_reset_is_refused_even_with_valid_tokens(
    bridge: Bridge, client_for: ClientFor, headers: dict[str, str]
) -> None:
    held(bridge)
    client = client_for(bridge.serve())
    answer = client.request(
        "/reset", data=reset_form(client), headers={"Accept": "application/json", **headers}
    )
    assert answer.status == 403
    assert answer.json()["error"] == "cross_site"
    assert bridge.service.status()["licences"]["used"] == 1
    assert resets(bridge) == []


def test_same_origin_referer_is_accepted(bridge: Bridge, client_for: ClientFor) -> None:
    held(bridge)
    web = bridge.serve()
    client = client_for(web)
    answer = client.request("/reset", data=reset_form(client), headers={"Referer": web.url + "?x=1"})
    assert answer.status == 303
    assert bridge.service.status()["licences"]["used"] == 0


def test_read_only_without_a_token(read_only_bridge: Bridge, client_for: ClientFor) -> None:
    held(read_only_bridge)
    client = client_for(read_only_bridge.serve())
    answer = client.request("/")
    assert 'id="reset-form"' not in answer.text
    assert 'name="token"' not in answer.text
    assert 'id="read-only"' in answer.text
    assert "Set-Cookie" not in answer.headers
    refused = client.request(
        "/reset", data={"token": "", "confirm": "yes", "csrf": "x"}, headers={"Accept": "application/json"}
    )
    assert refused.status == 403
    assert refused.json()["error"] == "read_only"
    assert read_only_bridge.service.status()["licences"]["used"] == 1


def test_reset_form_limits(bridge: Bridge, client_for: ClientFor) -> None:
    client = client_for(bridge.serve())
    client.csrf()
    big = client.request("/reset", data={"token": "x" * 5000}, headers={"Accept": "application/json"})
    assert big.status == 413
    wrong_type = client.request(
        "/reset", data={"token": TOKEN}, headers={"Content-Type": "text/plain", "Accept": "application/json"}
    )
    assert wrong_type.status == 415


def test_token_never_appears_in_answers_or_logs(
    bridge: Bridge, client_for: ClientFor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    held(bridge)
    client = client_for(bridge.serve())
    answers = [
        client.request(path) for path in ("/", "/status.json", "/metrics", "/healthz", "/?token=" + TOKEN)
    ]
    answers.append(client.request("/reset", data=reset_form(client, token=TOKEN[:-1])))
    answers.append(
        client.request("/reset", data=reset_form(client), headers={"Origin": "http://evil.example"})
    )
    answers.append(client.request("/reset", data=reset_form(client, csrf="")))
    answers.append(client.request("/reset", data=reset_form(client)))
    assert answers[-1].status == 303  # the right token was used too
    for answer in answers:
        assert TOKEN not in answer.text
        assert TOKEN not in str(answer.headers)
    assert "/?token" not in caplog.text  # query strings are not logged either
    assert TOKEN not in caplog.text
    assert "licences reset by web:127.0.0.1" in caplog.text
    assert "wrong administrator token" in caplog.text


def test_database_failure_gives_503_and_a_log_line(
    bridge: Bridge, client_for: ClientFor, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: Any) -> Any:
        raise StoreError("database error: disk I/O error")

    monkeypatch.setattr(bridge.service, "status", broken)
    monkeypatch.setattr(bridge.service, "counts", broken)  # what /metrics reads
    client = client_for(bridge.serve())
    assert client.request("/").status == 503
    assert client.request("/status.json").json()["error"] == "unavailable"
    assert "disk I/O error" in caplog.text
    families = {f.name: f for f in text_string_to_metric_families(client.request("/metrics").text)}
    assert families["forum_bridge_database_up"].samples[0].value == 0
    assert "forum_bridge_pbx_connected" in families  # the rest of the scrape still works


def test_unexpected_error_gives_a_generic_500_and_a_traceback_in_the_log(
    bridge: Bridge, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(bridge.service, "status", broken)
    app = make_app(bridge.service, bridge.settings, bridge.metrics)
    status, headers, body = wsgi_call(app, "/")
    assert status == "500 Internal Server Error"
    assert headers["Content-Type"].startswith("text/html")
    assert b"secret internals" not in body
    assert "secret internals" in caplog.text  # the traceback goes to the log, not to the client


def test_status_json_lists_one_page_of_subscribers_when_asked(bridge: Bridge) -> None:
    bridge.service.import_subscribers("".join(f"p{i:04d},{7000 + i}\n" for i in range(30)))
    app = make_app(bridge.service, bridge.settings, bridge.metrics)
    _, _, body = wsgi_call(app, "/status.json")
    assert len(json.loads(body)["subscribers"]) == 30  # scripts without parameters get every one
    _, _, body = wsgi_call(app, "/status.json", QUERY_STRING="limit=10&offset=25")
    doc = json.loads(body)
    assert [s["logon"] for s in doc["subscribers"]] == [f"p{i:04d}" for i in range(25, 30)]
    assert doc["subscriber_page"] == {"search": "", "offset": 25, "limit": 10, "matched": 30}
    assert doc["summary"]["subscribers"] == 30
    _, _, body = wsgi_call(app, "/status.json", QUERY_STRING="q=7011")
    assert [s["logon"] for s in json.loads(body)["subscribers"]] == ["p0011"]
    _, _, body = wsgi_call(app, "/status.json", QUERY_STRING="limit=5000")
    assert json.loads(body)["subscriber_page"]["limit"] == 1000  # bounded
    _, _, body = wsgi_call(app, "/status.json", QUERY_STRING="limit=99999999&offset=-3")
    doc = json.loads(body)  # malformed numbers count as absent: every subscriber
    assert (doc["subscriber_page"]["offset"], doc["subscriber_page"]["limit"]) == (0, None)
    assert len(doc["subscribers"]) == 30


def test_the_page_shows_a_flood_summary_as_a_sample_and_how_many_more(bridge: Bridge) -> None:
    service = bridge.service
    for i in range(40):
        service.apply(
            LogonFailed(f"scan{i}", at=bridge.clock(), source="203.0.113.9:5060", reason="unknown_user")
        )
    assert service.flush_failure_summary(bridge.clock() + timedelta(minutes=2))
    app = make_app(service, bridge.settings, bridge.metrics)
    _, _, body = wsgi_call(app, "/")
    failed = body.decode().split('id="failed">')[1].split("</tbody>")[0]
    assert "and 29 more (30 names)" in failed  # 10 written one by one, 30 summarised
    assert failed.count("<tr>") == 11
