"""The Asterisk dialplan snippet (``forum_bridge.conf``), rendered from the configuration.

It gives extensions.conf two Gosub routines:

* ``forum-bridge-outbound`` (ARG1 = the dialled number) returns only when the call may go on; a
  call that may not is rejected inside it with ``Hangup(21)`` (the phone sees 403 Forbidden).
* ``forum-bridge-inbound`` (ARG1 = the call number) sets ``FORUM_BRIDGE_DIAL`` to the dial string of
  the log-ons that may ring now (empty when none).

Emergency calls never wait on the bridge. The outbound routine decides them inside Asterisk,
before any question to the hook, from two facts it holds itself:

* the emergency numbers, written into the snippet (with and without the outside-line prefix) and
  compared with core dialplan expressions only;
* whether the calling log-on is blocked by a failed log-on: the bridge keeps that set in AstDB
  (:data:`BLOCKED_FAMILY`, key = log-on) together with a heartbeat (:data:`HEARTBEAT_FAMILY` /
  :data:`HEARTBEAT_KEY`, Unix seconds). A block counts only while the heartbeat is younger than
  ``emergency.block_stale_after`` seconds, so a bridge that has been away for long cannot keep a
  phone from 112 on stale facts. A blocked log-on may make no call at all (row 1 of the rules).

The log-on of a call is cut out of the channel name (``PJSIP/<endpoint>-<8 hex digits>``, chan_pjsip's
format), the same rule the bridge applies to ``agi_channel``: it needs no module and no hop to a
PJSIP thread (``CHANNEL(endpoint)`` needs func_channel and chan_pjsip's serializer), and the hook and
the snippet can never disagree on whose call it is.

With ``asterisk.enforce = both`` the routine also answers by itself the calls of a log-on that
already holds a licence: the bridge keeps those log-ons in AstDB (:data:`LICENSED_FAMILY`, key =
log-on) beside the blocked ones, and while the heartbeat is younger than :func:`local_stale_after`
the routine sets ``FORUM_BRIDGE_RESULT=allow`` / ``FORUM_BRIDGE_REASON=licensed`` (what the hook
would answer) and returns without a FastAGI round trip. That is safe only because with ``both`` the
bridge decides every call's Newchannel over AMI anyway: a call let through in the moment between
a licence being freed and AstDB being told takes a free licence there or is hung up, as a call seen
over AMI alone is. With ``hook`` or ``ami`` the snippet has no such path (and the bridge removes any
licensed entries left in AstDB), nor with ``emergency.block_stale_after = 0`` (no heartbeat is
consulted then). The order stays: blocked log-ons are refused first, emergency
numbers pass next, then the local answer, then the hook.

Every other call asks the FastAGI hook, bounded inside Asterisk: ``TIMEOUT(absolute)`` is set to
``asterisk.hook_timeout`` with ``AGIEXITONHANGUP=yes`` around the ``AGI()`` (res_agi has no read
timeout of its own, and without that variable it keeps waiting for a hung script after the
timeout), and the routine's ``T`` extension, which the PBX core runs when that timeout fires,
applies the same fallback as a hook that did not answer. ``AGISTATUS`` cannot tell "the hook
answered" from "the hook accepted the connection and closed it", so the routines look only at the
variables the hook sets, cleared before each call. Without an answer, or with the hook's own
"could not decide" (``deny``/``bridge_error``, e.g. its database is down), ``asterisk.fail_mode`` applies:
``closed`` rejects with cause 34 (503 Service Unavailable, so phones and traces show the difference
between "the bridge said no" and "the bridge could not be asked"), ``open`` lets the call go. The
inbound routine rings nobody then.
"""

from __future__ import annotations

from forum_bridge.config import Settings

__all__ = [
    "BLOCKED_FAMILY",
    "HEARTBEAT_FAMILY",
    "HEARTBEAT_KEY",
    "LICENSED_FAMILY",
    "LOCAL_STALE_AFTER",
    "REQUIRED_MODULES",
    "UNAVAILABLE_CAUSE",
    "local_path",
    "local_stale_after",
    "render_dialplan",
]

UNAVAILABLE_CAUSE = 34
"""Q.850 NO_CIRCUIT_AVAILABLE: chan_pjsip answers 503; used when the bridge cannot be asked."""

REJECTED_CAUSE = 21
"""Q.850 CALL_REJECTED: chan_pjsip answers 403 to a call not yet answered."""

