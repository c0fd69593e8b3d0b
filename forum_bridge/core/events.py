"""Normalised events that every PBX adapter produces.

Adapters turn AMI or ESL frames into these frozen dataclasses; the service applies them. Time is
always passed in (``at``), never read here, so the rules stay testable without a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class Direction(StrEnum):
    """Which way a call leg goes, seen from the managed log-on."""

    OUTBOUND = "outbound"  # the log-on's phone places the call
    INBOUND = "inbound"  # the log-on's phone would ring


@dataclass(frozen=True)
class LoggedOn:
    """A contact of a log-on was registered (technical log-on succeeded)."""

    logon: str
    at: datetime
    contact: str = ""
    source: str = ""
    user_agent: str = ""
    expires: int | None = None


@dataclass(frozen=True)
class LoggedOff:
    """A contact was removed (unregister or expiry). ``contact=""`` means every contact of the log-on."""

    logon: str
    at: datetime
    contact: str = ""
    reason: str = "logoff"


@dataclass(frozen=True)
class LogonFailed:
    """A log-on attempt failed: wrong password, or an unknown user name."""

    logon: str
    at: datetime
    source: str = ""
    reason: str = "wrong_password"


@dataclass(frozen=True)
class Keepalive:
    """The log-on proved it is alive (refresh REGISTER or any successful authentication).

    ``clears_block`` says the adapter knows this was a successful *log-on* (a REGISTER), which
    lifts the block of a failed log-on. A successful authentication alone (e.g. of an INVITE to
    112) may not, so the default is False: an adapter that cannot tell never lifts a block.
    """

    logon: str
    at: datetime
    source: str = ""
    clears_block: bool = False


@dataclass(frozen=True)
class CallStarted:
    """A channel of a log-on appeared: the log-on calls ``number`` or is being rung for it."""

    logon: str
    channel: str
    number: str
    direction: Direction
    at: datetime
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class CallEnded:
    """A channel went away."""

    channel: str
    at: datetime
    logon: str = ""


Event = LoggedOn | LoggedOff | LogonFailed | Keepalive | CallStarted | CallEnded
