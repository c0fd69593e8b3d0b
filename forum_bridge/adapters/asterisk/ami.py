"""The AMI side of the Asterisk adapter: follow events, resync after every login, hang up.

panoramisk 1.4's ``Manager`` does the framing, the action/response matching and the event
dispatch. Its connection management is unfit for a service and is replaced here:

* it reconnects on its own, at a fixed interval, for ever, also with a wrong secret, and
  ``close()`` does not cancel a reconnect already scheduled; so each session here gets a fresh
  ``Manager`` whose reconnect hooks are disabled, and one supervisor loop reconnects with backoff;
* ``connect()`` only waits for TCP; the login result is taken from its login callback;
* its ping never checks the answer; a ping with a deadline runs here, and a missed answer aborts
  the transport (which a half-open TCP connection needs);
* actions sent while disconnected wait for a FullyBooted that may never come; here an action is
  only sent on a logged-in session and every wait has a deadline;
* each TCP chunk is decoded on its own with errors ignored, which drops a UTF-8 character split
  across two reads; the protocol subclass decodes incrementally first. It also bounds the size of
  an unfinished frame, which panoramisk would buffer without limit.

Service calls are synchronous SQL: they run in one worker thread. Frames the bridge has no use for
are dropped on receipt; the others are stamped with the time they arrived (the time the event
happened, as far as the bridge can tell, however long the queue) and applied in batches, one
transaction per batch (:meth:`BridgeService.apply_batch`), in the order they came. One exception to
the order: when the FastAGI hook is about to decide a call of a log-on, that log-on's queued frames
are applied first (in their own order), so the decision sees the phone's latest REGISTER without
waiting for a whole registration storm to drain.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from panoramisk import Manager
from panoramisk.ami_protocol import AMIProtocol
from panoramisk.message import Message

from forum_bridge.adapters.asterisk.events import (
    EVENT_NAMES,
    MAPPED_HEADERS,
    AmiEventMapper,
    call_snapshot,
    contact_registration,
    event_time,
    headers_of,
    logon_of_channel,
)
from forum_bridge.config import Settings
from forum_bridge.core.events import CallStarted, Direction, Event, Keepalive, LoggedOn, LogonFailed
from forum_bridge.core.rules import Decision
from forum_bridge.dropped_events import DroppedEvents
from forum_bridge.errors import PbxAuthError, PbxConnectionError, PbxError, ProtocolError, StoreError
from forum_bridge.service import BridgeService, Outcome, ResyncReport

__all__ = [
    "EVENT_CLASSES",
    "EVENT_FILTER",
    "HANGUP_CAUSE_REJECTED",
    "AmiListener",
    "AmiObserver",
    "RecentDecisions",
]

log = logging.getLogger(__name__)
# panoramisk logs routine protocol chatter (versions, queued actions) at INFO; keep it out of the
# service log unless something goes wrong.
_wire_log = logging.getLogger(__name__ + ".wire")
_wire_log.setLevel(logging.WARNING)

EVENT_CLASSES = "system,call,security"
"""The Login ``Events:`` mask: registrations (system), channels (call), authentication (security).

``system`` is also what makes Asterisk send FullyBooted after the login."""

EVENT_FILTER = "^Event: (" + "|".join(sorted(EVENT_NAMES)) + ")[[:space:]]"
"""The session filter (AMI ``Filter`` action, a POSIX regex over the whole event) asked for after login.

The classes above also carry frames no rule reads: half of a registration storm (``ChallengeSent``,
``PeerStatus``) and most of a call (``Newstate``, ``DialBegin``...). Asterisk then keeps them from
the session, so the bridge does not spend its time parsing them. ``[[:space:]]`` ends the name
(``Hangup`` but not ``HangupRequest``). Answers to actions (list items included) are never filtered.
"""

HANGUP_CAUSE_REJECTED = 21
"""Q.850 CALL_REJECTED: chan_pjsip answers a call not yet answered with 403 Forbidden."""

HANGUP_CAUSE_UNAVAILABLE = 34
"""Q.850 NO_CIRCUIT_AVAILABLE: 503, for a call hung up because the bridge could not decide it."""

_MAX_FRAME = 1 << 20  # bytes of one unfinished frame; far above any real AMI event
_SLICE = 16 * 1024  # bytes parsed at a time (about 50 frames)
_TURN = 0.005  # seconds of parsing per turn of the event loop, at most (plus one slice)
_READ_AHEAD = 256 * 1024  # bytes received but not parsed yet before reading pauses
_MAX_BACKLOG = 30_000  # queued frames before the listener gives up on them and resyncs instead
_BATCH = 250  # frames applied in one transaction: big enough for a storm, short enough for the hook
_DECISION_HOLD = 0.5  # seconds a hook decision counts as under way at most
_GIVE_WAY = 0.1  # seconds the worker waits for decisions under way before its next batch, at most
_RECONNECT_MIN = 0.5
# A first REGISTER's ContactStatus follows its SuccessfulAuth within milliseconds; a log-on whose
# ContactStatus has not *arrived* this long after its SuccessfulAuth arrived (however long the queue
# takes to apply them) is one the PBX and the bridge really disagree about.
_UNKNOWN_RESYNC_DELAY = 1.0
_UNKNOWN_RESYNC_MIN_INTERVAL = 5.0
_NO_CONTACTS = "no contacts found"
# After a blocked log-on's SuccessfulAuth, when to look at its contacts (seconds, one after the
# other): the registrar stores a REGISTER's refresh a moment after the authentication is reported.
_LOGON_CHECK_DELAYS = (0.1, 0.2, 0.4, 0.8)
_MAX_EXPIRY_REFERENCES = 10_000  # blocked log-ons whose contact expiries are remembered
_MAX_LOGON_CHECKS = 256  # blocked log-ons checked at once; beyond that a block waits for a later REGISTER
_RUNG_PER_LOGON = 16  # ring stamps kept per log-on (calls ringing it within the TTL)
_HANGUPS_KEPT = 1000  # channels kept in AmiListener.hangups_sent, newest last

T = TypeVar("T")


class AmiObserver(Protocol):
    """What the listener reports as it goes (the metrics implement this)."""

    def set_connected(self, up: bool) -> None:
        """The AMI session is up (logged in) or down."""

    def observe_event_lag(self, seconds: float) -> None:
        """How long after Asterisk stamped an event the bridge applied it."""


class RecentDecisions:
    """Decisions one path (AMI or the hook) took, which the other reuses for the same call leg.

    With ``enforce = "both"`` a call is seen twice: its Newchannel over AMI, then the dialplan's
    question. Deciding twice would log, audit and count every call twice, so the hook reuses the
    AMI's decision for the channel, and the AMI only records a leg ringing a log-on the hook has
    just let ring (and which took its licence then). Entries live ``ttl`` seconds. Thread-safe:
    the AMI side records from its database thread.
    """

    def __init__(
        self, ttl: float = 10.0, limit: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Keep at most ``limit`` entries of each kind, each for ``ttl`` seconds."""
        self._ttl = ttl
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: OrderedDict[str, tuple[float, Decision]] = OrderedDict()
        self._rung: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        """Entries held now (decided legs plus rung stamps), for tests and diagnostics."""
        with self._lock:
            return len(self._calls) + sum(len(stamps) for stamps in self._rung.values())

    def _prune(self, now: float) -> None:
        # Both maps are in insertion order, oldest first, so expired entries sit at the front:
        # without this, a log-on rung once and never answered kept its stamp until the limit.
        while self._calls and now - next(iter(self._calls.values()))[0] > self._ttl:
            self._calls.popitem(last=False)
        while self._rung:
            logon, stamps = next(iter(self._rung.items()))
            while stamps and now - stamps[0] > self._ttl:
                stamps.pop(0)
            if stamps:
                break
            del self._rung[logon]

    def record_call(self, channel: str, decision: Decision) -> None:
        """The AMI side decided the call leg on ``channel``."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            self._calls[channel] = (now, decision)
            self._calls.move_to_end(channel)
            while len(self._calls) > self._limit:
                self._calls.popitem(last=False)

    def call(self, channel: str) -> Decision | None:
        """The decision taken for ``channel`` within ``ttl``, if any."""
        with self._lock:
            entry = self._calls.get(channel)
            if entry is None or self._clock() - entry[0] > self._ttl:
                return None
            return entry[1]

    def record_rung(self, logon: str) -> None:
        """The hook let ``logon`` ring for one call (it took its licence)."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            stamps = self._rung.setdefault(logon, [])
            stamps.append(now)
            # A log-on rings for at most a few calls at once; more stamps are inbound queries with
            # no call behind them, which must not grow this list without end.
            del stamps[:-_RUNG_PER_LOGON]
            self._rung.move_to_end(logon)
            while len(self._rung) > self._limit:
                self._rung.popitem(last=False)

    def take_rung(self, logon: str) -> bool:
        """True (once per ring) when the hook let ``logon`` ring within ``ttl``."""
        with self._lock:
            stamps = self._rung.get(logon)
            now = self._clock()
            while stamps and now - stamps[0] > self._ttl:
                stamps.pop(0)
            if not stamps:
                self._rung.pop(logon, None)
                return False
            stamps.pop(0)
            return True


