"""Emergency numbers: the configured list, a country's numbers, and the outside-line prefix."""

from __future__ import annotations

import pytest

from forum_bridge.core import EmergencyNumbers


@pytest.mark.parametrize(
    ("dialled", "expected"),
    [
        ("112", True),
        ("110", True),
        ("0112", True),
        ("0110", True),
        ("1120", False),
        ("11", False),
        ("600", False),
        ("00112", False),
        ("0", False),
        ("", False),
        (" 112 ", True),
    ],
)
def test_list_with_outside_line_prefix(dialled: str, expected: bool) -> None:
    numbers = EmergencyNumbers.of(["110", "112"], outside_line_prefix="0")
    assert numbers.is_emergency(dialled) is expected


def test_without_prefix_0112_is_not_an_emergency_call() -> None:
    assert not EmergencyNumbers.of(["110", "112"]).is_emergency("0112")


@pytest.mark.parametrize(
    ("region", "number", "expected"),
    [
        ("US", "911", True),
        ("GB", "999", True),
        ("DE", "911", False),
        ("DE", "112", True),
        ("AT", "133", True),
    ],
)
def test_country_numbers_come_from_libphonenumber(region: str, number: str, expected: bool) -> None:
    assert EmergencyNumbers.of([], region=region).is_emergency(number) is expected


def test_all_numbers_lists_region_and_prefixed_forms_for_the_dialplan() -> None:
    numbers = EmergencyNumbers.of(["110"], region="GB", outside_line_prefix="9")
    listed = numbers.all_numbers()
    assert {"110", "112", "999", "9110", "9112", "9999"} <= set(listed)
    assert all(numbers.is_emergency(n) for n in listed)
