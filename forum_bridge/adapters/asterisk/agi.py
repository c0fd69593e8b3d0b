"""The FastAGI hook server: Asterisk's dialplan asks the bridge before a call goes on.

A small asyncio server of its own rather than panoramisk's ``fast_agi``: that one spins at 100 %
CPU when a client closes before the blank line ending the AGI environment, freezing the whole
event loop (AMI included), and its ``add_route`` needs ``asyncio.coroutine``, gone in 3.11.

Protocol (``res_agi.c``): Asterisk connects and writes ``name: value`` lines (``agi_network_script``,
``agi_channel``, ``agi_arg_1``, ...) ending with an empty line; then the server sends commands, one
line each, and reads one reply per command. ``HANGUP`` lines arrive unasked when the channel hangs
up and are skipped; ``520-`` starts a multi-line usage text ending with a ``520 `` line.

Scripts (the part after the address in ``AGI(agi://host:port/<script>,...)``):

* ``outbound`` (``agi_arg_1`` = dialled number): may the log-on of ``agi_channel`` call it? Answers
  ``FORUM_BRIDGE_RESULT`` = ``allow`` or ``deny`` and ``FORUM_BRIDGE_REASON`` = the reason.
* ``inbound`` (``agi_arg_1`` = call number): which log-ons of that number may ring now (each takes
  its licence)? Answers ``FORUM_BRIDGE_DIAL`` = ``PJSIP/a&PJSIP/b`` (left empty when none) and
  ``FORUM_BRIDGE_RESULT`` = ``allow``/``deny``.

When the database fails or is too slow, an outbound emergency call is allowed and anything else
follows ``asterisk.fail_mode`` (reason ``bridge_error``); inbound answers ``FORUM_BRIDGE_RESULT``
= ``error`` with no dial string. An answer given that way is final: the decision still running is
rolled back (it takes no licence later), and the call leg keeps that answer when its AMI event
comes (see :class:`forum_bridge.service.DecisionTicket`). An outbound decision is stored under
the leg's channel, so the AMI event of the same leg reuses it instead of deciding again.

Outbound calls are decided in a database thread of the hook's own (on PostgreSQL up to four,
relaying): the calls that queued while it was busy are decided together in one transaction (each
by the same rules and with its own answer; see ``_GroupDecider``). Emergency calls and
``inbound`` never wait in that queue.

Every client is bounded in time and memory: one that connects and closes, stalls, or sends
garbage costs a few kilobytes for at most ``read_timeout`` seconds.

FastAGI has no authentication, and whoever can ask ``inbound`` takes licences: only addresses in
``asterisk.agi_allow`` (default: loopback) are served; others are closed at once. At most
``max_clients`` connections are open; when a new one would exceed that, the oldest connection
that has not yet sent its whole environment is dropped to make room (Asterisk sends it at once,
so that one is idle or hostile); only when every connection is busy deciding is the new one
refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from forum_bridge.adapters.asterisk.ami import RecentDecisions
from forum_bridge.adapters.asterisk.events import logon_of_channel
from forum_bridge.config import Settings
from forum_bridge.core.events import Direction
from forum_bridge.core.rules import Decision, Reason
from forum_bridge.errors import ConfigError, DecisionAbandoned, ProtocolError, StoreError
from forum_bridge.service import CallQuestion, DecisionTicket

__all__ = ["FastAgiServer", "HookService", "agi_quote", "parse_environment"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_LINE_LIMIT = 4096  # bytes of one line; real AGI environment lines are well under 1 KiB
_ENV_LIMIT = 32 * 1024  # bytes of the whole environment block
_ENV_LINES = 200
_REPLY_LINES = 500  # lines of one reply (a 520 usage text) before giving up
_MAX_CLIENTS = 128
_VERDICTS = 256  # peer addresses whose allow/refuse verdict is remembered
_CATCH_UP = 0.25  # seconds a decision waits for AMI events already received to be applied
# ... for the caller's own events, which the listener applies ahead of any backlog: the wait is the
# batch in flight plus one, whatever the backlog, and a wrong "not_logged_on" costs more than it.
_CATCH_UP_LOGON = 1.0
# A decision found committing at its deadline is waited for this much longer: its answer is the
# truth, and the commit is its last step.
_COMMIT_GRACE = 1.0
# Questions decided together in one transaction at most (those queued while the last group ran).
_GROUP_LIMIT = 64
_POSTGRESQL_DECIDERS = 4
"""Decider threads on PostgreSQL. A decision can wait there on one log-on's lock held by another
node (a node hung in the middle of its own decision keeps it until its connection dies); after
``_STALL`` another thread decides everybody else's calls meanwhile. SQLite has one writer: one
thread."""
_STALL = 0.05
"""Seconds a group of decisions runs before the calls queued behind it are decided by another
thread (PostgreSQL); normal groups take a few milliseconds."""
BRIDGE_ERROR = "bridge_error"


class HookService(Protocol):
    """The part of :class:`forum_bridge.service.BridgeService` the hook needs."""

    def authorize(
        self,
        logon: str,
        number: str,
        direction: Direction = Direction.OUTBOUND,
        *,
        channel: str = "",
        ticket: DecisionTicket | None = None,
    ) -> Decision:
        """Decide a call leg now and apply it."""

    def ringable(self, number: str, *, ticket: DecisionTicket | None = None) -> list[tuple[str, Decision]]:
        """Which log-ons of a call number may ring now."""

    def is_emergency(self, number: str) -> bool:
        """True for an emergency number."""

    def give_up(self, ticket: DecisionTicket, answer: Decision) -> bool:
        """The hook answered without the decision; False while it is being committed."""

    def give_up_anyway(self, ticket: DecisionTicket, answer: Decision) -> None:
        """The hook answered without the decision, even though it was being committed."""


def agi_quote(value: str) -> str:
    """One AGI command argument: in double quotes, with ``\\`` and ``"`` escaped (``res_agi`` parse_args)."""
    cleaned = value.replace("\r", " ").replace("\n", " ")
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_environment(lines: list[str]) -> dict[str, str]:
    """Parse ``agi_name: value`` lines (without line ends) into a dict; ProtocolError on garbage."""
    env: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name.startswith("agi_") or not name.replace("_", "").isalnum():
            raise ProtocolError("not an AGI environment line")
        env[name] = value[1:] if value.startswith(" ") else value
    return env