# A hyphen, not an underscore: AstDB matches families with SQL LIKE, where "_" is a wildcard.
BLOCKED_FAMILY = "forum-bridge/blocked"
"""AstDB family of the blocked log-ons (key = log-on, value = Unix time of the block)."""
# Not a prefix of the blocked family nor it of this one, so a DBGetTree of either (SQL LIKE
# '/<family>/%') never returns the other's keys.
LICENSED_FAMILY = "forum-bridge/licensed"
"""AstDB family of the log-ons holding a licence (key = log-on, value = Unix time written)."""
HEARTBEAT_FAMILY = "forum-bridge"
HEARTBEAT_KEY = "heartbeat"
"""AstDB ``forum-bridge/heartbeat``: Unix time the bridge last confirmed the blocked and licensed sets."""

LOCAL_STALE_AFTER = 90
"""Seconds after the last heartbeat from which the dialplan no longer answers calls by itself.

Three heartbeat periods: a bridge that missed two heartbeats is stopped, hung or cannot read its
database, and then nobody decides the call's Newchannel over AMI either, so the hook (and its fail
mode) must answer. Used when tighter than ``emergency.block_stale_after``: a stale block can
only keep a phone from 112 wrongly, while a stale licence would let calls through unchecked."""

REQUIRED_MODULES: tuple[tuple[str, str], ...] = (
    ("pbx_config", "reads extensions.conf, which includes the snippet"),
    ("app_stack", "Gosub, Return and LOCAL()"),
    ("res_agi", "AGI(): the FastAGI hook"),
    ("func_db", "DB(): the blocked and licensed log-ons the bridge keeps in AstDB"),
    ("func_timeout", "TIMEOUT(absolute): the bound on the hook's answer"),
)
"""Every module the snippet uses, with why; the bridge checks them over AMI (ModuleCheck).

Set, GotoIf, Goto, Hangup, NoOp, ``$[...]``, ``${CHANNEL}`` and ``${EPOCH}`` are part of the
Asterisk core and need no module."""

_HEADER = """\
; forum_bridge: the Forum 523/524 licence rules for Asterisk (chan_pjsip).
; Generated by "forum-bridge dialplan asterisk"; generate it again after changing the emergency
; numbers, the FastAGI address, asterisk.enforce, asterisk.fail_mode, asterisk.hook_timeout or
; emergency.block_stale_after.
;
; Include it from extensions.conf:
;   #include forum_bridge.conf
;
; Calls made by phones: first thing in the context your endpoints use.
;   exten => _X.,1,Gosub(forum-bridge-outbound,s,1(${{EXTEN}}))
;    same => n,Dial(...)            ; reached only when the call may go on
; A call that may not go on is rejected inside the routine with Hangup(21): 403 Forbidden.
;
; Calls to a call number: ask which of its log-ons may ring now.
;    same => n,Gosub(forum-bridge-inbound,s,1(<call number>))
;    same => n,GotoIf($["${{FORUM_BRIDGE_DIAL}}" = ""]?nobody)
;    same => n,Dial(${{FORUM_BRIDGE_DIAL}},30)
;
; The hook's address is the global variable FORUM_BRIDGE_AGI (agi://host:port, no path), e.g.
;   [globals]
;   FORUM_BRIDGE_AGI = agi://127.0.0.1:4573
; and {default_agi} when it is not set.
;
; Emergency numbers ({numbers}) are decided here, without asking the bridge: they pass
; unless the calling log-on's latest log-on failed. The bridge keeps those log-ons in AstDB
; ({blocked}/<log-on>) and refreshes {heartbeat_family}/{heartbeat_key} every {heartbeat} s; {stale_text}
; A blocked log-on may make no call at all: Hangup(21) before anything else.
{local_text}; Other calls ask the bridge and wait at most {timeout} s (TIMEOUT(absolute); an absolute
; timeout set before the routine is put back afterwards). Without an answer: {fail_text}
;
; Needs these modules (a default Asterisk with autoload = yes loads them all):
{modules}"""

