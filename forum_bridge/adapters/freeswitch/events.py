"""FreeSWITCH ESL events and API answers -> the core's events. Pure: no I/O, time is passed in.

Field names follow FreeSWITCH 1.10 (checked on a real 1.10.12 and against mod_sofia's source).

**Identity is what FreeSWITCH authenticated**, never what a phone claims in From or To: a phone
authenticated as ``1001`` may send ``From: 1000`` or register the address ``1000``, and FreeSWITCH
accepts both unless the profile forbids it (``inbound-reg-force-matching-username`` covers only
REGISTER). So:

* ``sofia::register`` (first REGISTER and every refresh), ``sofia::unregister`` and
  ``sofia::expire`` name the log-on in ``username``, the digest user (``from-user`` / ``user`` is
  the address registered: the To header). ``expires`` is relative seconds in a register and an
  absolute Unix time in an expire.
* ``sofia::register_attempt`` fires for every request that carries credentials, REGISTER or
  INVITE, after the check: ``auth-result`` ``FORBIDDEN`` (wrong password or unknown user: a failed
  log-on of the digest user ``username``); ``SUCCESS`` / ``RENEWED`` mean nothing more than the
  ``sofia::register`` of the same REGISTER, and for an INVITE they are no log-on at all.
  ``sofia::register_failure`` follows a FORBIDDEN attempt at once, but names only the To header in
  ``to-user``: the address for a REGISTER, the number dialled for an INVITE. It counts only as a
  fallback, for a REGISTER, when no FORBIDDEN attempt from the same address came just before it
  (:class:`FailureDeduplicator`); an INVITE's is never a log-on.
* ``CHANNEL_CREATE`` of a SIP leg: ``Call-Direction: inbound`` is a leg a phone placed; its log-on
  is ``variable_sip_auth_username`` (``variable_user_name`` when FreeSWITCH authorised it another
  way), while ``variable_sip_from_user``, ``Caller-Username`` and even ``Channel-Name`` carry the
  From user the phone chose. A leg FreeSWITCH did not authenticate belongs to no log-on (trunks,
  gateways). ``Call-Direction: outbound`` is a leg that rings a phone, made by the ``user/``
  endpoint, which sets ``dialed_user`` to the directory user.

Resync reads sofia's own registration table (``sofia xmlstatus profile <name> reg``), which has the
digest user and forgets a contact at once on ``flush_inbound_reg``, not the core's ``show
registrations``, which has only the address registered and keeps flushed and expired contacts until
a later clean-up. ``show channels`` has no authenticated user either, so each placed SIP leg's
``sip_auth_username`` is asked for with ``uuid_getvar``.

Contacts are reduced to their SIP URI without parameters (``sip:1000@192.0.2.50:5060``) so that an
event's ``contact`` header and sofia's table name the same contact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import unquote
from xml.sax.saxutils import unescape

from forum_bridge.core.events import (
    CallEnded,
    CallStarted,
    Direction,
    Event,
    LoggedOff,
    LoggedOn,
    LogonFailed,
)
from forum_bridge.errors import ProtocolError
from forum_bridge.service import CallSnapshot
from forum_bridge.store.operations import Registration

from .esl import UNDEFINED, EslEvent

REGISTER = "sofia::register"
UNREGISTER = "sofia::unregister"
EXPIRE = "sofia::expire"
REGISTER_ATTEMPT = "sofia::register_attempt"
REGISTER_FAILURE = "sofia::register_failure"
CHANNEL_CREATE = "CHANNEL_CREATE"
CHANNEL_HANGUP_COMPLETE = "CHANNEL_HANGUP_COMPLETE"

SUBCLASSES = (REGISTER, UNREGISTER, EXPIRE, REGISTER_FAILURE, REGISTER_ATTEMPT)
CHANNEL_EVENTS = (CHANNEL_CREATE, CHANNEL_HANGUP_COMPLETE)
# Everything after CUSTOM is read as a subclass name, so the channel events must come first.
SUBSCRIPTION = "event plain " + " ".join((*CHANNEL_EVENTS, "CUSTOM", *SUBCLASSES))

SIP_CHANNEL_PREFIX = "sofia/"
GATEWAY_CHANNEL_PREFIX = "sofia/gateway/"  # trunk legs: never a phone's log-on
_URI = re.compile(r"<([^<>]*)>")
_UUID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")


def normalise_contact(value: str) -> str:
    """The SIP URI of a Contact value, without display name, brackets or parameters."""
    value = value.strip()
    match = _URI.search(value)
    uri = match.group(1) if match else value
    return uri.split(";", 1)[0].strip()


def contact_from_url(url: str) -> str:
    """The contact of a ``show registrations`` row: its ``url`` is ``sofia/<profile>/<uri>``."""
    parts = url.split("/", 2)
    uri = parts[2] if len(parts) == 3 and parts[0] == "sofia" else url
    return normalise_contact(uri)


def source_of(ip: str, port: str) -> str:
    """``ip:port`` of the phone, or whatever part of it is known."""
    ip, port = ip.strip(), port.strip()
    if ip and port:
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return ip


def is_channel_uuid(value: str) -> bool:
    """True for a value that can safely be put on an ESL command line as a channel UUID."""
    return bool(_UUID.match(value))


def channel_uuid(event: EslEvent) -> str:
    """The channel's UUID (``Unique-ID``, or the variable when only that is present)."""
    return event.get("Unique-ID") or event.get("Channel-Unique-ID") or event.get("variable_uuid")


