"""Turn Asterisk 20/22 AMI frames (chan_pjsip) into the bridge's normalised events.

Pure: no I/O and no clock reads; the time of an event is passed in. Everything here was checked
against frames recorded from a real Asterisk 22 (see ``tests/asterisk/fixtures``):

* a REGISTER (first or refresh) raises ``SuccessfulAuth`` with ``Service: PJSIP``: a keepalive.
  Only a *new* contact also raises ``ContactStatus`` (``NonQualified``, or ``Created`` on old
  versions, ``Reachable`` with qualify on); a refresh raises nothing else. An authenticated INVITE
  raises the same ``SuccessfulAuth`` (``SessionID`` is the request's Call-ID either way), so its
  keepalive may not lift a failed log-on's block; the listener finds out which it was.
* a wrong password raises ``ChallengeResponseFailed`` (``AccountID`` = the endpoint); an unknown
  user raises ``InvalidAccountID`` (twice per attempt, same Call-ID) plus a
  ``ChallengeResponseFailed`` for ``<unknown>``, which carries no name and is skipped.
* unregister and expiry raise ``ContactStatus: Removed``; a failed qualify ``Unreachable``.
* a call from a phone raises ``Newchannel`` for ``PJSIP/<endpoint>-<seq>`` in state 4 (Ring) with
  ``Uniqueid == Linkedid`` and ``Exten`` = the dialled number; a leg that rings a phone is created
  by the PBX in state 0 (Down) with the caller's ``Linkedid`` and ``Exten: s``.

The log-on is the PJSIP endpoint name, which installations keep equal to the auth user name.
"""

from __future__ import annotations

import contextlib
import re
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from forum_bridge.core.events import (
    CallEnded,
    CallStarted,
    Direction,
    Event,
    Keepalive,
    LoggedOff,
    LoggedOn,
    LogonFailed,
)
from forum_bridge.service import CallSnapshot
from forum_bridge.store import Registration

__all__ = [
    "EVENT_NAMES",
    "MAPPED_HEADERS",
    "AmiEventMapper",
    "Headers",
    "NumberLookup",
    "call_snapshot",
    "contact_registration",
    "event_time",
    "headers_of",
    "logon_of_channel",
    "source_of_address",
]

Headers = dict[str, str]
"""One AMI frame: header names in lower case, values as text (the first of repeated headers)."""

NumberLookup = Callable[[str], "str | None"]
"""Maps a log-on to its call number (None when it is not a provisioned subscriber)."""

# chan_pjsip names channels "PJSIP/%s-%08x" (endpoint name, then a hex sequence number).
_PJSIP_CHANNEL = re.compile(r"^PJSIP/(?P<endpoint>.+)-[0-9a-fA-F]{8}$")
_UNKNOWN = "<unknown>"
_LOGGED_ON_STATES = frozenset({"created", "nonqualified", "reachable"})
# InvalidAccountID comes twice per REGISTER (challenge and retry, same Call-ID); count it once.
_DUPLICATE_WINDOW = timedelta(seconds=5)
_CHANNEL_STATE_DOWN = "0"


def headers_of(message: Mapping[str, object]) -> Headers:
    """Normalise a frame (a panoramisk ``Message`` or any mapping) to lower-case keys and text values."""
    result: Headers = {}
    for key, value in message.items():
        if isinstance(value, list | tuple):
            value = value[0] if value else ""
        result[str(key).lower()] = "" if value is None else str(value)
    return result


def source_of_address(address: str) -> str:
    """``IPV4/UDP/127.0.0.1/5082`` -> ``127.0.0.1:5082``; ``IPV6/UDP/::1/5060`` -> ``[::1]:5060``."""
    parts = address.strip().split("/")
    if len(parts) != 4 or not parts[2]:
        return address.strip()
    family, _transport, host, port = parts
    if family.upper() == "IPV6" or ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def logon_of_channel(channel: str) -> str | None:
    """The endpoint (log-on) of a ``PJSIP/<endpoint>-<seq>`` channel name; None for other channels."""
    match = _PJSIP_CHANNEL.match(channel.strip())
    return match.group("endpoint") if match else None


