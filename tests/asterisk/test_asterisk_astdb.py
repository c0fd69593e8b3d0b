"""The blocked log-ons and the heartbeat in AstDB, and the module check, against the fake AMI server.

The running bridge (AMI listener, hook, and :class:`EmergencyState` wired as the runner wires them)
talks to a fake Asterisk whose AstDB and module list the tests set and read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from forum_bridge.adapters.asterisk.ami import AmiListener
from forum_bridge.adapters.asterisk.dialplan import REQUIRED_MODULES
from forum_bridge.adapters.asterisk.runner import Bridge
from forum_bridge.config import Settings
from forum_bridge.core.events import LogonFailed
from forum_bridge.errors import StoreError
from forum_bridge.service import BridgeService
from tests.asterisk.conftest import AmiRig, RecordingObserver, challenge_failed, contact_status, new_channel
from tests.asterisk.fake_ami import FakeAmi
from tests.conftest import FakeClock

ServiceFactory = Callable[[Settings], BridgeService]
SettingsFactory = Callable[..., Settings]
ASTDB_LOGGER = "forum_bridge.adapters.asterisk.astdb"
BLOCKED = "/forum-bridge/blocked/"
HEARTBEAT = "/forum-bridge/heartbeat"


class ModuleRecorder(RecordingObserver):
    """The metrics' side of the module check."""

    def __init__(self) -> None:
        super().__init__()
        self.modules: dict[str, bool] = {}

    def set_module_missing(self, module: str, missing: bool) -> None:
        self.modules[module] = missing


