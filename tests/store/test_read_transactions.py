"""Reads take no write lock: a status page being read never holds up a call decision.

On SQLite every transaction used to start with ``BEGIN IMMEDIATE``, so a status read (which takes
long with thousands of subscribers) held the write lock and every decision queued behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from forum_bridge.config import Settings
from forum_bridge.core import LoggedOn
from forum_bridge.core.rules import Decision
from forum_bridge.service import BridgeService
from tests.conftest import wait_until


def test_a_decision_goes_through_while_a_status_read_is_in_progress(
    make_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = make_service(make_settings(**{"database.url": database_url}))
    service.add_subscriber("21-desk", "21")
    service.apply(LoggedOn("21-desk", service.clock(), contact="sip:21-desk@127.0.0.1:5081"))
    reading, release = threading.Event(), threading.Event()
    original = service._status

    def slow_status(*args: Any, **kwargs: Any) -> dict[str, Any]:
        document = original(*args, **kwargs)
        reading.set()
        release.wait(30)  # the read transaction stays open here
        return document

    monkeypatch.setattr(service, "_status", slow_status)
    reader = threading.Thread(target=service.status)
    reader.start()
    decided: list[Decision] = []
    try:
        assert reading.wait(10)
        worker = threading.Thread(target=lambda: decided.append(service.authorize("21-desk", "600")))
        worker.start()
        wait_until(lambda: bool(decided), timeout=5, what="a decision while a status read is open")
        assert decided[0].reason.value == "licence_acquired"
        # The other read methods do not block a writer either.
        assert service.logon_state("21-desk").holds_licence
    finally:
        release.set()
        reader.join(40)
    worker.join(40)
