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
import json
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from forum_bridge.config import Settings
from forum_bridge.errors import ForumBridgeError
from forum_bridge.metrics import Metrics
from forum_bridge.service import BridgeService
from forum_bridge.web import page

log = logging.getLogger(__name__)

CSRF_COOKIE = "forum_bridge_csrf"
MAX_FORM_BYTES = 4096
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


class StatusApp:
    """The WSGI callable; see :func:`make_app`."""

    def __init__(
        self, service: BridgeService, settings: Settings, metrics: Metrics | None, refresh_seconds: float
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.refresh_seconds = refresh_seconds
        self._token = settings.web.token
        # Per process: restarting the bridge invalidates open forms, which then ask for a reload.
        self._secret = secrets.token_bytes(32)
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
            if route is None:
                raise Refused(404, "not_found", "There is nothing at this address.")
            allowed, handler = route
            allowed_methods = ("GET", "HEAD") if allowed == "GET" else (allowed,)
            if method not in allowed_methods:
                response = self._error(environ, Refused(405, "method", "Method not allowed."))
                response.headers.append(("Allow", ", ".join(allowed_methods)))
            else:
                response = handler(environ)
        except Refused as refused:
            response = self._error(environ, refused)
        except ForumBridgeError as exc:
            log.warning("web: %s %s failed: %s", method, path, exc)
            unavailable = Refused(503, "unavailable", "The licence state cannot be read now.")
            response = self._error(environ, unavailable)
        except Exception:
            log.exception("web: %s %s failed", method, path)
            response = self._error(environ, Refused(500, "internal", "Internal error; see the bridge's log."))
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body)))]
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
        """``GET /``: the status page."""
        status = self.service.status()
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
        """``GET /status.json``: :meth:`BridgeService.status` as JSON."""
        return Response(200, json.dumps(self.service.status()).encode("utf-8"), _JSON)

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
        if authorization:
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
        given = form.get("token", [""])[0]
        if not hmac.compare_digest(given.encode("utf-8"), self._token.encode("utf-8")):
            log.warning("web: licence reset refused from %s: wrong administrator token", client)
            raise Refused(403, "wrong_token", "Refused: wrong administrator token. Nothing was changed.")
        freed = self.service.reset_licences(f"web:{client}")
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
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8"), self._token.encode("utf-8")
        ):
            log.warning("web: licence reset refused from %s: wrong administrator token", client)
            raise Refused(403, "wrong_token", "Refused: wrong administrator token. Nothing was changed.")
        freed = self.service.reset_licences(f"api:{client}")
        body = {"ok": True, "freed": freed, "message": f"Licences reset: {freed} freed."}
        return Response(200, json.dumps(body).encode(), _JSON)

    @staticmethod
    def _form(environ: WSGIEnvironment) -> dict[str, list[str]]:
        kind = str(environ.get("CONTENT_TYPE", "")).split(";", 1)[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
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


def make_app(
    service: BridgeService, settings: Settings, metrics: Metrics | None, *, refresh_seconds: float = 5.0
) -> WSGIApplication:
    """The bridge's WSGI application.

    ``settings.web.token`` enables the reset button; ``metrics`` (or None) serves ``/metrics``;
    ``refresh_seconds`` is how often the open page re-reads ``/status.json``.
    """
    return StatusApp(service, settings, metrics, refresh_seconds)
