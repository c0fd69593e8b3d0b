"""The ESL wire format and a small gevent client for FreeSWITCH's mod_event_socket.

A frame is a header block ending with an empty line, then exactly ``Content-Length`` body bytes
when that header is present. Event bodies (``text/event-plain``) and the outbound socket's
``CHANNEL_DATA`` reply are header blocks whose values are URL-encoded one by one; they are split
into lines first and decoded value by value with :func:`urllib.parse.unquote` (never
``unquote_plus``: FreeSWITCH writes a literal ``+`` as ``%2B``). Repeated headers are kept.

The client is native rather than greenswitch's ``InboundESL`` because the bridge must survive what
that class does not: its reader dies on a frame without ``Content-Type`` (the connection then hangs
silently), spins forever when the socket closes in the middle of a body, decodes the whole block
before splitting it (a ``%0A`` inside a value breaks the frame), keeps only the last of repeated
headers, and waits for command replies without a time limit.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote

import gevent
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore
from gevent.queue import Empty, Queue

from forum_bridge.errors import ConfigError, PbxAuthError, PbxConnectionError, PbxError, ProtocolError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 1024 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_QUEUED_EVENTS = 10_000  # events read but not applied yet, before they are dropped for a resync
MAX_QUEUED_BYTES = 16 * 1024 * 1024  # their body bytes
_YIELD_EVERY = 8  # frames the reader takes off the socket before it lets other greenlets run
UNDEFINED = "_undef_"  # what switch_event_serialize writes for an empty value


class ConnectionClosed(PbxConnectionError):
    """The peer closed the connection (end of stream)."""


# --- frames -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One ESL frame as it came off the socket; outer header values are not URL-decoded."""

    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    problems: tuple[str, ...] = field(default=(), compare=False)

    def header(self, name: str, default: str = "") -> str:
        """The first value of header ``name`` (case-insensitive, as FreeSWITCH matches them)."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return default

    @property
    def content_type(self) -> str:
        """The frame's ``Content-Type`` or ``""``."""
        return self.header("Content-Type")

    @property
    def reply_text(self) -> str:
        """``Reply-Text`` of a command reply, or the body of an api response."""
        text = self.header("Reply-Text")
        if text or self.content_type != "api/response":
            return text
        return self.text

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", errors="replace")


# Header names seen, each kept once (every event repeats the same forty), with its lower-case
# form; bounded, and emptied when full (like _PAIRS below), so a peer sending made-up names can
# neither grow them nor keep the real names out for good.
_NAMES: dict[str, str] = {}
_LOWER: dict[str, str] = {}
_NAMES_LIMIT = 4096
# Only short names and values are kept in these tables (real ones are a few dozen characters):
# a peer sending long ones cannot make the tables hold on to megabytes.
_SHARED_LENGTH = 128


def _shared(name: str) -> str:
    """``name`` as one shared string object (while the table has room)."""
    known = _NAMES.get(name)
    if known is not None:
        return known
    if len(name) <= _SHARED_LENGTH:
        if len(_NAMES) >= _NAMES_LIMIT:
            _NAMES.clear()
        _NAMES[name] = name
    return name


def _lower(name: str) -> str:
    """``name.lower()``, shared like :func:`_shared`."""
    known = _LOWER.get(name)
    if known is not None:
        return known
    lowered = _shared(name.lower())
    if len(name) <= _SHARED_LENGTH:
        if len(_LOWER) >= _NAMES_LIMIT:
            _LOWER.clear()
        _LOWER[name] = lowered
    return lowered


# Header lines seen lately, each kept once: most of an event's forty headers are the same in
# every event (the switch's name, addresses and version, the profile, the calling function), so
# a storm's queued events share them. Emptied when full, so it follows what the peer sends now.
_PAIRS: dict[tuple[str, str], tuple[str, str]] = {}
_PAIRS_LIMIT = 8192


def _shared_pair(name: str, value: str) -> tuple[str, str]:
    pair = (_shared(name), value)
    if len(value) > _SHARED_LENGTH:
        return pair
    known = _PAIRS.get(pair)
    if known is not None:
        return known
    if len(_PAIRS) >= _PAIRS_LIMIT:
        _PAIRS.clear()
    _PAIRS[pair] = pair
    return pair


