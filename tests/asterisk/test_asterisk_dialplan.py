"""The dialplan snippet: rendered from the settings; the shipped file is the rendered default."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from forum_bridge.adapters.asterisk.dialplan import REQUIRED_MODULES, UNAVAILABLE_CAUSE, render_dialplan
from forum_bridge.cli import main
from forum_bridge.config import load_settings

SHIPPED = Path(__file__).resolve().parents[2] / "dialplan" / "asterisk" / "forum_bridge.conf"


def context(text: str, name: str) -> str:
    """The lines of one ``[context]``."""
    match = re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
    assert match, f"no [{name}] context"
    return match.group(1)


def test_the_shipped_snippet_is_the_rendered_default() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == render_dialplan(load_settings(environ={}))


def test_the_cli_prints_the_same_snippet(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[emergency]\nnumbers = ["112", "110"]\n', encoding="utf-8")
    result = CliRunner().invoke(main, ["--config", str(config), "dialplan", "asterisk"], env={})
    assert result.exit_code == 0, result.output
    assert result.output == render_dialplan(load_settings(config, environ={}))


def steps_of(text: str) -> list[str]:
    """The applications of one context's lines, labels and extension heads removed."""
    return [
        re.sub(r"^\s*(exten => \w+,1|same => n(\(\w+\))?),", "", line)
        for line in text.splitlines()
        if "=>" in line
    ]


def test_emergency_calls_are_decided_before_and_without_the_hook() -> None:
    outbound = context(render_dialplan(load_settings(environ={})), "forum-bridge-outbound")
    steps = steps_of(outbound)
    classify = steps.index('GotoIf($["x${ARG1}" = "x110" | "x${ARG1}" = "x112"]?emergency)')
    agi = steps.index("AGI(${fb_agi}/outbound,${ARG1})")
    assert classify < agi
    # The emergency branch sets its answer and returns; nothing after the label asks the hook.
    emergency = steps_of(outbound.split("n(emergency),", 1)[1].split("\nexten => T", 1)[0])
    assert emergency == ["Set(FORUM_BRIDGE_REASON=emergency)", "Return()"]
    assert "DIALPLAN_EXISTS" not in render_dialplan(load_settings(environ={}))


def test_a_fresh_block_rejects_every_call_before_anything_else() -> None:
    outbound = context(render_dialplan(load_settings(environ={})), "forum-bridge-outbound")
    steps = steps_of(outbound)
    assert steps[:9] == [
        "Set(FORUM_BRIDGE_RESULT=)",
        "Set(FORUM_BRIDGE_REASON=)",
        'GotoIf($["${CHANNEL:0:6}" != "PJSIP/"]?classify)',
        "Set(LOCAL(fb_logon)=${CHANNEL:6:-9})",
        'GotoIf($["${DB(forum-bridge/blocked/${fb_logon})}" = ""]?classify)',
        "Set(LOCAL(fb_beat)=${DB(forum-bridge/heartbeat)})",
        'GotoIf($["${fb_beat}" = ""]?classify)',
        "GotoIf($[${EPOCH} - ${fb_beat} < 300]?blocked:classify)",
        "Set(FORUM_BRIDGE_RESULT=deny)",
    ]
    assert steps[10] == "Hangup(21)"
    assert re.search(r"n\(blocked\),Set\(FORUM_BRIDGE_RESULT=deny\)", outbound)


def test_block_stale_after_is_rendered_and_zero_means_blocks_never_go_stale() -> None:
    outbound = context(
        render_dialplan(load_settings(environ={}, overrides={"emergency.block_stale_after": 900})),
        "forum-bridge-outbound",
    )
    assert "GotoIf($[${EPOCH} - ${fb_beat} < 900]?blocked:classify)" in outbound
    never = context(
        render_dialplan(load_settings(environ={}, overrides={"emergency.block_stale_after": 0})),
        "forum-bridge-outbound",
    )
    assert "EPOCH" not in never and "heartbeat" not in never
    steps = steps_of(never)
    block = steps.index('GotoIf($["${DB(forum-bridge/blocked/${fb_logon})}" = ""]?classify)')
    assert steps[block + 1 : block + 4] == [
        "Set(FORUM_BRIDGE_RESULT=deny)",
        "Set(FORUM_BRIDGE_REASON=logon_failed)",
        "Hangup(21)",
    ]