def event_time(headers: Mapping[str, str]) -> datetime | None:
    """When Asterisk says the event happened: ``EventTV`` (security events) or ``Timestamp``.

    ``EventTV`` looks like ``2026-11-24T04:39:14.166+0000``; ``Timestamp`` (with
    ``timestampevents=yes``) is Unix seconds with microseconds. None when absent or unreadable.
    """
    tv = headers.get("eventtv", "").strip()
    if tv:
        # fromisoformat reads Asterisk's form (offset without a colon) fifty times faster than
        # strptime, which a registration storm would pay for every frame; strptime stays the
        # arbiter of anything else.
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(tv)
            if parsed.tzinfo is not None and "T" in tv:
                return parsed.astimezone(UTC)
        for pattern in ("%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z"):
            try:
                return datetime.strptime(tv, pattern).astimezone(UTC)
            except ValueError:
                continue
    stamp = headers.get("timestamp", "").strip()
    if stamp:
        try:
            return datetime.fromtimestamp(float(stamp), UTC)
        except (ValueError, OverflowError, OSError):
            return None
    return None


def _known(value: str) -> str:
    value = value.strip()
    return "" if value == _UNKNOWN else value


def _direction(headers: Mapping[str, str]) -> Direction:
    """A phone's own call is Ring with its own Linkedid; a leg the PBX creates to ring a phone is
    Down, and (when dialled from another channel) carries the caller's Linkedid."""
    if headers.get("channelstate", "").strip() == _CHANNEL_STATE_DOWN:
        return Direction.INBOUND
    uniqueid = headers.get("uniqueid", "").strip()
    linkedid = headers.get("linkedid", "").strip()
    if uniqueid and linkedid and uniqueid != linkedid:
        return Direction.INBOUND
    return Direction.OUTBOUND


def _call_number(
    headers: Mapping[str, str], logon: str, direction: Direction, number_of: NumberLookup | None
) -> str:
    exten = _known(headers.get("exten", ""))
    if direction is Direction.OUTBOUND:
        return exten
    # The leg that rings a phone says nothing about the number that was called (Exten is "s"):
    # the call number of a managed log-on is its subscriber's number.
    number = number_of(logon) if number_of is not None else None
    if number:
        return number
    return "" if exten == "s" else exten


def contact_registration(headers: Mapping[str, str]) -> Registration | None:
    """A ``ContactList`` item of ``PJSIPShowContacts`` as a registration; None if it names no log-on.

    The log-on is the ``Endpoint``; without one, the AOR in front of ``;@`` in ``ObjectName``.
    """
    contact = headers.get("uri", "").strip()
    logon = headers.get("endpoint", "").strip()
    if not logon:
        name = headers.get("objectname", "")
        logon = name.split(";@", 1)[0].split("@@", 1)[0].strip()
    if not contact or not logon:
        return None
    via = headers.get("viaaddr", "").strip()
    port = headers.get("viaport", "").strip()
    source = ""
    if via:
        host = f"[{via}]" if ":" in via else via
        source = f"{host}:{port}" if port and port != "0" else host
    return Registration(logon, contact, source, headers.get("useragent", "").strip())


def call_snapshot(headers: Mapping[str, str], number_of: NumberLookup | None = None) -> CallSnapshot | None:
    """A ``CoreShowChannel`` item as a call leg of a log-on; None for channels that are not PJSIP."""
    channel = headers.get("channel", "").strip()
    logon = logon_of_channel(channel)
    if logon is None:
        return None
    direction = _direction(headers)
    number = _call_number(headers, logon, direction, number_of)
    return CallSnapshot(channel, logon, number, direction)


