"""Pure licence rules: events, decisions and emergency numbers. No I/O and no clock reads.

The names below are loaded on first use (PEP 562): ``forum-bridge status`` and ``--help`` read the
configuration, which needs only ``core.emergency`` and ``core.names``, and importing the events and
rules as well was a tenth of what those commands take.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULES = {
    "EmergencyNumbers": "emergency",
    **dict.fromkeys(
        ("CallEnded", "CallStarted", "Direction", "Event", "Keepalive", "LoggedOff", "LoggedOn"), "events"
    ),
    "LogonFailed": "events",
    **dict.fromkeys(("Decision", "LogonState", "Reason", "decide_call", "keepalive_expired"), "rules"),
}


def __getattr__(name: str) -> Any:
    """A name of :data:`__all__`, imported from its module on first use."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The module's names, the lazy ones included."""
    return sorted({*globals(), *__all__})
