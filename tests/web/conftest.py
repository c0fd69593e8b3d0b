"""Fixtures for the status page, metrics and logging tests: a real service on a temporary SQLite file,
the page served on a free port, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import http.cookiejar
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from forum_bridge.config import Settings, load_settings
from forum_bridge.core.events import LoggedOn
from forum_bridge.metrics import Metrics
from forum_bridge.service import BridgeService
from forum_bridge.store.database import Database
from forum_bridge.web.server import WebServer, start_web

TOKEN = "s3cret-admin-token"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


class Clock:
    """A clock the test moves by hand, so status documents are reproducible."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        """The current test time."""
        return self.now

    def advance(self, **delta: float) -> datetime:
        """Move the clock by ``timedelta(**delta)`` (negative to go back) and return the new time."""
        self.now += timedelta(**delta)
        return self.now


@dataclass
class Bridge:
    """A service, its settings and metrics, and (once started) its web server."""

    service: BridgeService
    settings: Settings
    metrics: Metrics
    clock: Clock
    web: WebServer | None = None
    _servers: list[WebServer] = field(default_factory=list)

    def log_on(self, logon: str, number: str, **extra: Any) -> None:
        """Provision ``logon`` and register one contact."""
        self.service.add_subscriber(logon, number)
        contact = extra.pop("contact", f"sip:{logon}@127.0.0.1:5081")
        self.service.apply(LoggedOn(logon, at=self.clock(), contact=contact, **extra))

    def serve(self, refresh_seconds: float = 1.0) -> WebServer:
        """Start the page on a free port of 127.0.0.1."""
        self.web = start_web(self.service, self.settings, self.metrics, refresh_seconds=refresh_seconds)
        self._servers.append(self.web)
        return self.web


def make_bridge(
    tmp_path: Path, *, token: str = TOKEN, clock: Clock | None = None, **overrides: Any
) -> Bridge:
    """A started service with two licences on a fresh SQLite file; ``overrides`` are dotted keys
    with ``__`` for the dot (``web__max_connections=2``)."""
    settings = load_settings(
        environ={},
        overrides={
            "database.url": f"sqlite:///{tmp_path}/bridge-{len(list(tmp_path.glob('*.db')))}.db",
            "licences.count": 2,
            "node.name": "pbx1",
            "web.token": token,
            "web.host": "127.0.0.1",
            "web.port": 0,
            **{key.replace("__", "."): value for key, value in overrides.items()},
        },
    )
    db = Database(settings.database_url)
    db.upgrade()
    clock = clock or Clock(datetime.now(UTC).replace(microsecond=0))
    service = BridgeService(settings, db, clock)
    service.start()
    return Bridge(service, settings, Metrics(service, "asterisk"), clock)


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Bridge]:
    """A bridge with the administrator token configured."""
    b = make_bridge(tmp_path)
    yield b
    for server in b._servers:
        server.stop()
    b.service.database.dispose()


@pytest.fixture
def read_only_bridge(tmp_path: Path) -> Iterator[Bridge]:
    """A bridge without an administrator token."""
    b = make_bridge(tmp_path, token="")
    yield b
    for server in b._servers:
        server.stop()
    b.service.database.dispose()


# --- HTTP helpers ---------------------------------------------------------------------------------


@dataclass
class Answer:
    """What came back over HTTP."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        """The body as UTF-8 text."""
        return self.body.decode("utf-8")

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    """A cookie-keeping HTTP client that returns every status instead of raising (real sockets)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.cookies), _NoRedirect()
        )

    def request(
        self,
        path: str,
        *,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
    ) -> Answer:
        """Send one request; ``data`` is sent as a form (POST)."""
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path.lstrip("/"), data=body, method=method)
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with self.opener.open(req, timeout=10) as resp:
                return Answer(resp.status, dict(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return Answer(err.code, dict(err.headers.items()), err.read())

    def csrf(self) -> str:
        """Load the page (setting the cookie) and return the form's CSRF token."""
        page = self.request("/").text
        marker = 'name="csrf" value="'
        start = page.index(marker) + len(marker)
        return page[start : page.index('"', start)]


@pytest.fixture
def client_for() -> Callable[[WebServer], Client]:
    """Build an HTTP client for a running page."""
    return lambda web: Client(web.url)


# --- browser --------------------------------------------------------------------------------------


# Module scope: Playwright's sync API keeps an event loop of its own alive, which must not overlap
# with tests elsewhere that run asyncio loops in the same thread.
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright. Fails (never skips) when it cannot start."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        except PlaywrightError as exc:
            pytest.fail(f"Chromium did not start: {exc}")
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Tab:
    """A browser page and the errors its console reported (script errors, CSP violations)."""

    page: Any
    errors: list[str]


@pytest.fixture
def tab(chromium: Any) -> Iterator[Tab]:
    """A fresh page in its own browser context (its own cookies)."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield Tab(page, errors)
    context.close()
