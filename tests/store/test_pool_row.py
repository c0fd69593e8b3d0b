"""The licence pool's row (``licence_pool``) always equals a full count of the pool.

Taking a licence checks and counts the floating pool in that one row instead of counting the
licence rows, so the row must stay exact through everything that changes who holds a licence or
how many are reserved: calls on two nodes, log-offs, failed log-ons, keepalive expiry, the expiry
of a node that went silent, resyncs, resets, (un)reservations, subscribers added and removed, and a
new ``licences.count``. A random sequence of all of these (hypothesis, fixed seed) is applied, and
after every step the row is compared with a count of the licence rows, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from forum_bridge.config import Settings
from forum_bridge.core import LoggedOff, LoggedOn, LogonFailed, Reason
from forum_bridge.errors import AlreadyExistsError, ConfigError, InvalidInputError, NotFoundError
from forum_bridge.service import BridgeService
from forum_bridge.store.operations import Registration
from tests.conftest import FakeClock, SettingsFactory

ServiceFactory = Callable[[Settings], BridgeService]
LOGONS = [f"s{i}" for i in range(8)]
KINDS = [
    "logon",
    "logon_node2",
    "call",
    "call_node2",
    "emergency",
    "logoff",
    "failed",
    "reserve",
    "unreserve",
    "reset",
    "count",
    "silence",
    "resync",
    "remove",
    "add",
]
# Written here on purpose rather than taken from the store: the test must not trust the code it checks.
FULL_COUNT = text(
    "SELECT (SELECT count(*) FROM licences),"
    " (SELECT count(*) FROM licences WHERE logon IS NOT NULL),"
    " (SELECT count(*) FROM subscribers WHERE reserved),"
    " (SELECT count(*) FROM licences l JOIN subscribers s ON s.logon = l.logon WHERE s.reserved)"
)
ROW = text("SELECT total, used, reserved, reserved_used FROM licence_pool")


def pool_row_and_count(service: BridgeService) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    with service.database.engine.connect() as connection:
        rows = [tuple(r) for r in connection.execute(ROW)]
        counted = tuple(connection.execute(FULL_COUNT).one())
    return rows, counted


@settings(
    max_examples=12,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 7)), min_size=10, max_size=30))
def test_the_pool_row_equals_a_full_count_after_any_sequence_of_changes(
    steps: list[tuple[str, int]],
    pool_services: tuple[BridgeService, BridgeService, Callable[[int], BridgeService]],
    clock: FakeClock,
) -> None:
    one, two, recount = pool_services
    start_afresh(one, two, recount)
    for kind, i in steps:
        logon = LOGONS[i]
        try:
            if kind == "logon":
                one.apply(LoggedOn(logon, at=clock(), contact=f"sip:{logon}@127.0.0.1:5060"))
            elif kind == "logon_node2":
                two.apply(LoggedOn(logon, at=clock(), contact=f"sip:{logon}@127.0.0.2:5060"))
            elif kind in ("call", "call_node2", "emergency"):
                service = two if kind == "call_node2" else one
                service.authorize(logon, "112" if kind == "emergency" else "600")
            elif kind == "logoff":
                one.apply(LoggedOff(logon, at=clock()))
            elif kind == "failed":
                one.apply(LogonFailed(logon, at=clock()))
            elif kind in ("reserve", "unreserve"):
                one.set_reserved(logon, kind == "reserve")
            elif kind == "reset":
                one.reset_licences("test")
            elif kind == "count":
                recount(1 + i % 6)
            elif kind == "silence":
                # Past every keepalive and node.dead_after: this node's contacts expire, and, once
                # node 2 has been silent long enough, its contacts and calls too.
                two.expire_keepalives()
                one.expire_keepalives()
                clock.advance(100 + 20 * i)
                one.expire_keepalives()
            elif kind == "resync":
                keep = [r for r in LOGONS if int(r[1:]) % 3 == i % 3]
                one.resync([Registration(r, f"sip:{r}@127.0.0.1:5060") for r in keep], [])
            elif kind == "remove":
                one.remove_subscriber(logon)
            elif kind == "add":
                one.add_subscriber(logon, f"{100 + i}", reserved=i % 2 == 1)
        except (AlreadyExistsError, ConfigError, InvalidInputError, NotFoundError):
            pass  # refused with nothing changed: the row must still be exact
        rows, counted = pool_row_and_count(one)
        assert rows == [counted], f"after {kind} {logon}: row {rows}, counted {counted}"


def start_afresh(one: BridgeService, two: BridgeService, recount: Callable[[int], BridgeService]) -> None:
    """Every example starts from the same state: four free licences, eight log-ons, s1 and s3 reserved."""
    recount(4)
    one.reset_licences("test")
    one.resync([], [])
    two.resync([], [])
    for i, logon in enumerate(LOGONS):
        with contextlib.suppress(AlreadyExistsError):
            one.add_subscriber(logon, f"{100 + i}")
        one.set_reserved(logon, False)
    for i, logon in enumerate(LOGONS):
        one.set_reserved(logon, i in (1, 3))
        one.apply(LoggedOn(logon, at=one.clock(), contact=f"sip:{logon}@127.0.0.1:5060"))
    one.resync([], [])  # logged off again, but "logged on once": no failed log-on left
    rows, counted = pool_row_and_count(one)
    assert rows == [counted] == [(4, 0, 2, 0)]


@pytest.fixture
def pool_services(
    make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str, clock: FakeClock
) -> tuple[BridgeService, BridgeService, Callable[[int], BridgeService]]:
    """Two nodes on one database, four licences, eight log-ons (s1 and s3 reserved)."""
    one = make_service(make_settings(**{"database.url": database_url, "licences.count": 4}))
    two = make_service(
        make_settings(**{"database.url": database_url, "licences.count": 4, "node.name": "pbx2"})
    )
    for i, logon in enumerate(LOGONS):
        one.add_subscriber(logon, f"{100 + i}", reserved=i in (1, 3))

    def recount(count: int) -> BridgeService:
        # A restart with another licences.count: slots are added or removed at start.
        service = BridgeService(
            make_settings(**{"database.url": database_url, "licences.count": count}),
            one.database,
            clock=clock,
        )
        service.sync_configuration()
        return service

    return one, two, recount


def test_a_reserved_log_on_still_takes_over_a_floating_licence_through_the_row(
    pool_services: tuple[BridgeService, BridgeService, Callable[[int], BridgeService]],
    clock: FakeClock,
) -> None:
    """The row says the pool is full; a reserved log-on still gets its licence, a floating one not."""
    one, _two, _recount = pool_services
    for logon in ("s0", "s2", "s4", "s5", "s1"):
        one.apply(LoggedOn(logon, at=clock(), contact=f"sip:{logon}@127.0.0.1:5060"))
    for logon in ("s0", "s2"):  # the floating pool: 4 licences - 2 reserved
        assert one.authorize(logon, "600").reason is Reason.LICENCE_ACQUIRED
    assert one.authorize("s4", "600").reason is Reason.EMERGENCY_ONLY
    one.set_reserved("s1", False)  # three floating now, and room for s4
    assert one.authorize("s4", "600").reason is Reason.LICENCE_ACQUIRED
    one.set_reserved("s1", True)  # two floating again, held by three: s5 must wait
    assert one.authorize("s5", "600").reason is Reason.EMERGENCY_ONLY
    one.set_reserved("s5", True)  # reserved now: it takes the last free licence
    assert one.authorize("s5", "600").reason is Reason.LICENCE_ACQUIRED
    assert one.authorize("s1", "600").reason is Reason.LICENCE_ACQUIRED  # none free: taken over
    holders = {a["logon"] for a in one.status()["assignments"]}
    assert {"s1", "s5"} <= holders and len(holders & {"s0", "s2", "s4"}) == 2
    rows, counted = pool_row_and_count(one)
    assert rows == [counted] == [(4, 4, 3, 2)]


def test_the_pool_row_stays_exact_while_reservations_change_under_calls(
    pool_services: tuple[BridgeService, BridgeService, Callable[[int], BridgeService]],
    clock: FakeClock,
) -> None:
    """Calls and log-offs on two nodes run while an administrator reserves and unreserves log-ons.

    On PostgreSQL the reservation changes wait for the licence changes in flight (and keep new ones
    out) before they recount the row; on SQLite writers take turns anyway. Either way the row ends
    equal to a full count, and never more licences are held than there are.
    """
    one, two, _recount = pool_services
    for logon in LOGONS:
        one.apply(LoggedOn(logon, at=clock(), contact=f"sip:{logon}@127.0.0.1:5060"))
    errors: list[BaseException] = []

    def caller(service: BridgeService, logons: list[str]) -> None:
        try:
            for round_ in range(15):
                for logon in logons:
                    service.authorize(logon, "600")
                    if round_ % 2:
                        service.apply(LoggedOff(logon, at=clock()))
                        service.apply(LoggedOn(logon, at=clock(), contact=f"sip:{logon}@127.0.0.1:5060"))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    def administrator() -> None:
        try:
            for round_ in range(15):
                for logon in ("s5", "s6"):
                    with contextlib.suppress(InvalidInputError):
                        one.set_reserved(logon, round_ % 2 == 0)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=caller, args=(one, LOGONS[:4])),
        threading.Thread(target=caller, args=(two, LOGONS[4:])),
        threading.Thread(target=administrator),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    rows, counted = pool_row_and_count(one)
    assert rows == [counted]
    total, used, _reserved, _reserved_used = counted
    assert 0 < used <= total