def test_the_hook_is_bounded_inside_asterisk_in_both_routines() -> None:
    text = render_dialplan(load_settings(environ={}, overrides={"asterisk.hook_timeout": 1.5}))
    for name, script in (("forum-bridge-outbound", "outbound"), ("forum-bridge-inbound", "inbound")):
        body = context(text, name)
        steps = steps_of(body)
        agi = steps.index(f"AGI(${{fb_agi}}/{script},${{ARG1}})")
        assert steps[agi - 3 : agi] == [
            "Set(LOCAL(fb_timeout)=${TIMEOUT(absolute)})",
            "Set(LOCAL(AGIEXITONHANGUP)=yes)",
            "Set(TIMEOUT(absolute)=1.5)",
        ]
        assert steps[agi + 1] == "Set(TIMEOUT(absolute)=${fb_timeout})"
        # The core jumps to T when the timeout fires: put the caller's timeout back, then decide.
        assert re.search(
            r"^exten => T,1,Set\(TIMEOUT\(absolute\)=\$\{fb_timeout\}\)\n same => n,Goto\(s,decide\)$",
            body,
            re.M,
        )
        assert re.search(r"same => n\(decide\),", body)


def test_the_outbound_fallback_follows_the_fail_mode_after_the_answer_is_read() -> None:
    outbound = context(render_dialplan(load_settings(environ={})), "forum-bridge-outbound")
    steps = steps_of(outbound)
    decide = steps.index('GotoIf($["${FORUM_BRIDGE_RESULT}" = "allow"]?allow)')
    assert steps[decide : decide + 6] == [
        'GotoIf($["${FORUM_BRIDGE_RESULT}" = "allow"]?allow)',
        'GotoIf($["${FORUM_BRIDGE_RESULT}" = "deny" & "${FORUM_BRIDGE_REASON}" != "bridge_error"]?deny)',
        "Set(FORUM_BRIDGE_REASON=bridge_unavailable)",
        f"Hangup({UNAVAILABLE_CAUSE})",
        "Return()",
        "Hangup(21)",
    ]


def test_the_inbound_routine_clears_and_asks() -> None:
    inbound = context(render_dialplan(load_settings(environ={})), "forum-bridge-inbound")
    steps = steps_of(inbound)
    assert steps[0] == "Set(FORUM_BRIDGE_DIAL=)"
    assert "AGI(${fb_agi}/inbound,${ARG1})" in steps
    # Without a complete "allow" answer the dial string is emptied again.
    decide = steps.index('GotoIf($["${FORUM_BRIDGE_RESULT}" = "allow"]?done)')
    assert steps[decide + 1] == "Set(FORUM_BRIDGE_DIAL=)"
    assert steps[decide + 5] == "Return()"


def test_emergency_numbers_come_from_the_configuration_with_the_outside_line_prefix() -> None:
    settings = load_settings(
        environ={},
        overrides={"emergency.numbers": ["112", "110", "19222"], "emergency.outside_line_prefix": "0"},
    )
    outbound = context(render_dialplan(settings), "forum-bridge-outbound")
    test = re.search(r"n\(classify\),GotoIf\(\$\[(.*)\]\?emergency\)", outbound)
    assert test is not None
    numbers = re.findall(r'"x\$\{ARG1\}" = "x([^"]*)"', test.group(1))
    assert numbers == ["110", "112", "0110", "0112", "19222", "019222"]


# What each application or function the snippet may use needs: None = the Asterisk core.
NEEDS = {
    "Set": None,
    "GotoIf": None,
    "Goto": None,
    "Hangup": None,
    "NoOp": None,
    "Return": "app_stack",
    "LOCAL": "app_stack",
    "AGI": "res_agi",
    "DB": "func_db",
    "TIMEOUT": "func_timeout",
}


