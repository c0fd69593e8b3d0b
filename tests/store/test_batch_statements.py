"""The registration batch's own SQL (store.batch_statements) stores what the ORM path stores.

A storm is applied with fixed-text statements fed one JSON document, outside SQLAlchemy's column
types; whatever a peer sends (quotes, backslashes, control characters, NUL, characters outside
the BMP, over-long values, JSON's own special characters) must end up stored, found again and
shown exactly as when each event is applied on its own, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from forum_bridge.config import Settings
from forum_bridge.core import Keepalive, LoggedOff, LoggedOn
from forum_bridge.core.events import Event
from forum_bridge.service import BridgeService
from tests.conftest import FakeClock, SettingsFactory

ServiceFactory = Callable[[Settings], BridgeService]

# Pieces a peer might send: JSON's and SQL's special characters, line breaks, NUL, a lone
# surrogate, characters outside the BMP, and lengths beyond every column.
PIECES = [
    '"',
    "\\",
    "'",
    "\r\n",
    "\x00",
    "\x1f",
    "\u2028",
    "\ud800",
    "\U0001f4de",
    "é",
    "%",
    "?",
    "$1",
    ";",
    " ",
]


def nasty(rng: random.Random, length: int) -> str:
    """A string of ``length`` pieces and letters."""
    return "".join(
        rng.choice(PIECES) if rng.random() < 0.4 else rng.choice("abcxyz019") for _ in range(length)
    )


def storm(rng: random.Random, clock: FakeClock) -> list[Event]:
    """Registrations, refreshes and log-offs with odd names, contacts, sources and user agents."""
    names = ["21-desk", "22-desk"] + [nasty(rng, rng.choice([3, 8, 200])) for _ in range(6)]
    contacts = {n: [f"sip:{nasty(rng, rng.choice([4, 12, 700]))}" for _ in range(2)] for n in names}
    events: list[Event] = []
    for _ in range(120):
        clock.advance(rng.choice([0, 1]))
        logon = rng.choice(names)
        kind = rng.random()
        if kind < 0.5:
            events.append(
                LoggedOn(
                    logon,
                    clock(),
                    contact=rng.choice(contacts[logon]),
                    source=nasty(rng, rng.choice([5, 200])),
                    user_agent=nasty(rng, rng.choice([5, 400])),
                )
            )
        elif kind < 0.85:
            events.append(Keepalive(logon, clock(), source=nasty(rng, 6)))
        else:
            events.append(LoggedOff(logon, clock(), contact=rng.choice(contacts[logon]), reason="logoff"))
    return events


def shown(service: BridgeService) -> dict[str, Any]:
    """What the status document shows of registrations (the generation time left out)."""
    status = service.status()
    return {"subscribers": status["subscribers"], "unmanaged": status["unmanaged"]}


@pytest.mark.parametrize("seed", [7, 8])
def test_odd_values_in_a_batch_are_stored_as_one_by_one(
    make_settings: SettingsFactory,
    make_service: ServiceFactory,
    database_url: str,
    clock: FakeClock,
    seed: int,
    tmp_path: Any,
) -> None:
    one = make_service(make_settings(**{"database.url": f"sqlite:///{tmp_path / 'one.db'}"}))
    batched = make_service(make_settings(**{"database.url": database_url}))
    for service in (one, batched):
        service.add_subscriber("21-desk", "21")
        service.add_subscriber("22-desk", "22")
    events = storm(random.Random(seed), clock)
    singles = [one.apply(e) for e in events]
    together: list[Any] = []
    for start in range(0, len(events), 40):
        together += batched.apply_batch(events[start : start + 40])
    assert together == singles
    assert shown(batched) == shown(one)
    assert any(s["state"] == "logged_on" for s in shown(one)["subscribers"])
    assert shown(one)["unmanaged"], "some odd log-on must still be registered"
    # What the batch stored, it finds again: registering every contact once more refreshes the
    # stored rows (a key read back differently would add a second row and a second contact).
    again = [LoggedOn(e.logon, clock(), contact=e.contact) for e in events if isinstance(e, LoggedOn)]
    assert batched.apply_batch(again) == [one.apply(e) for e in again]
    assert shown(batched) == shown(one)
