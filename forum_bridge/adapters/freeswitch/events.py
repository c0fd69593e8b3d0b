"""FreeSWITCH ESL events and API answers -> the core's events. Pure: no I/O, time is passed in.

Field names follow FreeSWITCH 1.10 (checked against captures of 1.10.12 and mod_sofia's source):

* ``sofia::register`` fires for the first REGISTER and every refresh. ``from-user`` is the user
  part of the To header, the address being registered, which is also ``reg_user`` in
  ``show registrations``; ``username`` is the digest user. ``expires`` is relative seconds.
* ``sofia::register_failure`` (403) names the user in ``to-user``; ``profile-name`` appears twice.
* ``sofia::unregister`` (Expires: 0) has ``from-user``; ``sofia::expire`` has ``user`` and an
  absolute ``expires``.
* ``CHANNEL_CREATE`` of a SIP leg: ``Call-Direction: inbound`` is a leg a phone placed
  (``variable_sip_from_user``, ``Caller-Username``, dialled ``Caller-Destination-Number``);
  ``Call-Direction: outbound`` is a leg that rings a phone, created by the ``user/`` endpoint,
  which sets ``dialed_user`` to the directory user.

Contacts are reduced to their SIP URI without parameters (``sip:1000@192.0.2.50:5060``) so that an
event's ``contact`` header and the ``url`` column of ``show registrations`` name the same contact.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

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

from .esl import EslEvent

REGISTER = "sofia::register"
UNREGISTER = "sofia::unregister"
EXPIRE = "sofia::expire"
REGISTER_FAILURE = "sofia::register_failure"
CHANNEL_CREATE = "CHANNEL_CREATE"
CHANNEL_HANGUP_COMPLETE = "CHANNEL_HANGUP_COMPLETE"

SUBCLASSES = (REGISTER, UNREGISTER, EXPIRE, REGISTER_FAILURE)
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


def caller_logon(event: EslEvent) -> str:
    """The log-on that placed a leg FreeSWITCH received (``Call-Direction: inbound``)."""
    return event.get("variable_sip_from_user") or event.get("Caller-Username")


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


def _custom(event: EslEvent, at: datetime) -> Event | None:
    subclass = event.subclass
    source = source_of(event.get("network-ip"), event.get("network-port"))
    if subclass == REGISTER:
        logon = event.get("from-user") or event.get("username")
        if not logon:
            return None
        return LoggedOn(
            logon=logon,
            at=at,
            contact=normalise_contact(event.get("contact")),
            source=source,
            user_agent=event.get("user-agent"),
            expires=_int(event.get("expires")),
        )
    if subclass == REGISTER_FAILURE:
        logon = event.get("to-user")
        return LogonFailed(logon=logon, at=at, source=source) if logon else None
    if subclass in (UNREGISTER, EXPIRE):
        # An expire names the user in "user"; an unregister in "from-user".
        logon = event.get("from-user") or event.get("user") or event.get("username")
        if not logon:
            return None
        return LoggedOff(
            logon=logon,
            at=at,
            contact=normalise_contact(event.get("contact")),
            reason="logoff" if subclass == UNREGISTER else "expired",
        )
    return None


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
    """The registered contacts in an ``api show registrations as json`` answer."""
    found: dict[tuple[str, str], Registration] = {}
    for row in _rows(answer, "registrations"):
        logon = _text(row, "reg_user")
        contact = contact_from_url(_text(row, "url"))
        if not logon or not contact:
            continue
        source = source_of(_text(row, "network_ip"), _text(row, "network_port"))
        found.setdefault((logon, contact), Registration(logon, contact, source))
    return list(found.values())


def parse_channels(answer: str) -> list[CallSnapshot]:
    """The SIP call legs of log-ons in an ``api show channels as json`` answer.

    The channels table has no SIP From user; ``presence_id`` is ``user@domain`` of the phone for
    both a leg it placed (From) and a leg that rings it (the ``user/`` endpoint sets it).
    """
    calls: list[CallSnapshot] = []
    for row in _rows(answer, "channels"):
        uuid, name = _text(row, "uuid"), _text(row, "name")
        if not uuid or not name.startswith(SIP_CHANNEL_PREFIX) or name.startswith(GATEWAY_CHANNEL_PREFIX):
            continue
        logon = _text(row, "presence_id").split("@", 1)[0]
        if not logon:
            continue
        placed = _text(row, "direction") != "outbound"
        direction = Direction.OUTBOUND if placed else Direction.INBOUND
        number = _text(row, "dest") or logon
        calls.append(CallSnapshot(channel=uuid, logon=logon, number=number, direction=direction))
    return calls
