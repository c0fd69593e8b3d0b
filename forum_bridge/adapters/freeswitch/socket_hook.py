"""The dialplan hook: FreeSWITCH's ``socket`` application connects here for every call a phone places.

Protocol (outbound ESL): FreeSWITCH connects and waits; the bridge sends ``connect``; FreeSWITCH
answers with the channel's data (a ``CHANNEL_DATA`` header block, values URL-encoded,
``Content-Type: command/reply`` near its end). The bridge decides with
:meth:`BridgeService.authorize` and then either

* allows: ``api uuid_setvar <uuid> forum_bridge_verdict allowed``, ``resume``, ``exit``: the
  dialplan goes on and, seeing the verdict, routes the call normally; or
* denies: sets the verdict to ``denied``, ``sendmsg`` with ``call-command: hangup`` and
  ``hangup-cause: CALL_REJECTED``, then ``exit``.

A session whose socket path is ``inbound`` (``socket host:port/inbound``, run by the snippet's
``forum-bridge-inbound`` extension) asks instead which log-ons of the call number in the channel
variable ``forum_bridge_number`` may ring now (:meth:`BridgeService.ringable`: each allowed log-on
takes its licence). The bridge sets ``forum_bridge_dial`` to their dial string
(``user/<log-on>@<domain>``, joined with commas so they ring at once; the domain is the channel's
``forum_bridge_domain`` or ``domain_name``), or leaves it empty, and ``forum_bridge_result`` to
``allow``, ``deny`` or ``error`` (database trouble: nobody is rung), then ``resume``.

When no decision can be made (database down, a broken session) ``freeswitch.fail_mode`` decides:
``closed`` hangs up with NORMAL_TEMPORARY_FAILURE (503, as the dialplan does), ``open`` lets the
call go on. If the bridge cannot be reached at all, the dialplan itself applies the fail mode (see
:mod:`.dialplan`).

Deadline. The dialplan's ``sched_transfer +N`` (N = ``freeswitch.hook_timeout``) ends the wait on
the bridge: FreeSWITCH's scheduler counts whole seconds, so it may fire as early as N - 1 seconds
after it was set. Each session therefore carries a :class:`forum_bridge.service.DecisionTicket`
whose deadline is :data:`TRANSFER_EARLY` + :data:`ANSWER_MARGIN` seconds short of N, counted from
the moment the connection arrived. A decision not made by then is answered by the fail mode and
given up: the decision still waiting for the database is rolled back and never takes a licence
afterwards, and the leg keeps that answer when its ``CHANNEL_CREATE`` comes over the event socket
(the ticket carries the channel's UUID). A decision made in time is stored under the UUID, so the
event path reuses it instead of deciding the leg again.

Every connection is bounded: ``session_timeout`` seconds, ``MAX_SESSION_BYTES`` received (a real
``CHANNEL_DATA`` is a few kilobytes) and ``max_sessions`` at once. When a new connection would
exceed that, the oldest one still waiting for its channel data is dropped to make room (FreeSWITCH
sends it at once, so that one is stuck or hostile); only when every session is deciding is the
new one closed at once, and the dialplan applies the fail mode.

This is a small gevent ``StreamServer`` rather than greenswitch's ``OutboundESLServer``, which
calls ``sys.exit()`` when it cannot bind (and with port 0), polls ``accept`` every 0.1 s, has no
time limit on a session, and decodes ``CHANNEL_DATA`` as one block before splitting it.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.server import StreamServer

from forum_bridge.config import Settings
from forum_bridge.core.events import Direction
from forum_bridge.core.rules import Decision, Reason
from forum_bridge.decision_gate import DecisionTicket
from forum_bridge.errors import (
    DecisionAbandoned,
    ForumBridgeError,
    InvalidInputError,
    PbxConnectionError,
    PbxError,
    ProtocolError,
    StoreError,
)
from forum_bridge.service import BridgeService, validate_number

from .dialplan import SOCKET_PATH_INBOUND
from .esl import ConnectionClosed, EslEvent, Frame, FrameReader, describe_os_error, event_from_frame
from .events import caller_logon, channel_uuid, dialled_number, is_channel_uuid
from .offhub import Pending, call_now

log = logging.getLogger(__name__)

VERDICT_VARIABLE = "forum_bridge_verdict"
DIAL_VARIABLE = "forum_bridge_dial"
RESULT_VARIABLE = "forum_bridge_result"
_DOMAIN = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
HANGUP_CAUSE = "CALL_REJECTED"
UNAVAILABLE_CAUSE = "NORMAL_TEMPORARY_FAILURE"  # no decision, fail_mode closed: SIP 503
_REPLIES = ("command/reply", "api/response")
_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn (4096 on current kernels)
MAX_SESSIONS = 128  # hook connections at once
MAX_SESSION_BYTES = 256 * 1024  # bytes one connection may send in all
_MAX_HEADER = 128 * 1024  # bytes of one header block (CHANNEL_DATA with every channel variable)
_MAX_BODY = 64 * 1024
TRANSFER_EARLY = 1.0  # ``sched_transfer +N`` fires N - 1 s after it was set at the earliest
ANSWER_MARGIN = 0.25  # from the transfer being set to the session, and for sending the verdict
# Seconds a decision waits at most for the events FreeSWITCH sent before the call to be applied,
# and the time it keeps for itself after that wait (a decision takes milliseconds, but may queue
# behind one batch of events in the database thread).
_CATCH_UP = 1.0
_DECISION_RESERVE = 0.25
# A decision found committing at its deadline is waited for this much longer (its answer is the
# truth and the commit is its last step); after that it is given up anyway, its licence given back.
_COMMIT_GRACE = 0.15


class DecisionLate(ForumBridgeError):
    """No decision by the session's deadline: the fail mode answers, and that answer is final."""