def authenticated_user(event: EslEvent) -> str:
    """The directory user FreeSWITCH authenticated a leg as, or ``""`` when it did not."""
    return event.get("variable_sip_auth_username") or event.get("variable_user_name")


def caller_logon(event: EslEvent) -> str:
    """The log-on that placed a leg FreeSWITCH received (``Call-Direction: inbound``).

    Only what FreeSWITCH authenticated counts; the From user is the phone's to choose.
    """
    return authenticated_user(event)


def callee_logon(event: EslEvent) -> str:
    """The log-on whose phone a leg rings (``Call-Direction: outbound``)."""
    return event.get("variable_dialed_user") or event.get("Caller-Callee-ID-Number")


def dialled_number(event: EslEvent) -> str:
    """The number the caller dialled."""
    return event.get("Caller-Destination-Number") or event.get("variable_destination_number")


def to_core_event(event: EslEvent, at: datetime) -> Event | None:
    """Map one ESL event to a core event, or None when it means nothing for licences."""
    name = event.name
    if name == "CUSTOM":
        return _custom(event, at)
    if name == CHANNEL_CREATE:
        return _channel_create(event, at)
    if name == CHANNEL_HANGUP_COMPLETE:
        uuid = channel_uuid(event)
        if not uuid:
            return None
        logon = ""
        if _is_sip_leg(event):
            logon = caller_logon(event) if _placed_by_phone(event) else callee_logon(event)
        return CallEnded(channel=uuid, at=at, logon=logon)
    return None


def registration_logon(event: EslEvent) -> str:
    """The log-on a registration event is about (as :func:`to_core_event` reads it), ``""`` for
    any other event. Cheap enough for every queued event: one pass over its headers, no index
    built (:meth:`EslEvent.first_of`), no core event made."""
    name, subclass, username, to_user = event.first_of("event-name", "event-subclass", "username", "to-user")
    if name != "CUSTOM":
        return ""
    if subclass == REGISTER_FAILURE:
        return to_user.strip()
    if subclass in (REGISTER, UNREGISTER, EXPIRE, REGISTER_ATTEMPT):
        return _digest_user(username)
    return ""


def digest_user(event: EslEvent) -> str:
    """The digest user of a registration event (``username``); ``""`` when there was none."""
    return _digest_user(event.get("username"))


def _digest_user(username: str) -> str:
    user = username.strip()
    # mod_sofia writes "unknown" when the request carried no credentials it could read.
    return "" if user in ("unknown", UNDEFINED) else user


def _custom(event: EslEvent, at: datetime) -> Event | None:
    subclass = event.subclass
    source = source_of(event.get("network-ip"), event.get("network-port"))
    if subclass == REGISTER_FAILURE:
        if event.get("registration-type").strip().upper() not in ("", "REGISTER"):
            return None  # an INVITE's: to-user is the number dialled
        logon = event.get("to-user").strip()
        return LogonFailed(logon=logon, at=at, source=source) if logon else None
    logon = digest_user(event)
    if not logon:
        return None
    if subclass == REGISTER:
        return LoggedOn(
            logon=logon,
            at=at,
            contact=normalise_contact(event.get("contact")),
            source=source,
            user_agent=event.get("user-agent"),
            expires=_int(event.get("expires")),
        )
    if subclass == REGISTER_ATTEMPT:
        result = event.get("auth-result").strip().upper()
        if result == "FORBIDDEN":
            return LogonFailed(logon=logon, at=at, source=source)
        # SUCCESS / RENEWED: a REGISTER's success also comes as sofia::register (same call-id),
        # which logs on and so clears a failed log-on. An INVITE's success comes only here, and it
        # is no log-on: it must not lift the block of a log-on whose latest REGISTER failed, or a
        # blocked phone's first (refused) 112 would clear the way for its second. STALE: a new
        # challenge follows, nothing was decided.
        return None
    if subclass in (UNREGISTER, EXPIRE):
        return LoggedOff(
            logon=logon,
            at=at,
            contact=normalise_contact(event.get("contact")),
            reason="logoff" if subclass == UNREGISTER else "expired",
        )
    return None


