"""The status page, ``/status.json``, ``/metrics`` and the licence reset, as one plain WSGI application.

Standard library only: the bridge serves it from an asyncio process (Asterisk) and from a gevent
process (FreeSWITCH), and any WSGI server can mount it. Everything the page shows comes from
:meth:`BridgeService.status`, the same document ``forum-bridge status --json`` prints.

Resetting needs the administrator token, typed into the page. Because the token is typed rather than
remembered, a forged cross-site form could only succeed with a browser that autofills it; the POST is
protected anyway, twice: the ``Origin`` (or ``Referer``) must name this very host, and the form must
carry a CSRF token that is the HMAC, under a secret of this process, of a random value in a
``SameSite=Strict`` cookie (signed double submit: a page elsewhere can neither read the cookie nor
compute the HMAC). Without a configured token the page is read-only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from forum_bridge.config import Settings
from forum_bridge.errors import ConfigError, ForumBridgeError
from forum_bridge.metrics import Metrics
from forum_bridge.service import BridgeService
from forum_bridge.web import page

log = logging.getLogger(__name__)

CSRF_COOKIE = "forum_bridge_csrf"
MAX_FORM_BYTES = 4096
PAGE_SIZE = 100
"""Subscribers per page of the status page."""
MAX_PAGE_SIZE = 1000
"""The most subscribers one ``/status.json?limit=`` answer lists."""
MAX_SEARCH = 64
WORKERS = 2
"""Requests whose answer is being computed at once; the other connections wait without running."""
_ENCODED = 8  # serialized status documents kept (the whole one and a few pages)
FRESH_SECONDS = 0.25
"""How old a status document the page and ``/status.json`` may answer with (at least; see below)."""
COST_SHARE = 5
"""A listing is made again at most every COST_SHARE times as long as making it took."""
_LISTINGS = 16  # recent listings kept (searches and pages)
PACE_BYTES_PER_SECOND = 20_000_000
"""Each worker hands out at most this many bytes of answers a second (see :meth:`StatusApp.__call__`)."""


@dataclass(frozen=True)
class _Recent:
    """A status document as served: the document, its JSON, its ETag, and until when it is served."""

    status: dict[str, Any]
    body: bytes
    etag: str
    fresh_until: float


_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{32,64}")
_HTML = "text/html; charset=utf-8"
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


@dataclass
class Response:
    """One answer: status, body, content type and any extra headers."""

    status: int
    body: bytes
    content_type: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    nonce: str | None = None  # set for HTML that carries inline style and script


class Refused(Exception):
    """A request the application turns down with ``status`` and a message meant for people."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after: int | None = None


def _security_headers(nonce: str | None) -> list[tuple[str, str]]:
    policy = "default-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    if nonce is not None:
        policy += f"; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'"
        policy += "; connect-src 'self'; img-src data:"
    return [
        ("Content-Security-Policy", policy),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "same-origin"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
        ("Cache-Control", "no-store"),
    ]


def _wants_json(environ: WSGIEnvironment) -> bool:
    return "application/json" in environ.get("HTTP_ACCEPT", "")


def _client(environ: WSGIEnvironment) -> str:
    return str(environ.get("REMOTE_ADDR") or "unknown")


def _origin_of(scheme: str, netloc: str) -> str:
    scheme, netloc = scheme.lower(), netloc.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return f"{scheme}://{netloc}"


def same_origin(environ: WSGIEnvironment) -> bool:
    """True unless the browser says the request comes from another origin than this host.

    ``Origin`` wins; without it ``Referer`` is checked; a client that sends neither (curl, scripts)
    passes this check and still needs the CSRF token and the administrator token.
    """
    scheme = str(environ.get("wsgi.url_scheme", "http"))
    host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
    expected = _origin_of(scheme, str(host))
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None:
        # "null" (sandboxed frames, file: pages, some redirects) never matches.
        return _origin_of(*str(origin).split("://", 1)) == expected if "://" in str(origin) else False
    referer = environ.get("HTTP_REFERER")
    if referer:
        parts = urlsplit(str(referer))
        return _origin_of(parts.scheme, parts.netloc) == expected
    return True


MIN_TOKEN_LENGTH = 16
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104  # recognised here, never bound by this module


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """The host names the page answers to: ``web.allowed_hosts``, or the loopback names and the
    address it is bound to (and this machine's name when it listens on every address)."""
    if settings.web.allowed_hosts:
        return frozenset(settings.web.allowed_hosts)
    names = {*_LOOPBACK_NAMES, settings.web.host.strip("[]").lower()}
    if settings.web.host in _WILDCARDS:
        names.add(socket.gethostname().lower())
    return frozenset(names)


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without the port, lower case, without a trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8088
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