async def settled(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (the bridge counts a write once Asterisk's answer is read)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def block_puts(fake: FakeAmi) -> list[dict[str, str]]:
    return [a for a in fake.actions_named("DBPut") if a.get("Family") == "forum-bridge/blocked"]


def blocked(fake: FakeAmi) -> set[str]:
    return {key[len(BLOCKED) :] for key in fake.astdb if key.startswith(BLOCKED)}


def failed_before(ami: AmiRig, clock: FakeClock, *subscribers: str, **overrides: object) -> None:
    """The service with these subscribers, the first of them blocked by a failed log-on."""
    service = ami.setup(*subscribers, **overrides)
    service.apply(LogonFailed(logon=subscribers[0], at=clock(), reason="wrong_password"))


def test_the_login_rewrites_the_blocked_set_without_a_gap_and_writes_a_heartbeat(
    ami: AmiRig, clock: FakeClock
) -> None:
    failed_before(ami, clock, "21-desk", "22-soft", "23-gone")
    fake = ami.fake
    # Left from before: one block still true, one lifted while the bridge was away.
    fake.astdb[BLOCKED + "21-desk"] = "1795000000"
    fake.astdb[BLOCKED + "23-gone"] = "1795000000"
    fake.astdb["/other/family"] = "kept"
    before = int(time.time())

    async def scenario() -> None:
        async with ami.serving() as bridge:
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            assert blocked(fake) == {"21-desk"}
            assert before <= int(fake.astdb[HEARTBEAT]) <= int(time.time())
            assert fake.astdb["/other/family"] == "kept"
            # Only differences written: the true block was never deleted, nothing dropped a tree.
            assert fake.actions_named("DBDelTree") == []
            assert [a["Key"] for a in fake.actions_named("DBDel")] == ["23-gone"]
            assert [a["Key"] for a in fake.actions_named("DBPut") if a["Family"] != "forum-bridge"] == []
            await settled(lambda: bridge.emergency.syncs >= 1)

    ami.run(scenario())


def test_each_change_of_a_block_reaches_astdb_at_once(ami: AmiRig) -> None:
    ami.setup("21-desk")
    fake = ami.fake

    async def scenario() -> None:
        async with ami.serving(interval=3600) as bridge:
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            fake.push(challenge_failed("21-desk"))
            await fake.wait_until(lambda: blocked(fake) == {"21-desk"}, 5)
            stamp = int(fake.astdb[BLOCKED + "21-desk"])
            assert abs(stamp - time.time()) < 60
            fake.push(contact_status("21-desk"))  # the right password: registered again
            await fake.wait_until(lambda: blocked(fake) == set(), 5)
            # Written by the pushes themselves (the periodic pass is an hour away).
            await settled(lambda: bridge.emergency.pushes == 2)

    ami.run(scenario())


def test_the_periodic_pass_repairs_astdb_and_refreshes_the_heartbeat(ami: AmiRig, clock: FakeClock) -> None:
    failed_before(ami, clock, "21-desk")
    fake = ami.fake

    async def scenario() -> None:
        async with ami.serving(interval=0.2) as bridge:
            await fake.wait_until(lambda: blocked(fake) == {"21-desk"}, 5)
            del fake.astdb[BLOCKED + "21-desk"]  # e.g. "database deltree" by an operator
            fake.astdb[HEARTBEAT] = "0"
            await fake.wait_until(lambda: blocked(fake) == {"21-desk"}, 5)
            await fake.wait_until(lambda: int(fake.astdb[HEARTBEAT]) > 0, 5)
            await settled(lambda: bridge.emergency.syncs >= 2)

    ami.run(scenario())


def test_without_its_database_the_bridge_withholds_the_heartbeat_and_says_so_once(
    ami: AmiRig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = ami.fake

    def broken() -> list[str]:
        raise StoreError("database is unreachable")

    monkeypatch.setattr(ami.service, "blocked_logons", broken)
    fake.astdb[HEARTBEAT] = "1795000000"

    async def scenario() -> None:
        async with ami.serving(interval=0.1):
            await fake.wait_until(lambda: len(fake.actions_named("ModuleCheck")) >= 1, 5)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:  # several periodic passes
                await asyncio.sleep(0.1)

    with caplog.at_level(logging.INFO, logger=ASTDB_LOGGER):
        ami.run(scenario())
    assert fake.astdb[HEARTBEAT] == "1795000000"
    assert not [a for a in fake.actions_named("DBPut") if a.get("Key") == "heartbeat"]
    errors = [r for r in caplog.records if r.name == ASTDB_LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "cannot read the blocked log-ons" in errors[0].getMessage()


def test_missing_modules_are_logged_once_by_name_and_reported_after_each_login(
    ami: AmiRig, caplog: pytest.LogCaptureFixture
) -> None:
    needed = [name for name, _ in REQUIRED_MODULES]
    fake = ami.fake
    fake.modules = set(needed) - {"func_db"}
    observer = ami.observer = ModuleRecorder()

    async def scenario() -> None:
        async with ami.serving() as bridge:
            # Every module's answer is reported; wait for all of them, not only the missing one.
            await settled(lambda: set(observer.modules) == set(needed))
            assert {m for m, missing in observer.modules.items() if missing} == {"func_db"}
            await settled(lambda: bridge.emergency.syncs >= 1)
            # Asterisk restarted with the module loaded: checked again after the new login.
            fake.modules = None
            await fake.drop()
            await settled(lambda: bridge.emergency.missing_modules == [])
            assert observer.modules.get("func_db") is False

    with caplog.at_level(logging.INFO, logger=ASTDB_LOGGER):
        ami.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "func_db (DB()" in errors[0] and "res_agi" not in errors[0]
    assert any("has every module" in r.getMessage() for r in caplog.records)


def test_a_refused_module_check_is_a_warning_not_a_verdict(
    ami: AmiRig, caplog: pytest.LogCaptureFixture
) -> None:
    fake = ami.fake
    fake.refused_actions.add("modulecheck")
    observer = ami.observer = ModuleRecorder()

    async def scenario() -> None:
        async with ami.serving() as bridge:
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            assert observer.modules == {}
            assert bridge.emergency.missing_modules is None

    with caplog.at_level(logging.INFO, logger=ASTDB_LOGGER):
        ami.run(scenario())
    assert any("cannot check Asterisk's modules" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_failed_write_is_retried_by_the_next_pass(ami: AmiRig, clock: FakeClock) -> None:
    fake = ami.fake
    fake.refused_actions.add("dbput")
    failed_before(ami, clock, "21-desk")

    async def scenario() -> None:
        async with ami.serving(interval=0.1):
            await fake.wait_until(lambda: len(fake.actions_named("DBPut")) >= 2, 5)
            assert blocked(fake) == set()
            fake.refused_actions.clear()
            await fake.wait_until(lambda: blocked(fake) == {"21-desk"} and HEARTBEAT in fake.astdb, 5)

    ami.run(scenario())


def test_the_hook_answers_before_the_dialplans_bound_gives_up_on_it(
    bridge_settings: SettingsFactory, make_service: ServiceFactory
) -> None:
    for bound, expected in ((2.0, 1.5), (0.5, 0.2), (30.0, 3.0)):
        settings = bridge_settings(1, **{"asterisk.hook_timeout": bound})  # action_timeout 3.0
        bridge = Bridge(settings, make_service(settings))
        try:
            # The hook's own fail-mode answer (logged by the bridge) comes first, with room to spare.
            assert bridge.agi.decision_timeout == expected
        finally:
            bridge.executor.shutdown(wait=False)


@pytest.mark.parametrize(("enforce", "hung_up"), [("both", False), ("ami", True)])
def test_an_emergency_call_is_never_cut_over_ami_when_the_dialplan_decides(
    ami: AmiRig, clock: FakeClock, enforce: str, hung_up: bool
) -> None:
    failed_before(ami, clock, "21-desk", **{"asterisk.enforce": enforce})
    fake = ami.fake
    emergency, other = new_channel("21-desk", "112"), new_channel("21-desk", "600")
    fake.channels = [emergency, other]
    # Hang-ups go out in the order of the frames: once the second call's has come, an
    # emergency call's hang-up would have come before it.
    expected = [emergency["Channel"], other["Channel"]] if hung_up else [other["Channel"]]

    async def scenario(listener: AmiListener) -> None:
        ami.push(emergency, other)
        await fake.wait_until(lambda: len(fake.hangups) >= len(expected))
        await fake.wait_until(lambda: other["Channel"] in [h["Channel"] for h in fake.hangups])

    ami.listen(scenario)
    assert [h["Channel"] for h in fake.hangups] == expected
    denied = [a for a in ami.service.audit_log() if a["kind"] == "deny" and a["number"] == "112"]
    assert len(denied) == 1  # decided and audited all the same


def test_a_refused_change_is_retried_with_a_pause_not_in_a_tight_loop(ami: AmiRig) -> None:
    ami.setup("21-desk")
    fake = ami.fake

    async def scenario() -> None:
        async with ami.serving(interval=3600):
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            fake.refused_actions.add("dbput")
            fake.push(challenge_failed("21-desk"))
            pushed = time.monotonic()
            # Three refused tries of the block: a tight loop makes them in milliseconds, the
            # pause makes them take two seconds at least.
            await fake.wait_until(lambda: len(block_puts(fake)) >= 3, 10)
            assert time.monotonic() - pushed >= 1.5
            fake.refused_actions.clear()
            await fake.wait_until(lambda: blocked(fake) == {"21-desk"}, 5)

    ami.run(scenario())


def test_the_listener_reports_each_block_change_and_survives_a_failing_receiver(
    ami: AmiRig, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[tuple[str, bool]] = []

    def receiver(logon: str, blocked: bool) -> None:
        heard.append((logon, blocked))
        raise RuntimeError("receiver broke")

    ami.setup("21-desk")

    async def scenario(listener: AmiListener) -> None:
        ami.push(challenge_failed("21-desk"))
        ami.push(challenge_failed("21-desk"))  # blocked already: no change to report
        ami.push(contact_status("21-desk"))
        await ami.wait(lambda: len(heard) >= 2)

    with caplog.at_level(logging.ERROR):
        ami.listen(scenario, on_blocked=receiver)
    assert heard == [("21-desk", True), ("21-desk", False)]
    assert ami.subscriber("21-desk")["state"] == "logged_on"  # events went on being applied
    assert any("could not pass on the block of logon=21-desk" in r.getMessage() for r in caplog.records)
