"""Decision tickets, and the gate that makes one call leg decided once.

A caller that cannot wait for the database (the FastAGI hook past its deadline) answers by its
fail mode and gives up its ticket; the gate then makes sure no decision of that ticket or leg is
committed afterwards, and that the leg seen again gets the answer already given.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from forum_bridge.core.rules import Decision, Reason
from forum_bridge.errors import DecisionAbandoned


class DecisionTicket:
    """One caller's wait for a call decision: its deadline, and the leg it is about.

    The FastAGI hook makes one per question. When the deadline passes it answers by its fail mode
    and tells the service (:meth:`~forum_bridge.service.BridgeService.give_up`); from then on the
    decision can no longer commit, and the leg keeps the answer given.
    """

    _numbers = itertools.count(1)

    def __init__(self, deadline: float, channel: str = "") -> None:
        """``deadline`` is a ``time.monotonic()`` value; ``channel`` the leg, if there is one."""
        self.deadline = deadline
        self.channel = channel
        self.key = f"#{next(self._numbers)}"

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return time.monotonic() >= self.deadline


class Superseded(Exception):
    """The leg was answered without the database meanwhile; roll back, return that."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason.value)
        self.decision = decision


class DecisionGate:
    """Makes "committed" and "answered without the database" exclude each other, per leg.

    A decision commits only after :meth:`begin_commit` said yes; a caller that gives up first
    makes every later commit of its ticket and its channel fail, so an answer once given is never
    contradicted by a licence taken later. Answers given are kept a while (bounded) so that the
    same leg seen again (its AMI event) gets the same answer.
    """

    _TTL = 600.0
    _LIMIT = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._committing: dict[str, int] = {}
        self._settled: OrderedDict[str, tuple[float, Decision]] = OrderedDict()

    def settled(self, *keys: str) -> Decision | None:
        """The answer given without the database for any of ``keys``, if one was."""
        if not self._settled:
            return None
        with self._lock:
            for key in keys:
                entry = self._settled.get(key) if key else None
                if entry is not None and time.monotonic() - entry[0] <= self._TTL:
                    return entry[1]
        return None

    def standing(
        self, channel: str, ticket: DecisionTicket | None, *, emergency: bool
    ) -> tuple[list[str], Decision | None]:
        """Before deciding: the keys the decision commits under, and the answer that stands, if any.

        An answer given before without the database to this leg stands (the caller must return
        it). Raises DecisionAbandoned when the ticket's caller stopped waiting before the decision
        began.
        """
        keys = [k for k in (channel, ticket.key if ticket is not None else "") if k]
        settled = self.settled(*keys)
        if settled is not None and emergency and settled.reason is Reason.BRIDGE_ERROR:
            # Emergency first: a fail-mode denial never sticks to a call for help (which takes
            # no licence, so deciding it again cannot take one either).
            keys = [ticket.key] if ticket is not None else []
            settled = self.settled(*keys)
        if settled is not None and (ticket is None or self.settled(ticket.key) is None):
            return keys, settled
        if ticket is not None and (settled is not None or ticket.expired()):
            raise DecisionAbandoned("the caller stopped waiting before the decision began")
        return keys, None

    def begin_commit(self, keys: Sequence[str], ticket: DecisionTicket | None) -> None:
        """Let the decision commit, or raise: DecisionAbandoned when the ticket's caller gave up,
        Superseded when the leg was answered without the database meanwhile (roll back, return that).
        """
        with self._lock:
            if ticket is not None and ticket.key in self._settled:
                raise DecisionAbandoned("the caller stopped waiting; the decision was rolled back")
            for key in keys:
                entry = self._settled.get(key)
                if entry is not None:
                    raise Superseded(entry[1])
            for key in keys:
                self._committing[key] = self._committing.get(key, 0) + 1

    def end_commit(self, keys: Sequence[str]) -> Decision | None:
        """The commit finished; the answer given meanwhile by a caller that could not wait, if any."""
        with self._lock:
            answer = None
            for key in keys:
                left = self._committing.get(key, 0) - 1
                if left > 0:
                    self._committing[key] = left
                else:
                    self._committing.pop(key, None)
                entry = self._settled.get(key)
                if entry is not None:
                    answer = entry[1]
            return answer

    def give_up(self, ticket: DecisionTicket, answer: Decision, *, force: bool) -> bool:
        """Record ``answer`` for the ticket and its leg; False (nothing recorded) while committing."""
        keys = [k for k in (ticket.key, ticket.channel) if k]
        with self._lock:
            if not force and any(self._committing.get(k) for k in keys):
                return False
            now = time.monotonic()
            for key in keys:
                self._settled[key] = (now, answer)
                self._settled.move_to_end(key)
            while self._settled and (
                len(self._settled) > self._LIMIT or now - next(iter(self._settled.values()))[0] > self._TTL
            ):
                self._settled.popitem(last=False)
            return True
