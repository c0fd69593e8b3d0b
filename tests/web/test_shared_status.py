"""The status page's readers share one status document instead of each computing it.

64 clients polling ``/status.json`` made every call decision wait: each poll computed the whole
document, all at once, in the bridge's process. Readers at the same moment now share one
computation, and a change made through the bridge is still visible to the very next reader.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from forum_bridge.config import Settings
from forum_bridge.core import LoggedOn
from forum_bridge.service import BridgeService
from tests.conftest import wait_until

READERS = 32


def test_concurrent_readers_share_one_computation_and_see_changes_at_once(
    make_settings: Callable[..., Settings],
    make_service: Callable[[Settings], BridgeService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = make_service(make_settings())
    service.add_subscriber("21-desk", "21")
    service.apply(LoggedOn("21-desk", service.clock(), contact="sip:21-desk@127.0.0.1:5081"))
    computed: list[int] = []
    release = threading.Event()
    original = service._status

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        computed.append(1)
        release.wait(10)  # hold the first computation until every reader has asked
        return original(*args, **kwargs)

    monkeypatch.setattr(service, "_status", counted)
    documents: list[dict[str, Any]] = []
    started = threading.Barrier(READERS + 1)

    def reader() -> None:
        started.wait(10)
        documents.append(service.shared_status())

    threads = [threading.Thread(target=reader) for _ in range(READERS)]
    for thread in threads:
        thread.start()
    started.wait(10)
    wait_until(lambda: len(computed) >= 1, timeout=10, what="the first computation to start")
    # Every reader is now either waiting for the computation under way or about to.
    release.set()
    for thread in threads:
        thread.join(20)
    assert len(documents) == READERS
    assert len(computed) == 1, f"{len(computed)} computations for {READERS} readers at once"
    assert all(d is documents[0] for d in documents)
    assert documents[0]["licences"]["used"] == 0
    # A change through the service is visible to the next reader, without waiting for any age.
    assert service.authorize("21-desk", "600").allowed
    assert service.shared_status()["licences"]["used"] == 1
    assert len(computed) == 2
    # Nothing changed: the next reader within the second gets the same document again.
    assert service.shared_status() is service.shared_status()
    assert len(computed) == 2
