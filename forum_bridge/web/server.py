"""Serve the status page from a daemon thread with the standard library's ``wsgiref``.

One thread per request (``ThreadingMixIn``), so a slow client cannot stall the page or a Prometheus
scrape; under gevent's monkey-patching those threads are greenlets. The page shares its process
with the call hook and the database, so it is bounded: at most ``web.max_connections`` requests
are served at once (further clients wait in the listen queue, holding no file descriptor of this
process), and each request must arrive within :data:`REQUEST_TIMEOUT` seconds in all, however
slowly it trickles in. Requests are logged through ``logging`` (successful ones at DEBUG, so a
page refreshing every few seconds does not flood the journal), with the path but never the query
string or the body, where a token could travel; so are the server's own errors, never as a bare
traceback on stderr.
"""

from __future__ import annotations

import io
import logging
import resource
import socket
import socketserver
import sys
import threading
import time
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
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its whole request (line, headers and body)
WRITE_TIMEOUT = 10.0  # seconds a client has to take the answer
LISTEN_BACKLOG = 128  # clients waiting to be served, in the kernel: no descriptor of ours
# The page takes at most this share of the process's open-file limit, whatever is configured:
# the rest is for the call hook, the PBX connection and the database.
FD_SHARE = 4


class _ErrorLog(io.TextIOBase):
    """``wsgi.errors`` for the WSGI handler: whatever it writes goes to the log, not to bare stderr."""

    def write(self, text: str) -> int:
        if text.strip():
            log.error("web server: %s", text.rstrip())
        return len(text)


class _DeadlineReader(io.RawIOBase):
    """The socket's input, with one deadline for all reads together (not a timeout per read).

    A per-read timeout lets a client that sends one header line every 20 s hold a connection,
    a thread and a descriptor for ever; here every read gets only what is left of the deadline.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _ServerHandler(ServerHandler):
    def log_exception(self, exc_info: Any) -> None:
        # wsgiref prints the traceback to wsgi.errors; through logging it is one logfmt record,
        # redacted like every other.
        log.error("web server: error while answering", exc_info=exc_info)


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def setup(self) -> None:
        super().setup()
        deadline = time.monotonic() + REQUEST_TIMEOUT
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    def handle(self) -> None:
        # WSGIRequestHandler.handle, with wsgi.multithread telling the truth about ThreadingMixIn.
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if not self.parse_request():
            return
        # The request (but for a form body, which the application reads within the deadline) is
        # in; the answer gets its own bound.
        self.connection.settimeout(WRITE_TIMEOUT)
        handler = _ServerHandler(
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
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int = 32) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.stopping = False
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Waiting here stops accepting: further clients stay in the kernel's listen queue instead
        # of each taking a descriptor and a thread; they are served as slots come free.
        while not self._slots.acquire(timeout=0.2):
            if self.stopping:
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a bare traceback to stderr, past the log's format and redaction.
        client = client_address[0] if isinstance(client_address, tuple) else "-"
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a client that went away or was too slow: routine
            log.info("http client=%s connection ended: %s", client, type(error).__name__)
        else:
            log.error("web server: error while serving client=%s", client, exc_info=True)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's FQDN (a DNS lookup that can hang); the
        # address is all the WSGI environment needs.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


SWITCH_INTERVAL = 0.001
"""Seconds a thread may run Python before it must let a waiting thread have the interpreter."""


def share_interpreter() -> None:
    """Make busy page threads hand the interpreter back to the call hook within a millisecond.

    A thread coming back from I/O (the hook after each database or socket call) waits until the
    running thread lets go; for a thread computing a page that is Python's switch interval, 5 ms
    by default, paid at every step of a decision while pollers keep the page busy. One millisecond
    keeps that wait short at the cost of more frequent switches, which a process of mostly waiting
    threads does not notice. Never raised here.
    """
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))


def connection_cap(configured: int) -> int:
    """``web.max_connections``, lowered if needed to a quarter of the open-file limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return configured
    return max(1, min(configured, soft // FD_SHARE))


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
        self._server.stopping = True
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
    share_interpreter()
    app = make_app(service, settings, metrics, refresh_seconds=refresh_seconds)  # checks the token
    cap = connection_cap(settings.web.max_connections)
    if cap < settings.web.max_connections:
        log.warning(
            "status page serves at most %d requests at once (web.max_connections = %d is more than "
            "a quarter of the open-file limit; raise LimitNOFILE)",
            cap,
            settings.web.max_connections,
        )
    server_class = _Server6 if ":" in host else _Server
    try:
        server = server_class((host, port), _Handler, cap)
    except OSError as exc:
        raise ConfigError("web.port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    server.set_app(app)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="forum-bridge-web", daemon=True
    )
    thread.start()
    web = WebServer(server, thread)
    log.info("status page listening on %s", web.url)
    return web
