"""The Forum 523/524 licence decision table as pure functions.

The rows (design brief, section 2) for a call from managed log-on L to number D:

1. L's latest log-on attempt failed and the setting blocks it -> deny ``logon_failed``
2. D is an emergency number -> allow ``emergency`` (no licence)
3. L is not logged on -> deny ``not_logged_on``
4. L holds a licence -> allow ``licensed``
5. a licence is free -> allow ``licence_acquired`` (the caller takes it atomically)
6. otherwise -> deny ``emergency_only``

A call *to* L follows rows 1, 3, 4, 5 and 6 (an emergency number is never rung). Log-ons that are not
provisioned are not managed and always pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from forum_bridge.core.events import Direction


class Reason(StrEnum):
    """Why a call was allowed or denied; these strings appear in JSON, logs and metrics."""

    LOGON_FAILED = "logon_failed"
    EMERGENCY = "emergency"
    NOT_LOGGED_ON = "not_logged_on"
    LICENSED = "licensed"
    LICENCE_ACQUIRED = "licence_acquired"
    EMERGENCY_ONLY = "emergency_only"
    UNMANAGED = "unmanaged"
    # Not a row of the table: the answer an adapter gave by its fail mode when the bridge could not
    # decide in time (the database failed or was too slow).
    BRIDGE_ERROR = "bridge_error"


@dataclass(frozen=True)
class LogonState:
    """What the rules need to know about one log-on at the moment of a call."""

    managed: bool
    logged_on: bool
    last_logon_failed: bool
    holds_licence: bool


@dataclass(frozen=True)
class Decision:
    """The verdict on one call leg."""

    allowed: bool
    reason: Reason
    takes_licence: bool = False

    @property
    def undecided(self) -> bool:
        """A refusal only because no decision could be made: the fail mode's 503, not a denial's 603."""
        return not self.allowed and self.reason is Reason.BRIDGE_ERROR

    def as_dict(self) -> dict[str, object]:
        """Return the decision as a JSON-ready mapping."""
        return {"allowed": self.allowed, "reason": str(self.reason), "takes_licence": self.takes_licence}


def decide_call(
    state: LogonState,
    *,
    direction: Direction,
    is_emergency: bool,
    licence_free: bool,
    block_after_failed_logon: bool,
) -> Decision:
    """Apply the decision table to one call leg of a log-on.

    ``is_emergency`` only counts for outbound calls: nobody rings a phone "for" 112.
    ``takes_licence`` in the answer tells the caller to acquire a licence now.
    """
    if not state.managed:
        return Decision(True, Reason.UNMANAGED)
    if state.last_logon_failed and block_after_failed_logon:
        return Decision(False, Reason.LOGON_FAILED)
    if direction is Direction.OUTBOUND and is_emergency:
        return Decision(True, Reason.EMERGENCY)
    if not state.logged_on:
        return Decision(False, Reason.NOT_LOGGED_ON)
    if state.holds_licence:
        return Decision(True, Reason.LICENSED)
    if licence_free:
        return Decision(True, Reason.LICENCE_ACQUIRED, takes_licence=True)
    return Decision(False, Reason.EMERGENCY_ONLY)


def keepalive_deadline(last_seen: datetime, keepalive_seconds: int, grace_seconds: int) -> datetime:
    """When a log-on last seen at ``last_seen`` counts as gone (profile clock plus grace)."""
    return last_seen + timedelta(seconds=keepalive_seconds + grace_seconds)


def keepalive_expired(now: datetime, last_seen: datetime, keepalive_seconds: int, grace_seconds: int) -> bool:
    """True once a log-on has missed its keepalive: ``now`` is past the deadline."""
    return now > keepalive_deadline(last_seen, keepalive_seconds, grace_seconds)