_OUTBOUND = """\

[forum-bridge-outbound]
exten => s,1,Set(FORUM_BRIDGE_RESULT=)
 same => n,Set(FORUM_BRIDGE_REASON=)
 ; The log-on: the endpoint of a PJSIP/<endpoint>-<8 hex digits> channel.
 same => n,GotoIf($["${{CHANNEL:0:6}}" != "PJSIP/"]?classify)
 same => n,Set(LOCAL(fb_logon)=${{CHANNEL:6:-9}})
 same => n,GotoIf($["${{DB(forum-bridge/blocked/${{fb_logon}})}}" = ""]?classify)
{stale_check} same => n(blocked),Set(FORUM_BRIDGE_RESULT=deny)
 same => n,Set(FORUM_BRIDGE_REASON=logon_failed)
 same => n,Hangup({rejected})
 same => n(classify),GotoIf($[{emergency_test}]?emergency)
{local_check} same => n(hook),Set(LOCAL(fb_agi)=${{FORUM_BRIDGE_AGI}})
 same => n,GotoIf($["${{fb_agi}}" != ""]?ask)
 same => n,Set(LOCAL(fb_agi)={default_agi})
 same => n(ask),Set(LOCAL(fb_timeout)=${{TIMEOUT(absolute)}})
 same => n,Set(LOCAL(AGIEXITONHANGUP)=yes)
 same => n,Set(TIMEOUT(absolute)={timeout})
 same => n,AGI(${{fb_agi}}/outbound,${{ARG1}})
 same => n,Set(TIMEOUT(absolute)=${{fb_timeout}})
 same => n(decide),GotoIf($["${{FORUM_BRIDGE_RESULT}}" = "allow"]?allow)
 same => n,GotoIf($["${{FORUM_BRIDGE_RESULT}}" = "deny" & "${{FORUM_BRIDGE_REASON}}" != "bridge_error"]?deny)
 ; No answer from the hook in time, or it could not decide (bridge_error): the fail mode.
 same => n,Set(FORUM_BRIDGE_REASON=bridge_unavailable)
{fallback}
 same => n(allow),Return()
 same => n(deny),Hangup({rejected})
 same => n(emergency),Set(FORUM_BRIDGE_RESULT=allow)
 same => n,Set(FORUM_BRIDGE_REASON=emergency)
 same => n,Return()
; The hook did not answer within the bound (TIMEOUT(absolute) fired; the core comes here).
exten => T,1,Set(TIMEOUT(absolute)=${{fb_timeout}})
 same => n,Goto(s,decide)
"""

_INBOUND = """\

[forum-bridge-inbound]
exten => s,1,Set(FORUM_BRIDGE_DIAL=)
 same => n,Set(FORUM_BRIDGE_RESULT=)
 same => n,Set(FORUM_BRIDGE_REASON=)
 same => n,Set(LOCAL(fb_agi)=${{FORUM_BRIDGE_AGI}})
 same => n,GotoIf($["${{fb_agi}}" != ""]?ask)
 same => n,Set(LOCAL(fb_agi)={default_agi})
 same => n(ask),Set(LOCAL(fb_timeout)=${{TIMEOUT(absolute)}})
 same => n,Set(LOCAL(AGIEXITONHANGUP)=yes)
 same => n,Set(TIMEOUT(absolute)={timeout})
 same => n,AGI(${{fb_agi}}/inbound,${{ARG1}})
 same => n,Set(TIMEOUT(absolute)=${{fb_timeout}})
 same => n(decide),GotoIf($["${{FORUM_BRIDGE_RESULT}}" = "allow"]?done)
 ; Nobody may ring, or no (complete) answer in time: no dial string.
 same => n,Set(FORUM_BRIDGE_DIAL=)
 same => n,GotoIf($["${{FORUM_BRIDGE_RESULT}}" != ""]?done)
 same => n,Set(FORUM_BRIDGE_RESULT=error)
 same => n,Set(FORUM_BRIDGE_REASON=bridge_unavailable)
 same => n(done),Return()
exten => T,1,Set(TIMEOUT(absolute)=${{fb_timeout}})
 same => n,Goto(s,decide)
"""


def _agi_address(settings: Settings) -> str:
    host = settings.asterisk.agi_host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104  # a wildcard bind is reached on loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"agi://{host}:{settings.asterisk.agi_port}"


