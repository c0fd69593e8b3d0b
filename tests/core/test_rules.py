"""Every row of the Forum decision table, and the keepalive clock, as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import product

import pytest

from forum_bridge.core import Decision, Direction, LogonState, Reason, decide_call, keepalive_expired

OUT, IN = Direction.OUTBOUND, Direction.INBOUND


def state(
    *, logged_on: bool = True, failed: bool = False, licensed: bool = False, managed: bool = True
) -> LogonState:
    return LogonState(managed=managed, logged_on=logged_on, last_logon_failed=failed, holds_licence=licensed)


def decide(
    s: LogonState,
    *,
    direction: Direction = OUT,
    emergency: bool = False,
    free: bool = True,
    block: bool = True,
) -> Decision:
    return decide_call(
        s, direction=direction, is_emergency=emergency, licence_free=free, block_after_failed_logon=block
    )


def test_row1_failed_logon_blocks_every_call_even_emergency() -> None:
    for emergency, free, licensed, direction in product(
        [True, False], [True, False], [True, False], [OUT, IN]
    ):
        d = decide(state(failed=True, licensed=licensed), direction=direction, emergency=emergency, free=free)
        assert d == Decision(False, Reason.LOGON_FAILED)


def test_row1_can_be_switched_off_then_emergency_passes() -> None:
    d = decide(state(failed=True, logged_on=False), emergency=True, block=False)
    assert d == Decision(True, Reason.EMERGENCY)


def test_row2_emergency_allowed_without_licence_and_without_log_on() -> None:
    for logged_on, free in product([True, False], [True, False]):
        d = decide(state(logged_on=logged_on), emergency=True, free=free)
        assert d == Decision(True, Reason.EMERGENCY, takes_licence=False)


def test_row2_does_not_apply_to_calls_towards_the_log_on() -> None:
    d = decide(state(), direction=IN, emergency=True, free=False)
    assert d == Decision(False, Reason.EMERGENCY_ONLY)


def test_row3_not_logged_on_is_denied_both_ways() -> None:
    for direction in (OUT, IN):
        assert decide(state(logged_on=False), direction=direction) == Decision(False, Reason.NOT_LOGGED_ON)


def test_row4_licence_holder_keeps_its_licence() -> None:
    for direction, free in product([OUT, IN], [True, False]):
        d = decide(state(licensed=True), direction=direction, free=free)
        assert d == Decision(True, Reason.LICENSED, takes_licence=False)


def test_row5_free_licence_is_taken() -> None:
    for direction in (OUT, IN):
        assert decide(state(), direction=direction, free=True) == Decision(
            True, Reason.LICENCE_ACQUIRED, True
        )


def test_row6_pool_full_means_emergency_only() -> None:
    for direction in (OUT, IN):
        assert decide(state(), direction=direction, free=False) == Decision(False, Reason.EMERGENCY_ONLY)


def test_unmanaged_log_ons_are_left_alone() -> None:
    for failed, free, emergency in product([True, False], [True, False], [True, False]):
        d = decide(state(managed=False, failed=failed, logged_on=False), free=free, emergency=emergency)
        assert d == Decision(True, Reason.UNMANAGED)


@pytest.mark.parametrize(
    ("elapsed", "expired"),
    [(0, False), (60, False), (65, False), (65.001, True), (3600, True)],
)
def test_keepalive_expires_after_interval_plus_grace(elapsed: float, expired: bool) -> None:
    last = datetime(2026, 1, 1, tzinfo=UTC)
    assert keepalive_expired(last + timedelta(seconds=elapsed), last, 60, 5) is expired


def test_decision_as_dict_is_json_ready() -> None:
    assert Decision(False, Reason.EMERGENCY_ONLY).as_dict() == {
        "allowed": False,
        "reason": "emergency_only",
        "takes_licence": False,
    }
