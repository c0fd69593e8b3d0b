"""The FreeSWITCH XML dialplan snippet that routes calls through the bridge's socket hook.

The snippet goes at the top of the context the phones use. It works in two passes:

1. First pass. An emergency number sets ``forum_bridge_verdict=emergency`` inline (during the
   hunt), so it never reaches the socket and passes even when the bridge is down. Any other call
   sets ``forum_bridge_verdict=unreachable`` and ``socket_resume=true``, runs ``socket``, and is
   then transferred to the same number and context, which hunts again.
2. Second pass. The verdict is now set: ``allowed`` (the hook said so) matches nothing here and the
   call follows the rest of the dialplan; ``denied`` is hung up; ``unreachable`` means the socket
   could not be reached or ended without a decision, so ``fail_mode`` applies: ``closed`` hangs
   up, ``open`` lets the call go on.

A denied call is hung up by the hook itself; the ``denied`` extension only matters if that failed.
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape

from forum_bridge.config import Settings
from forum_bridge.errors import ConfigError

HANGUP_CAUSE = "CALL_REJECTED"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")  # noqa: S104 - names of "every address", not a bind


def _attr(value: str) -> str:
    return escape(value, {'"': "&quot;"})


def emergency_expression(numbers: list[str]) -> str:
    """A PCRE (and Python ``re``) pattern matching exactly the given numbers."""
    return "^(?:" + "|".join(re.escape(n) for n in numbers) + ")$"


def not_emergency_expression(numbers: list[str]) -> str:
    """A pattern matching any non-empty number except the given ones."""
    return "^(?!(?:" + "|".join(re.escape(n) for n in numbers) + ")$).+$"


def socket_target(settings: Settings) -> str:
    """``host:port`` FreeSWITCH connects to; a wildcard listen address means this host."""
    fs = settings.freeswitch
    host = "127.0.0.1" if fs.socket_host.strip() in _WILDCARD_HOSTS else fs.socket_host.strip()
    return f"{host}:{fs.socket_port}"


def render_dialplan(settings: Settings) -> str:
    """The dialplan snippet for these settings (``forum-bridge dialplan freeswitch`` prints it)."""
    numbers = settings.emergency.all_numbers()
    if not numbers:
        raise ConfigError("emergency.numbers", "no emergency numbers to let through the dialplan")
    fs = settings.freeswitch
    emergency = _attr(emergency_expression(numbers))
    others = _attr(not_emergency_expression(numbers))
    target = _attr(socket_target(settings))
    if fs.fail_mode == "closed":
        unreachable = (
            '  <!-- 5. The bridge could not decide (fail_mode = "closed"): no call without a decision. -->\n'
            '  <extension name="forum_bridge_unreachable">\n'
            '    <condition field="${forum_bridge_verdict}" expression="^unreachable$">\n'
            '      <action application="log" data="ERR forum_bridge: no licence decision for'
            ' ${destination_number}, call rejected (fail_mode closed)"/>\n'
            f'      <action application="hangup" data="{HANGUP_CAUSE}"/>\n'
            "    </condition>\n"
            "  </extension>\n"
        )
    else:
        unreachable = (
            '  <!-- 5. The bridge could not decide (fail_mode = "open"): the call goes on. -->\n'
            '  <extension name="forum_bridge_unreachable" continue="true">\n'
            '    <condition field="${forum_bridge_verdict}" expression="^unreachable$">\n'
            '      <action application="log" data="WARNING forum_bridge: no licence decision for'
            ' ${destination_number}, call goes on (fail_mode open)"/>\n'
            "    </condition>\n"
            "  </extension>\n"
        )
    return f"""<?xml version="1.0" encoding="utf-8"?>
<!--
  forum_bridge: Forum 523/524 licence check for calls placed by phones (FreeSWITCH XML dialplan).
  Made by "forum-bridge dialplan freeswitch" from the bridge's settings; make it again after
  changing the emergency numbers, [freeswitch] socket_host / socket_port or fail_mode.
  Put it at the top of the context the phones use, before any extension that bridges a call
  (for example as dialplan/default/00_forum_bridge.xml), then run "reloadxml".
  Emergency numbers: {_attr(", ".join(numbers))}
-->
<include>
  <!-- 1. Emergency numbers never wait for the bridge, so they pass even when it is down.
       The verdict is set inline, during the hunt, so the hook below does not match. -->
  <extension name="forum_bridge_emergency" continue="true">
    <condition field="destination_number" expression="{emergency}">
      <action application="set" data="forum_bridge_verdict=emergency" inline="true"/>
    </condition>
  </extension>

  <!-- 2. Every other call asks the bridge once. The bridge hangs up a denied call itself; for an
       allowed call it sets forum_bridge_verdict=allowed and the call is routed again. -->
  <extension name="forum_bridge_hook">
    <condition field="${{forum_bridge_verdict}}" expression="^$"/>
    <condition field="destination_number" expression="{others}">
      <action application="set" data="forum_bridge_verdict=unreachable"/>
      <action application="set" data="socket_resume=true"/>
      <action application="socket" data="{target} async full"/>
      <action application="transfer" data="${{destination_number}} XML ${{context}}"/>
    </condition>
  </extension>

  <!-- 3. Allowed (or emergency): nothing to do here; the rest of the dialplan routes the call. -->

  <!-- 4. Denied: the bridge hangs the call up; this only catches a hang-up that did not happen. -->
  <extension name="forum_bridge_denied">
    <condition field="${{forum_bridge_verdict}}" expression="^denied$">
      <action application="hangup" data="{HANGUP_CAUSE}"/>
    </condition>
  </extension>

{unreachable}</include>
"""