def parse_header_lines(text: str, *, decode: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """Split a header block into ``(name, value)`` pairs; return them and the lines that were not headers.

    With ``decode`` each value is URL-decoded on its own, after the block was split into lines.
    """
    headers: list[tuple[str, str]] = []
    bad: list[str] = []
    for raw in text.split("\n"):
        line = raw.rstrip("\r")
        if not line:
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        # A stripped name with white space inside splits in two (str.split and str.isspace agree
        # on what white space is); one C call instead of a generator over its characters.
        if not sep or len(name.split()) != 1:
            bad.append(line)
            continue
        if value.startswith(" "):
            value = value[1:]
        if decode:
            if "%" in value:  # most values have nothing to decode: skip unquote's call
                value = unquote(value, errors="replace")
            if value == UNDEFINED:
                value = ""
        headers.append(_shared_pair(name, value))
    return headers, bad


def content_length(value: str) -> int | None:
    """A ``Content-Length`` value as a number of bytes, or None when it is not one."""
    value = value.strip()
    if not value.isdigit():
        return None
    return int(value)


def unread(sock: Any) -> bool:
    """True when ``sock`` has data (or its end) waiting to be read; never waits."""
    # poll(), not select(): a busy bridge has descriptors above select()'s limit of 1,024.
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class FrameReader:
    """Reads whole frames from a stream socket (gevent or standard), with bounded buffers."""

    def __init__(
        self,
        sock: Any,
        *,
        max_body: int = MAX_BODY_BYTES,
        max_header: int = MAX_HEADER_BYTES,
        max_total: int | None = None,
        on_drained: Callable[[], object] | None = None,
    ) -> None:
        """Read from ``sock``; ``max_total`` bounds the bytes of the whole connection (None: no bound).

        ``on_drained()`` is called whenever the reader is about to wait for data with nothing left
        unread on the socket: at that moment it has read everything the peer sent.
        """
        self._on_drained = on_drained
        self.waiting = False  # waiting for data, everything sent before having been read
        self._sock = sock
        self._buffer = bytearray()
        self._max_body = max_body
        self._max_header = max_header
        self._max_total = max_total
        self.received = 0  # bytes taken off the socket so far

    def _fill(self) -> None:
        try:
            if self._on_drained is not None and not unread(self._sock):
                self.waiting = True
                self._on_drained()
            chunk = self._sock.recv(65536)
        except TimeoutError as exc:
            raise PbxConnectionError("timed out waiting for data") from exc
        except OSError as exc:
            raise PbxConnectionError(f"connection lost: {describe_os_error(exc)}") from exc
        finally:
            self.waiting = False
        if not chunk:
            raise ConnectionClosed("the peer closed the connection")
        self.received += len(chunk)
        if self._max_total is not None and self.received > self._max_total:
            raise ProtocolError(f"the peer sent more than {self._max_total} bytes on one connection")
        self._buffer += chunk

    def read_frame(self) -> Frame:
        """The next frame; raises :class:`ConnectionClosed` at the end of the stream."""
        while True:
            # Stray newlines between frames carry nothing (FreeSWITCH skips them too).
            while self._buffer[:1] == b"\n":
                del self._buffer[:1]
            end = self._buffer.find(b"\n\n")
            if end >= 0:
                break
            if len(self._buffer) > self._max_header:
                raise ProtocolError(f"a header block longer than {self._max_header} bytes: not an ESL peer")
            self._fill()
        block = bytes(self._buffer[:end]).decode("utf-8", errors="replace")
        del self._buffer[: end + 2]
        headers, bad = parse_header_lines(block, decode=False)
        problems = [f"ignored a line that is not a header: {line[:60]!r}" for line in bad]
        frame = Frame(tuple(headers), b"", tuple(problems))
        raw_length = frame.header("Content-Length")
        if not raw_length:
            return frame
        length = content_length(raw_length)
        if length is None:
            problems.append(f"Content-Length {raw_length[:20]!r} is not a number; read no body")
            return Frame(frame.headers, b"", tuple(problems))
        if length > self._max_body:
            raise ProtocolError(f"a body of {length} bytes is more than this reader accepts")
        while len(self._buffer) < length:
            self._fill()
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return Frame(frame.headers, body, tuple(problems))


# --- events -------------------------------------------------------------------------------------


class EslEvent:
    """A decoded FreeSWITCH event: headers in order (repeats kept) and an optional body."""

    __slots__ = ("_index", "body", "headers")

    def __init__(self, headers: Iterable[tuple[str, str]], body: str = "") -> None:
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)
        self.body = body
        # Built at the first lookup: an event waiting in a storm's queue costs its headers only
        # (the index doubled an event's memory, about 14 KB for 1 KB on the wire).
        self._index: dict[str, list[str]] | None = None

    def _lookup(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = {}
            for name, value in self.headers:
                index.setdefault(_lower(name), []).append(value)
            self._index = index
        return index

    def first_of(self, *lowered: str) -> tuple[str, ...]:
        """The first value of each header named (in lower case), ``""`` for one missing, in one
        pass over the headers: unlike :meth:`get` it builds no index, so an event that only waits
        in the queue stays small."""
        index = self._index
        if index is not None:
            return tuple((index.get(name) or [""])[0] for name in lowered)
        found: dict[str, str] = {}
        for header, value in self.headers:
            name = _lower(header)
            if name in lowered and name not in found:
                found[name] = value
        return tuple(found.get(name, "") for name in lowered)

    def get(self, name: str, default: str = "") -> str:
        """The first value of ``name``, matched case-insensitively like ``switch_event_get_header``."""
        values = self._lookup().get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        """Every value of a repeated header, in order."""
        return list(self._lookup().get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    @property
    def name(self) -> str:
        """``Event-Name``."""
        return self.get("Event-Name")

    @property
    def subclass(self) -> str:
        """``Event-Subclass`` of a CUSTOM event."""
        return self.get("Event-Subclass")

    def __repr__(self) -> str:
        return f"EslEvent(name={self.name!r}, subclass={self.subclass!r}, headers={len(self.headers)})"


def parse_event_block(data: bytes) -> EslEvent:
    """Decode a serialized event: URL-encoded header lines, then an optional ``Content-Length`` body."""
    head, _sep, rest = data.partition(b"\n\n")
    headers, _bad = parse_header_lines(head.decode("utf-8", errors="replace"), decode=True)
    if not headers:
        raise ProtocolError("an event without headers")
    event = EslEvent(headers)
    (raw_length,) = event.first_of("content-length")
    if raw_length:
        length = content_length(raw_length)
        if length is None:
            raise ProtocolError(f"an event whose Content-Length {raw_length[:20]!r} is not a number")
        event.body = rest[:length].decode("utf-8", errors="replace")
    return event


def parse_event_plain(data: bytes) -> EslEvent:
    """Decode the body of a ``text/event-plain`` frame; it must name its event."""
    event = parse_event_block(data)
    if not event.first_of("event-name")[0]:
        raise ProtocolError("an event without Event-Name")
    return event


def event_from_frame(frame: Frame) -> EslEvent:
    """Decode a frame whose own headers are an event (the outbound socket's ``CHANNEL_DATA``)."""
    return EslEvent(
        ((name, _decoded(value)) for name, value in frame.headers), frame.body.decode("utf-8", "replace")
    )


def _decoded(value: str) -> str:
    value = unquote(value, errors="replace")
    return "" if value == UNDEFINED else value


def describe_os_error(exc: OSError) -> str:
    """A short, stable description of a socket error."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


def check_one_line(value: str, what: str) -> str:
    """Refuse values that would break out of an ESL command line."""
    if "\n" in value or "\r" in value:
        raise ProtocolError(f"{what} must not contain a line break")
    return value


# --- the inbound client -------------------------------------------------------------------------


_CLOSED = object()


@dataclass(frozen=True)
class EventsDropped:
    """Returned by :meth:`EslClient.next_event` in place of events dropped from a full queue.

    The owner must resynchronise with FreeSWITCH's tables: what those events said is lost.
    """

    count: int
    overflows: int = 1  # times the queue was full since the owner last took a marker
    through: int = 0  # the number (see EslClient.events_received) of the last event it stands for


class EslClient:
    """One authenticated connection to mod_event_socket, driven by gevent.

    A reader greenlet takes frames off the socket: command replies complete the oldest pending
    command (ESL answers in order), events go to a queue the owner drains with :meth:`next_event`.
    Malformed frames are logged and dropped. When the connection ends, every pending command and
    the event queue fail with :class:`PbxConnectionError`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        *,
        timeout: float = 5.0,
        max_queued: int = MAX_QUEUED_EVENTS,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        tag: Callable[[EslEvent], str] | None = None,
    ) -> None:
        """Prepare a client; ``max_queued``/``max_queued_bytes`` bound the events not yet taken.

        ``tag(event)`` is worked out once for each event as it is queued; :meth:`take_matching`
        picks events by it (without it every event's tag is ``""``).
        """
        self._tag = tag
        if "\n" in password or "\r" in password:
            raise ConfigError("freeswitch.esl_password", "must not contain a line break")
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0
        self.peak_queued = 0  # most events ever waiting at once, for tests and diagnostics
        self.dropped = 0  # events dropped because the queue was full
        # Events are numbered as they arrive: the last one received, and the last one the owner
        # took off the queue (or learnt was dropped). The owner is in step with every event
        # received before a moment once it has applied those it took up to that moment's number.
        self.events_received = 0
        self.events_taken = 0
        self.drains = 0  # times the reader had read everything FreeSWITCH had sent (see FrameReader)
        self._progress = Event()  # set, and replaced, by wake_waiters()
        self.host = host
        self.port = port
        self._password = password
        self.timeout = timeout
        self._sock: Any = None
        self._reader: FrameReader | None = None
        self._pending: deque[Any] = deque()
        self._events: Any = Queue()
        self._send_lock: Any = Semaphore()
        self._greenlet: Any = None
        self.closed_reason: str | None = None

    def __repr__(self) -> str:  # never shows the password
        return f"EslClient({self.peer!r})"

    @property
    def peer(self) -> str:
        """``host:port`` of the FreeSWITCH event socket."""
        return f"{self.host}:{self.port}"

    @property
    def is_open(self) -> bool:
        """True while the connection is authenticated and not closed."""
        return self._greenlet is not None and self.closed_reason is None

    def connect(self) -> None:
        """Connect and authenticate; raise PbxConnectionError, PbxAuthError or ProtocolError."""
        try:
            sock = gsocket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise PbxConnectionError(f"cannot connect to {self.peer}: {describe_os_error(exc)}") from exc
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock = sock
        self._reader = FrameReader(sock, on_drained=self._drained)
        try:
            self._authenticate(self._reader)
        except BaseException:
            self._close_socket()
            raise
        sock.settimeout(None)
        self._greenlet = gevent.spawn(self._read_loop)

    def _authenticate(self, reader: FrameReader) -> None:
        greeting = reader.read_frame()
        if greeting.content_type == "text/rude-rejection":
            raise PbxAuthError(
                f"FreeSWITCH at {self.peer} refused this host (apply-inbound-acl of event_socket.conf)"
            )
        if greeting.content_type != "auth/request":
            raise ProtocolError(
                f"{self.peer} did not ask for a password (got {greeting.content_type or 'no Content-Type'!r})"
            )
        try:
            self._sock.sendall(f"auth {self._password}\n\n".encode())
        except OSError as exc:
            raise PbxConnectionError(f"connection lost: {describe_os_error(exc)}") from exc
        reply = reader.read_frame()
        if reply.content_type == "command/reply" and reply.reply_text.startswith("+OK"):
            return
        if reply.content_type == "command/reply":
            # The text is FreeSWITCH's (-ERR invalid); the password itself is never repeated.
            raise PbxAuthError(
                f"FreeSWITCH at {self.peer} rejected the ESL password ({reply.reply_text[:40]}): "
                "check freeswitch.esl_password"
            )
        raise ProtocolError(f"{self.peer} answered auth with {reply.content_type or 'no Content-Type'!r}")

    # --- being in step with FreeSWITCH -----------------------------------------------------------

    def all_read(self) -> bool:
        """True when every byte FreeSWITCH sent so far has been read and its events queued."""
        reader, sock = self._reader, self._sock
        return reader is not None and sock is not None and reader.waiting and not unread(sock)

    def wait_for(self, condition: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``condition()`` holds (checked whenever :meth:`wake_waiters` is called), or
        until ``deadline`` (``time.monotonic()``); whether it holds."""
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed_reason is not None:
                return condition()
            self._progress.wait(remaining)
        return True

    def wake_waiters(self) -> None:
        """Something :meth:`wait_for` may be waiting for happened (the owner applied events)."""
        progress, self._progress = self._progress, Event()
        progress.set()

    def _drained(self) -> None:
        self.drains += 1
        self.wake_waiters()

    # --- reading ----------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        reason = "FreeSWITCH closed the connection"
        reader = self._reader
        assert reader is not None
        frames = 0
        try:
            while True:
                self._dispatch(reader.read_frame())
                frames += 1
                if frames % _YIELD_EVERY == 0:
                    # A socket that always has data never blocks, so gevent would never switch:
                    # during a flood the hook sessions and the page would starve.
                    gevent.sleep(0)
        except ConnectionClosed:
            pass
        except PbxError as exc:
            reason = str(exc)
        except gevent.GreenletExit:
            reason = self.closed_reason or "closed by the bridge"
        except Exception as exc:  # a bug here must end this connection, not the process
            log.exception("ESL reader for %s failed", self.peer)
            reason = f"reader failed: {exc}"
        finally:
            self._shutdown(reason)

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.content_type
        for problem in frame.problems:
            log.warning("malformed ESL frame from %s: %s", self.peer, problem)
        if kind in ("command/reply", "api/response"):
            if not self._pending:
                log.warning("dropped a %s from %s that answers no command", kind, self.peer)
                return
            self._pending.popleft().set(frame)
        elif kind == "text/event-plain":
            try:
                event = parse_event_plain(frame.body)
            except ProtocolError as exc:
                log.warning("dropped a malformed event from %s: %s", self.peer, exc)
                return
            self._queue_event(event, len(frame.body))
        elif kind == "text/disconnect-notice":
            if frame.header("Content-Disposition") != "linger":
                log.debug("%s sent a disconnect notice", self.peer)
        elif not kind:
            names = ", ".join(name for name, _ in frame.headers[:3]) or "no headers"
            log.warning("dropped a frame without Content-Type from %s (%s)", self.peer, names)
        else:
            log.warning("dropped a %r frame from %s", kind[:40], self.peer)

    def _queue_event(self, event: EslEvent, size: int) -> None:
        if self._events.qsize() >= self.max_queued or self._queued_bytes + size > self.max_queued_bytes:
            # Like the AMI side: memory stays bounded, and a resync restores what was dropped.
            dropped = earlier = overflows = 0
            with contextlib.suppress(Empty):
                while True:
                    item = self._events.get_nowait()
                    if isinstance(item, tuple):
                        dropped += 1
                    elif isinstance(item, EventsDropped):
                        earlier += item.count  # a marker not taken yet: its count carries over
                        overflows += item.overflows
            self._queued_bytes = 0
            self.dropped += dropped
            # The owner logs it (once per burst) and counts it when it takes this marker.
            log.debug("%d events from %s dropped from a full queue", dropped, self.peer)
            self._events.put(EventsDropped(dropped + earlier, overflows + 1, self.events_received))
        self._queued_bytes += size
        self.events_received += 1
        tag = self._tag(event) if self._tag is not None else ""
        self._events.put((event, size, self.events_received, tag))
        self.peak_queued = max(self.peak_queued, self._events.qsize())

    def request_resync(self) -> None:
        """Make :meth:`next_event` return ``EventsDropped(0)`` next, so the owner resyncs."""
        self._events.put(EventsDropped(0, through=self.events_received))

    def next_event(self, timeout: float | None = None) -> EslEvent | EventsDropped | None:
        """The next event, or None after ``timeout`` seconds; raise PbxConnectionError once closed.

        :class:`EventsDropped` stands where events were dropped because too many were waiting.
        """
        try:
            item = self._events.get(timeout=timeout)
        except Empty:
            return None
        if item is _CLOSED:
            self._events.put(_CLOSED)  # every later call fails the same way
            raise PbxConnectionError(self.closed_reason or "connection closed")
        if isinstance(item, EventsDropped):
            self.events_taken = max(self.events_taken, item.through)
            return item
        return self._took(item)

    def _took(self, item: object) -> EslEvent:
        event, size, number, _tag = cast(tuple[EslEvent, int, int, str], item)
        self._queued_bytes -= size
        self.events_taken = number
        return event

    def take_queued(self, limit: int) -> list[EslEvent]:
        """Up to ``limit`` events already waiting, in order, without waiting for more.

        Stops before a marker of dropped events and before the end of the connection:
        :meth:`next_event` returns those.
        """
        taken: list[EslEvent] = []
        while len(taken) < limit:
            try:
                item = self._events.peek_nowait()
            except Empty:
                break
            if not isinstance(item, tuple):
                break
            self._events.get_nowait()
            taken.append(self._took(item))
        return taken

    def take_matching(self, tags: Container[str]) -> list[EslEvent]:
        """Take the queued events whose tag (see the constructor) is in ``tags`` out of the queue,
        in order, ahead of the others (which stay queued, in theirs). Their numbers are not
        counted as taken: the owner's place in the queue does not move. Compares the tags worked
        out when the events were queued: no event is looked into."""
        queued = self._events.queue  # gevent's Queue keeps its items in this deque
        taken: list[EslEvent] = []
        kept: deque[Any] = deque()
        for item in queued:
            if isinstance(item, tuple) and item[3] and item[3] in tags:
                taken.append(item[0])
                self._queued_bytes -= item[1]
            else:
                kept.append(item)
        if taken:
            queued.clear()
            queued.extend(kept)
        return taken

    # --- commands ---------------------------------------------------------------------------------

    def command(self, line: str, *, timeout: float | None = None) -> Frame:
        """Send one command line and return its reply frame (command/reply or api/response)."""
        check_one_line(line, "an ESL command")
        verb = " ".join(line.split()[:2])
        result = AsyncResult()
        with self._send_lock:
            if not self.is_open:
                raise PbxConnectionError(self.closed_reason or f"not connected to {self.peer}")
            self._pending.append(result)
            try:
                self._sock.sendall(f"{line}\n\n".encode())
            except OSError as exc:
                reason = f"connection lost: {describe_os_error(exc)}"
                self._shutdown(reason)
                raise PbxConnectionError(reason) from exc
        limit = self.timeout if timeout is None else timeout
        try:
            return cast(Frame, result.get(timeout=limit))
        except gevent.Timeout as exc:
            # Replies come in order: one that never came leaves the connection unusable.
            reason = f"no reply to {verb!r} within {limit:g} s"
            self.close(reason)
            raise PbxConnectionError(reason) from exc

    def api(self, command: str, *, timeout: float | None = None) -> str:
        """Run ``api <command>`` and return FreeSWITCH's answer text."""
        frame = self.command(f"api {command}", timeout=timeout)
        if frame.content_type != "api/response":
            raise ProtocolError(f"api {command.split()[0]} was answered with {frame.content_type!r}")
        return frame.text

    # --- closing ----------------------------------------------------------------------------------

    def close(self, reason: str = "closed by the bridge") -> None:
        """Say goodbye (best effort) and close the connection."""
        if self._sock is not None and self.closed_reason is None and self._greenlet is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(b"exit\n\n")
        self._shutdown(reason)
        greenlet = self._greenlet
        if greenlet is not None and greenlet is not gevent.getcurrent():
            greenlet.kill(block=False)

    def _shutdown(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            error = PbxConnectionError(reason)
            while self._pending:
                self._pending.popleft().set_exception(error)
            self._events.put(_CLOSED)
            self.wake_waiters()
        self._close_socket()

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
