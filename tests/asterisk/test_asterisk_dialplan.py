"""The dialplan snippet: rendered from the settings; the shipped file is the rendered default."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from forum_bridge.adapters.asterisk.dialplan import UNAVAILABLE_CAUSE, render_dialplan
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


def test_the_outbound_routine_asks_first_and_falls_back_only_without_an_answer() -> None:
    text = render_dialplan(load_settings(environ={}))
    outbound = context(text, "forum-bridge-outbound")
    steps = [
        re.sub(r"^\s*(exten => s,1|same => n(\(\w+\))?),", "", line)
        for line in outbound.splitlines()
        if "=>" in line
    ]
    assert steps == [
        "Set(LOCAL(fb_agi)=${FORUM_BRIDGE_AGI})",
        'GotoIf($["${fb_agi}" != ""]?ask)',
        "Set(LOCAL(fb_agi)=agi://127.0.0.1:4573)",
        "Set(FORUM_BRIDGE_RESULT=)",
        "Set(FORUM_BRIDGE_REASON=)",
        "AGI(${fb_agi}/outbound,${ARG1})",
        'GotoIf($["${FORUM_BRIDGE_RESULT}" = "allow"]?allow)',
        'GotoIf($["${FORUM_BRIDGE_RESULT}" = "deny"]?deny)',
        "Set(FORUM_BRIDGE_REASON=bridge_unavailable)",
        "GotoIf(${DIALPLAN_EXISTS(forum-bridge-emergency,${ARG1},1)}?allow)",
        f"Hangup({UNAVAILABLE_CAUSE})",
        "Return()",
        "Hangup(21)",
    ]
    labels = re.findall(r"n\((\w+)\)", outbound)
    assert labels == ["ask", "allow", "deny"]


def test_the_inbound_routine_clears_and_asks() -> None:
    inbound = context(render_dialplan(load_settings(environ={})), "forum-bridge-inbound")
    assert "Set(FORUM_BRIDGE_DIAL=)" in inbound
    assert "AGI(${fb_agi}/inbound,${ARG1})" in inbound
    assert inbound.rstrip().endswith("Return()")


def test_emergency_numbers_come_from_the_configuration_with_the_outside_line_prefix() -> None:
    settings = load_settings(
        environ={},
        overrides={"emergency.numbers": ["112", "110", "19222"], "emergency.outside_line_prefix": "0"},
    )
    emergency = context(render_dialplan(settings), "forum-bridge-emergency")
    numbers = re.findall(r"^exten => ([^,]+),1,", emergency, re.M)
    assert numbers == ["110", "112", "0110", "0112", "19222", "019222"]


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