class SocketHookServer:
    """Answers FreeSWITCH's ``socket`` application: allow a call, or hang it up."""

    def __init__(
        self,
        service: BridgeService,
        settings: Settings | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        session_timeout: float = 10.0,
        max_sessions: int = MAX_SESSIONS,
        decision_timeout: float | None = None,
    ) -> None:
        """``decision_timeout``: seconds from a connection's arrival to its answer (see the module)."""
        self.service = service
        self.settings = settings if settings is not None else service.settings
        fs = self.settings.freeswitch
        self.host = fs.socket_host if host is None else host
        self.requested_port = fs.socket_port if port is None else port
        self.fail_open = fs.fail_mode == "open"
        self.session_timeout = session_timeout
        self.max_sessions = max_sessions
        if decision_timeout is None:
            decision_timeout = fs.hook_timeout - TRANSFER_EARLY - ANSWER_MARGIN
        self.decision_timeout = max(0.1, decision_timeout)
        self.late = 0  # decisions answered by the fail mode because their deadline passed
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in fs.socket_allow]
        self._stranger_logged: set[str] = set()
        self.rejected = 0  # connections from addresses outside freeswitch.socket_allow
        self._server: Any = None
        self._open: set[Any] = set()  # greenlets of the connections being handled
        # Connections still waiting for their channel data, oldest first.
        self._waiting: dict[Any, None] = {}
        self._over_capacity_logged = False
        self.sessions = 0  # finished sessions, for tests and diagnostics
        self.evicted = 0  # connections dropped while waiting, to make room for a new one
        self.refused = 0  # connections closed at once: every place was busy deciding
        # ``before_decision(timeout, logon)`` is called before each decision (logon "" for an
        # inbound one): the runner sets the ESL listener's caught_up, so a call is decided on the
        # events FreeSWITCH sent before it, the caller's own first.
        self.before_decision: Callable[[float, str], object] | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        if self._server is None:
            return self.requested_port
        return int(self._server.server_port)

    def start(self) -> None:
        """Listen; raise PbxConnectionError when the address cannot be bound."""
        # The socket is made here, not by StreamServer, which leaks it when bind fails.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = gsocket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.requested_port))
            # While the bridge is hung the kernel still accepts into this queue, and FreeSWITCH keeps
            # each such connection for its own 25 s; once the queue is full a new call's connect()
            # would wait for TCP's retries, which the dialplan's scheduled transfer cannot cut short.
            listener.listen(_BACKLOG)
        except OSError as exc:
            listener.close()
            raise PbxConnectionError(
                f"cannot listen for the socket hook on {self.host}:{self.requested_port}: "
                f"{describe_os_error(exc)}"
            ) from exc
        server = StreamServer(listener, self._handle)
        server.start()
        self._server = server
        log.info("socket hook listening on %s:%d", self.host, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting calls; sessions in progress get ``timeout`` seconds to finish."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout=timeout)

    # --- one call ---------------------------------------------------------------------------------

    def _allowed_peer(self, address: Any) -> bool:
        host = str(address[0]) if isinstance(address, tuple) and address else ""
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip is not None and any(ip in network for network in self._allowed):
            return True
        self.rejected += 1
        if host not in self._stranger_logged and len(self._stranger_logged) < 64:
            self._stranger_logged.add(host)  # once per address, so a scan cannot flood the log
            log.warning("socket hook connection from %s refused: not in freeswitch.socket_allow", host or "?")
        return False

    def _admit(self) -> bool:
        """Make room for the current connection; False when it must be refused."""
        current = gevent.getcurrent()
        self._open.add(current)
        self._waiting[current] = None
        if len(self._open) <= self.max_sessions:
            self._over_capacity_logged = False
            return True
        for oldest in self._waiting:
            if oldest is not current:
                del self._waiting[oldest]
                self.evicted += 1
                oldest.kill(_Evicted(), block=False)
                return True
        self.refused += 1
        if not self._over_capacity_logged:
            self._over_capacity_logged = True
            log.warning(
                "more than %d socket hook sessions deciding at once; refusing new ones", self.max_sessions
            )
        return False

    def deciding(self) -> None:
        """The current session has its channel data: it may no longer be dropped to make room."""
        self._waiting.pop(gevent.getcurrent(), None)

    def _handle(self, sock: Any, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        # FreeSWITCH set its transfer just before it connected: the deadline counts from now.
        session = _HookSession(self, sock, time.monotonic() + self.decision_timeout)
        try:
            if not self._allowed_peer(address) or not self._admit():
                return
            with gevent.Timeout(self.session_timeout, PbxConnectionError("the session took too long")):
                session.run()
        except _Evicted:
            log.debug("socket hook connection from %s dropped to make room: it sent no channel data", peer)
        except PbxConnectionError as exc:
            self._connection_ended(session, peer, exc)
        except PbxError as exc:
            # The socket closes now; with socket_resume=true the dialplan applies the fail mode.
            log.error("socket hook session from %s failed: %s", peer, exc)
        except Exception:
            log.exception("socket hook session from %s failed", peer)
        finally:
            current = gevent.getcurrent()
            self._open.discard(current)
            self._waiting.pop(current, None)
            self.sessions += 1
            with contextlib.suppress(OSError):
                sock.close()

    def _connection_ended(self, session: _HookSession, peer: str, exc: PbxConnectionError) -> None:
        """The session's connection ended early: log it only as loud as an operator must act on it."""
        if session.decided is not None:
            # The call was decided; FreeSWITCH closes the session when the channel goes away, for
            # example when the event path killed it at the same moment (enforce = both).
            log.debug(
                "socket hook: channel %s closed its session after the decision (%s)",
                session.uuid,
                "allowed" if session.decided else "denied",
            )
        elif not session.uuid and isinstance(exc, ConnectionClosed):
            # Connected and closed without a channel: a port probe or a health check.
            log.debug("socket hook: connection from %s closed without channel data", peer)
        elif not session.uuid:
            log.warning("socket hook: connection from %s sent no channel data: %s", peer, exc)
        else:
            # A channel came and went before it was decided: the caller hung up while the bridge
            # was deciding, or FreeSWITCH gave up on the hook; the dialplan applies the fail mode.
            log.warning("socket hook: channel %s ended its session before a decision: %s", session.uuid, exc)

    def decide(self, logon: str, number: str, uuid: str, deadline: float | None = None) -> bool | None:
        """True when the call may go on, False when it is denied.

        When no decision can be made by ``deadline`` (a ``time.monotonic()`` value; default: the
        decision timeout from now) the fail mode applies: ``open`` answers True, ``closed`` None
        (the call is rejected as undecided, 503, like the dialplan's own fail mode, not as denied).
        """
        if not logon or not number:
            # FreeSWITCH did not authenticate the caller (a trunk, a gateway, an internal leg):
            # no log-on's call, so nothing the licence rules manage.
            log.info("socket hook: channel %s has no authenticated caller or number; letting it pass", uuid)
            return True
        # The dialplan keeps emergency numbers away from the hook; should one come, it passes.
        emergency = self.settings.emergency.is_emergency(number)
        fallback = Decision(
            emergency or self.fail_open, Reason.EMERGENCY if emergency else Reason.BRIDGE_ERROR
        )
        ticket = DecisionTicket(self._deadline(deadline), uuid)
        self._catch_up(ticket, logon)
        try:
            decision: Decision = self._decided(
                ticket, fallback, "authorize", logon, number, Direction.OUTBOUND, channel=uuid
            )
            if decision.undecided:  # the leg's event left it undecided first: 503, never 603
                return None
            return decision.allowed
        except ForumBridgeError as exc:
            action = (
                "letting it pass (fail_mode open)" if fallback.allowed else "hanging up (fail_mode closed)"
            )
            log.error(
                "socket hook cannot decide channel %s of %s to %s: %s; %s", uuid, logon, number, exc, action
            )
            return True if fallback.allowed else None

    def ring(self, number: str, domain: str, deadline: float | None = None) -> tuple[str, str]:
        """``(result, dial string)`` for a call to call number ``number`` (see the module docstring)."""
        ticket = DecisionTicket(self._deadline(deadline))
        self._catch_up(ticket, "")
        try:
            ringable: list[tuple[str, Decision]] = self._decided(
                ticket, Decision(False, Reason.BRIDGE_ERROR), "ringable", validate_number(number)
            )
        except InvalidInputError as exc:
            log.warning("socket hook: inbound lookup for an unusable call number: %s; nobody rung", exc)
            return "deny", ""
        except ForumBridgeError as exc:
            log.error("socket hook cannot decide who may ring for number %s: %s; nobody rung", number, exc)
            return "error", ""
        suffix = f"@{domain}" if domain else ""
        allowed = [f"user/{logon}{suffix}" for logon, decision in ringable if decision.allowed]
        return ("allow" if allowed else "deny"), ",".join(allowed)

    def _catch_up(self, ticket: DecisionTicket, logon: str) -> None:
        """Let the events FreeSWITCH sent before the call be applied first (``before_decision``),
        as long as the decision keeps ``_DECISION_RESERVE`` seconds of its deadline."""
        if self.before_decision is None:
            return
        budget = min(_CATCH_UP, ticket.deadline - time.monotonic() - _DECISION_RESERVE)
        if budget <= 0:
            return
        try:
            self.before_decision(budget, logon)
        except Exception:  # only an optimisation: it must never cost the answer
            log.exception("waiting for FreeSWITCH's pending events failed")

    def _deadline(self, deadline: float | None) -> float:
        return time.monotonic() + self.decision_timeout if deadline is None else deadline

    def _decided(
        self, ticket: DecisionTicket, fallback: Decision, method: str, /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run the service's ``method`` with ``ticket`` until the ticket's deadline.

        Raises :class:`DecisionLate` when the caller must answer ``fallback``, which the service
        was told: from then on the decision still running can take no licence, and the leg's
        event gets the same answer. A service without tickets (a stand-in) is asked the plain way.
        """
        if not callable(getattr(self.service, "give_up", None)):
            return getattr(self.service, method)(*args, **kwargs)
        pending: Pending | None = None
        timer = gevent.Timeout(max(0.0, ticket.deadline - time.monotonic()))
        timer.start()
        try:
            # Starting counts too: the database thread may be busy, and its queue is waited for.
            if self._takes_ticket(method):
                kwargs["ticket"] = ticket
            pending = self._submit(method, *args, **kwargs)
            return pending.wait()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            if self.service.give_up(ticket, fallback):
                raise self._late() from exc
        except (StoreError, DecisionAbandoned):
            # Nothing was committed; the leg keeps the fail-mode answer also for its event.
            self.service.give_up(ticket, fallback)
            raise
        finally:
            timer.close()
        # Committing at this very moment (this decision, or the leg's event): its answer is the
        # truth, and the commit is its last step.
        grace = time.monotonic() + _COMMIT_GRACE
        while time.monotonic() < grace:
            if pending is not None:
                with contextlib.suppress(gevent.Timeout):
                    return pending.wait(timeout=max(0.0, min(0.02, grace - time.monotonic())))
            else:
                gevent.sleep(0.01)
            if self.service.give_up(ticket, fallback):
                raise self._late()
        # Even that took too long: answer anyway; a licence the commit takes is given back.
        self.service.give_up_anyway(ticket, fallback)
        raise self._late()

    def _late(self) -> DecisionLate:
        self.late += 1
        return DecisionLate(
            f"no decision within {self.decision_timeout:g} s (freeswitch.hook_timeout "
            f"{self.settings.freeswitch.hook_timeout}); answered by the fail mode"
        )

    def _takes_ticket(self, method: str) -> bool:
        # A stand-in for a service method (a test's, a wrapper's) may not know about tickets.
        service = getattr(self.service, "wrapped", self.service)
        try:
            parameters = inspect.signature(getattr(service, method)).parameters
        except (TypeError, ValueError):
            return False
        return "ticket" in parameters

    def _submit(self, method: str, /, *args: Any, **kwargs: Any) -> Pending:
        submit: Callable[..., Pending] | None = getattr(self.service, "submit", None)
        if callable(submit):
            return submit(method, *args, **kwargs)
        return call_now(getattr(self.service, method), *args, **kwargs)


class _Evicted(BaseException):
    """Raised in a waiting session's greenlet to drop it for a newer connection."""


class _HookSession:
    """One outbound-socket conversation."""

    def __init__(self, server: SocketHookServer, sock: Any, deadline: float) -> None:
        self.server = server
        self.sock = sock
        self.deadline = deadline  # of the decision (time.monotonic())
        self.reader = FrameReader(
            sock, max_body=_MAX_BODY, max_header=_MAX_HEADER, max_total=MAX_SESSION_BYTES
        )
        self.uuid = ""  # the channel, once its data came
        self.decided: bool | None = None  # True allowed, False denied, None not yet

    def run(self) -> None:
        self._send("connect")
        channel = event_from_frame(self.reader.read_frame())
        self.server.deciding()
        uuid = channel_uuid(channel)
        if not is_channel_uuid(uuid):
            raise ProtocolError("the channel data has no usable Unique-ID")
        self.uuid = uuid
        if channel.get("variable_socket_path") == SOCKET_PATH_INBOUND:
            self._inbound(uuid, channel)
            return
        logon, number = caller_logon(channel), dialled_number(channel)
        verdict = self.server.decide(logon, number, uuid, self.deadline)
        self.decided = bool(verdict)
        if verdict:
            self._request(f"api uuid_setvar {uuid} {VERDICT_VARIABLE} allowed")
            self._request("resume")
        else:
            # Denied (603), or undecided with fail_mode closed (503, as the dialplan's fail mode).
            state, cause = (
                ("denied", HANGUP_CAUSE) if verdict is False else ("unreachable", UNAVAILABLE_CAUSE)
            )
            self._request(f"api uuid_setvar {uuid} {VERDICT_VARIABLE} {state}")
            self._request(f"sendmsg {uuid}\ncall-command: hangup\nhangup-cause: {cause}")
        with contextlib.suppress(PbxConnectionError):  # FreeSWITCH may close first once the channel is gone
            self._request("exit")

    def _inbound(self, uuid: str, channel: EslEvent) -> None:
        number = channel.get("variable_forum_bridge_number").strip()
        domain = (channel.get("variable_forum_bridge_domain") or channel.get("variable_domain_name")).strip()
        if domain and not _DOMAIN.match(domain):
            log.warning("socket hook: ignoring unusable domain %r of channel %s", domain[:60], uuid)
            domain = ""
        result, dial = self.server.ring(number, domain, self.deadline)
        self.decided = result == "allow"
        # Set (or cleared) every time: the dialplan must never find a dial string of an earlier call.
        self._request(f"api uuid_setvar {uuid} {DIAL_VARIABLE} {dial}".rstrip())
        self._request(f"api uuid_setvar {uuid} {RESULT_VARIABLE} {result}")
        self._request("resume")
        with contextlib.suppress(PbxConnectionError):
            self._request("exit")

    def _send(self, text: str) -> None:
        try:
            self.sock.sendall(f"{text}\n\n".encode())
        except OSError as exc:
            raise PbxConnectionError(f"connection lost: {describe_os_error(exc)}") from exc

    def _request(self, text: str) -> Frame:
        self._send(text)
        while True:
            frame = self.reader.read_frame()
            if frame.content_type in _REPLIES:
                break
            # Events or a linger notice may come in between; only the reply matters here.
        answer = frame.reply_text.strip()
        if not answer.startswith("+OK"):
            log.warning("socket hook: FreeSWITCH answered %r to %s", answer[:80], text.split("\n", 1)[0])
        return frame