class FailureLimit:
    """Wrong administrator tokens per client: after ``limit`` within ``window`` seconds the client
    must wait until the oldest of them is ``window`` seconds old, whatever it sends.

    IPv6 clients count by their /64, since one host can use a whole /64. At most ``clients``
    addresses are remembered (the oldest are forgotten first), so the table itself stays bounded.
    """

    def __init__(
        self,
        limit: int = 5,
        window: float = 300.0,
        clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.clients = clients
        self.clock = clock
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(client: str) -> str:
        """The address a failure counts against."""
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return client
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)

    def wait(self, client: str) -> float:
        """Seconds ``client`` must wait before it may try a token again (0: it may now)."""
        now = self.clock()
        with self._lock:
            stamps = [t for t in self._failures.get(self.key(client), []) if now - t < self.window]
            if len(stamps) < self.limit:
                return 0.0
            return max(stamps[0] + self.window - now, 0.0)

    def failed(self, client: str) -> None:
        """Count one wrong token from ``client``."""
        now = self.clock()
        key = self.key(client)
        with self._lock:
            stamps = [t for t in self._failures.pop(key, []) if now - t < self.window]
            self._failures[key] = [*stamps, now][-self.limit :]
            while len(self._failures) > self.clients:
                self._failures.popitem(last=False)


