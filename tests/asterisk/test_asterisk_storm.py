"""Registration storms and failed log-on floods over AMI, with the real frame order.

A storm must be applied in batches without mistaking the normal order (SuccessfulAuth before its
ContactStatus) for a disagreement with Asterisk; a call placed during the storm is decided on the
caller's latest REGISTER; and a scanner's flood of unknown user names costs no phone its licence.

To make sure a backlog really exists while the hook decides (on any machine), some tests slow every
commit down like a busy disk would: the queue then drains in tenths of seconds, not milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event

from forum_bridge.adapters.asterisk import ami as ami_module
from forum_bridge.adapters.asterisk.ami import AmiListener
from forum_bridge.batching import DIGEST_INDIVIDUAL, DIGEST_WINDOW_SECONDS
from forum_bridge.service import BridgeService
from forum_bridge.store.database import Database
from tests.asterisk.conftest import AmiRig
from tests.asterisk.storm import first_register, phone, refresh, storm, unknown_user, wrong_password
from tests.asterisk.test_asterisk_agi import ask


@contextmanager
def slow_commits(service: BridgeService, seconds: float) -> Iterator[None]:
    """Every commit takes ``seconds`` longer (a busy disk)."""

    def slow(_conn: Any) -> None:
        time.sleep(seconds)

    event.listen(service.database.engine, "commit", slow)
    try:
        yield
    finally:
        event.remove(service.database.engine, "commit", slow)


def import_phones(service: BridgeService, count: int) -> None:
    service.import_subscribers("".join(f"{phone(i)},{20000 + i}\n" for i in range(count)))


def states(service: BridgeService) -> dict[str, int]:
    return service.counts()["subscribers"]


def test_a_storm_in_the_real_order_logs_everyone_on_and_triggers_no_resync(
    ami: AmiRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short grace, so that a ContactStatus still queued (not missing) would trigger the resync
    # at once if the listener judged before catching up.
    monkeypatch.setattr(ami_module, "_UNKNOWN_RESYNC_DELAY", 0.05)
    monkeypatch.setattr(ami_module, "_UNKNOWN_RESYNC_MIN_INTERVAL", 0.0)
    count = 400
    service = ami.setup()
    import_phones(service, count)

    async def scenario(listener: AmiListener) -> None:
        with slow_commits(service, 0.03):
            ami.fake.push_bytes(storm(0, count))
            await ami.wait(lambda: listener.frames >= 4 * count, 20)
            # The unknown-registration timer (armed by every first SuccessfulAuth) has judged.
            await ami.wait(lambda: listener._resync_timer is None or listener._resync_timer.done(), 10)
        assert states(service) == {"logged_on": count, "logged_off": 0, "logon_failed": 0}
        assert listener.resyncs == 1
        assert len(ami.fake.actions_named("PJSIPShowContacts")) == 1
        # Batched: far fewer transactions than the 800 frames the bridge has a use for.
        assert listener.batches < 2 * count / 10

    ami.listen(scenario)


def test_a_call_during_a_storm_is_decided_on_the_callers_register_and_112_does_not_wait(ami: AmiRig) -> None:
    half = 2000
    service = ami.setup(**{"asterisk.enforce": "hook", "licences.count": 2})
    import_phones(service, 2 * half)
    for logon, number in (("21-desk", "21"), ("22-desk", "22"), ("23-desk", "23")):
        service.add_subscriber(logon, number)
    fake = ami.fake

    async def scenario() -> None:
        async with ami.serving() as bridge:
            listener = bridge.ami
            await ami.wait(lambda: listener.resyncs >= 1)
            fake.push_bytes(first_register("22-desk", 5082) + first_register("23-desk", 5083))
            await ami.wait(lambda: states(service)["logged_on"] == 2)
            with slow_commits(service, 0.025):
                fake.push_bytes(storm(0, half))
                # In the middle of the storm: 21-desk registers, 23-desk's next REGISTER fails.
                fake.push_bytes(first_register("21-desk", 5081) + wrong_password("23-desk", 5083))
                fake.push_bytes(storm(half, half))
                target = 4 * half + 4 + 2
                await ami.wait(lambda: listener.received >= target, 10)
                call = await ask(bridge.agi.port, "outbound", "600", channel="PJSIP/21-desk-00000001")
                assert call == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "licence_acquired"}
                backlog_after_call = listener.received - listener.done_upto()
                emergency = await ask(bridge.agi.port, "outbound", "112", channel="PJSIP/22-desk-00000002")
                backlog_after_112 = listener.received - listener.done_upto()
                blocked = await ask(bridge.agi.port, "outbound", "112", channel="PJSIP/23-desk-00000003")
                await ami.wait(lambda: listener.frames >= listener.received, 30)
            assert emergency == {"FORUM_BRIDGE_RESULT": "allow", "FORUM_BRIDGE_REASON": "emergency"}
            # What Asterisk reported before the call counts, 112 included: a failed log-on.
            assert blocked == {"FORUM_BRIDGE_RESULT": "deny", "FORUM_BRIDGE_REASON": "logon_failed"}
            # The answers came while the storm was still queued: nobody waited for it to drain.
            assert backlog_after_call > 0 and backlog_after_112 > 0
            assert states(service)["logged_on"] == 2 * half + 2
            assert listener.resyncs == 1

    ami.run(scenario(), timeout=60)


def test_a_flood_of_unknown_users_costs_no_phone_its_licence(
    ami: AmiRig, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue: 12,000 failed REGISTERs made a phone that refreshed in time miss its keepalive.

    Scaled down: the phone's profile keeps it for 2 s plus 1 s grace; it refreshes every second
    while a scanner tries 2,500 user names; the real clock runs, and so does the keepalive sweep.
    """
    caplog.set_level(logging.INFO)
    rounds, per_round = 5, 500
    settings = ami.settings(
        **{"asterisk.enforce": "hook", "keepalive.grace": 1, "database.url": f"sqlite:///{tmp_path}/f.db"}
    )
    database = Database(settings.database_url)
    database.upgrade()
    service = BridgeService(settings, database)  # the real clock: the sweep must see time pass
    service.start()
    service.set_profile("fast", 2)
    service.add_subscriber("21-desk", "21", "fast")
    ami.adopt(service)

    async def scenario() -> None:
        async with ami.serving() as bridge:
            listener = bridge.ami
            await ami.wait(lambda: listener.resyncs >= 1)
            ami.fake.push_bytes(first_register("21-desk", 5081))
            await ami.wait(lambda: states(service)["logged_on"] == 1)
            answer = await ask(bridge.agi.port, "outbound", "600")
            assert answer["FORUM_BRIDGE_REASON"] == "licence_acquired"
            started = time.monotonic()
            for n in range(rounds):
                scan = b"".join(unknown_user(f"scan{n}-{i}", 40000 + i, n) for i in range(per_round))
                ami.fake.push_bytes(scan + refresh("21-desk", 5081, n))
                # The phone refreshes once a second, as its REGISTER interval says.
                await asyncio.sleep(max(0.0, started + n + 1 - time.monotonic()))
            await ami.wait(lambda: listener.frames >= listener.received, 60)
            status = service.status()
            assert status["subscribers"][0]["state"] == "logged_on"
            assert status["licences"]["used"] == 1
            releases = [a for a in service.audit_log(5000) if a["kind"] == "release"]
            assert releases == []
            unknown = [a for a in service.audit_log(5000) if a["reason"] == "unknown_user"]
            assert len(unknown) == DIGEST_INDIVIDUAL
            later = service.clock() + timedelta(seconds=DIGEST_WINDOW_SECONDS)
            assert service.flush_failure_summary(later)
            summary = service.status()["failed_logons"][0]
            assert summary["count"] == rounds * per_round - DIGEST_INDIVIDUAL

    try:
        ami.run(scenario(), timeout=60)
    finally:
        database.dispose()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("log-on failed" in line for line in lines) == DIGEST_INDIVIDUAL + 1  # + the summary
    assert not any("missed keepalive" in r.getMessage() for r in caplog.records)