class FastAgiServer:
    """Serves the dialplan hook on ``asterisk.agi_host``/``agi_port`` (port 0 picks a free port)."""

    def __init__(
        self,
        settings: Settings,
        service: HookService,
        *,
        executor: Executor | None = None,
        read_timeout: float = 5.0,
        decision_timeout: float | None = None,
        max_clients: int = _MAX_CLIENTS,
        before_decision: Callable[[float, str | None], Awaitable[object]] | None = None,
        after_decision: Callable[[], object] | None = None,
        decisions: RecentDecisions | None = None,
    ) -> None:
        """Prepare the server; :meth:`start` binds it.

        ``before_decision(timeout, logon)`` is awaited before each decision: the runner passes the
        AMI listener's ``caught_up``, so a decision sees the events Asterisk sent just before the
        call (``logon`` is the caller's log-on for an outbound call, None for an inbound one).
        ``after_decision()`` is called once the decision that followed is made (the listener lets
        decisions have the database before its next batch).
        ``decisions`` is shared with the AMI listener so a call leg is decided once.
        """
        self._settings = settings
        self._service = service
        self._executor = executor
        self.read_timeout = read_timeout
        # The dialplan waits for the answer with no deadline of its own: never keep it waiting long.
        self.decision_timeout = (
            decision_timeout if decision_timeout is not None else float(settings.asterisk.action_timeout)
        )
        self.max_clients = max_clients
        self._before_decision = before_decision
        self._after_decision = after_decision
        self._decisions = decisions
        # A service without decision tickets (a stand-in) is asked the plain way.
        self._tickets = callable(getattr(service, "give_up", None))
        # Optional (stand-ins in tests lack it): BridgeService.authorize_group.
        group = getattr(service, "authorize_group", None)
        database = getattr(service, "database", None)
        deciders = _POSTGRESQL_DECIDERS if getattr(database, "dialect", "") == "postgresql" else 1
        self._group = _GroupDecider(group, deciders) if self._tickets and callable(group) else None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        # Made only while someone waits in wait_idle: every connection's end would set it.
        self._changed: asyncio.Event | None = None
        self._over_capacity_logged = False
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in settings.asterisk.agi_allow]
        # Verdicts by peer address as the socket gives it (Asterisk connects from one or two): the
        # address parse and network checks cost more than the rest of accepting a connection.
        self._verdicts: dict[str, bool] = {}
        # Connections still waiting for their AGI environment, oldest first, with their writers.
        self._waiting: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._stranger_logged: set[str] = set()
        self.port = settings.asterisk.agi_port
        self.requests = 0
        self.answered = 0
        self.refused = 0
        self.evicted = 0  # idle connections dropped to make room for a new one
        self._closing = False
        self.rejected = 0  # connections from addresses outside asterisk.agi_allow

    @property
    def active(self) -> int:
        """Connections being handled right now."""
        return len(self._handlers)

    async def start(self) -> None:
        """Listen; ConfigError when the address cannot be bound."""
        host = self._settings.asterisk.agi_host
        try:
            self._server = await asyncio.start_server(
                self._handle, host, self._settings.asterisk.agi_port, limit=_LINE_LIMIT
            )
        except OSError as exc:
            raise ConfigError(
                "asterisk.agi_port",
                f"cannot listen on {host}:{self._settings.asterisk.agi_port}: {exc.strerror or exc}",
            ) from exc
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("FastAGI hook listening on %s:%d", host, self.port)

    async def close(self) -> None:
        """Stop listening and end every connection still open."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._group is not None:
            await asyncio.to_thread(self._group.close)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def wait_idle(self, timeout: float) -> None:
        """Wait until no connection is being handled; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while self._handlers:
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    # --- one connection ----------------------------------------------------------------------

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = self._judge(host)
            if len(self._verdicts) < _VERDICTS:  # bounded: a scan from many addresses is not kept
                self._verdicts[host] = verdict
        if verdict:
            return True
        self.rejected += 1
        if host not in self._stranger_logged and len(self._stranger_logged) < 64:
            self._stranger_logged.add(host)  # once per address, so a scan cannot flood the log
            log.warning("FastAGI connection from %s refused: not in asterisk.agi_allow", host or "?")
        return False

    def _judge(self, host: str) -> bool:
        """True when ``host`` (a peer address as the socket reports it) is in ``asterisk.agi_allow``."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            address = None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address is not None and any(address in network for network in self._allowed)

    def _make_room(self, newcomer: asyncio.Task[Any] | None) -> bool:
        """Drop the oldest connection still waiting for its environment; False when there is none."""
        for task, writer in self._waiting.items():
            if task is not newcomer:
                del self._waiting[task]
                self.evicted += 1
                writer.transport.abort()
                log.debug("dropped an idle FastAGI connection to make room")
                return True
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if not self._peer_allowed(writer):
            writer.transport.abort()
            return
        if task is not None:
            self._handlers.add(task)
            self._waiting[task] = writer
        try:
            if len(self._handlers) > self.max_clients and not self._make_room(task):
                self.refused += 1
                if not self._over_capacity_logged:
                    self._over_capacity_logged = True
                    log.warning(
                        "more than %d FastAGI connections deciding at once; refusing new ones",
                        self.max_clients,
                    )
                return
            self._over_capacity_logged = False
            try:
                async with asyncio.timeout(self.read_timeout):
                    env = await self._read_environment(reader)
            except TimeoutError:
                log.debug("FastAGI client sent no complete environment within %.1fs", self.read_timeout)
                return
            except (ProtocolError, ValueError, ConnectionError) as exc:
                # ValueError: a line over the limit (asyncio's LimitOverrunError).
                log.debug("FastAGI client dropped: %s", exc)
                return
            if task is not None and self._waiting.pop(task, None) is None:
                return  # dropped to make room while its last line was arriving
            self.requests += 1
            await self._dispatch(env, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.debug("FastAGI connection closed by Asterisk")
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # Ended by close(): finish normally, or asyncio 3.11's stream callback logs the
            # cancellation as an error with a traceback at every shutdown during a call.
        except Exception:
            log.exception("FastAGI request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                # A timeout scope rather than wait_for: no task per connection for the close.
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)
                self._waiting.pop(task, None)
            self._notify()

    async def _read_environment(self, reader: asyncio.StreamReader) -> dict[str, str]:
        lines: list[str] = []
        total = 0
        while True:
            raw = await reader.readline()
            if not raw.endswith(b"\n"):
                raise ProtocolError("connection closed before the end of the AGI environment")
            total += len(raw)
            if total > _ENV_LIMIT or len(lines) >= _ENV_LINES:
                raise ProtocolError("AGI environment too large")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                return parse_environment(lines)
            lines.append(line)

    async def _dispatch(
        self, env: dict[str, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        script = env.get("agi_network_script", "").split("?", 1)[0].strip().strip("/")
        if script == "outbound":
            answers = await self._outbound(env)
        elif script == "inbound":
            answers = await self._inbound(env)
        else:
            log.warning(
                "FastAGI request for unknown script %r from channel=%s; use outbound or inbound",
                script[:64],
                env.get("agi_channel", "-")[:128],
            )
            return
        async with asyncio.timeout(self.read_timeout):
            for name, value in answers:
                if not await self._command(reader, writer, f"SET VARIABLE {name} {agi_quote(value)}"):
                    return
        self.answered += 1

    async def _outbound(self, env: dict[str, str]) -> list[tuple[str, str]]:
        channel = env.get("agi_channel", "")
        number = (env.get("agi_arg_1") or env.get("agi_extension", "")).strip()
        logon = logon_of_channel(channel)
        if logon is None:
            # Not a PJSIP phone (a Local channel, a trunk of another technology): not managed.
            return [("FORUM_BRIDGE_RESULT", "allow"), ("FORUM_BRIDGE_REASON", Reason.UNMANAGED.value)]
        emergency = self._service.is_emergency(number)
        fallback = Decision(
            emergency or self._settings.asterisk.fail_mode == "open",
            Reason.EMERGENCY if emergency else Reason.BRIDGE_ERROR,
        )
        # The deadline counts from the request, catch-up included: Asterisk's own bound on the hook
        # runs from then too, and an answer it no longer waits for must not take a licence.
        asked = time.monotonic()
        ticket = DecisionTicket(asked + self.decision_timeout, channel)
        caught_up = asked
        try:
            if self._before_decision is not None:
                await self._catch_up(logon)
            try:
                caught_up = time.monotonic()
                known = self._decisions.call(channel) if self._decisions is not None else None
                if known is not None:
                    decision = known  # decided (and logged) when its Newchannel came over AMI
                elif self._group is not None and not emergency:
                    # Decided with the other calls asked meanwhile, in one transaction (see
                    # _GroupDecider). Emergency calls are never queued behind a group.
                    question = CallQuestion(logon, number, Direction.OUTBOUND, channel, ticket)
                    decision = await self._wait(ticket, fallback, self._group.submit(question))
                else:
                    # Keyed by the channel (the decision is stored under it), so the leg's AMI event
                    # gets this answer (and one audit line) instead of deciding again.
                    decision = await self._decide(
                        ticket,
                        fallback,
                        self._service.authorize,
                        logon,
                        number,
                        Direction.OUTBOUND,
                        channel=channel,
                        ticket=ticket,
                    )
            finally:
                self._decided()
        except (StoreError, TimeoutError, DecisionAbandoned) as exc:
            log.warning(
                "no decision for logon=%s number=%s (%s): fail_mode=%s -> %s",
                logon,
                number,
                "timed out" if isinstance(exc, TimeoutError | DecisionAbandoned) else exc,
                self._settings.asterisk.fail_mode,
                "allow" if fallback.allowed else "deny",
            )
            decision = fallback
        if log.isEnabledFor(logging.DEBUG):
            # Where a call's set-up time goes: waiting for the AMI events before it, then deciding.
            done = time.monotonic()
            log.debug(
                "hook outbound channel=%s caught up %.2f ms, decided %.2f ms (%s)",
                channel,
                (caught_up - asked) * 1000,
                (done - caught_up) * 1000,
                decision.reason.value,
            )
        return [
            ("FORUM_BRIDGE_RESULT", "allow" if decision.allowed else "deny"),
            ("FORUM_BRIDGE_REASON", decision.reason.value),
        ]

    async def _inbound(self, env: dict[str, str]) -> list[tuple[str, str]]:
        number = (env.get("agi_arg_1") or "").strip()
        ticket = DecisionTicket(time.monotonic() + self.decision_timeout)
        try:
            if self._before_decision is not None:
                await self._catch_up()
            try:
                ringable = await self._decide(
                    ticket,
                    Decision(False, Reason.BRIDGE_ERROR),
                    self._service.ringable,
                    number,
                    ticket=ticket,
                )
            finally:
                self._decided()
        except (StoreError, TimeoutError, DecisionAbandoned) as exc:
            log.warning(
                "no ringing decision for number=%s (%s); nobody rung",
                number,
                "timed out" if isinstance(exc, TimeoutError) else exc,
            )
            return [("FORUM_BRIDGE_RESULT", "error"), ("FORUM_BRIDGE_REASON", BRIDGE_ERROR)]
        allowed = [logon for logon, decision in ringable if decision.allowed]
        if self._decisions is not None:
            for logon in allowed:
                self._decisions.record_rung(logon)
        answers = [("FORUM_BRIDGE_RESULT", "allow" if allowed else "deny")]
        if allowed:
            answers.insert(0, ("FORUM_BRIDGE_DIAL", "&".join(f"PJSIP/{logon}" for logon in allowed)))
        return answers

    def _decided(self) -> None:
        """Tell the AMI listener a decision was made (it lets decisions have the database first)."""
        if self._before_decision is not None and self._after_decision is not None:
            with contextlib.suppress(Exception):
                self._after_decision()

    async def _catch_up(self, logon: str | None = None) -> None:
        """Wait until the PBX's events received before the call are applied (``before_decision``).

        Without an AMI side (no ``before_decision``) the callers skip this: no await, no task.
        """
        if self._before_decision is not None:
            try:
                bound = _CATCH_UP if logon is None else _CATCH_UP_LOGON
                await self._before_decision(min(bound, self.decision_timeout / 2), logon)
            except Exception:  # only an optimisation: never let it cost the answer
                log.exception("waiting for pending PBX events failed")

    async def _decide(
        self, own: DecisionTicket, fallback: Decision, func: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> T:
        """Run a decision in a database thread until the ticket's deadline.

        TimeoutError means the caller must answer ``fallback``, which is then final: the service
        was told, so the decision still running can no longer take a licence.
        """
        loop = asyncio.get_running_loop()
        if not self._tickets:
            kwargs.pop("ticket", None)
        future = loop.run_in_executor(self._executor, functools.partial(func, *args, **kwargs))
        return await self._wait(own, fallback, future)

    async def _wait(self, own: DecisionTicket, fallback: Decision, future: asyncio.Future[T]) -> T:
        """Wait for a decision running in a database thread until the ticket's deadline (see _decide)."""
        # Whatever the thread ends with is collected, also after we stopped waiting for it.
        future.add_done_callback(_collect)
        try:
            return await _within(future, own.deadline - time.monotonic())
        except TimeoutError:
            if not self._tickets or self._service.give_up(own, fallback):
                raise
        except (StoreError, DecisionAbandoned):
            # Nothing was committed; the leg keeps the fail-mode answer also for its AMI event.
            if self._tickets:
                self._service.give_up(own, fallback)
            raise
        try:
            return await _within(future, _COMMIT_GRACE)
        except TimeoutError:
            self._service.give_up_anyway(own, fallback)
            raise

    async def _command(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: str
    ) -> bool:
        """Send one command; True when Asterisk answered 200."""
        writer.write(command.encode("utf-8") + b"\n")
        await writer.drain()
        code = await self._reply(reader)
        if code == 200:
            return True
        if code == 511:
            log.debug("Asterisk refused %r: the channel is gone", command.split(" ", 2)[:2])
        else:
            log.warning("Asterisk answered %d to FastAGI command %s", code, command.split(" ", 1)[0])
        return False

    async def _reply(self, reader: asyncio.StreamReader) -> int:
        for _ in range(_REPLY_LINES):
            raw = await reader.readline()
            if not raw:
                raise ConnectionError("Asterisk closed the FastAGI connection")
            line = raw.decode("utf-8", "replace").strip()
            if line == "HANGUP":
                continue  # sent unasked when the channel hangs up; the reply comes after it
            if line.startswith("520-"):
                for _ in range(_REPLY_LINES):
                    more = await reader.readline()
                    if not more:
                        raise ConnectionError("Asterisk closed the FastAGI connection")
                    if more.startswith(b"520 "):
                        return 520
                raise ProtocolError("520 usage text without an end")
            if len(line) >= 3 and line[:3].isdigit():
                return int(line[:3])
            raise ProtocolError("unexpected FastAGI reply line")
        raise ProtocolError("too many lines in one FastAGI reply")


