"""The status page in Debian's Chromium: what an administrator sees and does.

Each test drives a real service on a temporary SQLite file, served by start_web on a free port.
Chromium failing to start fails these tests (see the chromium fixture); it never skips them.
"""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from forum_bridge.core.events import LoggedOff, LoggedOn, LogonFailed

from .conftest import ARTIFACTS, TOKEN, Bridge, Client, Clock, Tab, make_bridge

pytestmark = pytest.mark.browser
XSS_NAME = "<img src=x onerror=alert(1)>"


@pytest.fixture
def office(tmp_path: Path) -> Iterator[Bridge]:
    """A day of a small office: licence use over the last 20 hours, one failure, one trunk.

    The service starts 20 hours ago on the test clock, which then moves forward to now.
    """
    bridge = make_bridge(
        tmp_path, clock=Clock(datetime.now(UTC).replace(microsecond=0) - timedelta(hours=20))
    )
    clock, service = bridge.clock, bridge.service
    bridge.log_on("21-desk", "21", user_agent="Yealink SIP-T46U 108.86.0.20")
    bridge.log_on("24-desk", "24", user_agent="snom D785/10.1.159.12")
    service.add_subscriber("22-soft", "22")
    service.add_subscriber("23-mobile", "23")
    clock.advance(hours=2)
    assert service.authorize("21-desk", "600").takes_licence
    clock.advance(hours=6)
    assert service.authorize("24-desk", "4711").takes_licence  # both licences in use
    clock.advance(hours=3)
    service.apply(LoggedOff("24-desk", at=clock()))
    clock.advance(hours=6)
    service.apply(LoggedOff("21-desk", at=clock()))
    clock.advance(hours=2)
    service.apply(LoggedOn("21-desk", at=clock(), contact="sip:21-desk@192.0.2.21:5060", user_agent="SIPp"))
    assert service.authorize("21-desk", "600").takes_licence
    service.apply(LogonFailed("22-soft", at=clock(), source="192.0.2.22"))
    service.apply(LogonFailed(XSS_NAME, at=clock(), source="198.51.100.7", reason="unknown_user"))
    service.apply(
        LoggedOn("trunk-carrier", at=clock(), contact="sip:trunk@203.0.113.5", user_agent="Carrier SBC")
    )
    clock.advance(hours=1)  # now
    yield bridge
    for server in bridge._servers:
        server.stop()
    service.database.dispose()


def chart_path(html: str) -> str:
    """The ``d`` of the server-rendered licence-use curve."""
    found = re.search(r'<path class="used" d="([^"]*)"', html)
    assert found is not None
    return found.group(1)


def resets(bridge: Bridge) -> list[dict[str, Any]]:
    """The audit log's reset lines."""
    return [row for row in bridge.service.audit_log() if row["kind"] == "reset"]


def test_see_the_licence_then_reset_it_with_the_right_token(office: Bridge, tab: Tab) -> None:
    bridge = office
    web = bridge.serve()
    page = tab.page
    page.goto(web.url)
    subscriber = page.locator("#subscribers tr", has_text="21-desk")
    expect(subscriber).to_contain_text("logged on")
    expect(subscriber).to_contain_text("slot 1")
    expect(subscriber).to_contain_text("SIPp")
    expect(page.locator("#assignments")).to_contain_text("21-desk")
    expect(page.locator("#lic-used")).to_have_text("1")
    expect(page.locator("#lic-free")).to_have_text("1")
    expect(page.locator("#failed")).to_contain_text(XSS_NAME)  # shown as text, not run
    expect(page.locator("#unmanaged")).to_contain_text("trunk-carrier")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)

    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.fill("#reset-token", TOKEN)
    page.click("#reset-button")
    expect(page.locator("#flash")).to_have_text("Licences reset: 1 freed.")
    expect(page.locator("#lic-used")).to_have_text("0")
    expect(page.locator("#lic-free")).to_have_text("2")
    expect(page.locator("#assignments")).to_have_text("No licence is held.")
    expect(page.locator("#subscribers tr", has_text="21-desk")).to_contain_text("no")
    expect(page.locator("#reset-token")).to_have_value("")
    assert dialogs == ["Free every licence now? Calls in progress go on."]

    status = bridge.service.status()
    assert status["licences"] == {"total": 2, "used": 0, "free": 2, "reserved": 0}
    [reset] = resets(bridge)
    assert reset["actor"] == "web:127.0.0.1"
    assert reset["at"] == status["generated_at"]  # the service clock's time of the reset
    # The script redraws the chart from status.json exactly as the server draws it.
    expect(page.locator("#chart-summary")).to_contain_text("Now 0 of 2 in use")
    assert page.get_attribute("#chart path.used", "d") == chart_path(Client(web.url).request("/").text)
    assert tab.errors == []  # no script error, no CSP violation