class _Resync:
    """Queue marker: resynchronise with Asterisk's list actions at this point of the stream."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Frame:
    """A queued event frame: only the headers the mapper reads, and when and in what order it came."""

    seq: int
    headers: dict[str, str]
    received: datetime  # the service clock at receipt: the time the event is applied as
    arrived: float  # time.monotonic() at receipt
    logon: str  # the log-on the frame is about ("" when none): the hook's fast lane


_SECURITY_EVENTS = frozenset({"SuccessfulAuth", "ChallengeResponseFailed", "InvalidAccountID"})


def _compact(message: Any) -> dict[str, str]:
    """The headers of a frame that the mapper reads, normalised as :func:`headers_of` does.

    A registration storm is tens of thousands of frames: this reads panoramisk's own store of
    lower-case keys directly instead of going through its case-insensitive mapping interface.
    """
    store = getattr(message, "_store", None)
    if not isinstance(store, dict):
        return {k: v for k, v in headers_of(message).items() if k in MAPPED_HEADERS}
    headers: dict[str, str] = {}
    for key, pair in store.items():
        if key in MAPPED_HEADERS:
            value = pair[1]
            if isinstance(value, list | tuple):
                value = value[0] if value else ""
            headers[key] = "" if value is None else str(value)
    return headers


def _event_headers(frame: str) -> dict[str, str]:
    """The headers the mapper reads of one plain event frame, as :func:`_compact` gives them.

    panoramisk's own reading (a ``Message`` and a case-insensitive mapping per frame) is the larger
    part of the listener's work in a registration storm; a plain event needs none of it. Same
    splitting as panoramisk (``": "``, the first of repeated headers kept, values as sent).
    """
    headers: dict[str, str] = {}
    for line in frame.split("\r\n"):
        key, sep, value = line.partition(": ")
        if sep:
            key = key.lower()
            if key in MAPPED_HEADERS and key not in headers:
                headers[key] = value
    return headers


def _logon_of(name: str, headers: Mapping[str, str]) -> str:
    if name in _SECURITY_EVENTS:
        return headers.get("accountid", "").strip()
    if name == "ContactStatus":
        return headers.get("endpointname", "").strip() or headers.get("aor", "").strip()
    return logon_of_channel(headers.get("channel", "")) or ""


class _Protocol(AMIProtocol):  # type: ignore[misc]  # panoramisk ships no type information
    """AMIProtocol with incremental UTF-8 decoding, a bound on an unfinished frame, and fair turns.

    A registration storm arrives as a continuous stream: asyncio hands over up to 256 KiB per read,
    and parsing that many frames at once holds the event loop for tens of milliseconds, on every
    turn, for as long as the storm lasts; the FastAGI hook, which needs a dozen turns per call,
    then answers in seconds. So the bytes are parsed in slices, one slice per turn of the loop,
    and reading pauses while more than a few slices wait.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start a fresh incremental decoder for the new connection."""
        super().connection_made(transport)
        # The banner can arrive before panoramisk hands its own logger over.
        self.log = _wire_log
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._unparsed = bytearray()
        self._parsing = False
        self._paused = False

    def handle_message(self, message: Any) -> None:
        """Route one parsed frame; a frame that cannot be routed is dropped, not fatal."""
        # A frame panoramisk cannot route (e.g. a repeated Event header) would raise out of
        # data_received, and asyncio then closes the connection: drop that one frame instead.
        try:
            super().handle_message(message)
        except Exception:
            log.warning("dropped a malformed AMI frame")

    def data_received(self, data: bytes) -> None:
        """Parse a small read at once; queue a big one and parse it a slice per turn of the loop."""
        if not self._parsing and len(data) <= _SLICE:
            self._parse(data)
            return
        self._unparsed += data
        if not self._parsing:
            self._parsing = True
            asyncio.get_running_loop().call_soon(self._parse_slice)
        if len(self._unparsed) > _READ_AHEAD and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _parse_slice(self) -> None:
        # Slices until the turn's time is used up: yielding after every slice would hand the
        # interpreter to the database thread for a whole switch interval each time.
        deadline = time.perf_counter() + _TURN
        while self._unparsed and not self.transport.is_closing():
            chunk = bytes(self._unparsed[:_SLICE])
            del self._unparsed[:_SLICE]
            self._parse(chunk)
            if time.perf_counter() >= deadline:
                break
        if self._unparsed:
            asyncio.get_running_loop().call_soon(self._parse_slice)
        else:
            self._parsing = False
        if self._paused and len(self._unparsed) <= _READ_AHEAD // 2 and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    def _parse(self, data: bytes) -> None:
        """Decode whole characters only, then frame; drop the connection on an endless frame."""
        text = self._decoder.decode(data)
        if text and self.version is None:
            # The banner: panoramisk reads the protocol version from the first read.
            super().data_received(text.encode("utf-8"))
        elif text:
            self._frame(text)
        pending = sum(len(part) for part in self.queue)
        if pending > _MAX_FRAME:
            log.error(
                "Asterisk sent a frame over %d bytes without an end; dropping the connection", _MAX_FRAME
            )
            self.queue.clear()
            self._unparsed.clear()
            self.transport.abort()

    def _frame(self, text: str) -> None:
        """panoramisk's framing, with plain events handed over without building a ``Message``.

        An event that answers an action (it carries an ActionID: list items), a ``Shutdown`` and
        anything that is not an event go through panoramisk as before.
        """
        if self.queue:
            text = self.queue.popleft() + text
        frames = text.split("\r\n\r\n")
        self.queue.append(frames.pop())
        fast = getattr(self.factory, "on_event_headers", None)
        for raw in frames:
            frame = raw.strip()
            if (
                fast is not None
                and frame.startswith("Event: ")
                and "ActionID: " not in frame
                and not frame.startswith("Event: Shutdown")
            ):
                fast(_event_headers(frame))
                continue
            message = Message.from_line(frame)
            if message is not None:
                self.handle_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        """Parse what had arrived before the connection ended, then report the loss."""
        if self._unparsed:
            rest = bytes(self._unparsed)
            self._unparsed.clear()
            self._parse(rest)
        super().connection_lost(exc)


class _Manager(Manager):  # type: ignore[misc]  # panoramisk ships no type information
    """A panoramisk Manager for exactly one connection: it never reconnects or pings by itself."""

    def __init__(
        self,
        *,
        on_login_result: Callable[[bool, str], None],
        on_lost: Callable[[object], None],
        on_event_headers: Callable[[Any, dict[str, str]], None],
        **config: Any,
    ) -> None:
        super().__init__(**config)
        self._on_login_result = on_login_result
        self._on_lost = on_lost
        self._on_event_headers = on_event_headers

    def on_event_headers(self, headers: dict[str, str]) -> None:
        """A plain event read by the protocol's fast path (see :meth:`_Protocol._frame`)."""
        self._on_event_headers(self, headers)

    def connection_made(self, f: asyncio.Future[Any]) -> None:
        """TCP is up: log in (panoramisk); a failed connect is left to the supervisor."""
        # panoramisk would schedule its own retry on failure; the supervisor decides instead.
        if f.cancelled() or f.exception() is not None:
            return
        super().connection_made(f)

    def login(self, future: asyncio.Future[Any]) -> bool:
        """The Login answer arrived: report success or refusal to the supervisor."""
        self.authenticated_future = None
        try:
            response = future.result()
        except (asyncio.CancelledError, Exception):
            self.authenticated = False
            return False
        self.authenticated = bool(response.success)
        message = str(response.get("Message", "") or "")
        self._on_login_result(self.authenticated, message)
        return self.authenticated

    def ping(self) -> None:
        """Disabled: see the supervisor's ping."""
        # The supervisor pings with a deadline; panoramisk's own ping never looks at the answer.
        self.pinger = None

    def connection_lost(self, exc: object) -> None:
        """Tell the supervisor; unlike panoramisk, schedule no reconnect."""
        self._connected = False
        self.authenticated = False
        if self.pinger is not None:
            self.pinger.cancel()
            self.pinger = None
        self._on_lost(exc)

    def abort(self) -> None:
        """Drop the TCP connection at once; the normal lost-connection path follows."""
        protocol = getattr(self, "protocol", None)
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.abort()