class _GroupDecider:
    """Database threads that decide the hook's outbound calls, those queued meanwhile together.

    With one thread per call, 20 calls at once meant 20 transactions queueing for SQLite's writer
    (or 20 PostgreSQL connections competing for two cores), each paying its own BEGIN and COMMIT,
    and threads competing with the event loop for the interpreter. Here a call is put in a queue;
    a thread takes every call waiting, decides them in one transaction
    (:meth:`~forum_bridge.service.BridgeService.authorize_group`) and hands the answers back to the
    event loop in one wake-up. A lone call pays the same hop as before.

    With ``threads`` > 1 (PostgreSQL) the threads relay: the thread holding the turn takes the
    queued calls and keeps the turn until its group is decided, so the calls queued meanwhile wait
    for it and go together in the next group, which costs the least per call (each group's BEGIN,
    locks and COMMIT are shared, and threads do not take turns with the event loop for the
    interpreter). Only when that group has run for ``stall`` seconds (waiting on a log-on's lock
    held by another node, which a node hung in the middle of its own decision keeps until its
    connection dies) does another thread take the queued calls without the turn, so a stuck
    decision holds up the others by ``stall`` at most, not until it ends. Groups take their log-on
    locks in one sorted statement, so two groups never wait on each other in a cycle.
    """

    def __init__(
        self,
        decide: Callable[[list[CallQuestion], Callable[[list[Any]], None]], object],
        threads: int = 1,
        *,
        stall: float = _STALL,
    ) -> None:
        self._decide = decide
        self._count = max(1, threads)
        self._stall = stall
        self._queue: queue.SimpleQueue[
            tuple[CallQuestion, asyncio.Future[Decision], asyncio.AbstractEventLoop] | None
        ] = queue.SimpleQueue()
        # Held by the thread whose turn it is to take calls, until its group is decided.
        self._turn = threading.Lock()
        # When the holder of the turn took its group (time.monotonic()); None while it waits.
        self._turn_busy_since: float | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._start_lock = threading.Lock()

    def submit(self, question: CallQuestion) -> asyncio.Future[Decision]:
        """Queue ``question``; the future gets its Decision (or the exception deciding it raised)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision] = loop.create_future()
        if self._closed:
            future.set_exception(DecisionAbandoned("the hook is closing"))
            return future
        if not self._threads:
            with self._start_lock:
                if not self._threads:
                    threads = [
                        threading.Thread(target=self._run, name=f"forum-bridge-hook-db-{n}", daemon=True)
                        for n in range(self._count)
                    ]
                    for thread in threads:
                        thread.start()
                    self._threads = threads
        self._queue.put((question, future, loop))
        return future

    def close(self) -> None:
        """Stop the threads once the calls queued before are decided (blocks; run it in a thread)."""
        self._closed = True
        threads = self._threads
        for _thread in threads:
            self._queue.put(None)  # one each: a thread takes one and stops after its group
        for thread in threads:
            thread.join(30.0)

    def _wait_for_turn(self) -> bool:
        """Block until this thread may take calls: True with the turn held, False (turn not held)
        when the holder's group has been stuck for ``stall`` seconds."""
        while not self._turn.acquire(timeout=self._stall):
            since = self._turn_busy_since
            if since is not None and time.monotonic() - since >= self._stall:
                return False
        return True

    def _run(self) -> None:
        stop = False
        while not stop:
            holding = self._wait_for_turn()
            try:
                # The queue's own blocking get: a lone call wakes this thread directly.
                item = self._queue.get()
                if item is None:
                    return
                group = [item]
                while len(group) < _GROUP_LIMIT:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    group.append(more)
                if holding:
                    self._turn_busy_since = time.monotonic()
                self._decide_group(group)
            finally:
                if holding:
                    self._turn_busy_since = None
                    self._turn.release()

    def _decide_group(self, group: list[Any]) -> None:
        delivered = False

        def hand_back(answers: list[Any]) -> None:
            nonlocal delivered
            delivered = True
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Decision], Any]]] = {}
            for (_question, future, loop), answer in zip(group, answers, strict=True):
                by_loop.setdefault(loop, []).append((future, answer))
            for loop, results in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                    loop.call_soon_threadsafe(_deliver, results)

        try:
            # The answers go back as soon as they are known; log lines and listeners follow.
            self._decide([question for question, _f, _l in group], hand_back)
        except Exception as exc:  # a bug must answer every caller (by its fail mode), not hang them
            log.exception("deciding %d calls together failed", len(group))
            if not delivered:
                hand_back([StoreError(f"deciding failed: {type(exc).__name__}")] * len(group))


def _deliver(results: list[tuple[asyncio.Future[Decision], Any]]) -> None:
    for future, answer in results:
        if future.done():
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)


async def _within(future: asyncio.Future[T], timeout: float) -> T:
    """The future's result, or TimeoutError after ``timeout`` seconds; the future is never cancelled.

    What ``wait_for(shield(future))`` does, without the two extra futures and the task per call.
    """
    if not future.done():
        await asyncio.wait((future,), timeout=max(0.0, timeout))
        if not future.done():
            raise TimeoutError
    return future.result()


def _collect(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