def test_every_module_the_snippet_uses_is_in_the_checked_list_and_the_header() -> None:
    for fail_mode in ("closed", "open"):
        text = render_dialplan(load_settings(environ={}, overrides={"asterisk.fail_mode": fail_mode}))
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(";"))
        used = set(re.findall(r"([A-Za-z_]+)\(", re.sub(r"same => n\(\w+\)", "", body)))
        assert used <= set(NEEDS), f"unknown application or function: {used - set(NEEDS)}"
        needed = {NEEDS[name] for name in used} - {None}
        checked = {name for name, _ in REQUIRED_MODULES}
        assert needed | {"pbx_config"} == checked
        for module in checked:
            assert re.search(rf"^;\s+{module}\s", text, re.M), f"{module} not named in the header"


def test_fail_mode_open_lets_other_calls_through() -> None:
    settings = load_settings(environ={}, overrides={"asterisk.fail_mode": "open"})
    outbound = context(render_dialplan(settings), "forum-bridge-outbound")
    assert " same => n,Goto(allow)" in outbound
    assert f"Hangup({UNAVAILABLE_CAUSE})" not in outbound


def test_the_default_agi_address_follows_the_hook_settings() -> None:
    def default(host: str, port: int) -> str:
        settings = load_settings(environ={}, overrides={"asterisk.agi_host": host, "asterisk.agi_port": port})
        return re.findall(r"Set\(LOCAL\(fb_agi\)=(agi://[^)]*)\)", render_dialplan(settings))[0]

    assert default("10.1.2.3", 4600) == "agi://10.1.2.3:4600"
    assert default("0.0.0.0", 4573) == "agi://127.0.0.1:4573"
    assert default("::1", 4573) == "agi://[::1]:4573"


def test_with_enforce_both_a_licensed_log_on_is_answered_locally_after_blocks_and_emergencies() -> None:
    outbound = context(render_dialplan(load_settings(environ={})), "forum-bridge-outbound")
    steps = steps_of(outbound)
    blocked = steps.index('GotoIf($["${DB(forum-bridge/blocked/${fb_logon})}" = ""]?classify)')
    classify = steps.index('GotoIf($["x${ARG1}" = "x110" | "x${ARG1}" = "x112"]?emergency)')
    local = steps.index('GotoIf($["${DB(forum-bridge/licensed/${CHANNEL:6:-9})}" = ""]?hook)')
    agi = steps.index("AGI(${fb_agi}/outbound,${ARG1})")
    assert blocked < classify < local < agi
    # Only a PJSIP channel with an entry and a fresh heartbeat (90 s: tighter than 300) is answered
    # here, with what the hook would set; anything else goes on to the hook.
    assert steps[local - 1 : local + 7] == [
        'GotoIf($["${CHANNEL:0:6}" != "PJSIP/"]?hook)',
        'GotoIf($["${DB(forum-bridge/licensed/${CHANNEL:6:-9})}" = ""]?hook)',
        "Set(LOCAL(fb_beat)=${DB(forum-bridge/heartbeat)})",
        'GotoIf($["${fb_beat}" = ""]?hook)',
        "GotoIf($[${EPOCH} - ${fb_beat} < 90]?licensed:hook)",
        "Set(FORUM_BRIDGE_RESULT=allow)",
        "Set(FORUM_BRIDGE_REASON=licensed)",
        "Return()",
    ]
    assert re.search(r"n\(licensed\),Set\(FORUM_BRIDGE_RESULT=allow\)", outbound)
    assert re.search(r"n\(hook\),Set\(LOCAL\(fb_agi\)=", outbound)
    # The inbound routine always asks: who may ring is decided per log-on of the number.
    assert "licensed" not in context(render_dialplan(load_settings(environ={})), "forum-bridge-inbound")


def test_the_local_answer_goes_stale_with_the_tighter_bound() -> None:
    def bound(stale_after: int) -> list[str]:
        settings = load_settings(environ={}, overrides={"emergency.block_stale_after": stale_after})
        return re.findall(r"< (\d+)\]\?licensed:hook", render_dialplan(settings))

    assert bound(60) == ["60"]
    assert bound(900) == ["90"]


def test_without_enforce_both_or_a_heartbeat_every_call_asks_the_hook() -> None:
    for overrides in (
        {"asterisk.enforce": "hook"},
        {"asterisk.enforce": "ami"},
        {"emergency.block_stale_after": 0},
    ):
        text = render_dialplan(load_settings(environ={}, overrides=overrides))
        assert "forum-bridge/licensed" not in text, overrides
        assert "?licensed" not in text and "n(hook)" in text