class StatusApp:
    """The WSGI callable; see :func:`make_app`."""

    def __init__(
        self, service: BridgeService, settings: Settings, metrics: Metrics | None, refresh_seconds: float
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.refresh_seconds = refresh_seconds
        self._token = settings.web.token
        if self._token and len(self._token) < MIN_TOKEN_LENGTH:
            # Never quote it, not even its length: one line that says what to do.
            raise ConfigError(
                "web.token",
                f"too short: use at least {MIN_TOKEN_LENGTH} random characters "
                "(e.g. from 'python3 -c \"import secrets; print(secrets.token_urlsafe(24))\"')",
            )
        self._hosts = allowed_hosts(settings)
        self._any_host = "*" in self._hosts
        self.failures = FailureLimit()
        # Per process: restarting the bridge invalidates open forms, which then ask for a reload.
        self._secret = secrets.token_bytes(32)
        # The bridge's call hook shares this interpreter: a crowd of pollers each running Python at
        # once would make every hook step wait for its turn (the GIL), so few answers are computed
        # at a time while the rest of the connections wait here, sleeping.
        self._work = threading.BoundedSemaphore(WORKERS)
        # A shared status document is serialized once for all its readers (and named by an ETag).
        self._encoded: OrderedDict[int, tuple[dict[str, Any], bytes, str]] = OrderedDict()
        self._encoded_lock = threading.Lock()
        self._recent: OrderedDict[tuple[str, int, int | None], _Recent] = OrderedDict()
        self._routes = {
            "/": ("GET", self.page),
            "/status.json": ("GET", self.status_json),
            "/metrics": ("GET", self.metrics_text),
            "/healthz": ("GET", self.healthz),
            "/reset": ("POST", self.reset),
        }

    # --- WSGI -----------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Route one request and answer it; never lets an exception reach the server."""
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        path = str(environ.get("PATH_INFO") or "/")
        route = self._routes.get(path)
        try:
            self._check_host(environ)
            if route is None:
                raise Refused(404, "not_found", "There is nothing at this address.")
            allowed, handler = route
            allowed_methods = ("GET", "HEAD") if allowed == "GET" else (allowed,)
            if method not in allowed_methods:
                response = self._error(environ, Refused(405, "method", "Method not allowed."))
                response.headers.append(("Allow", ", ".join(allowed_methods)))
            elif handler == self.healthz:  # a liveness probe must not queue behind documents
                response = handler(environ)
            else:
                with self._work:
                    began = time.monotonic()
                    response = handler(environ)
                    # Clients polling as fast as they are answered would take as much of the
                    # machine as they can (encoding, copying, their own reading); pacing the
                    # workers by the bytes they hand out bounds what a crowd of them costs the hook.
                    pause = len(response.body) / PACE_BYTES_PER_SECOND - (time.monotonic() - began)
                    if pause > 0:
                        time.sleep(pause)
        except Refused as refused:
            response = self._error(environ, refused)
            if refused.retry_after is not None:
                response.headers.append(("Retry-After", str(refused.retry_after)))
        except ForumBridgeError as exc:
            log.warning("web: %s %s failed: %s", method, path, exc)
            unavailable = Refused(503, "unavailable", "The licence state cannot be read now.")
            response = self._error(environ, unavailable)
        except Exception:
            log.exception("web: %s %s failed", method, path)
            response = self._error(environ, Refused(500, "internal", "Internal error; see the bridge's log."))
        headers = [("Content-Type", response.content_type)]
        if response.status != 304:  # a 304's length would be the unchanged document's
            headers.append(("Content-Length", str(len(response.body))))
        headers += _security_headers(response.nonce) + response.headers
        phrase = HTTPStatus(response.status).phrase
        start_response(f"{response.status} {phrase}", headers)
        return [] if method == "HEAD" else [response.body]

    def _error(self, environ: WSGIEnvironment, refused: Refused) -> Response:
        if _wants_json(environ) or str(environ.get("PATH_INFO", "")).endswith((".json", "/metrics")):
            body = {"ok": False, "error": refused.code, "message": refused.message}
            return Response(refused.status, json.dumps(body).encode(), _JSON)
        nonce = secrets.token_urlsafe(16)
        title = f"{refused.status} {HTTPStatus(refused.status).phrase}"
        html = page.render_message(title, refused.message, nonce=nonce)
        return Response(refused.status, html.encode(), _HTML, nonce=nonce)

    def _check_host(self, environ: WSGIEnvironment) -> None:
        """Answer only to the names this page is known by.

        A web page elsewhere can point a name it controls at 127.0.0.1 (DNS rebinding) and then
        read this page as its own origin; the browser still sends that name in ``Host``. Clients
        that send no ``Host`` at all (HTTP/1.0 scripts) are no browser and pass.
        """
        header = environ.get("HTTP_HOST")
        if header is None or self._any_host:
            return
        if host_name(str(header)) not in self._hosts:
            log.warning("web: request from %s refused: host name not in web.allowed_hosts", _client(environ))
            raise Refused(400, "host", "Unknown host name; see web.allowed_hosts.")

    def _token_wait(self, client: str) -> None:
        """Refuse, without looking at the token, a client that sent too many wrong ones."""
        wait = self.failures.wait(client)
        if wait > 0:
            log.warning("web: licence reset refused from %s: too many wrong tokens", client)
            refused = Refused(429, "too_many", "Too many wrong tokens. Wait and try again.")
            refused.retry_after = int(wait) + 1
            raise refused

    def _wrong_token(self, client: str) -> Refused:
        self.failures.failed(client)
        log.warning("web: licence reset refused from %s: wrong administrator token", client)
        return Refused(403, "wrong_token", "Refused: wrong administrator token. Nothing was changed.")

    # --- CSRF -----------------------------------------------------------------------------------

    def _csrf_for(self, cookie_value: str) -> str:
        return hmac.new(self._secret, cookie_value.encode("ascii"), hashlib.sha256).hexdigest()

    @staticmethod
    def _cookie(environ: WSGIEnvironment) -> str | None:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(str(environ.get("HTTP_COOKIE", "")))
        except CookieError:
            return None
        morsel = jar.get(CSRF_COOKIE)
        if morsel is None or not _COOKIE_VALUE.fullmatch(morsel.value):
            return None
        return morsel.value

    def _csrf_valid(self, environ: WSGIEnvironment, submitted: str) -> bool:
        cookie = self._cookie(environ)
        if cookie is None or not submitted:
            return False
        return hmac.compare_digest(submitted.encode("utf-8"), self._csrf_for(cookie).encode("ascii"))

    # --- routes ---------------------------------------------------------------------------------

    def page(self, environ: WSGIEnvironment) -> Response:
        """``GET /``: the status page, one page of subscribers (``?q=`` searches, ``?offset=`` pages)."""
        search, offset, _limit = _listing(environ)
        status = self._document(search, offset, PAGE_SIZE).status
        headers: list[tuple[str, str]] = []
        csrf = None
        if self._token:
            cookie = self._cookie(environ)
            if cookie is None:
                cookie = secrets.token_urlsafe(32)
                secure = "; Secure" if environ.get("wsgi.url_scheme") == "https" else ""
                headers.append(
                    ("Set-Cookie", f"{CSRF_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict{secure}")
                )
            csrf = self._csrf_for(cookie)
        nonce = secrets.token_urlsafe(16)
        html = page.render_page(
            status,
            nonce=nonce,
            csrf=csrf,
            flash=self._flash(environ),
            refresh_seconds=self.refresh_seconds,
        )
        return Response(200, html.encode("utf-8"), _HTML, headers, nonce=nonce)

    @staticmethod
    def _flash(environ: WSGIEnvironment) -> tuple[str, str] | None:
        # Only codes, never text, come through the query string: a crafted link must not be able to
        # make the page say anything it would not say by itself.
        query = parse_qs(str(environ.get("QUERY_STRING", "")), max_num_fields=10)
        if query.get("reset") == ["ok"]:
            freed = query.get("freed", [""])[0]
            count = freed if freed.isdigit() and len(freed) <= 6 else "?"
            return ("ok", f"Licences reset: {count} freed.")
        return None

    def status_json(self, environ: WSGIEnvironment) -> Response:
        """``GET /status.json``: :meth:`BridgeService.status` as JSON.

        Every subscriber, unless ``q`` (search), ``offset`` or ``limit`` (at most 1,000) in the
        query string ask for one page of them, as the page's script does.
        Answers carry an ``ETag``; a client that sends it back in ``If-None-Match`` gets ``304 Not
        Modified`` while the document is unchanged.
        """
        search, offset, limit = _listing(environ)
        if search or offset or limit is not None:
            recent = self._document(search, offset, limit or PAGE_SIZE)
        else:
            recent = self._document("", 0, None)
        headers = [("ETag", recent.etag), ("Cache-Control", "no-cache")]
        if recent.etag in _etags(str(environ.get("HTTP_IF_NONE_MATCH", ""))):
            return Response(304, b"", _JSON, headers)
        return Response(200, recent.body, _JSON, headers)

    def _document(self, search: str, offset: int, limit: int | None) -> _Recent:
        """The status document for one listing, at most :data:`FRESH_SECONDS` old.

        Every call decision changes the state, so with pollers asking all the time the document
        would be made again and again, competing with the call hook for the interpreter. Instead
        it is made again only after FRESH_SECONDS, or after COST_SHARE times what the last one
        took, whichever is longer: a big document, or a busy machine, keeps the share of time spent
        on it bounded. A reset through this page shows at once (see :meth:`reset`).
        """
        listing = (search, offset, limit)
        with self._encoded_lock:
            recent = self._recent.get(listing)
        if recent is not None and time.monotonic() < recent.fresh_until:
            return recent
        began = time.monotonic()
        status = self.service.shared_status(search=search, offset=offset, limit=limit)
        body, etag = self._encode(status)
        now = time.monotonic()
        recent = _Recent(status, body, etag, now + max(FRESH_SECONDS, COST_SHARE * (now - began)))
        with self._encoded_lock:
            self._recent[listing] = recent
            self._recent.move_to_end(listing)
            while len(self._recent) > _LISTINGS:
                self._recent.popitem(last=False)
        return recent

    def _forget_documents(self) -> None:
        """After a change made through the page: the next reader gets a new document."""
        with self._encoded_lock:
            self._recent.clear()

    def _encode(self, status: dict[str, Any]) -> tuple[bytes, str]:
        """The JSON of a shared document and its ETag, made once per document, not once per reader."""
        key = id(status)  # the entry holds the document, so its id is not reused meanwhile
        with self._encoded_lock:
            cached = self._encoded.get(key)
            if cached is not None and cached[0] is status:
                return cached[1], cached[2]
        body = json.dumps(status).encode("utf-8")
        # When it was made is part of the document; the rest decides whether it changed.
        etag = '"' + hashlib.blake2b(_without_time(body), digest_size=12).hexdigest() + '"'
        with self._encoded_lock:
            self._encoded[key] = (status, body, etag)
            while len(self._encoded) > _ENCODED:
                self._encoded.popitem(last=False)
        return body, etag

    def metrics_text(self, environ: WSGIEnvironment) -> Response:
        """``GET /metrics``: Prometheus text format."""
        if self.metrics is None:
            raise Refused(404, "not_found", "Metrics are not enabled in this process.")
        body, content_type = self.metrics.render()
        return Response(200, body, content_type)

    def healthz(self, environ: WSGIEnvironment) -> Response:
        """``GET /healthz``: the process serves requests."""
        return Response(200, b"ok\n", _TEXT)

    def reset(self, environ: WSGIEnvironment) -> Response:
        """``POST /reset``: free every licence, after origin, CSRF, confirmation and token checks."""
        client = _client(environ)
        if not self._token:
            raise Refused(403, "read_only", "Read-only: no administrator token is configured.")
        authorization = str(environ.get("HTTP_AUTHORIZATION", ""))
        # A reverse proxy that asks for a password of its own passes "Authorization: Basic" on to
        # every request, the page's form included; only a bearer token, or a request without a
        # form, is a script's reset.
        if authorization.partition(" ")[0].lower() == "bearer" or (
            authorization and not self._is_form(environ)
        ):
            return self._reset_by_script(authorization, client)
        if not same_origin(environ):
            log.warning("web: licence reset refused from %s: cross-site request", client)
            raise Refused(403, "cross_site", "Refused: the request came from another site.")
        form = self._form(environ)
        if not self._csrf_valid(environ, form.get("csrf", [""])[0]):
            log.warning("web: licence reset refused from %s: missing or invalid CSRF token", client)
            raise Refused(403, "csrf", "Refused: the form has expired. Reload the page and try again.")
        if "yes" not in form.get("confirm", []):
            raise Refused(400, "confirm", "Not reset: confirm=yes is required.")
        self._token_wait(client)
        given = form.get("token", [""])[0]
        if not hmac.compare_digest(given.encode("utf-8"), self._token.encode("utf-8")):
            raise self._wrong_token(client)
        freed = self.service.reset_licences(f"web:{client}")
        self._forget_documents()
        message = f"Licences reset: {freed} freed."
        if _wants_json(environ):
            body = {"ok": True, "freed": freed, "message": message}
            return Response(200, json.dumps(body).encode(), _JSON)
        location = f"{environ.get('SCRIPT_NAME', '')}/?reset=ok&freed={freed}"
        return Response(303, b"", _TEXT, [("Location", location)])

    def _reset_by_script(self, authorization: str, client: str) -> Response:
        """``Authorization: Bearer <token>``: a reset for scripts, without form, cookie or confirmation.

        A browser never sends this header cross-site without a CORS preflight, which this app does
        not answer, so no CSRF token is needed; the request itself is the explicit confirmation.
        """
        self._token_wait(client)
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8"), self._token.encode("utf-8")
        ):
            raise self._wrong_token(client)
        freed = self.service.reset_licences(f"api:{client}")
        self._forget_documents()
        body = {"ok": True, "freed": freed, "message": f"Licences reset: {freed} freed."}
        return Response(200, json.dumps(body).encode(), _JSON)

    @staticmethod
    def _is_form(environ: WSGIEnvironment) -> bool:
        kind = str(environ.get("CONTENT_TYPE", "")).split(";", 1)[0].strip().lower()
        return kind == "application/x-www-form-urlencoded"

    def _form(self, environ: WSGIEnvironment) -> dict[str, list[str]]:
        if not self._is_form(environ):
            raise Refused(415, "content_type", "Send the form as application/x-www-form-urlencoded.")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise Refused(400, "length", "Bad Content-Length.") from None
        if length < 0 or length > MAX_FORM_BYTES:
            raise Refused(413, "too_large", "The form is too large.")
        body = environ["wsgi.input"].read(length) if length else b""
        try:
            return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "form", "The form could not be read.") from None