def test_wrong_token_is_refused_and_nothing_changes(bridge: Bridge, tab: Tab) -> None:
    bridge.log_on("21-desk", "21")
    assert bridge.service.authorize("21-desk", "600").takes_licence
    page = tab.page
    page.goto(bridge.serve().url)
    page.on("dialog", lambda dialog: dialog.accept())
    page.fill("#reset-token", "not-the-token")
    page.click("#reset-button")
    expect(page.locator("#flash")).to_have_text(
        "403: Refused: wrong administrator token. Nothing was changed."
    )
    expect(page.locator("#flash")).to_have_class(re.compile(r"\berror\b"))
    expect(page.locator("#lic-used")).to_have_text("1")
    assert bridge.service.status()["licences"]["used"] == 1
    assert resets(bridge) == []
    assert all("status of 403" in e for e in tab.errors), tab.errors  # Chromium logs the refused fetch


def test_dismissing_the_confirmation_sends_nothing(bridge: Bridge, tab: Tab) -> None:
    bridge.log_on("21-desk", "21")
    assert bridge.service.authorize("21-desk", "600").takes_licence
    page = tab.page
    page.goto(bridge.serve().url)
    seen: list[str] = []

    def dismiss(dialog: Any) -> None:
        seen.append(dialog.type)
        dialog.dismiss()

    page.on("dialog", dismiss)
    page.fill("#reset-token", TOKEN)
    # One refresh cycle later (the script asks for one page of subscribers): still nothing.
    with page.expect_request(re.compile(r"/status\.json(\?|$)")):
        page.click("#reset-button")
    assert seen == ["confirm"]
    assert page.locator("#flash").is_hidden()
    assert bridge.service.status()["licences"]["used"] == 1
    assert resets(bridge) == []


def test_without_javascript_the_form_needs_the_explicit_confirmation(bridge: Bridge, chromium: Any) -> None:
    bridge.log_on("21-desk", "21")
    assert bridge.service.authorize("21-desk", "600").takes_licence
    web = bridge.serve()
    context = chromium.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(web.url)
        page.fill("#reset-token", TOKEN)
        page.click("#reset-button")  # the confirmation box is required: the browser does not send
        expect(page.locator("input[name=confirm]:invalid")).to_have_count(1)
        assert page.url == web.url
        assert bridge.service.status()["licences"]["used"] == 1
        page.check("input[name=confirm]")
        with page.expect_navigation():
            page.click("#reset-button")
        assert page.url == web.url + "?reset=ok&freed=1"  # no script here to tidy the address
        expect(page.locator("#flash")).to_have_text("Licences reset: 1 freed.")
        expect(page.locator("#lic-used")).to_have_text("0")
    finally:
        context.close()
    assert bridge.service.status()["licences"]["used"] == 0
    assert [row["actor"] for row in resets(bridge)] == ["web:127.0.0.1"]


def test_read_only_without_a_token(read_only_bridge: Bridge, tab: Tab) -> None:
    read_only_bridge.log_on("21-desk", "21")
    assert read_only_bridge.service.authorize("21-desk", "600").takes_licence
    page = tab.page
    page.goto(read_only_bridge.serve().url)
    expect(page.locator("#read-only")).to_be_visible()
    expect(page.locator("#reset-form")).to_have_count(0)
    expect(page.locator("#reset-button")).to_have_count(0)
    status = page.evaluate(
        """async () => (await fetch("reset", {method: "POST",
            body: new URLSearchParams({token: "", confirm: "yes", csrf: "x"})})).status"""
    )
    assert status == 403
    assert read_only_bridge.service.status()["licences"]["used"] == 1


