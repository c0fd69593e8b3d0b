"""Serve the status page from a daemon thread with the standard library's ``wsgiref``.

One thread per request (``ThreadingMixIn``), so a slow client cannot stall the page or a Prometheus
scrape; under gevent's monkey-patching those threads are greenlets. Requests are logged through
``logging`` (successful ones at DEBUG, so a page refreshing every few seconds does not flood the
journal), with the path but never the query string or the body, where a token could travel.
"""

from __future__ import annotations

import io
import logging
import socket
import socketserver
import threading
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from forum_bridge.config import Settings
from forum_bridge.errors import ConfigError
from forum_bridge.metrics import Metrics
from forum_bridge.service import BridgeService
from forum_bridge.web.app import make_app

log = logging.getLogger("forum_bridge.web")
REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request; stops idle sockets piling up


class _ErrorLog(io.TextIOBase):
    """``wsgi.errors`` for the WSGI handler: whatever it writes goes to the log, not to bare stderr."""

    def write(self, text: str) -> int:
        if text.strip():
            log.error("web server: %s", text.rstrip())
        return len(text)


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def handle(self) -> None:
        # WSGIRequestHandler.handle, with wsgi.multithread telling the truth about ThreadingMixIn.
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if not self.parse_request():
            return
        handler = ServerHandler(
            self.rfile,
            self.wfile,  # type: ignore[arg-type]  # typeshed: BufferedIOBase, wsgiref wants IO[bytes]
            _ErrorLog(),
            self.get_environ(),
            multithread=True,
        )
        handler.request_handler = self  # type: ignore[attr-defined]  # wsgiref's back pointer for logging
        handler.run(self.server.get_app())  # type: ignore[attr-defined]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = int(code) if str(code).isdigit() else 0
        path = (getattr(self, "path", "") or "").split("?", 1)[0]
        level = logging.DEBUG if 0 < status < 400 else logging.INFO
        log.log(
            level,
            "http client=%s method=%s path=%s status=%s bytes=%s",
            self.client_address[0],
            getattr(self, "command", "-"),
            path,
            code,
            size,
        )

    def log_message(self, format: str, *args: Any) -> None:
        # Reached for protocol errors (bad request lines, timeouts): args never hold a form body.
        log.info("http client=%s %s", self.client_address[0], format % args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's FQDN (a DNS lookup that can hang); the
        # address is all the WSGI environment needs.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class WebServer:
    """A running status page; :meth:`stop` ends it."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, ending in ``/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting requests, close the socket and wait for the serving thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> WebServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_web(
    service: BridgeService, settings: Settings, metrics: Metrics | None, *, refresh_seconds: float = 5.0
) -> WebServer:
    """Serve :func:`make_app` on ``settings.web.host``/``port`` (port 0: any free port) in a daemon thread.

    Whether to start it at all (``settings.web.enabled``) is the caller's decision. A port that is
    taken, or a host that is not an address of this machine, raises :class:`ConfigError`.
    """
    host, port = settings.web.host, settings.web.port
    server_class = _Server6 if ":" in host else _Server
    try:
        server = server_class((host, port), _Handler)
    except OSError as exc:
        raise ConfigError("web.port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    server.set_app(make_app(service, settings, metrics, refresh_seconds=refresh_seconds))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="forum-bridge-web", daemon=True
    )
    thread.start()
    web = WebServer(server, thread)
    log.info("status page listening on %s", web.url)
    return web
