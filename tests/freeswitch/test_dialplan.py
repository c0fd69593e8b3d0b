"""The XML dialplan: emergency numbers are decided in FreeSWITCH; everything else asks the socket hook.

What the snippet does on the real FreeSWITCH (answer times, refusals, ringing) is tested end to end
in ``tests/e2e/test_freeswitch_emergency.py``; these tests check the rendering.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from forum_bridge.adapters.freeswitch import render_dialplan
from forum_bridge.adapters.freeswitch.dialplan import alive_buckets
from forum_bridge.config import Settings, load_settings
from forum_bridge.errors import ConfigError

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
    assert all(a.get("inline") == "true" for a in exts[0].iter("action"))


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


def test_the_hook_runs_the_socket_bounded_by_a_scheduled_transfer_then_routes_again() -> None:
    hook = extensions(render_dialplan(settings(**{"freeswitch.socket_port": 9099})))[1]
    assert condition(hook, "${forum_bridge_verdict}").pattern == "^$"
    assert actions(hook) == [
        ("set", "forum_bridge_verdict=unreachable"),
        ("set", "socket_resume=true"),
        ("sched_transfer", "+2 ${destination_number} XML ${context}"),
        ("set", "forum_bridge_timer=${last_sched_id}"),
        ("socket", "127.0.0.1:9099 async full"),
        # Only this task: an operator's own sched_hangup (call time limit) must survive.
        ("sched_cancel", "${forum_bridge_timer}"),
        ("transfer", "${destination_number} XML ${context}"),
    ]


def test_the_hook_timeout_is_a_setting_in_whole_seconds_from_two() -> None:
    hook = extensions(render_dialplan(settings(**{"freeswitch.hook_timeout": 5})))[1]
    assert ("sched_transfer", "+5 ${destination_number} XML ${context}") in actions(hook)
    for bad in (1, 31):
        with pytest.raises(ConfigError, match=r"freeswitch\.hook_timeout"):
            settings(**{"freeswitch.hook_timeout": bad})


def test_a_blocked_log_on_is_looked_up_in_mod_hash_by_its_authenticated_name() -> None:
    exts = {e.get("name"): e for e in extensions(render_dialplan(settings()))}
    lookup = exts["forum_bridge_emergency_lookup"]
    assert lookup.get("continue") == "true"
    assert all(a.get("inline") == "true" for a in lookup.iter("action"))
    looked_up = dict(data.split("=", 1) for _app, data in actions(lookup))
    assert looked_up["forum_bridge_now"] == "${strepoch()}"
    assert looked_up["forum_bridge_blocked"] == "${hash(select/forum_bridge/blocked_${forum_bridge_caller})}"
    caller = exts["forum_bridge_emergency_caller"]
    assert condition(caller, "${sip_auth_username}").pattern == "^(.+)$"
    steps = [
        (a.tag, a.get("data"), a.get("inline")) for a in caller.iter() if a.tag in ("action", "anti-action")
    ]
    assert steps == [
        ("action", "forum_bridge_caller=$1", "true"),
        ("anti-action", "forum_bridge_caller=${user_name}", "true"),
    ]
    assert looked_up["forum_bridge_alive"] == (
        "${hash(select/forum_bridge/alive_${forum_bridge_now:0:8})}${hash(select/forum_bridge/alive_forever)}"
    )
    blocked = exts["forum_bridge_emergency_blocked"]
    # Exact values only: without mod_hash a lookup answers "-ERR ...", which must block nobody.
    assert condition(blocked, "${forum_bridge_blocked}").pattern == "^yes$"
    assert condition(blocked, "${forum_bridge_alive}").pattern == "^yes$"
    assert not condition(blocked, "${forum_bridge_blocked}").search("-ERR hash Command not found!")
    assert ("hangup", "CALL_REJECTED") in actions(blocked)
    names = list(exts)
    assert names.index("forum_bridge_emergency") < names.index("forum_bridge_emergency_caller")
    assert names.index("forum_bridge_emergency_caller") < names.index("forum_bridge_emergency_lookup")
    assert names.index("forum_bridge_emergency_lookup") < names.index("forum_bridge_emergency_blocked")


def test_heartbeat_buckets_cover_now_to_now_plus_block_stale_after() -> None:
    now = 1_796_291_554  # bucket 17962915, as the dialplan reads ${strepoch()}'s first 8 digits
    assert str(now)[:8] == str(now // 100)
    assert alive_buckets(now, 300) == [f"alive_{b}" for b in range(17962915, 17962919)]
    assert alive_buckets(now, 60) == ["alive_17962915", "alive_17962916"]
    assert alive_buckets(now, 0) == ["alive_forever"]


def test_the_inbound_hook_asks_with_its_own_socket_path_and_is_bounded() -> None:
    exts = {e.get("name"): e for e in extensions(render_dialplan(settings()))}
    inbound = exts["forum-bridge-inbound"]
    assert condition(inbound, "destination_number").search("forum-bridge-inbound")
    assert not condition(inbound, "destination_number").search("21")
    steps = actions(inbound)
    assert ("socket", "127.0.0.1:8084/inbound async full") in steps
    assert ("sched_transfer", "+2 ${forum_bridge_return}") in steps
    assert steps.index(("set", "forum_bridge_dial=")) < steps.index(
        ("socket", "127.0.0.1:8084/inbound async full")
    )
    back = exts["forum_bridge_return"]
    assert actions(back) == [("set", "forum_bridge_return=${destination_number} XML ${context}")]
    # The lookup itself must never overwrite where it returns to, nor be sent to the outbound hook.
    assert not condition(back, "destination_number").search("forum-bridge-inbound")
    assert not condition(exts["forum_bridge_hook"], "destination_number").search("forum-bridge-inbound")


def test_a_wildcard_listen_address_is_reached_on_loopback() -> None:
    hook = extensions(render_dialplan(settings(**{"freeswitch.socket_host": "0.0.0.0"})))[1]
    assert ("socket", "127.0.0.1:8084 async full") in actions(hook)


@pytest.mark.parametrize(("fail_mode", "hangs_up"), [("closed", True), ("open", False)])
def test_an_unreachable_bridge_follows_fail_mode(fail_mode: str, hangs_up: bool) -> None:
    exts = extensions(render_dialplan(settings(**{"freeswitch.fail_mode": fail_mode})))
    unreachable = next(e for e in exts if e.get("name") == "forum_bridge_unreachable")
    assert condition(unreachable, "${forum_bridge_verdict}").search("unreachable")
    assert (("hangup", "NORMAL_TEMPORARY_FAILURE") in actions(unreachable)) is hangs_up  # SIP 503
    assert (unreachable.get("continue") == "true") is not hangs_up
    denied = next(e for e in exts if e.get("name") == "forum_bridge_denied")
    assert actions(denied) == [("hangup", "CALL_REJECTED")]


def test_numbers_with_regex_characters_are_escaped() -> None:
    xml = render_dialplan(settings(**{"emergency.numbers": ["112", "*112", "+49112"]}))
    emergency = condition(extensions(xml)[0], "destination_number")
    assert emergency.search("*112") and emergency.search("+49112")
    assert not emergency.search("49112") and not emergency.search("x112")


def test_enforce_esl_routes_placed_calls_without_asking_the_hook() -> None:
    """With enforce = esl no hook server runs, so placed calls must not wait on one (or fail closed)."""
    exts = {e.get("name"): e for e in extensions(render_dialplan(settings(**{"freeswitch.enforce": "esl"})))}
    assert "forum_bridge_hook" not in exts
    assert "forum_bridge_emergency_blocked" in exts  # the in-dialplan emergency rule stays
    both = {e.get("name") for e in extensions(render_dialplan(settings(**{"freeswitch.enforce": "both"})))}
    assert "forum_bridge_hook" in both