class FailureDeduplicator:
    """Drops the ``sofia::register_failure`` that repeats a FORBIDDEN ``register_attempt``.

    FreeSWITCH fires both, back to back, for one refused request; the attempt names who tried, the
    failure only the To header. Keyed by the phone's address, remembered for ``window`` seconds, and
    bounded: at most ``limit`` addresses, the oldest forgotten first.
    """

    def __init__(self, window: float = 5.0, limit: int = 4096) -> None:
        self.window = window
        self.limit = limit
        self._seen: dict[str, float] = {}

    def keep(self, event: EslEvent, now: float) -> bool:
        """False for a register_failure that only repeats an attempt seen just before it."""
        subclass = event.subclass
        if subclass not in (REGISTER_ATTEMPT, REGISTER_FAILURE):
            return True
        key = source_of(event.get("network-ip"), event.get("network-port"))
        if subclass == REGISTER_ATTEMPT:
            if event.get("auth-result").strip().upper() == "FORBIDDEN":
                self._seen.pop(key, None)
                self._seen[key] = now
                while len(self._seen) > self.limit:
                    del self._seen[next(iter(self._seen))]
            return True
        seen = self._seen.pop(key, None)
        return seen is None or now - seen > self.window


def _is_sip_leg(event: EslEvent) -> bool:
    name = event.get("Channel-Name")
    return name.startswith(SIP_CHANNEL_PREFIX) and not name.startswith(GATEWAY_CHANNEL_PREFIX)


def _placed_by_phone(event: EslEvent) -> bool:
    direction = event.get("Call-Direction") or event.get("Caller-Direction")
    return direction != "outbound"


def _channel_create(event: EslEvent, at: datetime) -> CallStarted | None:
    # Only SIP legs belong to a log-on; loopback and other internal legs copy the caller's
    # variables and would count one call twice.
    uuid = channel_uuid(event)
    if not uuid or not _is_sip_leg(event):
        return None
    if _placed_by_phone(event):
        logon, direction = caller_logon(event), Direction.OUTBOUND
    else:
        logon, direction = callee_logon(event), Direction.INBOUND
    if not logon:
        return None
    number = dialled_number(event) or logon
    extra = {"channel_name": event.get("Channel-Name")}
    return CallStarted(logon=logon, channel=uuid, number=number, direction=direction, at=at, extra=extra)


def event_time(event: EslEvent) -> float | None:
    """When FreeSWITCH created the event (Unix seconds, from ``Event-Date-Timestamp`` in µs)."""
    value = _int(event.get("Event-Date-Timestamp"))
    return value / 1_000_000 if value else None


def _int(value: str) -> int | None:
    value = value.strip()
    return int(value) if value.isdigit() else None


# --- resync answers -----------------------------------------------------------------------------


def _rows(answer: str, what: str) -> list[dict[str, Any]]:
    """The rows of a ``show ... as json`` answer; ``{"row_count": 0}`` has no ``rows`` at all."""
    text = answer.strip()
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"show {what} did not answer JSON: {text[:80]!r}") from exc
    if not isinstance(document, dict):
        raise ProtocolError(f"show {what} answered {type(document).__name__}, not an object")
    rows = document.get("rows", [])
    if not isinstance(rows, list):
        raise ProtocolError(f"show {what}: 'rows' is not a list")
    return [row for row in rows if isinstance(row, dict)]


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value).strip()


def parse_registrations(answer: str) -> list[Registration]:
    """The contacts in the core's ``api show registrations as json``, by the address registered.

    Kept for diagnostics: the bridge resyncs from :func:`parse_sofia_registrations`, because this
    table names the To user, not who authenticated, and keeps flushed and expired contacts.
    """
    found: dict[tuple[str, str], Registration] = {}
    for row in _rows(answer, "registrations"):
        logon = _text(row, "reg_user")
        contact = contact_from_url(_text(row, "url"))
        if not logon or not contact:
            continue
        source = source_of(_text(row, "network_ip"), _text(row, "network_port"))
        found.setdefault((logon, contact), Registration(logon, contact, source))
    return list(found.values())


# ``sofia xmlstatus`` is written line by line with printf, one element per line, and escapes only
# some values (contact and agent); a Call-ID may hold "<" or ">". So it is read line by line, the
# way it was written, never as an XML document: a value cannot forge a line (SIP has no raw
# newlines in header values), so it cannot forge an element either.
_ELEMENT_LINE = re.compile(r"^\s*<([a-z][a-z-]*)>(.*)</\1>\s*$")
_EXPSECS = re.compile(r"\bexpsecs\((-?\d+)\)")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_PROFILES = 64


