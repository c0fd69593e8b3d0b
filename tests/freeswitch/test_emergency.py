"""The blocked log-ons and the heartbeat in FreeSWITCH's mod_hash, and the module check (fake ESL).

The dialplan reads realm ``forum_bridge``: ``blocked_<log-on>`` = ``yes`` refuses that log-on's
emergency calls while ``alive_<Unix time // 100>`` (or ``alive_forever``) = ``yes``. What the real
FreeSWITCH makes of it is tested end to end in ``tests/e2e/test_freeswitch_emergency.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from forum_bridge.core.events import LogonFailed
from forum_bridge.errors import StoreError
from tests.freeswitch.conftest import Bridge, wait_until
from tests.freeswitch.fake_esl import register_failure_event

StartBridge = Callable[..., Bridge]
NOW = 1_796_291_554.0  # bucket 17962915


class ModuleRecorder:
    """Stands in for the metrics' ``set_module_missing``."""

    def __init__(self) -> None:
        self.seen: dict[str, bool] = {}

    def set_module_missing(self, module: str, missing: bool) -> None:
        self.seen[module] = missing


def start(
    start_bridge: StartBridge, *, blocked: tuple[str, ...] = (), interval: float = 30.0, **overrides: object
) -> Bridge:
    """A listener on a fixed Unix time, with ``blocked`` failed before it connects."""
    bridge = start_bridge(wait=False, **overrides)
    # Set before the listener greenlet first runs (nothing has yielded to gevent yet).
    emergency = bridge.listener.emergency
    emergency.clock = lambda: NOW
    emergency.interval = interval
    emergency.observer = ModuleRecorder()
    for logon in blocked:
        bridge.service.apply(LogonFailed(logon=logon, at=bridge.clock(), source="192.0.2.9:5060"))
    wait_until(lambda: bridge.listener.connected, what="the listener to connect")
    return bridge


def realm(bridge: Bridge) -> dict[str, str]:
    """FreeSWITCH's mod_hash entries of the bridge's realm, without the realm."""
    return {
        k.removeprefix("forum_bridge_"): v
        for k, v in bridge.fake.hash_db.items()
        if k.startswith("forum_bridge_")
    }


ALIVE_300 = {f"alive_{b}": "yes" for b in range(17962915, 17962919)}


def test_connect_writes_the_blocked_set_and_the_heartbeat_and_removes_stale_keys(
    start_bridge: StartBridge, fake_esl: object
) -> None:
    fake = fake_esl
    fake.hash_db.update(  # type: ignore[attr-defined]
        {
            "forum_bridge_blocked_1002": "yes",  # no longer blocked: must go
            "forum_bridge_alive_17962000": "yes",  # a bucket long past: must go
            "other_realm_blocked_1002": "yes",  # someone else's: must stay
        }
    )
    bridge = start(start_bridge, blocked=("1001",))
    assert realm(bridge) == {"blocked_1001": "yes", **ALIVE_300}
    assert bridge.fake.hash_db["other_realm_blocked_1002"] == "yes"
    assert bridge.listener.emergency.missing_modules == []
    # Inserted before anything was deleted, so no blocked log-on was ever missing.
    hash_commands = [c for c in bridge.fake.commands if c.startswith("api hash ")]
    assert hash_commands.index("api hash insert/forum_bridge/blocked_1001/yes") < hash_commands.index(
        "api hash delete/forum_bridge/blocked_1002"
    )


def test_a_failed_log_on_is_pushed_at_once_and_a_successful_one_clears_it(start_bridge: StartBridge) -> None:
    bridge = start(start_bridge)
    assert "blocked_1000" not in realm(bridge)
    bridge.push(register_failure_event("1000"))
    assert realm(bridge)["blocked_1000"] == "yes"
    assert bridge.subscriber("1000")["state"] == "logon_failed"
    bridge.register("1000")
    assert "blocked_1000" not in realm(bridge)
    assert bridge.listener.emergency.pushes == 2


def test_an_unknown_user_failing_to_log_on_blocks_nobody(start_bridge: StartBridge) -> None:
    bridge = start(start_bridge)
    bridge.push(register_failure_event("9999"))
    bridge.push(register_failure_event("evil/../x"))
    assert [k for k in realm(bridge) if k.startswith("blocked_")] == []