_GENERATED = re.compile(rb'"generated_at": "[^"]*"')
_LAST_AT = b'"at": "'


def _without_time(body: bytes) -> bytes:
    """The document's JSON without the two places that only say when it was made.

    ``generated_at`` comes first; the last point of ``usage_history`` (the last key) is "now".
    """
    body = _GENERATED.sub(b"", body, count=1)
    last = body.rfind(_LAST_AT)
    end = body.find(b'"', last + len(_LAST_AT)) if last >= 0 else -1
    return body[:last] + body[end + 1 :] if end >= 0 else body


def _etags(header: str) -> set[str]:
    """The entity tags of an ``If-None-Match`` header (weak ones compared by their value)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",")[:16] if tag.strip()}


def _listing(environ: WSGIEnvironment) -> tuple[str, int, int | None]:
    """(search, offset, limit) from the query string; anything malformed counts as absent."""
    query = parse_qs(str(environ.get("QUERY_STRING", "")), max_num_fields=10)
    search = "".join(ch for ch in query.get("q", [""])[0] if ch.isprintable())[:MAX_SEARCH].strip()

    def number(name: str) -> int | None:
        value = query.get(name, [""])[0]
        return int(value) if value.isdigit() and len(value) <= 7 else None

    limit = number("limit")
    return search, number("offset") or 0, None if limit is None else max(1, min(limit, MAX_PAGE_SIZE))


def make_app(
    service: BridgeService, settings: Settings, metrics: Metrics | None, *, refresh_seconds: float = 5.0
) -> WSGIApplication:
    """The bridge's WSGI application.

    ``settings.web.token`` enables the reset button; ``metrics`` (or None) serves ``/metrics``;
    ``refresh_seconds`` is how often the open page re-reads ``/status.json``.
    """
    return StatusApp(service, settings, metrics, refresh_seconds)
