"""Registration storms and failed log-on floods as Asterisk 22 writes them to the bridge's event mask.

For a first REGISTER (``tests/asterisk/fixtures/asterisk22-ami-capture.txt``): ``ChallengeSent``, then,
one round trip later, ``SuccessfulAuth``, ``PeerStatus`` and ``ContactStatus``, in that order (the
``TestEvent`` lines of the capture belong to the ``reporting`` class, which the bridge does not ask
for). Many phones at once interleave: the challenges of a window of phones are in flight together.
For an unknown user: ``InvalidAccountID`` twice (same Call-ID), ``ChallengeSent`` and
``ChallengeResponseFailed`` for ``<unknown>``. The storm benchmark uses the same frames.
"""

from __future__ import annotations

import time

from tests.asterisk.fake_ami import render

CHALLENGE_WINDOW = 100  # phones whose challenges are in flight at once


def _tv() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime())


def _security(event: str, account: str, session: str, port: int, **extra: str) -> bytes:
    return render(
        {
            "Event": event,
            "Privilege": "security,all",
            "EventTV": _tv(),
            "Severity": "Error"
            if event in ("InvalidAccountID", "ChallengeResponseFailed")
            else "Informational",
            "Service": "PJSIP",
            "EventVersion": "1",
            "AccountID": account,
            "SessionID": session,
            "LocalAddress": "IPV4/UDP/127.0.0.1/5060",
            "RemoteAddress": f"IPV4/UDP/127.0.0.1/{port}",
            **extra,
        }
    )


def first_register(logon: str, port: int, challenge: bool = True) -> bytes:
    """A phone's first REGISTER: [ChallengeSent,] SuccessfulAuth, PeerStatus, ContactStatus."""
    session = f"1-{port}@127.0.0.1"
    out = [_security("ChallengeSent", logon, session, port, Challenge="")] if challenge else []
    out.append(_security("SuccessfulAuth", logon, session, port, UsingPassword="1"))
    out.append(
        render(
            {
                "Event": "PeerStatus",
                "Privilege": "system,all",
                "ChannelType": "PJSIP",
                "Peer": f"PJSIP/{logon}",
                "PeerStatus": "Reachable",
            }
        )
    )
    out.append(
        render(
            {
                "Event": "ContactStatus",
                "Privilege": "system,all",
                "URI": f"sip:{logon}@127.0.0.1:{port}",
                "ContactStatus": "NonQualified",
                "AOR": logon,
                "EndpointName": logon,
                "RoundtripUsec": "0",
            }
        )
    )
    return b"".join(out)


def refresh(logon: str, port: int, seq: int = 0) -> bytes:
    """A REGISTER refresh: ChallengeSent and SuccessfulAuth only (no ContactStatus)."""
    session = f"2-{port}-{seq}@127.0.0.1"
    return _security("ChallengeSent", logon, session, port, Challenge="") + _security(
        "SuccessfulAuth", logon, session, port, UsingPassword="1"
    )


def wrong_password(logon: str, port: int, seq: int = 0) -> bytes:
    """A REGISTER with a wrong password: ChallengeSent, ChallengeResponseFailed."""
    session = f"3-{port}-{seq}@127.0.0.1"
    return _security("ChallengeSent", logon, session, port, Challenge="") + _security(
        "ChallengeResponseFailed", logon, session, port, Challenge="1/abc", Response="def"
    )


def unknown_user(name: str, port: int, seq: int = 0) -> bytes:
    """A scanner's REGISTER for a user that does not exist."""
    session = f"4-{port}-{seq}@127.0.0.1"
    invalid = _security("InvalidAccountID", name, session, port)
    return (
        invalid
        + _security("ChallengeSent", "<unknown>", session, port, Challenge="")
        + invalid
        + _security("ChallengeResponseFailed", "<unknown>", session, port, Challenge="1/abc", Response="def")
    )


def phone(i: int) -> str:
    """The log-on of storm phone ``i``."""
    return f"p{i:05d}"


def storm(first: int, count: int) -> bytes:
    """First REGISTERs of phones ``first`` .. ``first + count - 1`` (4 frames each), interleaved."""
    out: list[bytes] = []
    for start in range(first, first + count, CHALLENGE_WINDOW):
        window = range(start, min(first + count, start + CHALLENGE_WINDOW))
        for i in window:
            out.append(
                _security("ChallengeSent", phone(i), f"1-{10000 + i}@127.0.0.1", 10000 + i, Challenge="")
            )
        out.extend(first_register(phone(i), 10000 + i, challenge=False) for i in window)
    return b"".join(out)
