"""PBX events the bridge read but could not apply in time: counted always, logged once per burst.

Both adapters bound what they hold in memory (Asterisk: 30,000 AMI frames; FreeSWITCH: 10,000
ESL events or 16 MiB of them). When a flood (a SIP scanner's failed REGISTERs, a PBX far faster
than the database) fills the queue, the queued events are dropped and one resync restores the
state from the PBX's own tables. The operator must learn that it happened and how much, but a
flood overflows the queue again and again: the first overflow of a burst is logged at once
(ERROR), later ones are only counted, and one WARNING sums the burst up once no overflow came for
:data:`QUIET_SECONDS`. ``/metrics`` counts every dropped event in
``forum_bridge_events_dropped_total{pbx, reason}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["QUIET_SECONDS", "REASON_QUEUE_FULL", "DroppedEvents"]

REASON_QUEUE_FULL = "queue_full"  # the queue of events not applied yet was full
QUIET_SECONDS = 60.0  # a burst is over after this long without an overflow


class DroppedEvents:
    """Counts and logs the events one PBX connection dropped (see the module docstring)."""

    def __init__(
        self,
        pbx: str,
        metrics: Any = None,
        *,
        quiet: float = QUIET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``metrics`` is anything with ``count_dropped_events(reason, count)`` (or None)."""
        self.pbx = pbx
        self.metrics = metrics
        self.quiet = quiet
        self._clock = clock
        self.total = 0  # events dropped since start, for tests and diagnostics
        self._burst_start: float | None = None
        self._burst_last = 0.0
        self._burst_events = 0
        self._burst_overflows = 0

    def dropped(self, count: int, reason: str = REASON_QUEUE_FULL, *, overflows: int = 1) -> None:
        """``count`` queued events were just dropped (a resync follows), in ``overflows`` goes."""
        now = self._clock()
        self.tick()
        self.total += count
        counter = getattr(self.metrics, "count_dropped_events", None)
        if callable(counter):
            try:
                counter(reason, count)
            except Exception:  # metrics must never stop an event path
                log.exception("counting dropped events failed")
        if self._burst_start is None:
            self._burst_start = now
            self._burst_events = 0
            self._burst_overflows = 0
            log.error(
                "%d %s events queued faster than they could be applied; dropped them, resyncing "
                "(more overflows in this burst are counted and summed up when it is over)",
                count,
                self.pbx,
            )
        self._burst_last = now
        self._burst_events += count
        self._burst_overflows += overflows

    def seconds_until_quiet(self) -> float:
        """How long until the burst in progress counts as over (infinite when there is none)."""
        if self._burst_start is None:
            return float("inf")
        return max(0.0, self._burst_last + self.quiet - self._clock())

    def tick(self) -> None:
        """Sum a burst up once it is over; call this now and then (after each event is fine)."""
        if self._burst_start is None or self._clock() - self._burst_last < self.quiet:
            return
        if self._burst_overflows > 1:
            log.warning(
                "%s event flood over: %d events dropped in %d overflows within %.0f s, each followed "
                "by a resync",
                self.pbx,
                self._burst_events,
                self._burst_overflows,
                self._burst_last - self._burst_start,
            )
        self._burst_start = None
