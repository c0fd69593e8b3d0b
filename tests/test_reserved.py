"""Reserved licences and the pool-pressure warning, on SQLite and on PostgreSQL.

A reserved log-on always finds a licence at its first connection; log-ons without a reservation
share the floating pool (``licences.count`` minus the reservations). ``licences.warn_at`` logs one
warning when the floating pool crosses it and one when it falls back, once for all bridges sharing
the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from forum_bridge.config import Settings
from forum_bridge.core import CallStarted, Direction, LoggedOff, LoggedOn, LogonFailed, Reason
from forum_bridge.errors import ConfigError, InvalidInputError, NotFoundError
from forum_bridge.service import BridgeService
from tests.conftest import FakeClock, SettingsFactory

ServiceFactory = Callable[[Settings], BridgeService]
POOL_LOGGER = "forum_bridge.service"


@pytest.fixture
def svc(make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str) -> BridgeService:
    """Three licences; lift (reserved) and four floating desk phones."""
    service = make_service(make_settings(**{"database.url": database_url, "licences.count": 3}))
    service.add_subscriber("lift", "90", reserved=True)
    for n in range(1, 5):
        service.add_subscriber(f"desk{n}", f"2{n}")
    return service


def log_on(svc: BridgeService, clock: FakeClock, *names: str) -> None:
    for name in names:
        svc.apply(LoggedOn(name, at=clock(), contact=f"sip:{name}@127.0.0.1:5060"))


def licences(svc: BridgeService) -> dict[str, int]:
    return dict(svc.status()["licences"])


def holders(svc: BridgeService) -> list[str]:
    return sorted(a["logon"] for a in svc.status()["assignments"])


def test_the_floating_pool_is_the_count_minus_the_reservations(svc: BridgeService, clock: FakeClock) -> None:
    log_on(svc, clock, "lift", "desk1", "desk2", "desk3")
    assert licences(svc) == {"total": 3, "used": 0, "free": 2, "reserved": 1}
    assert svc.authorize("desk1", "600").reason is Reason.LICENCE_ACQUIRED
    assert svc.authorize("desk2", "600").reason is Reason.LICENCE_ACQUIRED
    # One licence is still unheld, but it is the lift's: desk3 gets emergency calls only.
    assert svc.check("desk3", "600").reason is Reason.EMERGENCY_ONLY
    assert svc.authorize("desk3", "600").reason is Reason.EMERGENCY_ONLY
    assert svc.authorize("desk3", "112").reason is Reason.EMERGENCY
    assert licences(svc) == {"total": 3, "used": 2, "free": 0, "reserved": 1}
    # ... and the lift gets its licence at its first connection, inbound as well as outbound.
    assert svc.check("lift", "600", Direction.INBOUND).reason is Reason.LICENCE_ACQUIRED
    assert svc.authorize("lift", "90", Direction.INBOUND).reason is Reason.LICENCE_ACQUIRED
    assert svc.authorize("lift", "600").reason is Reason.LICENSED
    assert licences(svc) == {"total": 3, "used": 3, "free": 0, "reserved": 1}
    assert holders(svc) == ["desk1", "desk2", "lift"]


def test_status_shows_which_log_ons_are_reserved(svc: BridgeService) -> None:
    reserved = {s["logon"]: s["reserved"] for s in svc.status()["subscribers"]}
    assert reserved == {"desk1": False, "desk2": False, "desk3": False, "desk4": False, "lift": True}


def test_a_reserved_log_on_still_follows_every_other_rule(svc: BridgeService, clock: FakeClock) -> None:
    assert svc.authorize("lift", "600").reason is Reason.NOT_LOGGED_ON
    log_on(svc, clock, "lift")
    assert svc.authorize("lift", "600").reason is Reason.LICENCE_ACQUIRED
    svc.apply(LogonFailed("lift", at=clock()))
    assert svc.authorize("lift", "112").reason is Reason.LOGON_FAILED
    assert svc.authorize("lift", "600").reason is Reason.LOGON_FAILED
    assert "lift" not in holders(svc)
    log_on(svc, clock, "lift")  # a successful log-on clears the block
    assert svc.authorize("lift", "600").reason is Reason.LICENCE_ACQUIRED
    svc.apply(LoggedOff("lift", at=clock()))
    assert "lift" not in holders(svc)
    # Log-off freed it, but nobody else may take it: the floating pool is still two.
    log_on(svc, clock, "desk1", "desk2", "desk3")
    reasons = [svc.authorize(name, "600").reason for name in ("desk1", "desk2", "desk3")]
    assert reasons == [Reason.LICENCE_ACQUIRED, Reason.LICENCE_ACQUIRED, Reason.EMERGENCY_ONLY]


def test_reserving_more_than_the_count_is_refused_and_changes_nothing(
    svc: BridgeService, clock: FakeClock
) -> None:
    svc.set_reserved("desk1", True)
    svc.set_reserved("desk2", True)
    before = svc.status()["subscribers"]
    with pytest.raises(InvalidInputError, match="3 of 3 licences are reserved already"):
        svc.set_reserved("desk3", True)
    with pytest.raises(InvalidInputError, match="reserved already"):
        svc.add_subscriber("door", "91", reserved=True)
    with pytest.raises(InvalidInputError, match="reserved already"):
        svc.import_subscribers("door,91,default,yes\ngate,92\n")
    with pytest.raises(NotFoundError):
        svc.set_reserved("nobody", True)
    assert svc.status()["subscribers"] == before
    assert licences(svc)["reserved"] == 3
    assert [(a["kind"], a["logon"]) for a in svc.audit_log()] == [
        ("reserve", "desk2"),
        ("reserve", "desk1"),
        ("reserve", "lift"),
    ]
    assert svc.set_reserved("desk1", True) is False  # already reserved: nothing to do


def test_lowering_the_count_below_the_reservations_is_refused(
    svc: BridgeService, make_settings: SettingsFactory, clock: FakeClock, database_url: str
) -> None:
    svc.set_reserved("desk1", True)
    log_on(svc, clock, "desk2")
    svc.authorize("desk2", "600")
    smaller = BridgeService(make_settings(**{"database.url": database_url, "licences.count": 1}), clock=clock)
    try:
        with pytest.raises(
            ConfigError, match=r"licences.count: 1 is fewer than the 2 reserved .*desk1, lift"
        ):
            smaller.start()
        assert licences(svc) == {"total": 3, "used": 1, "free": 0, "reserved": 2}
        assert holders(svc) == ["desk2"]
        smaller.set_reserved("desk1", False)  # what the message says to do; then the count applies
        smaller.start()
        assert licences(svc)["total"] == 1
    finally:
        smaller.database.dispose()


def test_reserving_when_the_floating_pool_is_full_takes_over_a_floating_licence(
    svc: BridgeService, clock: FakeClock
) -> None:
    log_on(svc, clock, "desk1", "desk2", "desk3", "lift")
    svc.set_reserved("lift", False)
    for name in ("desk1", "desk2", "desk3"):
        assert svc.authorize(name, "600").reason is Reason.LICENCE_ACQUIRED
    for name in ("desk1", "desk3"):
        svc.apply(CallStarted(name, f"PJSIP/{name}-1", "600", Direction.OUTBOUND, clock()), enforce=False)
    svc.set_reserved("lift", True)  # every licence is held by a floating log-on
    assert svc.authorize("lift", "600").reason is Reason.LICENCE_ACQUIRED
    # desk2 is the one not in a call, so it loses its licence; the audit log says why.
    assert holders(svc) == ["desk1", "desk3", "lift"]
    release = next(a for a in svc.audit_log() if a["kind"] == "release")
    assert (release["logon"], release["reason"]) == ("desk2", "reserved")
    assert "reserved lift" in release["detail"]
    assert svc.authorize("desk2", "600").reason is Reason.EMERGENCY_ONLY


def test_unreserving_keeps_a_held_licence_and_grows_the_floating_pool(
    svc: BridgeService, clock: FakeClock
) -> None:
    log_on(svc, clock, "lift", "desk1", "desk2", "desk3")
    svc.authorize("lift", "600")
    assert svc.set_reserved("lift", False) is True
    assert holders(svc) == ["lift"]
    assert licences(svc) == {"total": 3, "used": 1, "free": 2, "reserved": 0}
    assert [svc.authorize(n, "600").reason for n in ("desk1", "desk2", "desk3")] == [
        Reason.LICENCE_ACQUIRED,
        Reason.LICENCE_ACQUIRED,
        Reason.EMERGENCY_ONLY,
    ]


def test_removing_a_reserved_log_on_gives_its_licence_to_the_pool(
    svc: BridgeService, clock: FakeClock
) -> None:
    svc.remove_subscriber("lift")
    assert licences(svc) == {"total": 3, "used": 0, "free": 3, "reserved": 0}


def test_csv_import_reserves_all_or_nothing(svc: BridgeService) -> None:
    with pytest.raises(InvalidInputError, match="line 2: reserved must be yes or no"):
        svc.import_subscribers("door,91,default,yes\ngate,92,default,maybe\n")
    assert svc.import_subscribers("door,91,,yes\ngate,92,default,no\nhall,93\n") == 3
    reserved = {s["logon"]: s["reserved"] for s in svc.status()["subscribers"]}
    assert (reserved["door"], reserved["gate"], reserved["hall"]) == (True, False, False)
    assert licences(svc)["reserved"] == 2


# --- pool pressure --------------------------------------------------------------------------------


def pool_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == POOL_LOGGER
        and r.getMessage().startswith("licence pool ")
        and r.levelno == logging.WARNING
    ]


@pytest.fixture
def pool(make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str) -> BridgeService:
    """Twenty floating licences, warn_at 80 %, 22 desk phones logged on."""
    service = make_service(
        make_settings(**{"database.url": database_url, "licences.count": 20, "licences.warn_at": 80})
    )
    service.import_subscribers("".join(f"d{n},{100 + n}\n" for n in range(22)))
    for n in range(22):
        service.apply(LoggedOn(f"d{n}", at=service.clock(), contact=f"sip:d{n}@h"))
    return service


def test_one_warning_when_the_pool_crosses_warn_at_and_one_when_it_falls_back(
    pool: BridgeService, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=POOL_LOGGER)
    for n in range(15):
        pool.authorize(f"d{n}", "600")
    assert pool_lines(caplog) == []  # 15 of 20: 75 %
    pool.authorize("d15", "600")  # 16 of 20: 80 %
    assert pool_lines(caplog) == [
        "licence pool above warn_at used=16 floating=20 percent=80 warn_at=80 reserved=0 total=20 node=pbx1"
    ]
    for _ in range(3):  # more calls, more licences, up to exhaustion: no more lines
        for n in range(22):
            pool.authorize(f"d{n}", "600")
    for n in range(5):  # down to 15 of 20: 75 %, not below 80 - 5 yet
        pool.apply(LoggedOff(f"d{n}", at=clock()))
    pool.authorize("d20", "600")  # and around the threshold: 16, then 15 again
    pool.apply(LoggedOff("d20", at=clock()))
    assert len(pool_lines(caplog)) == 1
    pool.apply(LoggedOff("d5", at=clock()))  # 14 of 20: 70 %
    assert pool_lines(caplog)[1:] == [
        "licence pool back below warn_at used=14 floating=20 percent=70 warn_at=80 reserved=0 total=20 node=pbx1"
    ]


def test_reservations_count_against_the_floating_pool_for_the_warning(
    pool: BridgeService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=POOL_LOGGER)
    for n in range(12):
        pool.authorize(f"d{n}", "600")
    pool.set_reserved("d20", True)
    pool.set_reserved("d21", True)  # 12 of the 18 floating: 67 %
    pool.authorize("d12", "600")  # 13 of 18: 72 %
    pool.set_reserved("d19", True)  # 13 of 17: 76 %
    assert pool_lines(caplog) == []
    pool.set_reserved("d18", True)  # 13 of 16: 81 %, without a single call
    assert pool_lines(caplog) == [
        "licence pool above warn_at used=13 floating=16 percent=81 warn_at=80 reserved=4 total=20 node=pbx1"
    ]


def test_bridges_sharing_a_pool_log_each_crossing_once_between_them(
    pool: BridgeService,
    make_settings: SettingsFactory,
    clock: FakeClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=POOL_LOGGER)
    other = BridgeService(
        make_settings(**{"database.url": database_url, "licences.count": 20, "node.name": "pbx2"}),
        clock=clock,
    )
    other.start()
    try:
        for n in range(22):
            (pool if n % 2 else other).authorize(f"d{n}", "600")
        other.reset_licences("test")
        for n in range(22):
            (other if n % 2 else pool).authorize(f"d{n}", "600")
        lines = pool_lines(caplog)
        assert [line.split(" used=")[0] for line in lines] == [
            "licence pool above warn_at",
            "licence pool back below warn_at",
            "licence pool above warn_at",
        ]
    finally:
        other.database.dispose()


def test_a_one_shot_command_leaves_the_warning_to_the_running_bridge(
    pool: BridgeService,
    make_settings: SettingsFactory,
    clock: FakeClock,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=POOL_LOGGER)
    for n in range(17):
        pool.authorize(f"d{n}", "600")
    assert len(pool_lines(caplog)) == 1
    cli_side = BridgeService(
        make_settings(**{"database.url": database_url, "licences.count": 20}), clock=clock, watch_pool=False
    )
    try:
        cli_side.reset_licences("cli")
        assert len(pool_lines(caplog)) == 1  # the command's log goes nowhere: it does not flip the flag
        pool.expire_keepalives()  # the running bridge's sweep finds the change
        assert pool_lines(caplog)[1].startswith("licence pool back below warn_at used=0 ")
    finally:
        cli_side.database.dispose()


def test_warn_at_zero_never_warns(
    make_settings: SettingsFactory,
    make_service: ServiceFactory,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=POOL_LOGGER)
    svc = make_service(make_settings(**{"licences.count": 1, "licences.warn_at": 0}))
    svc.add_subscriber("d0", "100")
    log_on(svc, clock, "d0")
    assert svc.authorize("d0", "600").reason is Reason.LICENCE_ACQUIRED
    assert pool_lines(caplog) == []


def test_warn_at_is_a_percentage(make_settings: SettingsFactory) -> None:
    with pytest.raises(
        ConfigError, match=r"licences.warn_at: must be a percentage from 0 \(off\) to 100, got 101"
    ):
        make_settings(**{"licences.warn_at": 101})
    assert make_settings().licence_warn_at == 80


def test_a_broken_warning_state_never_costs_a_call_its_licence(
    pool: BridgeService, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import text

    with pool.database.engine.begin() as connection:
        connection.execute(text("DROP TABLE pool_state"))
    caplog.set_level(logging.INFO, logger=POOL_LOGGER)
    for n in range(18):  # across warn_at: the warning cannot be kept, the calls go on
        assert pool.authorize(f"d{n}", "600").reason is Reason.LICENCE_ACQUIRED
    assert licences(pool)["used"] == 18
    assert pool_lines(caplog) == []
    assert "could not update the pool-pressure warning" in caplog.text
