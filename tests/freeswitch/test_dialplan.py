"""The XML dialplan: emergency numbers pass without the bridge; everything else asks the socket hook."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from forum_bridge.adapters.freeswitch import render_dialplan
from forum_bridge.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def settings(**overrides: object) -> Settings:
    return load_settings(environ={}, overrides=overrides)


def extensions(xml: str) -> list[ET.Element]:
    return ET.fromstring(xml.encode()).findall("extension")


def actions(extension: ET.Element) -> list[tuple[str, str]]:
    return [(a.get("application", ""), a.get("data", "")) for a in extension.iter("action")]


def condition(extension: ET.Element, field: str) -> re.Pattern[str]:
    found = next(c for c in extension.iter("condition") if c.get("field") == field)
    return re.compile(found.get("expression", ""))


def test_the_shipped_file_is_the_rendered_default() -> None:
    shipped = (ROOT / "dialplan" / "freeswitch" / "forum_bridge.xml").read_text()
    assert shipped == render_dialplan(settings())


def test_the_emergency_extension_comes_first_and_has_no_socket() -> None:
    exts = extensions(render_dialplan(settings()))
    names = [e.get("name") for e in exts]
    assert names[0] == "forum_bridge_emergency"
    socket_at = next(i for i, e in enumerate(exts) if any(app == "socket" for app, _ in actions(e)))
    assert socket_at > 0
    assert all(app != "socket" for app, _ in actions(exts[0]))
    assert exts[0].get("continue") == "true"  # the rest of the dialplan routes the call
    assert actions(exts[0]) == [("set", "forum_bridge_verdict=emergency")]


def test_every_configured_emergency_number_matches_and_others_do_not() -> None:
    configured = settings(**{"emergency.region": "DE", "emergency.outside_line_prefix": "0"})
    numbers = configured.emergency.all_numbers()
    assert {"110", "112", "0110", "0112"} <= set(numbers)
    exts = extensions(render_dialplan(configured))
    emergency = condition(exts[0], "destination_number")
    hook = next(e for e in exts if any(app == "socket" for app, _ in actions(e)))
    to_hook = condition(hook, "destination_number")
    for number in numbers:
        assert emergency.search(number), number
        assert not to_hook.search(number), number  # never sent to the socket, even without inline set
    for number in ("600", "1120", "11", "0600", "9112"):
        assert not emergency.search(number), number
        assert to_hook.search(number), number


def test_the_hook_runs_the_socket_with_resume_then_routes_again() -> None:
    hook = extensions(render_dialplan(settings(**{"freeswitch.socket_port": 9099})))[1]
    assert condition(hook, "${forum_bridge_verdict}").pattern == "^$"
    assert actions(hook) == [
        ("set", "forum_bridge_verdict=unreachable"),
        ("set", "socket_resume=true"),
        ("socket", "127.0.0.1:9099 async full"),
        ("transfer", "${destination_number} XML ${context}"),
    ]


def test_a_wildcard_listen_address_is_reached_on_loopback() -> None:
    hook = extensions(render_dialplan(settings(**{"freeswitch.socket_host": "0.0.0.0"})))[1]
    assert ("socket", "127.0.0.1:8084 async full") in actions(hook)


@pytest.mark.parametrize(("fail_mode", "hangs_up"), [("closed", True), ("open", False)])
def test_an_unreachable_bridge_follows_fail_mode(fail_mode: str, hangs_up: bool) -> None:
    exts = extensions(render_dialplan(settings(**{"freeswitch.fail_mode": fail_mode})))
    unreachable = next(e for e in exts if e.get("name") == "forum_bridge_unreachable")
    assert condition(unreachable, "${forum_bridge_verdict}").search("unreachable")
    assert (("hangup", "CALL_REJECTED") in actions(unreachable)) is hangs_up
    assert (unreachable.get("continue") == "true") is not hangs_up
    denied = next(e for e in exts if e.get("name") == "forum_bridge_denied")
    assert actions(denied) == [("hangup", "CALL_REJECTED")]


def test_numbers_with_regex_characters_are_escaped() -> None:
    xml = render_dialplan(settings(**{"emergency.numbers": ["112", "*112", "+49112"]}))
    emergency = condition(extensions(xml)[0], "destination_number")
    assert emergency.search("*112") and emergency.search("+49112")
    assert not emergency.search("49112") and not emergency.search("x112")