def _element_blocks(answer: str, element: str, container: str) -> list[dict[str, str]]:
    """The ``<element>`` blocks of a ``sofia xmlstatus`` answer as {child: raw text}."""
    lines = answer.splitlines()
    if not any(line.strip() == f"<{container}>" for line in lines):
        raise ProtocolError(f"sofia xmlstatus did not answer a <{container}> list: {answer.strip()[:80]!r}")
    blocks: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in lines:
        stripped = line.strip()
        if stripped == f"<{element}>":
            current = {}
        elif stripped == f"</{element}>":
            if current is not None:
                blocks.append(current)
            current = None
        elif current is not None:
            match = _ELEMENT_LINE.match(line)
            if match:
                current.setdefault(match.group(1), match.group(2))
    return blocks


def parse_profiles(answer: str) -> list[str]:
    """The sofia profiles in ``api sofia xmlstatus`` (aliases and gateways left out)."""
    names: list[str] = []
    for block in _element_blocks(answer, "profile", "profiles"):
        name = block.get("name", "").strip()
        if block.get("type", "").strip() != "profile" or name in names:
            continue
        if not _PROFILE_NAME.match(name):
            raise ProtocolError(f"sofia xmlstatus names a profile that is no plain name: {name[:40]!r}")
        names.append(name)
    if len(names) > MAX_PROFILES:
        raise ProtocolError(f"sofia xmlstatus lists {len(names)} profiles, more than {MAX_PROFILES}")
    return names


def parse_sofia_registrations(answer: str) -> list[Registration]:
    """The live contacts in ``api sofia xmlstatus profile <name> reg``, by authenticated user.

    A row whose expiry has passed (``expsecs`` below zero: FreeSWITCH's sweep has not removed it
    yet) is no longer registered. A row without a digest user was not authenticated (blind
    registration) and belongs to no log-on.
    """
    found: dict[tuple[str, str], Registration] = {}
    for block in _element_blocks(answer, "registration", "registrations"):
        logon = unquote(block.get("sip-auth-user", ""), errors="replace").strip()
        contact = normalise_contact(unescape(block.get("contact", ""), {"&quot;": '"'}))
        if not logon or logon in ("unknown", UNDEFINED) or not contact:
            continue
        expsecs = _EXPSECS.search(block.get("status", ""))
        if expsecs and int(expsecs.group(1)) < 0:
            continue
        source = source_of(block.get("network-ip", ""), block.get("network-port", ""))
        agent = unescape(block.get("agent", ""), {"&quot;": '"'})
        found.setdefault((logon, contact), Registration(logon, contact, source, agent))
    return list(found.values())


def uuid_getvar_value(answer: str) -> str:
    """The value in an ``api uuid_getvar`` answer; ``""`` when unset or the channel is gone."""
    value = answer.strip()
    if value == UNDEFINED or value.startswith("-ERR"):
        return ""
    return value


def parse_channels(answer: str, users: Mapping[str, str] | None = None) -> list[CallSnapshot]:
    """The SIP call legs of log-ons in an ``api show channels as json`` answer.

    The channels table has no authenticated user: ``users`` maps a leg's UUID to its log-on as
    asked with ``uuid_getvar`` (see :func:`identity_variable`). A leg a phone placed needs it; a leg
    that rings a phone falls back on ``presence_id`` (``user@domain``, set by the ``user/``
    endpoint's usual dial string).
    """
    users = users or {}
    calls: list[CallSnapshot] = []
    for uuid, placed, number, presence_user in _sip_legs(answer):
        logon = users.get(uuid, "") or ("" if placed else presence_user)
        if not logon:
            continue
        direction = Direction.OUTBOUND if placed else Direction.INBOUND
        calls.append(CallSnapshot(channel=uuid, logon=logon, number=number or logon, direction=direction))
    return calls


def identity_lookups(answer: str) -> list[tuple[str, str]]:
    """``(uuid, variable)`` to ask ``uuid_getvar`` for each SIP leg of a ``show channels`` answer."""
    return [(uuid, identity_variable(placed)) for uuid, placed, _, _ in _sip_legs(answer)]


def identity_variable(placed: bool) -> str:
    """The channel variable naming a leg's log-on: who authenticated, or whose phone it rings."""
    return "sip_auth_username" if placed else "dialed_user"


def _sip_legs(answer: str) -> list[tuple[str, bool, str, str]]:
    legs: list[tuple[str, bool, str, str]] = []
    for row in _rows(answer, "channels"):
        uuid, name = _text(row, "uuid"), _text(row, "name")
        if not is_channel_uuid(uuid) or not name.startswith(SIP_CHANNEL_PREFIX):
            continue
        if name.startswith(GATEWAY_CHANNEL_PREFIX):
            continue
        placed = _text(row, "direction") != "outbound"
        legs.append((uuid, placed, _text(row, "dest"), _text(row, "presence_id").split("@", 1)[0]))
    return legs