@pytest.fixture
def foreign_site() -> Iterator[Callable[[str], str]]:
    """Serve one page from another origin (another port); returns a function that sets its HTML."""
    content = {"html": ""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = content["html"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(html: str) -> str:
        content["html"] = html
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_cross_site_form_post_is_refused(
    bridge: Bridge, tab: Tab, foreign_site: Callable[[str], str]
) -> None:
    bridge.log_on("21-desk", "21")
    assert bridge.service.authorize("21-desk", "600").takes_licence
    web = bridge.serve()
    page = tab.page
    page.goto(web.url)  # the administrator has the page open: the browser holds the CSRF cookie
    csrf = page.get_attribute("input[name=csrf]", "value")
    # The worst case: the other site somehow knows the token and the CSRF value; only the origin
    # check is left to stop it.
    attacker = foreign_site(
        f"""<!DOCTYPE html><form method="post" action="{web.url}reset">
        <input name="token" value="{TOKEN}"><input name="confirm" value="yes">
        <input name="csrf" value="{csrf}"><button id="go">Win a prize</button></form>"""
    )
    page.goto(attacker)
    page.click("#go")
    expect(page.locator("#message")).to_have_text("Refused: the request came from another site.")
    assert page.url == web.url + "reset"
    assert bridge.service.status()["licences"]["used"] == 1
    assert resets(bridge) == []


def test_the_page_refreshes_by_itself(bridge: Bridge, tab: Tab) -> None:
    bridge.log_on("21-desk", "21")
    page = tab.page
    alerts: list[str] = []

    def record(dialog: Any) -> None:
        alerts.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", record)
    page.goto(bridge.serve(refresh_seconds=1).url)
    expect(page.locator("#lic-used")).to_have_text("0")
    page.evaluate("window.notReloaded = true")

    # Two rounds of changes: the page keeps refreshing, not just once after loading.
    bridge.log_on("23-desk", "23", user_agent="<b>bold</b> phone")
    assert bridge.service.authorize("23-desk", "600").takes_licence
    expect(page.locator("#lic-used")).to_have_text("1")
    expect(page.locator("#subscribers tr", has_text="23-desk")).to_contain_text("<b>bold</b> phone")
    expect(page.locator("#assignments tr")).to_have_count(1)

    assert bridge.service.authorize("21-desk", "600").takes_licence
    bridge.service.apply(LogonFailed(XSS_NAME, at=bridge.clock(), reason="unknown_user"))
    expect(page.locator("#lic-used")).to_have_text("2")
    expect(page.locator("#lic-free")).to_have_text("0")
    expect(page.locator("#assignments tr")).to_have_count(2)
    expect(page.locator("#failed")).to_contain_text(XSS_NAME)
    expect(page.locator("#chart-summary")).to_contain_text("Now 2 of 2 in use")
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("#subscribers b").count() == 0  # the user agent stayed text
    assert page.locator("#failed img").count() == 0
    assert alerts == []
    assert tab.errors == []


def test_reserved_licences_are_shown_and_follow_changes(bridge: Bridge, tab: Tab) -> None:
    bridge.log_on("21-desk", "21")
    bridge.service.add_subscriber("lift", "90", reserved=True)
    bridge.service.apply(LoggedOn("lift", at=bridge.clock(), contact="sip:lift@192.0.2.90:5060"))
    assert bridge.service.authorize("lift", "90").takes_licence
    page = tab.page
    web = bridge.serve(refresh_seconds=1)
    page.goto(web.url)
    lift = page.locator("#subscribers tr", has_text="lift")
    desk = page.locator("#subscribers tr", has_text="21-desk")
    expect(page.locator("#lic-reserved")).to_have_text("1")
    expect(page.locator("#lic-used")).to_have_text("1")
    expect(page.locator("#lic-free")).to_have_text("1")  # two licences, one of them the lift's
    expect(lift.locator(".lic-reserved")).to_have_text("reserved")
    expect(lift).to_contain_text("slot 1")
    expect(desk.locator(".lic-reserved")).to_have_count(0)
    served = lift.locator("td").nth(3).inner_html()

    # The script redraws the same cell from status.json, and follows a reservation moving.
    page.evaluate("document.querySelector('#lic-reserved').textContent = 'stale'")
    expect(page.locator("#lic-reserved")).to_have_text("1")
    assert lift.locator("td").nth(3).inner_html() == served
    bridge.service.set_reserved("lift", False)
    bridge.service.set_reserved("21-desk", True)
    expect(desk.locator(".lic-reserved")).to_have_text("reserved")
    expect(lift.locator(".lic-reserved")).to_have_count(0)
    expect(page.locator("#lic-free")).to_have_text("0")  # the lift keeps its licence, 21-desk's waits
    assert tab.errors == []


def test_with_many_subscribers_the_page_shows_the_summary_and_pages_and_searches(
    bridge: Bridge, tab: Tab
) -> None:
    service = bridge.service
    service.import_subscribers("".join(f"p{i:04d},{7000 + i}\n" for i in range(250)))
    service.apply_batch(
        [
            LoggedOn(f"p{i:04d}", at=bridge.clock(), contact=f"sip:p{i:04d}@192.0.2.1")
            for i in range(0, 250, 5)
        ]
    )
    service.apply(LogonFailed("p0003", at=bridge.clock()))
    web = bridge.serve()
    page = tab.page
    page.goto(web.url)
    expect(page.locator("#sum-subscribers")).to_have_text("250")
    expect(page.locator("#sum-logged_on")).to_have_text("50")
    expect(page.locator("#sum-logon_failed")).to_have_text("1")
    expect(page.locator("#sum-logged_off")).to_have_text("199")
    expect(page.locator("#subscribers tr")).to_have_count(100)
    expect(page.locator("#subscriber-range")).to_have_text("1 to 100 of 250")
    expect(page.locator("#subscriber-prev")).to_be_hidden()
    page.click("#subscriber-next")
    expect(page.locator("#subscriber-range")).to_have_text("101 to 200 of 250")
    expect(page.locator("#subscribers tr").first).to_contain_text("p0100")
    page.fill("#subscriber-q", "7123")  # a call number
    expect(page.locator("#subscribers tr")).to_have_count(1)
    expect(page.locator("#subscribers tr").first).to_contain_text("p0123")
    expect(page.locator("#subscribers-count")).to_have_text("1 of 250")
    # Still the same page after the next refresh, and the address keeps the search for a reload.
    with page.expect_request(re.compile(r"/status\.json\?")):
        pass
    expect(page.locator("#subscribers tr")).to_have_count(1)
    page.reload()
    expect(page.locator("#subscriber-q")).to_have_value("7123")
    expect(page.locator("#subscribers tr")).to_have_count(1)
    assert tab.errors == []
