"""Pure licence rules: events, decisions and emergency numbers. No I/O and no clock reads."""

from forum_bridge.core.emergency import EmergencyNumbers
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
from forum_bridge.core.rules import Decision, LogonState, Reason, decide_call, keepalive_expired

__all__ = [
    "CallEnded",
    "CallStarted",
    "Decision",
    "Direction",
    "EmergencyNumbers",
    "Event",
    "Keepalive",
    "LoggedOff",
    "LoggedOn",
    "LogonFailed",
    "LogonState",
    "Reason",
    "decide_call",
    "keepalive_expired",
]