def _lost_reason(exc: object) -> str:
    if exc is None:
        return "Asterisk closed the connection"
    if isinstance(exc, Mapping) or hasattr(exc, "event"):
        return "Asterisk is shutting down"
    return f"connection lost ({exc})"


def _response_list(result: Any) -> list[Any]:
    # panoramisk answers a list action with a list and anything else with one Message.
    return list(result) if isinstance(result, list) else [result]


class AmiListener:
    """Follows one Asterisk over AMI and applies what happens there to the service.

    ``run(stop)`` connects, logs in, resyncs, applies events and enforces decisions until ``stop``
    is set, reconnecting with backoff (up to ``asterisk.reconnect_max`` seconds) whenever Asterisk
    goes away. It logs once when Asterisk goes away and once when it is back.
    """

    def __init__(
        self,
        settings: Settings,
        service: BridgeService,
        *,
        observer: AmiObserver | None = None,
        executor: Executor | None = None,
        ping_interval: float = 10.0,
        reconnect_min: float = _RECONNECT_MIN,
        decisions: RecentDecisions | None = None,
        on_blocked: Callable[[str, bool], None] | None = None,
    ) -> None:
        """Prepare a listener; nothing connects until :meth:`run`.

        ``decisions`` is shared with the FastAGI hook so a call leg is decided once.
        ``on_blocked(logon, blocked)`` hears of every change of a failed log-on's block
        (``Outcome.blocked``), so that it can be copied into Asterisk at once.
        """
        self._settings = settings
        self._ami = settings.asterisk
        self._service = service
        self._observer = observer
        self.drops = DroppedEvents("AMI", observer)
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(1, thread_name_prefix="forum-bridge-ami")
        self.ping_interval = ping_interval
        self.reconnect_min = reconnect_min
        self.action_timeout = float(self._ami.action_timeout)
        self._enforce = self._ami.enforce in ("ami", "both")
        self._decisions = decisions
        self._on_blocked = on_blocked
        self._mapper = AmiEventMapper(number_of=self._number_of)
        self._manager: _Manager | None = None
        self._lost: asyncio.Future[object] | None = None  # set when the current session's link dies
        self._queue: deque[_Frame | _Resync] = deque()
        self._wake = asyncio.Event()
        # Sequence numbers of the queued frames of each log-on, oldest first (the hook's fast lane).
        self._pending: dict[str, deque[int]] = {}
        self._urgent: set[str] = set()
        self._inflight: tuple[int, datetime] | None = None  # oldest frame of the batch being applied
        # Hook decisions under way (when each stops counting): the worker lets them have the
        # database between two batches, rather than SQLite's sleeping busy wait deciding who goes.
        self._deciding: deque[float] = deque()
        self._decided = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        self._state = "new"  # new -> up <-> down
        self._down_since: float | None = None
        self._auth_error_logged = False
        self._failures = 0  # sessions since the last good resync, for the backoff
        self._resync_error_logged = False
        self._db_failing = False
        self._db_back = False  # set in the database thread; the worker then resyncs
        self._unknown_logons: dict[str, float] = {}  # log-on -> when its SuccessfulAuth arrived
        self._resync_timer: asyncio.Task[None] | None = None
        self._last_resync = float("-inf")
        # Blocked log-ons: their contacts' expiries (URI -> RegExpire) when the block began, and the
        # latest keepalive of each whose check is running.
        self._expiries: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._logon_checks: dict[str, Keepalive] = {}
        self.connected = False
        self.filtered = False  # Asterisk accepted EVENT_FILTER for the current session
        self._filter_refusal_logged = False
        self.unused = 0  # event frames received that the bridge had no use for
        self.logins = 0
        self.resyncs = 0
        self.received = 0  # event frames received
        self.frames = 0  # event frames done: applied, dropped as of no interest, or given up on
        self.batches = 0  # transactions of queued frames
        self.hangups_sent: list[str] = []  # the newest channels hung up (at most _HANGUPS_KEPT)
        self.last_resync: ResyncReport | None = None

    @property
    def address(self) -> str:
        """``host:port`` of AMI, for messages."""
        return f"{self._ami.ami_host}:{self._ami.ami_port}"

    # --- waiting (used by the runner and the tests) ----------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds after some frame, login or resync; raise TimeoutError."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    # --- the supervisor --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Follow Asterisk until ``stop`` is set."""
        worker = asyncio.create_task(self._worker(), name="forum-bridge-ami-worker")
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                except PbxAuthError as exc:
                    self._mark_down(str(exc), auth=True)
                except PbxError as exc:
                    self._mark_down(str(exc))
                if stop.is_set():
                    break
                delay = min(float(self._ami.reconnect_max), self.reconnect_min * (2**self._failures))
                self._failures = min(self._failures + 1, 30)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(delay, 0.01))
        finally:
            worker.cancel()
            for task in list(self._tasks):
                task.cancel()
            if self._resync_timer is not None:
                self._resync_timer.cancel()
            await asyncio.gather(worker, *self._tasks, return_exceptions=True)
            if self._resync_timer is not None:
                await asyncio.gather(self._resync_timer, return_exceptions=True)
            if self.connected:
                self._set_connected(False)
            if self._own_executor:
                self._executor.shutdown(wait=False, cancel_futures=True)

    async def _session(self, stop: asyncio.Event) -> None:
        """One connection: connect, log in, resync, follow events until it is lost or ``stop``."""
        loop = asyncio.get_running_loop()
        login_result: asyncio.Future[tuple[bool, str]] = loop.create_future()
        lost: asyncio.Future[object] = loop.create_future()

        def on_login_result(ok: bool, message: str) -> None:
            if not login_result.done():
                login_result.set_result((ok, message))

        def on_lost(exc: object) -> None:
            if not lost.done():
                lost.set_result(exc)

        manager = _Manager(
            host=self._ami.ami_host,
            port=self._ami.ami_port,
            username=self._ami.ami_username,
            secret=self._ami.ami_secret,
            events=EVENT_CLASSES,
            loop=loop,
            ping_delay=3600,
            reconnect_timeout=3600,
            log=_wire_log,
            protocol_factory=_Protocol,
            on_login_result=on_login_result,
            on_lost=on_lost,
            on_event_headers=self._on_headers,
        )
        manager.register_event("*", self._on_event)
        self._manager = manager
        self._lost = lost
        pinger: asyncio.Task[None] | None = None
        stopping = asyncio.ensure_future(stop.wait())
        try:
            try:
                await asyncio.wait_for(manager.connect(), self.action_timeout)
            except (OSError, TimeoutError) as exc:
                reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
                raise PbxConnectionError(
                    f"cannot connect to Asterisk AMI at {self.address}: {reason}"
                ) from exc
            first: set[asyncio.Future[Any]] = {login_result, lost, stopping}
            await asyncio.wait(first, timeout=self.action_timeout, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                return
            if not login_result.done():
                if lost.done():
                    raise PbxConnectionError(f"{_lost_reason(lost.result())} before the login completed")
                raise PbxConnectionError(f"Asterisk AMI at {self.address} did not answer the login in time")
            ok, message = login_result.result()
            if not ok and "authentication" in message.lower():
                raise PbxAuthError(
                    f"Asterisk refused the AMI login of user {self._ami.ami_username!r} ({message})"
                )
            if not ok:
                # E.g. "Asterisk is shutting down" during a restart: not the credentials' fault.
                raise PbxConnectionError(
                    f"Asterisk did not accept the AMI login now ({message or 'no reason given'})"
                )
            self._mark_up()
            # Before the resync, so that every event frame after it is one the bridge reads.
            await self._ask_for_filter()
            self._enqueue(_Resync("login"))
            pinger = asyncio.create_task(self._pinger(manager), name="forum-bridge-ami-ping")
            running: set[asyncio.Future[Any]] = {lost, stopping}
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                raise PbxConnectionError(_lost_reason(lost.result()))
        finally:
            stopping.cancel()
            if pinger is not None:
                pinger.cancel()
                await asyncio.gather(pinger, return_exceptions=True)
            self._manager = None
            if self.connected:
                self._set_connected(False)
            with contextlib.suppress(Exception):
                manager.close()
            # Closed by us, panoramisk reports no loss: an action still waiting for its answer
            # (a module check at a stop) would wait out its whole deadline instead of failing now.
            if not lost.done():
                lost.set_result(None)

    async def _ask_for_filter(self) -> None:
        """Ask Asterisk to send this session only the events the bridge reads (see EVENT_FILTER).

        An optimisation only: refused (an older Asterisk, a user without write = system) the
        listener goes on, and drops those frames on receipt as before.
        """
        self.filtered = False
        try:
            responses = await self.send_action(
                {"Action": "Filter", "Operation": "Add", "Filter": EVENT_FILTER}
            )
        except PbxError as exc:
            log.debug("event filter not set: %s", exc)  # the session is failing; the next login asks again
            return
        first = responses[0] if responses else None
        if first is not None and first.success:
            self.filtered = True
            return
        if not self._filter_refusal_logged:
            self._filter_refusal_logged = True
            message = str(first.get("Message", "")) if first is not None else ""
            log.warning(
                "Asterisk did not accept the AMI event filter (%s); reading every event of the"
                " classes %s instead, which costs more during a registration storm",
                message or "no reason given",
                EVENT_CLASSES,
            )

    async def _pinger(self, manager: _Manager) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            try:
                await asyncio.wait_for(manager.send_action({"Action": "Ping"}), self.action_timeout)
            except TimeoutError:
                log.warning(
                    "Asterisk AMI at %s did not answer a ping within %.1fs; reconnecting",
                    self.address,
                    self.action_timeout,
                )
                manager.abort()
                return

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        if self._observer is not None:
            try:
                self._observer.set_connected(up)
            except Exception:  # metrics must never stop the listener
                log.exception("connection observer failed")
        self._notify()

    def _mark_up(self) -> None:
        self.logins += 1
        self._auth_error_logged = False
        if self._state == "down" and self._down_since is not None:
            log.info(
                "Asterisk AMI at %s is back (away %.1fs); resyncing",
                self.address,
                time.monotonic() - self._down_since,
            )
        elif self._state == "new":
            log.info("connected to Asterisk AMI at %s as %s", self.address, self._ami.ami_username)
        self._state = "up"
        self._down_since = None
        self._set_connected(True)

    def _mark_down(self, reason: str, *, auth: bool = False) -> None:
        if auth:
            if not self._auth_error_logged:
                self._auth_error_logged = True
                log.error(
                    "%s: check asterisk.ami_username and asterisk.ami_secret against manager.conf;"
                    " retrying every %.0fs at most",
                    reason,
                    self._ami.reconnect_max,
                )
        elif self._state == "up":
            log.warning("lost Asterisk AMI at %s: %s; reconnecting", self.address, reason)
        elif self._state == "new":
            log.warning(
                "cannot reach Asterisk AMI at %s (%s); retrying until it answers", self.address, reason
            )
        else:
            log.debug("Asterisk AMI still unavailable: %s", reason)
        if self._state != "down":
            self._down_since = time.monotonic()
        self._state = "down"
        self._notify()

    # --- actions ---------------------------------------------------------------------------

    async def send_action(self, action: Mapping[str, str], timeout: float | None = None) -> list[Any]:
        """Send one action on the logged-in session; return its responses as a list.

        Raises PbxConnectionError when not logged in or when the answer misses the deadline.
        """
        manager = self._manager
        if manager is None or not self.connected:
            raise PbxConnectionError(f"not connected to Asterisk AMI; {action.get('Action')} not sent")
        deadline = self.action_timeout if timeout is None else timeout
        lost = self._lost
        sent = asyncio.ensure_future(manager.send_action(dict(action)))
        # A link that dies mid-answer (a resync's list cut in half) fails at once, not after the
        # deadline: panoramisk keeps such an action waiting for a reconnect that never comes.
        waiting: set[asyncio.Future[Any]] = {sent} if lost is None else {sent, lost}
        await asyncio.wait(waiting, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        if not sent.done():
            sent.cancel()
            if lost is not None and lost.done():
                raise PbxConnectionError(f"connection lost before Asterisk answered {action.get('Action')}")
            raise PbxConnectionError(f"Asterisk did not answer {action.get('Action')} within {deadline:.1f}s")
        return _response_list(sent.result())

    async def hangup(self, channel: str, cause: int = HANGUP_CAUSE_REJECTED) -> bool:
        """Hang up ``channel`` with a Q.850 ``cause``; True when Asterisk did."""
        try:
            responses = await self.send_action({"Action": "Hangup", "Channel": channel, "Cause": str(cause)})
        except PbxError as exc:
            log.warning("could not hang up channel=%s: %s", channel, exc)
            return False
        first = responses[0] if responses else None
        ok = bool(first is not None and first.success)
        if ok:
            self.hangups_sent.append(channel)
            if len(self.hangups_sent) > _HANGUPS_KEPT:
                # Diagnostics only: keep the newest, so a long-running bridge does not grow.
                del self.hangups_sent[: len(self.hangups_sent) - _HANGUPS_KEPT]
            log.info("hung up channel=%s cause=%d", channel, cause)
        else:
            message = first.get("Message", "") if first is not None else ""
            log.info("hang-up of channel=%s not done: %s", channel, message or "no answer")
        self._notify()
        return ok

    async def _list(self, action: str, item: str, *, empty: str = "") -> list[dict[str, str]]:
        responses = await self.send_action({"Action": action})
        first = responses[0]
        if not first.success:
            message = str(first.get("Message", ""))
            if empty and message.strip().lower() == empty:
                return []
            raise ProtocolError(f"Asterisk refused {action}: {message or 'no reason given'}")
        return [headers_of(r) for r in responses if str(r.get("Event", "")) == item]

    async def resync(self) -> ResyncReport:
        """Read contacts and channels from Asterisk and make the service's view match them."""
        contacts = await self._list("PJSIPShowContacts", "ContactList", empty=_NO_CONTACTS)
        channels = await self._list("CoreShowChannels", "CoreShowChannel")
        report = await self._in_db(self._apply_resync, contacts, channels)
        self._unknown_logons.clear()
        self._last_resync = time.monotonic()
        self._failures = 0
        self._resync_error_logged = False
        self.resyncs += 1
        self.last_resync = report
        self._spawn(self._remember_blocked())
        self._notify()
        return report

    def _apply_resync(self, contacts: list[dict[str, str]], channels: list[dict[str, str]]) -> ResyncReport:
        registrations = [r for r in (contact_registration(c) for c in contacts) if r is not None]
        calls = [c for c in (call_snapshot(ch, self._number_of) for ch in channels) if c is not None]
        return self._service.resync(registrations, calls)

    # --- events ----------------------------------------------------------------------------

    def _on_event(self, manager: Any, message: Any) -> None:
        # An event panoramisk read (see _Protocol._frame for the others).
        try:
            headers = _compact(message)
        except Exception:
            if manager is self._manager:
                self.received += 1
                self.frames += 1
                log.exception("could not read an AMI event")
            return
        self._on_headers(manager, headers)

    def _on_headers(self, manager: Any, headers: dict[str, str]) -> None:
        # Called inline from the protocol's data_received: it must never raise (an exception there
        # tears the connection down) and never block.
        try:
            if manager is not self._manager:
                return
            self.received += 1
            name = headers.get("event", "").strip()
            logon = _logon_of(name, headers)
            service = headers.get("service", "PJSIP").strip().upper()
            if name not in EVENT_NAMES or logon == "<unknown>" or service != "PJSIP":
                # Of no use to the bridge (ChallengeSent, PeerStatus, Newexten, a failure without a
                # name...): done at once, never queued.
                self.frames += 1
                self.unused += 1
                return
            if len(self._queue) >= _MAX_BACKLOG:
                self._overflow()
            frame = _Frame(
                seq=self.received,
                headers=headers,
                received=self._service.clock(),
                arrived=time.monotonic(),
                logon=logon,
            )
            self._enqueue(frame)
        except Exception:
            self.frames += 1
            log.exception("could not queue an AMI event")

    def _enqueue(self, item: _Frame | _Resync) -> None:
        self._queue.append(item)
        if isinstance(item, _Frame) and item.logon:
            self._pending.setdefault(item.logon, deque()).append(item.seq)
        self._wake.set()

    def _overflow(self) -> None:
        dropped = sum(1 for item in self._queue if isinstance(item, _Frame))
        self._queue.clear()
        self._pending.clear()
        self.frames += dropped
        self.drops.dropped(dropped)  # logged once per burst, counted in /metrics
        self._enqueue(_Resync("backlog"))

    def request_resync(self, reason: str) -> None:
        """Queue a resync, e.g. once the database is back: events it could not store are lost."""
        if self.connected:
            self._enqueue(_Resync(reason))

    def _oldest_unapplied(self) -> tuple[int, datetime] | None:
        """(sequence number, receipt time) of the oldest frame not applied yet, or None."""
        oldest = self._inflight
        for item in self._queue:
            if isinstance(item, _Frame):
                if oldest is None or item.seq < oldest[0]:
                    oldest = (item.seq, item.received)
                break
        return oldest

    def done_upto(self) -> int:
        """Every event frame with a sequence number up to this one has been applied (or dropped)."""
        oldest = self._oldest_unapplied()
        return self.received if oldest is None else oldest[0] - 1

    def watermark(self) -> datetime | None:
        """When the oldest frame not applied yet arrived: the state is complete up to then.

        None when nothing is waiting. The keepalive clock judges at this time, not at the wall
        clock: a REGISTER refresh that arrived in time is never counted as missed because a flood
        queued in front of it.
        """
        oldest = self._oldest_unapplied()
        return None if oldest is None else oldest[1]

    async def caught_up(self, timeout: float, logon: str | None = None) -> bool:
        """Wait (at most ``timeout``) until the frames received so far have been applied.

        The hook calls this before deciding, so that it sees what Asterisk reported just before
        the call (a failed log-on, a keepalive, a new contact); False when the deadline passed.
        With ``logon``, only that log-on's frames count, and they are applied ahead of the rest of
        the queue: a call placed during a registration storm waits for one batch, not the storm.
        From its return until :meth:`decided` (half a second at most) the decision that follows
        counts as under way, and the worker lets it have the database before its next batch.
        """
        try:
            return await self._caught_up(timeout, logon)
        finally:
            self._deciding.append(time.monotonic() + _DECISION_HOLD)

    async def _caught_up(self, timeout: float, logon: str | None) -> bool:
        if logon is None:
            target = self.received
            predicate: Callable[[], bool] = lambda: self.done_upto() >= target  # noqa: E731
        else:
            queued = self._pending.get(logon)
            if not queued:
                return True
            last = queued[-1]
            self._urgent.add(logon)
            self._wake.set()

            def predicate() -> bool:
                remaining = self._pending.get(logon)
                return not remaining or remaining[0] > last

        try:
            await self.wait_until(predicate, timeout)
        except TimeoutError:
            return False
        return True

    def decided(self) -> None:
        """The hook has its answer (called once per :meth:`caught_up`): the worker may go on."""
        if self._deciding:
            self._deciding.popleft()
        if not self._deciding:
            self._decided.set()

    async def _give_way(self) -> None:
        """Let hook decisions under way have the database first, for a bounded time."""
        deadline = time.monotonic() + _GIVE_WAY
        while self._deciding:
            now = time.monotonic()
            while self._deciding and self._deciding[0] <= now:
                self._deciding.popleft()  # its decided() never came: it no longer counts
            if not self._deciding or now >= deadline:
                return
            self._decided.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._decided.wait(), min(deadline, self._deciding[0]) - now)

    def _take(self) -> list[_Frame] | _Resync:
        """The next work item: the urgent log-ons' frames, a resync marker, or a batch of frames."""
        if self._urgent:
            wanted, self._urgent = self._urgent, set()
            picked = [i for i in self._queue if isinstance(i, _Frame) and i.logon in wanted]
            if picked:
                self._queue = deque(
                    i for i in self._queue if not (isinstance(i, _Frame) and i.logon in wanted)
                )
                return picked
        first = self._queue.popleft()
        if isinstance(first, _Resync):
            return first
        batch = [first]
        while self._queue and len(batch) < _BATCH and isinstance(self._queue[0], _Frame):
            item = self._queue.popleft()
            assert isinstance(item, _Frame)
            batch.append(item)
        return batch

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._deciding and not self._urgent:
                await self._give_way()
            item = self._take()
            try:
                if isinstance(item, _Resync):
                    await self._resync_item(item)
                else:
                    oldest = min(item, key=lambda f: f.seq)
                    self._inflight = (oldest.seq, oldest.received)
                    await self._process(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("unexpected error while applying AMI events; dropped them")
            finally:
                if not isinstance(item, _Resync):
                    self._done(item)
                self.drops.tick()
                self._inflight = None
                if self._db_back:
                    self._db_back = False
                    self.request_resync("database back")
                self._notify()

    def _done(self, frames: list[_Frame]) -> None:
        self.frames += len(frames)
        for frame in frames:
            queued = self._pending.get(frame.logon)
            if queued and queued[0] == frame.seq:
                queued.popleft()
                if not queued:
                    del self._pending[frame.logon]

    async def _resync_item(self, item: _Resync) -> None:
        if not self.connected:
            return  # the next login queues its own resync
        manager = self._manager
        try:
            await self.resync()
        except StoreError as exc:
            log.error("resync after %s failed: %s", item.reason, exc)
        except ProtocolError as exc:
            if "unknown command" in str(exc).lower():
                # res_pjsip is not loaded: Asterisk is still booting or already shutting down
                # (it answers AMI before and after its modules). Not the AMI user's fault.
                log.warning("cannot resync yet: %s; Asterisk is starting or stopping, retrying", exc)
                self._spawn(self._retry_resync())
                return
            # Asterisk said no (e.g. the AMI user lacks write = system): reconnecting would not
            # help; keep following events and try again later.
            if not self._resync_error_logged:
                self._resync_error_logged = True
                log.error(
                    "cannot resync: %s; the AMI user needs write = system in manager.conf;"
                    " retrying every %.0fs",
                    exc,
                    self._resync_retry_delay(),
                )
            self._spawn(self._retry_resync())
        except PbxError as exc:
            # No answer: the state cannot be trusted and the session may be dead; a new session
            # starts with a resync (the backoff keeps growing until one succeeds).
            log.warning("resync after %s failed: %s; reconnecting", item.reason, exc)
            if manager is not None and manager is self._manager:
                manager.abort()  # never a newer session that replaced the one that failed

    def _resync_retry_delay(self) -> float:
        return max(1.0, float(self._ami.reconnect_max))

    async def _retry_resync(self) -> None:
        await asyncio.sleep(self._resync_retry_delay())
        if self.connected:
            self._enqueue(_Resync("retry"))

    async def _process(self, frames: list[_Frame]) -> None:
        results = await self._in_db(self._apply_frames, frames)
        self.batches += 1
        now = datetime.now(UTC)
        for frame, applied in zip(frames, results, strict=True):
            if applied is None:
                continue
            event, outcome = applied
            if self._observer is not None:
                stamped = event_time(frame.headers)
                if stamped is not None:
                    with contextlib.suppress(Exception):
                        self._observer.observe_event_lag((now - stamped).total_seconds())
            if outcome.blocked is not None:
                self._blocked_changed(event, outcome.blocked)
            self._follow_block(event, outcome)
            if isinstance(event, LoggedOn):
                self._unknown_logons.pop(event.logon, None)
            if outcome.unknown_registration and isinstance(event, Keepalive):
                self._unknown_logons.setdefault(event.logon, frame.arrived)
                self._schedule_unknown_resync()
            if outcome.hangup and isinstance(event, CallStarted) and not self._spare_emergency_call(event):
                # No decision, or the fail-mode answer the hook gave up with (bridge_error): the
                # database failed, so 503 like the dialplan's fail mode, not a denial's 403.
                undecided = outcome.decision is None or outcome.decision.undecided
                cause = HANGUP_CAUSE_UNAVAILABLE if undecided else HANGUP_CAUSE_REJECTED
                self._spawn(self.hangup(event.channel, cause))

    def _apply_frames(self, frames: list[_Frame]) -> list[tuple[Event, Outcome] | None]:
        """Map and apply a batch in order (in the database thread); None for frames that mean nothing.

        Registration and security events go to the service together; a call start is decided on
        its own, with the events before it applied first. Never raises.
        """
        results: list[tuple[Event, Outcome] | None] = [None] * len(frames)
        run: list[tuple[int, Event]] = []
        for index, frame in enumerate(frames):
            try:
                event = self._mapper.map_headers(frame.headers, frame.received)
            except Exception as exc:
                log.warning(
                    "dropped a malformed AMI frame (%s): event=%r", exc, frame.headers.get("event", "")[:64]
                )
                continue
            if event is None:
                continue
            if isinstance(event, CallStarted):
                self._apply_run(run, results)
                run = []
                results[index] = self._apply_frame(event)
            else:
                run.append((index, event))
        self._apply_run(run, results)
        return results

    def _apply_run(self, run: list[tuple[int, Event]], results: list[tuple[Event, Outcome] | None]) -> None:
        if not run:
            return
        try:
            outcomes = self._service.apply_batch([event for _, event in run])
        except StoreError as exc:
            for index, event in run:
                results[index] = (event, self._store_failed(event, exc, False))
            return
        except Exception:
            log.exception("could not apply %d AMI events; dropped them", len(run))
            return
        self._database_ok()
        for (index, event), outcome in zip(run, outcomes, strict=True):
            results[index] = (event, outcome)

    def _database_ok(self) -> None:
        if self._db_failing:
            self._db_failing = False
            self._db_back = True  # what failed meanwhile is lost: the worker resyncs
            log.info("database is back")

    def _apply_frame(self, event: Event) -> tuple[Event, Outcome]:
        """Apply one call start (in the database thread). Never raises."""
        enforce = self._enforce and isinstance(event, CallStarted)
        decisions = self._decisions
        if (
            enforce
            and decisions is not None
            and isinstance(event, CallStarted)
            and event.direction is Direction.INBOUND
            and decisions.take_rung(event.logon)
        ):
            enforce = False  # the hook let this log-on ring just now; only record the leg
        failed_before = self._service.failed_decisions
        try:
            outcome = self._service.apply(event, enforce=enforce)
        except StoreError as exc:
            return event, self._store_failed(event, exc, enforce)
        except Exception:
            log.exception("could not apply %s; dropped it", type(event).__name__)
            return event, Outcome()
        if enforce and decisions is not None and isinstance(event, CallStarted) and outcome.decision:
            decisions.record_call(event.channel, outcome.decision)
        if self._service.failed_decisions == failed_before:
            # An emergency call is let through when the database fails: that says nothing of
            # the database being back, and a resync now would only fail again.
            self._database_ok()
        return event, outcome

    def _spare_emergency_call(self, event: CallStarted) -> bool:
        """True for an emergency call the AMI side must not hang up (enforce = both).

        There the dialplan refuses a blocked log-on's emergency call before it is routed (from
        AstDB); a call it let through (e.g. the block was stale) may be connected to the
        emergency service by the time this event is applied (a backlog after a hang), and is
        never cut. With enforce = ami the hang-up is the only enforcement and stays.
        """
        if self._ami.enforce != "both" or event.direction is not Direction.OUTBOUND:
            return False
        if not self._service.is_emergency(event.number):
            return False
        log.info(
            "emergency call channel=%s logon=%s number=%s denied but not hung up over AMI:"
            " the dialplan refuses it before routing, and never cuts one it let through",
            event.channel,
            event.logon,
            event.number,
        )
        return True

    def _blocked_changed(self, event: Event, blocked: bool) -> None:
        logon = getattr(event, "logon", "")
        if self._on_blocked is None or not logon:
            return
        try:
            self._on_blocked(logon, blocked)
        except Exception:  # telling the PBX is best effort; the periodic rewrite repairs it
            log.exception("could not pass on the block of logon=%s", logon)

    # --- lifting a block: only a REGISTER may -------------------------------------------------
    #
    # SuccessfulAuth comes for any authenticated request, an INVITE to 112 as well as a REGISTER,
    # and says nothing of which. A refresh REGISTER from a contact Asterisk already has raises
    # nothing else (no ContactStatus), and Asterisk 22 keeps the contact's first Call-ID on a
    # refresh, so the SessionID cannot be matched against the contact either. What a REGISTER
    # does change, and an INVITE never, is the contact's expiry (RegExpire). So, for a blocked
    # log-on only: remember its contacts' expiries when the block begins, and after each of its
    # SuccessfulAuths look again (PJSIPShowEndpoint, write = system); a moved or new expiry proves
    # a successful REGISTER, which the service then hears as a Keepalive that clears the block.

    def _follow_block(self, event: Event, outcome: Outcome) -> None:
        """Hook after each applied event: keep the expiry references and start logon checks."""
        logon = getattr(event, "logon", "")
        if not logon:
            return
        if outcome.blocked is True or (isinstance(event, LogonFailed) and logon in self._expiries):
            # Taken again after every failure, so only a REGISTER after the latest one counts.
            self._spawn(self._remember_expiries(logon))
        elif outcome.blocked is False:
            self._expiries.pop(logon, None)
        if outcome.check_logon and isinstance(event, Keepalive):
            running = logon in self._logon_checks
            if not running and len(self._logon_checks) >= _MAX_LOGON_CHECKS:
                log.warning("too many blocked log-ons authenticating at once; not checking logon=%s", logon)
                return
            self._logon_checks[logon] = event
            if not running:
                self._spawn(self._check_logon(logon))

    async def _contact_expiries(self, logon: str) -> dict[str, str]:
        """URI -> RegExpire of every contact Asterisk holds for the endpoint ``logon``."""
        responses = await self.send_action({"Action": "PJSIPShowEndpoint", "Endpoint": logon})
        first = responses[0]
        if not first.success:
            raise ProtocolError(f"Asterisk refused PJSIPShowEndpoint: {first.get('Message', '')}")
        expiries: dict[str, str] = {}
        for response in responses:
            item = headers_of(response)
            if item.get("event") == "ContactStatusDetail" and item.get("uri"):
                expiries[item["uri"].strip()] = item.get("regexpire", "").strip()
        return expiries

    async def _remember_expiries(self, logon: str) -> bool:
        try:
            expiries = await self._contact_expiries(logon)
        except PbxError as exc:
            log.warning("could not read the contacts of blocked logon=%s: %s", logon, exc)
            return False
        self._expiries[logon] = expiries
        self._expiries.move_to_end(logon)
        while len(self._expiries) > _MAX_EXPIRY_REFERENCES:
            self._expiries.popitem(last=False)
        self._notify()
        return True

    async def _remember_blocked(self) -> None:
        """After a resync: a reference for every blocked log-on that has none (e.g. after a restart)."""
        try:
            blocked = await self._in_db(self._service.blocked_logons)
        except StoreError:
            return  # the next resync tries again; a check without a reference takes one
        for logon in blocked[:_MAX_EXPIRY_REFERENCES]:
            if logon not in self._expiries and not await self._remember_expiries(logon):
                return  # one warning is enough; the next resync tries again

    async def _check_logon(self, logon: str) -> None:
        """Did the latest SuccessfulAuth of blocked ``logon`` come with a REGISTER? If so, lift."""
        try:
            if logon not in self._expiries:
                # No reference (the bridge started after the block): take one now; the next
                # REGISTER lifts the block. Erring this way never lets a blocked 112 through.
                await self._remember_expiries(logon)
                return
            current = self._logon_checks[logon]
            attempt = 0
            while attempt < len(_LOGON_CHECK_DELAYS):
                await asyncio.sleep(_LOGON_CHECK_DELAYS[attempt])
                attempt += 1
                latest = self._logon_checks[logon]
                if latest is not current:  # another SuccessfulAuth meanwhile: watch for that one
                    current, attempt = latest, 0
                reference = self._expiries.get(logon)
                if reference is None:
                    return  # lifted meanwhile (e.g. by a new contact)
                expiries = await self._contact_expiries(logon)
                if any(reference.get(uri) != expiry for uri, expiry in expiries.items()):
                    await self._lift_block(current, expiries)
                    return
        except PbxError as exc:
            log.warning("could not check whether logon=%s registered: %s", logon, exc)
        finally:
            self._logon_checks.pop(logon, None)
            self._notify()

    async def _lift_block(self, event: Keepalive, expiries: dict[str, str]) -> None:
        confirmed = Keepalive(logon=event.logon, at=event.at, source=event.source, clears_block=True)
        try:
            outcome = await self._in_db(self._service.apply, confirmed)
        except StoreError as exc:
            log.error("could not lift the block of logon=%s: %s", event.logon, exc)
            return
        if outcome.blocked is False:
            log.info("logon=%s registered again: its failed log-on no longer blocks it", event.logon)
            self._blocked_changed(confirmed, False)
            self._expiries.pop(event.logon, None)
        elif event.logon in self._expiries:
            self._expiries[event.logon] = expiries  # still blocked (failed again since): new reference

    def _store_failed(self, event: Event, exc: StoreError, enforce: bool) -> Outcome:
        if not self._db_failing:
            log.error("database error while applying %s: %s", type(event).__name__, exc)
        self._db_failing = True
        if not (enforce and isinstance(event, CallStarted)):
            return Outcome()
        emergency = event.direction is Direction.OUTBOUND and self._service.is_emergency(event.number)
        hangup = not emergency and self._ami.fail_mode == "closed"
        log.warning(
            "no decision for channel=%s logon=%s number=%s (database error): fail_mode=%s -> %s",
            event.channel,
            event.logon,
            event.number,
            self._ami.fail_mode,
            "hang up" if hangup else "let it run",
        )
        return Outcome(hangup=hangup)

    def _number_of(self, logon: str) -> str | None:
        try:
            return self._service.call_number(logon)
        except StoreError:
            return None

    def _schedule_unknown_resync(self) -> None:
        if self._resync_timer is not None and not self._resync_timer.done():
            return
        self._resync_timer = asyncio.create_task(self._unknown_resync(), name="forum-bridge-ami-resync-timer")

    async def _unknown_resync(self) -> None:
        # A first REGISTER authenticates before its contact exists; its ContactStatus arrives right
        # after. Judge only once every frame that arrived by now is applied, and only log-ons whose
        # SuccessfulAuth arrived the grace ago: in a storm the ContactStatus may be queued, not
        # missing. What is left (e.g. a phone the bridge logged off for a missed keepalive while it
        # stayed registered) really disagrees with Asterisk.
        try:
            await self._judge_unknown()
        finally:
            self._notify()

    async def _judge_unknown(self) -> None:
        wait = max(_UNKNOWN_RESYNC_DELAY, self._last_resync + _UNKNOWN_RESYNC_MIN_INTERVAL - time.monotonic())
        await asyncio.sleep(wait)
        target = self.received
        judged_at = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await self.wait_until(lambda: self.done_upto() >= target or not self.connected, 60.0)
        due = sorted(
            logon
            for logon, arrived in self._unknown_logons.items()
            if arrived <= judged_at - _UNKNOWN_RESYNC_DELAY
        )
        if due and self.connected:
            shown = ", ".join(due[:20]) + (f" and {len(due) - 20} more" if len(due) > 20 else "")
            log.info("keepalive from log-ons without a known contact (%s); resyncing", shown)
            self._unknown_logons.clear()
            self._enqueue(_Resync("unknown registration"))
        elif self._unknown_logons and self.connected:
            self._resync_timer = asyncio.create_task(
                self._unknown_resync(), name="forum-bridge-ami-resync-timer"
            )

    # --- helpers ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _in_db(self, func: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(func, *args))
