"""The test sandbox's port picker: a SIPp run's own sockets never collide with each other.

SIPp binds its media port p and p+2 (audio and video); the same run's control port is picked
right after. It once landed on p+2, and SIPp refused to start ("Unable to bind remote control
socket"), failing a FreeSWITCH test at random.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import pytest

from tests.sandbox import asterisk, sipp


def test_a_sipp_runs_control_port_is_never_its_media_ports_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asterisk, "_recent", collections.deque(maxlen=asterisk._RECENT_PORTS))
    low = asterisk._TRANSIENT_LOW
    # The random offsets the picker draws: the media port, then p+1, p+2, p+3, then another one.
    offsets: Iterator[int] = iter([1000, 1001, 1002, 1003, 1500])
    monkeypatch.setattr(asterisk.secrets, "randbelow", lambda _bound: next(offsets))
    media = sipp._free_media_port()
    control = asterisk.free_transient_udp_port()
    assert media == low + 1000
    assert control == low + 1500