def _seconds(value: float) -> str:
    """A duration as TIMEOUT() reads it: whole seconds without a fraction, else up to 3 decimals."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def _emergency_test(numbers: list[str]) -> str:
    # "x" first: ast_expr2 compares two numeric-looking operands as numbers, so "0112" would
    # equal "112"; with a letter in front both are strings and only an exact match counts.
    # Asterisk substitutes ${ARG1} as text before it parses the expression, so a dial string
    # holding a double quote could change the expression. No dialable number has one, the
    # comparison needs no module this way (FILTER() would need func_strings), and with
    # enforce = ami or both the bridge still decides such a call from its AMI events.
    return " | ".join(f'"x${{ARG1}}" = "x{number}"' for number in numbers)


def local_path(settings: Settings) -> bool:
    """True when the dialplan answers the calls of licensed log-ons itself.

    Only with ``asterisk.enforce = both`` (the AMI side checks every such call), and only while the
    heartbeat can go stale: ``emergency.block_stale_after = 0`` means the snippet consults no
    heartbeat at all, and a local answer without one could outlive the bridge.
    """
    return settings.asterisk.enforce == "both" and settings.block_stale_after > 0


def local_stale_after(settings: Settings) -> int:
    """Seconds a heartbeat keeps the local answer valid: the tighter of :data:`LOCAL_STALE_AFTER`
    and ``emergency.block_stale_after``."""
    return min(settings.block_stale_after, LOCAL_STALE_AFTER)


def _local_parts(settings: Settings) -> tuple[str, str]:
    """The header text, and the check and answer of the local path (after the emergency test)."""
    if not local_path(settings):
        return "", ""
    stale_after = local_stale_after(settings)
    text = (
        f"; A log-on holding a licence ({LICENSED_FAMILY}/<log-on>) is let through here while the\n"
        f"; heartbeat is younger than {stale_after} s (asterisk.enforce = both: the bridge still decides\n"
        "; the call over AMI and hangs it up if the licence was freed meanwhile).\n"
    )
    # Anything unreadable (not a PJSIP channel, no entry, no heartbeat, garbage) goes to the hook.
    # The channel is tested again rather than trusting fb_logon, which is unset in this frame for
    # another channel type and would then read a channel variable of that name.
    check = (
        ' same => n,GotoIf($["${CHANNEL:0:6}" != "PJSIP/"]?hook)\n'
        f' same => n,GotoIf($["${{DB({LICENSED_FAMILY}/${{CHANNEL:6:-9}})}}" = ""]?hook)\n'
        f" same => n,Set(LOCAL(fb_beat)=${{DB({HEARTBEAT_FAMILY}/{HEARTBEAT_KEY})}})\n"
        ' same => n,GotoIf($["${fb_beat}" = ""]?hook)\n'
        f" same => n,GotoIf($[${{EPOCH}} - ${{fb_beat}} < {stale_after}]?licensed:hook)\n"
        " same => n(licensed),Set(FORUM_BRIDGE_RESULT=allow)\n"
        " same => n,Set(FORUM_BRIDGE_REASON=licensed)\n"
        " same => n,Return()\n"
    )
    return text, check


def render_dialplan(settings: Settings) -> str:
    """The ``forum_bridge.conf`` text for these settings.

    It depends on the emergency numbers, the AGI address, ``asterisk.enforce``,
    ``asterisk.fail_mode``, ``asterisk.hook_timeout`` and ``emergency.block_stale_after``.
    """
    # Imported here: the heartbeat period lives with the code that writes it.
    from forum_bridge.adapters.asterisk.astdb import HEARTBEAT_SECONDS

    default_agi = _agi_address(settings)
    timeout = _seconds(settings.asterisk.hook_timeout)
    stale_after = settings.block_stale_after
    if settings.asterisk.fail_mode == "closed":
        fail_text = f"rejected with Hangup({UNAVAILABLE_CAUSE}), 503 (asterisk.fail_mode = closed)."
        fallback = f" same => n,Hangup({UNAVAILABLE_CAUSE})"
    else:
        fail_text = "let through (asterisk.fail_mode = open)."
        fallback = " same => n,Goto(allow)"
    if stale_after > 0:
        stale_text = (
            f"a block counts only\n; while that heartbeat is younger than {stale_after} s"
            " (emergency.block_stale_after)."
        )
        # Written so that anything unreadable (no heartbeat, garbage) counts as stale: when in
        # doubt an emergency call goes through.
        stale_check = (
            f" same => n,Set(LOCAL(fb_beat)=${{DB({HEARTBEAT_FAMILY}/{HEARTBEAT_KEY})}})\n"
            f' same => n,GotoIf($["${{fb_beat}}" = ""]?classify)\n'
            f" same => n,GotoIf($[${{EPOCH}} - ${{fb_beat}} < {stale_after}]?blocked:classify)\n"
        )
    else:
        stale_text = "blocks never go stale\n; (emergency.block_stale_after = 0)."
        stale_check = ""
    numbers = settings.emergency.all_numbers()
    local_text, local_check = _local_parts(settings)
    modules = "".join(f";   {name:<13} {why}\n" for name, why in REQUIRED_MODULES)
    header = _HEADER.format(
        default_agi=default_agi,
        numbers=", ".join(numbers),
        blocked=BLOCKED_FAMILY,
        heartbeat_family=HEARTBEAT_FAMILY,
        heartbeat_key=HEARTBEAT_KEY,
        heartbeat=HEARTBEAT_SECONDS,
        stale_text=stale_text,
        local_text=local_text,
        timeout=timeout,
        fail_text=fail_text,
        modules=modules,
    )
    outbound = _OUTBOUND.format(
        default_agi=default_agi,
        fallback=fallback,
        timeout=timeout,
        rejected=REJECTED_CAUSE,
        stale_check=stale_check,
        emergency_test=_emergency_test(numbers),
        local_check=local_check,
    )
    return header + outbound + _INBOUND.format(default_agi=default_agi, timeout=timeout)