class AmiEventMapper:
    """Maps one AMI event frame at a time to at most one normalised event.

    It remembers only two small things between frames: where each log-on last authenticated from
    (ContactStatus does not say, SuccessfulAuth does), and recent failures, so that Asterisk's
    doubled InvalidAccountID for one REGISTER is counted once.
    """

    def __init__(self, number_of: NumberLookup | None = None) -> None:
        """``number_of`` gives a log-on's call number for legs that ring a phone."""
        self._number_of = number_of
        self._sources: dict[str, str] = {}
        self._recent_failures: deque[tuple[str, str, str, datetime]] = deque(maxlen=64)

    def map(self, message: Mapping[str, object], at: datetime) -> Event | None:
        """The event this frame means, or None when the bridge does not care about it.

        Raises ``ValueError`` only for a frame that is not an event at all; anything the mapping
        does not recognise simply maps to None.
        """
        return self.map_headers(headers_of(message), at)

    def map_headers(self, headers: Headers, at: datetime) -> Event | None:
        """:meth:`map` for a frame already normalised by :func:`headers_of` (lower-case keys, text)."""
        name = headers.get("event", "").strip()
        if not name:
            raise ValueError("not an AMI event frame (no Event header)")
        handler = self._handlers.get(name)
        if handler is None:
            return None
        return handler(self, headers, at)

    # --- security events -----------------------------------------------------------------

    def _successful_auth(self, headers: Headers, at: datetime) -> Event | None:
        if headers.get("service", "").strip().upper() != "PJSIP":
            return None
        logon = _known(headers.get("accountid", ""))
        if not logon:
            return None
        source = source_of_address(headers.get("remoteaddress", ""))
        if source:
            self._sources[logon] = source
        # A success ends the "same failure again" suppression for this log-on.
        self._forget_failures(logon)
        # REGISTER or INVITE: the event does not say, so this keepalive never clears a block.
        return Keepalive(logon=logon, at=at, source=source, clears_block=False)

    def _failure(self, headers: Headers, at: datetime, reason: str) -> Event | None:
        if headers.get("service", "PJSIP").strip().upper() != "PJSIP":
            return None
        logon = _known(headers.get("accountid", ""))
        if not logon:
            return None
        session = headers.get("sessionid", "").strip()
        source = source_of_address(headers.get("remoteaddress", ""))
        for kind, seen_logon, seen_session, seen_at in self._recent_failures:
            if (
                kind == reason
                and seen_logon == logon
                and session
                and seen_session == session
                and abs(at - seen_at) <= _DUPLICATE_WINDOW
            ):
                return None
        self._recent_failures.append((reason, logon, session, at))
        return LogonFailed(logon=logon, at=at, source=source, reason=reason)

    def _challenge_response_failed(self, headers: Headers, at: datetime) -> Event | None:
        return self._failure(headers, at, "wrong_password")

    def _invalid_account(self, headers: Headers, at: datetime) -> Event | None:
        return self._failure(headers, at, "unknown_user")

    def _forget_failures(self, logon: str) -> None:
        kept = [entry for entry in self._recent_failures if entry[1] != logon]
        if len(kept) != len(self._recent_failures):
            self._recent_failures.clear()
            self._recent_failures.extend(kept)

    # --- registrations -------------------------------------------------------------------

    def _contact_status(self, headers: Headers, at: datetime) -> Event | None:
        logon = headers.get("endpointname", "").strip() or headers.get("aor", "").strip()
        contact = headers.get("uri", "").strip()
        status = headers.get("contactstatus", "").strip().lower()
        if not logon or not contact:
            return None
        if status in _LOGGED_ON_STATES:
            return LoggedOn(
                logon=logon,
                at=at,
                contact=contact,
                source=self._sources.get(logon, ""),
                user_agent=headers.get("useragent", "").strip(),
            )
        if status == "removed":
            return LoggedOff(logon=logon, at=at, contact=contact, reason="logoff")
        if status == "unreachable":
            # The phone stopped answering qualify OPTIONS: as good as a missed keepalive.
            return LoggedOff(logon=logon, at=at, contact=contact, reason="keepalive")
        return None

    # --- calls ---------------------------------------------------------------------------

    def _new_channel(self, headers: Headers, at: datetime) -> Event | None:
        channel = headers.get("channel", "").strip()
        logon = logon_of_channel(channel)
        if logon is None:
            return None
        direction = _direction(headers)
        number = _call_number(headers, logon, direction, self._number_of)
        extra = {
            key: headers[key]
            for key in ("uniqueid", "linkedid", "calleridnum", "connectedlinenum", "exten")
            if headers.get(key)
        }
        return CallStarted(
            logon=logon, channel=channel, number=number, direction=direction, at=at, extra=extra
        )

    def _hangup(self, headers: Headers, at: datetime) -> Event | None:
        channel = headers.get("channel", "").strip()
        logon = logon_of_channel(channel)
        if logon is None:
            return None
        return CallEnded(channel=channel, at=at, logon=logon)

    # Event names are case-sensitive on the wire (e.g. "Newexten"); match them exactly.
    _handlers: dict[str, Callable[[AmiEventMapper, Headers, datetime], Event | None]] = {
        "SuccessfulAuth": _successful_auth,
        "ChallengeResponseFailed": _challenge_response_failed,
        "InvalidAccountID": _invalid_account,
        "ContactStatus": _contact_status,
        "Newchannel": _new_channel,
        "Hangup": _hangup,
    }


EVENT_NAMES = frozenset(AmiEventMapper._handlers)
"""The AMI events the mapper turns into something; the listener drops every other frame on receipt."""

MAPPED_HEADERS = frozenset(
    {
        "event",
        "service",
        "accountid",
        "remoteaddress",
        "sessionid",
        "endpointname",
        "aor",
        "uri",
        "contactstatus",
        "useragent",
        "channel",
        "channelstate",
        "uniqueid",
        "linkedid",
        "calleridnum",
        "connectedlinenum",
        "exten",
        "eventtv",
        "timestamp",
    }
)
"""Every header (lower case) the mapper or the lag measurement reads; a queued frame keeps only these."""
