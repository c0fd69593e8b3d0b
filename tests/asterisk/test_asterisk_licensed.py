"""The licensed log-ons in AstDB (the dialplan's local answer), against the fake AMI server.

The whole bridge runs as ``forum-bridge run asterisk`` wires it; the fake Asterisk keeps an AstDB
the tests read. With ``asterisk.enforce = both`` every licence this process takes or frees reaches
``forum-bridge/licensed`` at once, and the periodic pass corrects what others changed; with any
other enforce value the family is kept empty.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.orm import Session

from forum_bridge.adapters.asterisk.dialplan import LICENSED_FAMILY
from forum_bridge.core.events import Direction
from forum_bridge.errors import StoreError
from forum_bridge.service import BridgeService
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database
from tests.asterisk.conftest import AmiRig, challenge_failed, contact_status, new_channel
from tests.asterisk.fake_ami import FakeAmi
from tests.asterisk.test_asterisk_astdb import settled
from tests.conftest import FakeClock

LICENSED = f"/{LICENSED_FAMILY}/"
BLOCKED = "/forum-bridge/blocked/"
# The local path exists only with enforce = both; two licences so two log-ons can hold one each.
BOTH = {"asterisk.enforce": "both", "licences.count": 2}
HEARTBEAT = "/forum-bridge/heartbeat"


def licensed(fake: FakeAmi) -> set[str]:
    return {key[len(LICENSED) :] for key in fake.astdb if key.startswith(LICENSED)}


def licensed_puts(fake: FakeAmi) -> list[str]:
    return [a["Key"] for a in fake.actions_named("DBPut") if a.get("Family") == LICENSED_FAMILY]


def test_a_call_that_takes_a_licence_writes_the_log_on_and_its_log_off_deletes_it(ami: AmiRig) -> None:
    ami.setup("21-desk", "22-soft", registered=True, **BOTH)
    fake = ami.fake

    async def scenario() -> None:
        # The periodic pass is an hour away: what is written here comes from the changes themselves.
        async with ami.serving(interval=3600) as bridge:
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            assert licensed(fake) == set()
            await ami.send(new_channel("21-desk", "0301234"))
            await fake.wait_until(lambda: licensed(fake) == {"21-desk"}, 5)
            assert ami.holders() == ["21-desk"]
            # A second call of the licensed log-on changes nothing in the pool: nothing written.
            await ami.send(new_channel("21-desk", "0309876"))
            await ami.send(contact_status("21-desk", "Removed"))
            await fake.wait_until(lambda: licensed(fake) == set(), 5)
            assert ami.holders() == []
            assert licensed_puts(fake) == ["21-desk"]
            # Both written by the passes that follow a licence change, not by the full pass.
            await settled(lambda: bridge.emergency.licensed_passes >= 2)

    ami.run(scenario())


def test_a_reset_from_the_page_and_a_failed_log_on_delete_the_entries(ami: AmiRig) -> None:
    service = ami.setup("21-desk", "22-soft", registered=True, **BOTH)
    fake = ami.fake

    async def scenario() -> None:
        async with ami.serving(interval=3600):
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            await ami.send(new_channel("21-desk", "0301234"), new_channel("22-soft", "0301234"))
            await fake.wait_until(lambda: licensed(fake) == {"21-desk", "22-soft"}, 5)
            # The status page resets from its own thread.
            assert await asyncio.to_thread(service.reset_licences, "admin") == 2
            await fake.wait_until(lambda: licensed(fake) == set(), 5)
            await ami.send(new_channel("22-soft", "0301234"))
            await fake.wait_until(lambda: licensed(fake) == {"22-soft"}, 5)
            # A failed log-on frees the licence and blocks: the log-on moves from one family to the other.
            await ami.send(challenge_failed("22-soft"))
            await fake.wait_until(lambda: licensed(fake) == set() and BLOCKED + "22-soft" in fake.astdb, 5)

    ami.run(scenario())


def test_keepalive_expiry_deletes_the_entry(ami: AmiRig, clock: FakeClock) -> None:
    ami.setup("21-desk", registered=True, **BOTH)
    fake = ami.fake

    async def scenario() -> None:
        async with ami.serving(interval=3600):
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            await ami.send(new_channel("21-desk", "0301234"))
            await fake.wait_until(lambda: licensed(fake) == {"21-desk"}, 5)
            clock.advance(3600)  # far past the default profile's keepalive and grace
            await fake.wait_until(lambda: licensed(fake) == set(), 10)
            assert ami.holders() == []

    ami.run(scenario())


def test_the_periodic_pass_corrects_what_another_process_or_an_operator_changed(
    ami: AmiRig, clock: FakeClock
) -> None:
    service = ami.setup("21-desk", "22-soft", "23-gone", registered=True, **BOTH)
    fake = ami.fake
    fake.astdb[LICENSED + "23-gone"] = "1795000000"  # left from before: 23-gone holds no licence

    def taken_elsewhere(logon: str) -> None:
        # Another process on the same database: its commits do not reach this bridge's hooks.
        other = Database(service.settings.database_url)
        try:
            with other.transaction() as session:
                assert ops.acquire(session, logon, "pbx2", clock()) is not None
        finally:
            other.dispose()

    async def scenario() -> None:
        async with ami.serving(interval=0.2) as bridge:
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb and licensed(fake) == set(), 5)
            await asyncio.to_thread(taken_elsewhere, "22-soft")
            await fake.wait_until(lambda: licensed(fake) == {"22-soft"}, 5)
            del fake.astdb[LICENSED + "22-soft"]  # e.g. "database deltree" by an operator
            fake.astdb[LICENSED + "21-desk"] = "1795000000"
            syncs = bridge.emergency.syncs
            await settled(lambda: bridge.emergency.syncs > syncs + 1)
            assert licensed(fake) == {"22-soft"}

    ami.run(scenario())


def test_without_enforce_both_nothing_is_written_and_stale_entries_go(ami: AmiRig) -> None:
    service: BridgeService = ami.setup("21-desk", registered=True, **{**BOTH, "asterisk.enforce": "hook"})
    fake = ami.fake
    fake.astdb[LICENSED + "21-desk"] = "1795000000"  # from a time with enforce = both

    async def scenario() -> None:
        async with ami.serving(interval=0.2) as bridge:
            await settled(lambda: bridge.emergency.syncs >= 1)
            assert licensed(fake) == set()
            # The hook takes the licence (here called as the FastAGI server calls it).
            decision = await asyncio.to_thread(service.authorize, "21-desk", "0301234", Direction.OUTBOUND)
            assert decision.takes_licence and ami.holders() == ["21-desk"]
            syncs = bridge.emergency.syncs
            await settled(lambda: bridge.emergency.syncs > syncs + 1)
            assert licensed(fake) == set()
            assert licensed_puts(fake) == []

    ami.run(scenario())


def test_a_bridge_that_stops_withdraws_the_licensed_entries_and_keeps_the_blocks(
    ami: AmiRig, clock: FakeClock
) -> None:
    service = ami.setup("21-desk", "22-soft", registered=True, **BOTH)
    fake = ami.fake

    async def scenario() -> None:
        async with ami.serving(interval=3600):
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            await ami.send(new_channel("21-desk", "0301234"), challenge_failed("22-soft"))
            await fake.wait_until(
                lambda: licensed(fake) == {"21-desk"} and BLOCKED + "22-soft" in fake.astdb, 5
            )
            beat = fake.astdb[HEARTBEAT]
        # Stopped: nothing decides calls over AMI now, so the dialplan must ask (and fail closed).
        assert licensed(fake) == set()
        assert [a["Family"] for a in fake.actions_named("DBDelTree")] == [LICENSED_FAMILY]
        # Blocks and the heartbeat stay: they keep a blocked phone from 112 until they are stale.
        assert BLOCKED + "22-soft" in fake.astdb and fake.astdb[HEARTBEAT] == beat
        assert service.licensed_logons() == ["21-desk"]  # the database keeps the licence

    ami.run(scenario())


def test_while_the_database_cannot_be_read_the_local_answers_are_withdrawn(
    ami: AmiRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    ami.setup("21-desk", registered=True, **BOTH)
    fake = ami.fake
    failing = False
    real = ops.failed_logons

    def failed_logons(session: Session) -> list[str]:
        if failing:
            raise StoreError("database is down (test)")
        return real(session)

    monkeypatch.setattr(ops, "failed_logons", failed_logons)

    async def scenario() -> None:
        nonlocal failing
        async with ami.serving(interval=0.2) as bridge:
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            await ami.send(new_channel("21-desk", "0301234"))
            await fake.wait_until(lambda: licensed(fake) == {"21-desk"}, 5)
            failing = True
            # The AMI side could not decide these calls either: the dialplan must ask (fail mode).
            await fake.wait_until(lambda: licensed(fake) == set(), 5)
            syncs = bridge.emergency.syncs
            failing = False
            # Readable again: the next full pass writes the set back, with a heartbeat.
            await fake.wait_until(lambda: licensed(fake) == {"21-desk"}, 5)
            await settled(lambda: bridge.emergency.syncs > syncs)

    ami.run(scenario())


def test_two_log_ons_of_one_call_number_each_have_their_own_entry(ami: AmiRig) -> None:
    # 21-desk and 21-soft share call number 21; a licence belongs to a log-on, not to a number.
    service = ami.setup("21-desk", "21-soft", registered=True, **BOTH)
    fake = ami.fake

    async def scenario() -> None:
        async with ami.serving(interval=3600):
            await fake.wait_until(lambda: HEARTBEAT in fake.astdb, 5)
            # A call to number 21 rings both (the hook's inbound question): each takes a licence.
            rung = await asyncio.to_thread(service.ringable, "21")
            assert [(logon, d.allowed) for logon, d in rung] == [("21-desk", True), ("21-soft", True)]
            await fake.wait_until(lambda: licensed(fake) == {"21-desk", "21-soft"}, 5)
            # One of them logs off: only its entry goes; the other's calls stay local.
            await ami.send(contact_status("21-soft", "Removed", port=5082))
            await fake.wait_until(lambda: licensed(fake) == {"21-desk"}, 5)
            assert ami.holders() == ["21-desk"]

    ami.run(scenario())