def test_nothing_is_blocked_when_block_after_failed_logon_is_off(start_bridge: StartBridge) -> None:
    bridge = start(start_bridge, blocked=("1001",), emergency__block_after_failed_logon=False)
    assert realm(bridge) == ALIVE_300
    bridge.push(register_failure_event("1000"))
    assert realm(bridge) == ALIVE_300


def test_block_stale_after_zero_writes_a_heartbeat_that_never_goes_stale(start_bridge: StartBridge) -> None:
    bridge = start(start_bridge, blocked=("1001",), emergency__block_stale_after=0)
    assert realm(bridge) == {"blocked_1001": "yes", "alive_forever": "yes"}


def test_the_periodic_pass_heals_what_was_lost_and_moves_the_heartbeat(start_bridge: StartBridge) -> None:
    bridge = start(start_bridge, blocked=("1001",), interval=0.05, emergency__block_stale_after=60)
    assert {"blocked_1001", "alive_17962915", "alive_17962916"} <= set(realm(bridge))
    emergency = bridge.listener.emergency
    emergency.clock = lambda: NOW + 100
    bridge.fake.hash_db.clear()  # e.g. someone ran "hash delete" by hand
    syncs = emergency.syncs
    wait_until(lambda: emergency.syncs > syncs + 1, what="two periodic passes")
    assert realm(bridge) == {"blocked_1001": "yes", "alive_17962916": "yes", "alive_17962917": "yes"}
    assert bridge.listener.connected


def test_without_the_database_blocks_stay_but_are_no_longer_confirmed(
    start_bridge: StartBridge, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bridge = start(start_bridge, blocked=("1001",), interval=0.05, emergency__block_stale_after=60)
    emergency = bridge.listener.emergency
    attempts = 0

    def broken() -> list[str]:
        nonlocal attempts
        attempts += 1
        raise StoreError("database is locked")

    with caplog.at_level(logging.ERROR):
        monkeypatch.setattr(bridge.service, "blocked_logons", broken)
        emergency.clock = lambda: NOW + 300
        syncs = emergency.syncs
        wait_until(lambda: attempts >= 3, what="three passes without the database")
    assert emergency.syncs == syncs
    # The last confirmed facts stay, and are not stretched: no newer bucket was written.
    assert realm(bridge) == {"blocked_1001": "yes", "alive_17962915": "yes", "alive_17962916": "yes"}
    assert caplog.text.count("cannot read the blocked log-ons") == 1  # once, not every pass
    assert bridge.listener.connected


def test_a_missing_mod_hash_is_named_once_and_the_listener_stays_up(
    start_bridge: StartBridge, fake_esl: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake_esl.modules.discard("mod_hash")  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR):
        bridge = start(start_bridge, blocked=("1001",))
        bridge.push(register_failure_event("1000"))
    assert bridge.listener.emergency.missing_modules == ["mod_hash"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("lacks mod_hash" in e for e in errors) == 1
    assert sum("refused 'hash" in e for e in errors) == 1
    recorder = bridge.listener.emergency.observer
    assert isinstance(recorder, ModuleRecorder)
    assert recorder.seen["mod_hash"] is True and recorder.seen["mod_dptools"] is False
    assert bridge.listener.connected and bridge.listener.sessions == 1  # no reconnect loop


def test_without_mod_commands_the_check_says_so(start_bridge: StartBridge, fake_esl: object) -> None:
    fake_esl.modules.discard("mod_commands")  # type: ignore[attr-defined]
    bridge = start(start_bridge)
    assert bridge.listener.emergency.missing_modules == ["mod_commands"]


def test_modules_are_checked_again_after_every_reconnect(start_bridge: StartBridge, fake_esl: object) -> None:
    bridge = start(start_bridge)
    assert bridge.listener.emergency.missing_modules == []
    fake_esl.modules.discard("mod_hash")  # type: ignore[attr-defined]
    bridge.fake.drop()
    wait_until(lambda: bridge.listener.sessions == 2 and bridge.listener.connected, what="the reconnect")
    assert bridge.listener.emergency.missing_modules == ["mod_hash"]
