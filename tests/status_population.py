"""A bridge with a bit of everything the status document shows, for the status readers' tests.

Plain subscribers and one whose name holds SQL wildcards, a log-on with two contacts, a failed
log-on, an unknown user's failure, an unmanaged endpoint and two licences held.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from forum_bridge.config import Settings
from forum_bridge.core import LoggedOn, LogonFailed
from forum_bridge.service import BridgeService
from tests.conftest import SettingsFactory


def populated(
    make_settings: SettingsFactory,
    make_service: Callable[[Settings], BridgeService],
    url: str,
    licences: int = 3,
) -> BridgeService:
    """A started service on ``url`` with four subscribers in every state, two of them licensed."""
    service = make_service(make_settings(database__url=url, licences__count=licences))
    service.import_subscribers("21-desk,21\n22-soft,22\n23_x%,23\nlift,90,,yes\n")
    now = service.clock()
    service.apply_batch(
        [
            LoggedOn("21-desk", now, contact="sip:21-desk@192.0.2.21:5060", user_agent="SIPp"),
            LoggedOn("21-desk", now + timedelta(seconds=1), contact="sip:21-desk@192.0.2.99:5060"),
            LoggedOn("lift", now, contact="sip:lift@192.0.2.90:5060"),
            LoggedOn("trunk", now, contact="sip:trunk@198.51.100.1"),
            LogonFailed("22-soft", now, source="192.0.2.22:5060"),
            LogonFailed("scanner", now, source="203.0.113.9:5060", reason="unknown_user"),
        ]
    )
    assert service.authorize("21-desk", "600").takes_licence
    assert service.authorize("lift", "90").takes_licence
    return service
