"""The FreeSWITCH XML dialplan snippet: emergency calls decided inside FreeSWITCH, the rest asks the bridge.

The snippet goes at the top of the context the phones use. Calls placed by phones take two passes:

1. First pass, during the hunt (``inline`` actions, so nothing waits on the bridge):

   * An emergency number (with and without the outside-line prefix) sets
     ``forum_bridge_verdict=emergency`` and never reaches the socket. Its caller's authenticated
     log-on (``sip_auth_username``, else ``user_name``) is looked up in mod_hash, where the bridge
     keeps the log-ons blocked by a failed log-on (realm ``forum_bridge``, key ``blocked_<log-on>``).
     A blocked log-on's emergency call is hung up in the hunt, before it is answered or routed, but only while
     the bridge's heartbeat is fresh (see below); every other emergency call goes on to the rest of
     the dialplan at once, whatever the state of the bridge.
   * Any other call sets ``forum_bridge_verdict=unreachable``, schedules a transfer back to itself
     ``freeswitch.hook_timeout`` seconds later, and runs ``socket``. The bridge answers
     ``allowed`` (the scheduled transfer is cancelled and the call routed again) or hangs a denied
     call up itself. When the bridge is stopped the socket fails at once; when it is hung (the
     kernel still accepts the connection) the scheduled transfer ends the wait.

2. Second pass: ``allowed`` (or ``emergency``) matches nothing here and the call follows the rest of
   the dialplan; ``denied`` is hung up; ``unreachable`` means no decision came, so ``fail_mode``
   applies: ``closed`` rejects the call with NORMAL_TEMPORARY_FAILURE (503), ``open`` lets it on.

Stale blocks. FreeSWITCH here has no mod_expr, so the dialplan cannot subtract times. The bridge
writes, every heartbeat, one key ``alive_<bucket>`` for every 100-second bucket (Unix time // 100)
from now to now + ``emergency.block_stale_after``; the dialplan takes the first eight digits of
``${strepoch()}`` (the current bucket, for ten-digit Unix times: until the year 2286) and honours
blocks only when that key exists. A bridge gone for longer than ``block_stale_after`` (plus up to
100 s) therefore stops keeping phones from emergency numbers on stale facts. With
``block_stale_after = 0`` the bridge writes ``alive_forever`` instead and blocks never go stale.
Values are compared exactly, so a missing mod_hash (whose lookups then return an error text) makes
every block void rather than blocking everyone.

Calls to a call number (``forum-bridge-inbound``): the operator's extension sets
``forum_bridge_number`` and runs ``execute_extension forum-bridge-inbound XML <this context>``;
it returns with ``forum_bridge_dial`` set to the dial string of the log-ons that may ring now (each
took its licence; empty when none) and ``forum_bridge_result`` = ``allow``, ``deny`` or ``error``.
A hung bridge is bounded the same way: the scheduled transfer re-runs the operator's extension,
whose second ``execute_extension`` returns at once with ``error`` and nobody to ring.
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape

from forum_bridge.config import Settings
from forum_bridge.errors import ConfigError

HANGUP_CAUSE = "CALL_REJECTED"  # the bridge (or its blocked list) said no: SIP 603
UNAVAILABLE_CAUSE = "NORMAL_TEMPORARY_FAILURE"  # the bridge could not be asked: SIP 503
INBOUND_EXTENSION = "forum-bridge-inbound"
SOCKET_PATH_INBOUND = "inbound"

HASH_REALM = "forum_bridge"
BLOCKED_PREFIX = "blocked_"
ALIVE_PREFIX = "alive_"
ALIVE_FOREVER = ALIVE_PREFIX + "forever"
HASH_VALUE = "yes"
BUCKET_SECONDS = 100  # the dialplan's bucket is the first 8 digits of a 10-digit Unix time
BUCKET_DIGITS = 8

# What the snippet runs: the XML dialplan, set/hangup/transfer/sched_*/execute_extension/log
# (mod_dptools), strepoch and module_exists (mod_commands), hash (mod_hash), socket (mod_event_socket).
REQUIRED_MODULES = ("mod_commands", "mod_dialplan_xml", "mod_dptools", "mod_event_socket", "mod_hash")

_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")  # noqa: S104 - names of "every address", not a bind


def _attr(value: str) -> str:
    return escape(value, {'"': "&quot;"})


def emergency_expression(numbers: list[str]) -> str:
    """A PCRE (and Python ``re``) pattern matching exactly the given numbers."""
    return "^(?:" + "|".join(re.escape(n) for n in numbers) + ")$"


def not_emergency_expression(numbers: list[str]) -> str:
    """A pattern matching any non-empty number except the given ones (and the inbound hook's name)."""
    excluded = [re.escape(n) for n in numbers] + [re.escape(INBOUND_EXTENSION)]
    return "^(?!(?:" + "|".join(excluded) + ")$).+$"


def socket_target(settings: Settings) -> str:
    """``host:port`` FreeSWITCH connects to; a wildcard listen address means this host."""
    fs = settings.freeswitch
    host = "127.0.0.1" if fs.socket_host.strip() in _WILDCARD_HOSTS else fs.socket_host.strip()
    return f"{host}:{fs.socket_port}"


def alive_buckets(now: float, stale_after: int) -> list[str]:
    """The heartbeat keys for a heartbeat written at Unix time ``now`` (see the module docstring)."""
    if stale_after <= 0:
        return [ALIVE_FOREVER]
    first = int(now) // BUCKET_SECONDS
    last = (int(now) + stale_after) // BUCKET_SECONDS
    return [f"{ALIVE_PREFIX}{bucket}" for bucket in range(first, last + 1)]


def blocked_key(logon: str) -> str:
    """The mod_hash key (within :data:`HASH_REALM`) that marks ``logon`` as blocked."""
    return BLOCKED_PREFIX + logon


def _unreachable(fail_mode: str) -> str:
    if fail_mode == "closed":
        return (
            '  <!-- 6. No decision from the bridge (fail_mode = "closed"): no call without one. -->\n'
            '  <extension name="forum_bridge_unreachable">\n'
            '    <condition field="${forum_bridge_verdict}" expression="^unreachable$">\n'
            '      <action application="log" data="ERR forum_bridge: no licence decision for'
            ' ${destination_number}, call rejected (fail_mode closed)"/>\n'
            f'      <action application="hangup" data="{UNAVAILABLE_CAUSE}"/>\n'
            "    </condition>\n"
            "  </extension>\n"
        )
    return (
        '  <!-- 6. No decision from the bridge (fail_mode = "open"): the call goes on. -->\n'
        '  <extension name="forum_bridge_unreachable" continue="true">\n'
        '    <condition field="${forum_bridge_verdict}" expression="^unreachable$">\n'
        '      <action application="log" data="WARNING forum_bridge: no licence decision for'
        ' ${destination_number}, call goes on (fail_mode open)"/>\n'
        "    </condition>\n"
        "  </extension>\n"
    )


_NO_HOOK = """\
  <!-- 2. enforce = "esl": no call waits on the bridge here; it decides each call from the event
       socket and hangs up those the rules refuse (uuid_kill). -->

"""


def _hook(others: str, target: str, wait: int) -> str:
    return f"""\
  <!-- 2. Every other call asks the bridge once, for at most {wait} s (the scheduled transfer ends a
       wait on a hung bridge). The bridge hangs up a denied call itself; for an allowed call it sets
       forum_bridge_verdict=allowed and the call is routed again. -->
  <extension name="forum_bridge_hook">
    <condition field="${{forum_bridge_verdict}}" expression="^$"/>
    <condition field="destination_number" expression="{others}">
      <action application="set" data="forum_bridge_verdict=unreachable"/>
      <action application="set" data="socket_resume=true"/>
      <action application="sched_transfer" data="+{wait} ${{destination_number}} XML ${{context}}"/>
      <action application="set" data="forum_bridge_timer=${{last_sched_id}}"/>
      <action application="socket" data="{target} async full"/>
      <action application="sched_cancel" data="${{forum_bridge_timer}}"/>
      <action application="transfer" data="${{destination_number}} XML ${{context}}"/>
    </condition>
  </extension>

"""


def render_dialplan(settings: Settings) -> str:
    """The dialplan snippet for these settings (``forum-bridge dialplan freeswitch`` prints it)."""
    numbers = settings.emergency.all_numbers()
    if not numbers:
        raise ConfigError("emergency.numbers", "no emergency numbers to let through the dialplan")
    fs = settings.freeswitch
    emergency = _attr(emergency_expression(numbers))
    others = _attr(not_emergency_expression(numbers))
    target = _attr(socket_target(settings))
    wait = fs.hook_timeout
    inbound = re.escape(INBOUND_EXTENSION)
    now = f"${{forum_bridge_now:0:{BUCKET_DIGITS}}}"
    refused = (
        "WARNING forum_bridge: emergency call of ${forum_bridge_caller} to ${destination_number}"
        " refused: its latest log-on failed"
    )
    timed_out = f"ERR forum_bridge: no answer about call number ${{forum_bridge_number}} within {wait} s"
    back = "forum_bridge_return=${destination_number} XML ${context}"
    alive = (
        f"${{hash(select/{HASH_REALM}/{ALIVE_PREFIX}{now})}}${{hash(select/{HASH_REALM}/{ALIVE_FOREVER})}}"
    )
    blocked = f"${{hash(select/{HASH_REALM}/{BLOCKED_PREFIX}${{forum_bridge_caller}})}}"
    hook = _hook(others, target, wait) if fs.enforce != "esl" else _NO_HOOK
    if settings.block_after_failed_logon:
        block_rule = "a log-on whose latest log-on failed may not call them"
    else:
        block_rule = "emergency.block_after_failed_logon is off: every log-on may call them"
    return f"""<?xml version="1.0" encoding="utf-8"?>
<!--
  forum_bridge: the Forum 523/524 licence rules for FreeSWITCH (XML dialplan).
  Made by "forum-bridge dialplan freeswitch" from the bridge's settings; make it again after
  changing the emergency numbers, [freeswitch] socket_host / socket_port / fail_mode / hook_timeout.
  Put it at the top of the context the phones use, before any extension that bridges a call
  (for example as dialplan/default/00_forum_bridge.xml), then run "reloadxml".
  Needs: {", ".join(REQUIRED_MODULES)} (the bridge checks at every connect).

  Emergency numbers: {_attr(", ".join(numbers))}
  They are decided here, never by the bridge, so they pass when it is stopped, hung or without its
  database; {_attr(block_rule)} (the bridge keeps those
  log-ons in mod_hash, realm {HASH_REALM}; blocks count only while its heartbeat there is fresh).

  Calls to a call number, from an extension in this same context:
    <action application="set" data="forum_bridge_number=21"/>
    <action application="execute_extension" data="{INBOUND_EXTENSION} XML ${{context}}"/>
    <action application="bridge" data="${{forum_bridge_dial}}"/>
  forum_bridge_dial is empty when no log-on of the number may ring now; forum_bridge_result is
  allow, deny or error (the bridge could not be asked within {wait} s).
-->
<include>
  <!-- 1. Emergency numbers never wait for the bridge, so they pass even when it is down.
       The verdict is set inline, during the hunt, so the hook below does not match. -->
  <extension name="forum_bridge_emergency" continue="true">
    <condition field="destination_number" expression="{emergency}">
      <action application="set" data="forum_bridge_verdict=emergency" inline="true"/>
    </condition>
  </extension>

{hook}  <!-- 3. An emergency call: who did FreeSWITCH authenticate (digest user, else directory user;
       never the From user)? Is that log-on blocked by a failed log-on, and is the bridge's word on
       that still fresh? Looked up inline, in mod_hash, without the bridge. -->
  <extension name="forum_bridge_emergency_caller" continue="true">
    <condition field="${{forum_bridge_verdict}}" expression="^emergency$"/>
    <condition field="${{sip_auth_username}}" expression="^(.+)$">
      <action application="set" data="forum_bridge_caller=$1" inline="true"/>
      <anti-action application="set" data="forum_bridge_caller=${{user_name}}" inline="true"/>
    </condition>
  </extension>
  <extension name="forum_bridge_emergency_lookup" continue="true">
    <condition field="${{forum_bridge_verdict}}" expression="^emergency$">
      <action application="set" data="forum_bridge_now=${{strepoch()}}" inline="true"/>
      <action application="set" data="forum_bridge_alive={_attr(alive)}" inline="true"/>
      <action application="set" data="forum_bridge_blocked={_attr(blocked)}" inline="true"/>
    </condition>
  </extension>

  <!-- 4. A blocked log-on's emergency call is refused here, before it is answered or routed. -->
  <extension name="forum_bridge_emergency_blocked">
    <condition field="${{forum_bridge_verdict}}" expression="^emergency$"/>
    <condition field="${{forum_bridge_alive}}" expression="^{HASH_VALUE}$"/>
    <condition field="${{forum_bridge_blocked}}" expression="^{HASH_VALUE}$">
      <action application="set" data="forum_bridge_verdict=denied"/>
      <action application="log" data="{refused}"/>
      <action application="hangup" data="{HANGUP_CAUSE}"/>
    </condition>
  </extension>

  <!-- 5. Denied: the bridge hangs the call up; this only catches a hang-up that did not happen. -->
  <extension name="forum_bridge_denied">
    <condition field="${{forum_bridge_verdict}}" expression="^denied$">
      <action application="hangup" data="{HANGUP_CAUSE}"/>
    </condition>
  </extension>

{_unreachable(fs.fail_mode)}
  <!-- 7. Where a wait on the bridge for a call to a call number returns to (set inline on every
       routing of a call in this context). -->
  <extension name="forum_bridge_return" continue="true">
    <condition field="destination_number" expression="^(?!{inbound}$).+$">
      <action application="set" data="{back}" inline="true"/>
    </condition>
  </extension>

  <!-- 8. Calls to a call number (execute_extension {INBOUND_EXTENSION} XML ${{context}}, after
       setting forum_bridge_number): which log-ons may ring now. A second run after the wait timed
       out returns at once, with nobody to ring. -->
  <extension name="{INBOUND_EXTENSION}">
    <condition field="destination_number" expression="^{inbound}$"/>
    <condition field="${{forum_bridge_inbound_pending}}" expression="^$">
      <action application="set" data="forum_bridge_dial="/>
      <action application="set" data="forum_bridge_result=error"/>
      <action application="set" data="forum_bridge_inbound_pending=${{forum_bridge_number}}"/>
      <action application="set" data="socket_resume=true"/>
      <action application="sched_transfer" data="+{wait} ${{forum_bridge_return}}"/>
      <action application="set" data="forum_bridge_timer=${{last_sched_id}}"/>
      <action application="socket" data="{target}/{SOCKET_PATH_INBOUND} async full"/>
      <action application="sched_cancel" data="${{forum_bridge_timer}}"/>
      <action application="set" data="forum_bridge_inbound_pending="/>
      <anti-action application="set" data="forum_bridge_inbound_pending="/>
      <anti-action application="set" data="forum_bridge_dial="/>
      <anti-action application="set" data="forum_bridge_result=error"/>
      <anti-action application="log" data="{timed_out}; nobody rung"/>
    </condition>
  </extension>
</include>
"""
