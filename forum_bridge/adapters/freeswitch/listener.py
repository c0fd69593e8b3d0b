"""The ESL listener: events in, resync after every (re)connect, enforcement with ``uuid_kill``.

One greenlet owns the connection. It subscribes, resyncs, and then applies events in the order
FreeSWITCH sent them. Events that arrive during the resync wait in the client's queue, so a
registration seen after the snapshot is never undone by the snapshot. When the connection ends
it reconnects with exponential backoff up to ``freeswitch.reconnect_max``, logging once when
FreeSWITCH goes away and once when it is back.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Protocol

import gevent
from gevent.event import Event as GeventEvent

from forum_bridge.config import Settings
from forum_bridge.core.events import CallStarted, Direction, Event, LoggedOff, LoggedOn
from forum_bridge.dropped_events import DroppedEvents
from forum_bridge.errors import (
    ConfigError,
    ForumBridgeError,
    PbxAuthError,
    PbxConnectionError,
    PbxError,
    ProtocolError,
    StoreError,
)
from forum_bridge.service import BridgeService, CallSnapshot, Outcome
from forum_bridge.store.models import RegistrationRow, stored
from forum_bridge.store.operations import Registration

from .emergency import EmergencyHash
from .esl import MAX_QUEUED_EVENTS, EslClient, EslEvent, EventsDropped
from .events import (
    SUBSCRIPTION,
    FailureDeduplicator,
    event_time,
    identity_lookups,
    is_channel_uuid,
    parse_channels,
    parse_profiles,
    parse_registrations,
    parse_sofia_registrations,
    registration_logon,
    to_core_event,
    uuid_getvar_value,
)

log = logging.getLogger(__name__)

# Events applied together at most: a storm goes in a few transactions, and a hook session waits
# for one batch at most before it gets the interpreter.
_BATCH = 250
# Seconds the listener holds back its next batch while a hook decision waits for the reader.
_HOOK_READ_PAUSE = 0.1
HANGUP_CAUSE = "CALL_REJECTED"  # sofia answers 603 Decline before the call is answered
# No decision (database away) with fail_mode closed: 503, as the dialplan's fail mode answers.
UNAVAILABLE_CAUSE = "NORMAL_TEMPORARY_FAILURE"


class MetricsSink(Protocol):
    """What the listener reports to the metrics module."""

    def set_connected(self, connected: bool) -> None:
        """FreeSWITCH's event socket is connected (True) or not."""

    def observe_event_lag(self, seconds: float) -> None:
        """How long an event took from FreeSWITCH to the bridge."""


class EslListener:
    """Keeps one ESL connection to FreeSWITCH and applies its events through the service."""

    def __init__(
        self,
        service: BridgeService,
        settings: Settings | None = None,
        *,
        metrics: MetricsSink | None = None,
        initial_backoff: float = 0.5,
        idle_probe: float = 30.0,
        command_timeout: float = 10.0,
        wall_clock: Callable[[], float] = time.time,
        max_queued: int = MAX_QUEUED_EVENTS,
    ) -> None:
        self.service = service
        self.settings = settings if settings is not None else service.settings
        fs = self.settings.freeswitch
        self.host, self.port = fs.esl_host, fs.esl_port
        self.enforce = fs.enforce in ("esl", "both")
        self.fail_closed = fs.fail_mode == "closed"
        self.reconnect_max = max(fs.reconnect_max, 0.01)
        self.initial_backoff = min(initial_backoff, self.reconnect_max)
        self.idle_probe = idle_probe
        self.command_timeout = command_timeout
        self.metrics = metrics
        self._wall_clock = wall_clock
        self.max_queued = max_queued
        self.overflow_resyncs = 0  # resyncs after dropped events, for tests and diagnostics
        self.drops = DroppedEvents("FreeSWITCH", metrics)
        self._stopping = GeventEvent()
        self._failures = FailureDeduplicator()
        self._client: EslClient | None = None
        self._state = "starting"  # starting | up | down | auth
        self.sessions = 0  # connections that got as far as a finished resync
        # The blocked log-ons in FreeSWITCH's mod_hash, so emergency calls never wait on the bridge.
        self.emergency = EmergencyHash(
            service, self.settings, observer=metrics, command_timeout=command_timeout
        )
        self.events_handled = 0  # events taken off the connection and dealt with
        # The number (EslClient.events_taken) of the last event of this connection applied.
        self._applied = 0
        # Log-ons whose queued registration events the hook wants applied ahead of the backlog,
        # and how many times the listener has done so (see caught_up).
        self._expedite: set[str] = set()
        self._expedited = 0
        self._expediting = False  # a pass is under way: a log-on asked now waits for the next one
        # Hook decisions waiting for the reader to read what FreeSWITCH sent before their call:
        # meanwhile the listener applies nothing, so the reader has the interpreter to itself.
        self._reading_for_hook = 0

    @property
    def peer(self) -> str:
        """``host:port`` of FreeSWITCH's event socket."""
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        """True while subscribed and in sync with FreeSWITCH."""
        return self._state == "up"

    # --- life cycle -------------------------------------------------------------------------------

    def run(self) -> None:
        """Connect, listen and reconnect until :meth:`stop`; never raises for PBX or database trouble."""
        delay = self.initial_backoff
        while not self._stopping.is_set():
            try:
                client = EslClient(
                    self.host,
                    self.port,
                    self.settings.freeswitch.esl_password,
                    max_queued=self.max_queued,
                    # Which log-on's registration it is, so the hook's caller can go first.
                    tag=registration_logon,
                )
            except ConfigError as exc:  # retrying cannot help
                log.error("FreeSWITCH listener stopped: %s", exc)
                return
            self._client = client
            self._applied = 0
            before = self.sessions
            try:
                client.connect()
                self._session(client)
            except PbxAuthError as exc:
                self._went_down(str(exc), auth=True)
            except PbxError as exc:
                self._went_down(str(exc))
            except Exception as exc:
                log.exception("unexpected failure in the FreeSWITCH listener")
                self._went_down(f"internal error: {exc}")
            finally:
                client.close()
                self._client = None
            if self.sessions > before:
                delay = self.initial_backoff
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self.reconnect_max)
        self._set_connected(False)

    def caught_up(self, timeout: float, logon: str = "") -> bool:
        """Wait until every event FreeSWITCH sent before now is applied, ``timeout`` seconds at most.

        The socket hook asks this before it decides a call: a phone that registered a moment
        before calling is then decided on that registration, even behind a registration storm's
        backlog. With ``logon`` (the caller) that log-on's queued registration events are applied
        first, ahead of the backlog and in their own order, and that is all it waits for. False
        when the time ran out, or when there is no connection (nothing to wait for).
        """
        client = self._client
        if client is None or not self.connected:
            return False
        deadline = time.monotonic() + timeout
        if not client.all_read():
            # Sent before now but not read yet (the storm's bytes wait in the socket): once the
            # reader has read all there was, everything sent before now is among its events.
            drains = client.drains
            self._reading_for_hook += 1
            try:
                if not client.wait_for(lambda: client.drains != drains, deadline):
                    return False
            finally:
                self._reading_for_hook -= 1
                client.wake_waiters()
        target = client.events_received
        served: float = float("inf")  # no expedite pass can end the wait
        if logon and self._applied < target:
            # Served by the listener after the batch it is applying (which may hold earlier events
            # of the same log-on: they go first).
            self._expedite.add(logon)
            served = self._expedited + (2 if self._expediting else 1)

        def done() -> bool:
            return self._expedited >= served or self._applied >= target or self._client is not client

        return client.wait_for(done, deadline) and self._client is client

    def _apply_expedited(self, client: EslClient) -> None:
        """Apply the queued registration events of the log-ons the hook is waiting for."""
        logons, self._expedite = self._expedite, set()
        self._expediting = True
        try:
            events = client.take_matching(logons)
            if events:
                self._handle_batch(client, events)
        finally:
            self._expediting = False
            self._expedited += 1
            client.wake_waiters()

    def _advance(self, client: EslClient) -> None:
        """Every event ``client`` handed over so far is applied (or resynced): wake the waiters."""
        if client.events_taken > self._applied:
            self._applied = client.events_taken
            client.wake_waiters()

    def request_resync(self) -> None:
        """Resync with FreeSWITCH's tables soon (the database is back: events meanwhile were lost)."""
        client = self._client
        if client is not None and self.connected:
            client.request_resync()

    def stop(self) -> None:
        """Ask :meth:`run` to return; the connection is closed at once."""
        self._stopping.set()
        client = self._client
        if client is not None:
            client.close()

    def _went_down(self, reason: str, *, auth: bool = False) -> None:
        if self._stopping.is_set():
            return
        state = "auth" if auth else "down"
        if state == self._state:
            log.debug("FreeSWITCH ESL at %s still unavailable: %s", self.peer, reason)
            return
        retry = f"retrying with backoff up to {self.reconnect_max:g} s"
        if auth:
            log.error("%s; %s", reason, retry)
        elif self._state == "up":
            log.warning("FreeSWITCH ESL at %s went away (%s); %s", self.peer, reason, retry)
        else:
            log.warning("FreeSWITCH ESL at %s is unreachable (%s); %s", self.peer, reason, retry)
        self._state = state
        self._set_connected(False)

    def _came_up(self) -> None:
        if self._state in ("down", "auth"):
            log.warning("FreeSWITCH ESL at %s is back", self.peer)
        else:
            log.info("connected to FreeSWITCH ESL at %s", self.peer)
        self._state = "up"
        self._set_connected(True)

    def _set_connected(self, connected: bool) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.set_connected(connected)
        except Exception:  # metrics must never take the listener down
            log.exception("metrics.set_connected failed")

    # --- one connection ---------------------------------------------------------------------------

    def _session(self, client: EslClient) -> None:
        reply = client.command(SUBSCRIPTION, timeout=self.command_timeout)
        if not reply.reply_text.startswith("+OK"):
            raise ProtocolError(f"FreeSWITCH refused the event subscription: {reply.reply_text[:80]}")
        self._resync(client)
        self.emergency.connected(client)
        self.sessions += 1
        self._came_up()
        while not self._stopping.is_set():
            if self._reading_for_hook:
                # At most _HOOK_READ_PAUSE per batch: calls placed all through a storm must not
                # stop the listener (one batch then goes between two pauses).
                client.wait_for(lambda: not self._reading_for_hook, time.monotonic() + _HOOK_READ_PAUSE)
            if self._expedite:
                self._apply_expedited(client)
            wait = min(self.idle_probe, self.emergency.seconds_until_due(), self.drops.seconds_until_quiet())
            event = client.next_event(timeout=wait)
            if self.drops.seconds_until_quiet() <= 0:
                self.drops.tick()  # a burst of dropped events is over: sum it up
                if event is None:
                    continue  # woken for that, not because the link was idle
            if event is None:
                if self.emergency.seconds_until_due() <= 0:
                    self.emergency.sync(client)  # also proves the link is alive
                else:
                    # Nothing for a while: prove the link is alive, or find out it is not.
                    client.api("status", timeout=self.command_timeout)
                continue
            if isinstance(event, EventsDropped):
                if event.count:  # 0: a resync asked for, nothing was dropped
                    self.drops.dropped(event.count, overflows=event.overflows)
                self._resync(client)
                self.overflow_resyncs += 1
                self._advance(client)
                continue
            # The events already waiting go with it: a registration storm is applied in a few
            # transactions, not one per event (see _handle_batch).
            self._handle_batch(client, self._gather(client, event))
            self._advance(client)
            self.emergency.tick(client)
            # Let the hook sessions and the page run between two batches.
            gevent.sleep(0)

    def _resync(self, client: EslClient) -> None:
        try:
            registrations = self._registrations(client)
            calls = self._calls(client)
        except ProtocolError as exc:
            log.error("resync with FreeSWITCH at %s skipped: %s", self.peer, exc)
            return
        try:
            # resync also moves the keepalive clock of the contacts FreeSWITCH still holds.
            self.service.resync(registrations, calls)
        except StoreError as exc:
            log.error("resync with FreeSWITCH at %s failed: %s", self.peer, exc)

    def _registrations(self, client: EslClient) -> list[Registration]:
        """Every profile's live contacts from sofia's own table (see :mod:`.events` for why).

        If sofia's table cannot be read, the core's ``show registrations`` stands in, with a
        warning: a resync that may log flushed contacts back on (until their keepalive runs out)
        is still better than none, which would leave every phone that left meanwhile logged on.
        """
        try:
            found: list[Registration] = []
            for profile in parse_profiles(client.api("sofia xmlstatus", timeout=self.command_timeout)):
                answer = client.api(f"sofia xmlstatus profile {profile} reg", timeout=self.command_timeout)
                found.extend(parse_sofia_registrations(answer))
            return found
        except ProtocolError as exc:
            log.warning(
                "cannot read sofia's registrations from FreeSWITCH at %s (%s); using show registrations, "
                "which names the registered address and keeps flushed contacts",
                self.peer,
                exc,
            )
        return parse_registrations(client.api("show registrations as json", timeout=self.command_timeout))

    def _calls(self, client: EslClient) -> list[CallSnapshot]:
        """The SIP legs in progress, each with the log-on FreeSWITCH authenticated or rings."""
        answer = client.api("show channels as json", timeout=self.command_timeout)
        users: dict[str, str] = {}
        for uuid, variable in identity_lookups(answer):
            value = self._getvar(client, uuid, variable)
            if not value and variable == "sip_auth_username":
                # Authorised another way (an ACL naming a directory user): FreeSWITCH sets user_name.
                value = self._getvar(client, uuid, "user_name")
            if value:
                users[uuid] = value
        return parse_channels(answer, users)

    def _getvar(self, client: EslClient, uuid: str, variable: str) -> str:
        return uuid_getvar_value(client.api(f"uuid_getvar {uuid} {variable}", timeout=self.command_timeout))

    # --- events -----------------------------------------------------------------------------------

    @staticmethod
    def _gather(client: EslClient, first: EslEvent) -> list[EslEvent]:
        """``first`` and the events queued behind it, up to ``_BATCH``.

        The reader hands over a few frames at a time (it yields to the other greenlets between
        them), so while it keeps finding more, it is given its turn and the batch grows; a lone
        event is not held up at all.
        """
        batch = [first]
        while len(batch) < _BATCH:
            more = client.take_queued(_BATCH - len(batch))
            if not more:
                break
            batch += more
            gevent.sleep(0)
        return batch

    def _handle_batch(self, client: EslClient, events: list[EslEvent]) -> None:
        """Apply ``events`` in the order FreeSWITCH sent them.

        Runs of registration and security events go to the service together
        (:meth:`BridgeService.apply_batch`: one transaction for the run, the effects of applying
        each in turn); each call start is decided alone, in its place, as it may be hung up.
        """
        run: list[Event] = []
        try:
            for event in events:
                self._observe_lag(event)
                if not self._failures.keep(event, time.monotonic()):
                    continue
                core = to_core_event(event, self.service.clock())
                if core is None:
                    continue
                if isinstance(core, CallStarted):
                    self._apply_run(client, run)
                    run = []
                    self._guarded(core, functools.partial(self._call_started, client, core))
                else:
                    run.append(core)
            self._apply_run(client, run)
        finally:
            self.events_handled += len(events)

    def _apply_run(self, client: EslClient, run: list[Event]) -> None:
        if not run:
            return
        try:
            outcomes = self.service.apply_batch(run)
        except ForumBridgeError as exc:
            log.error("could not apply %d events from FreeSWITCH: %s", len(run), exc)
            return
        except Exception:  # a bug must not end the listener
            log.exception("unexpected error applying %d events from FreeSWITCH", len(run))
            return
        for core, outcome in zip(run, outcomes, strict=True):
            if outcome.blocked is not None or (isinstance(core, LoggedOn) and outcome.other_contacts):
                self._guarded(core, functools.partial(self._follow_up, client, core, outcome))

    def _follow_up(self, client: EslClient, core: Event, outcome: Outcome) -> None:
        """What an applied event asks of FreeSWITCH: a block in mod_hash, replaced contacts gone."""
        logon = getattr(core, "logon", "")
        if outcome.blocked is not None:
            self.emergency.blocked_changed(client, logon, outcome.blocked)
        if isinstance(core, LoggedOn) and outcome.other_contacts:
            self._drop_replaced(client, core, outcome.other_contacts)

    @staticmethod
    def _guarded(core: Event, step: Callable[[], object]) -> None:
        """Run one event's ``step``: losing FreeSWITCH ends the session; anything else is logged,
        and the batch goes on (one bad event must not end the listener)."""
        try:
            step()
        except PbxConnectionError:
            raise
        except ForumBridgeError as exc:
            log.error("could not apply %s of %s: %s", type(core).__name__, getattr(core, "logon", ""), exc)
        except Exception:
            log.exception("unexpected error applying %s", type(core).__name__)

    def _drop_replaced(self, client: EslClient, event: LoggedOn, others: tuple[str, ...]) -> None:
        """Log off the log-on's other contacts that FreeSWITCH no longer holds.

        Without ``multiple-registrations`` a REGISTER replaces every contact of its address, and
        FreeSWITCH says nothing about the contacts it dropped. Asked only when a log-on gains a
        contact while it has others, so a plain refresh costs nothing.
        """
        try:
            # ``others`` are stored contacts, shortened to their column: compare like with like.
            live = {
                stored(RegistrationRow.contact, r.contact)
                for r in self._registrations(client)
                if r.logon == event.logon
            }
        except ProtocolError as exc:
            log.warning("could not check the other contacts of %s: %s", event.logon, exc)
            return
        for contact in others:
            if contact in live:
                continue
            log.info("FreeSWITCH replaced contact %s of %s with %s", contact, event.logon, event.contact)
            self.service.apply(LoggedOff(logon=event.logon, at=event.at, contact=contact, reason="replaced"))

    def _call_started(self, client: EslClient, call: CallStarted) -> None:
        try:
            outcome = self.service.apply(call, enforce=self.enforce)
        except StoreError as exc:
            closed = self.enforce and self.fail_closed
            action = "hanging up (fail_mode closed)" if closed else "the call goes on"
            log.error("cannot decide channel %s of %s (%s); %s", call.channel, call.logon, exc, action)
            if closed:
                self._kill(client, call, "no decision", UNAVAILABLE_CAUSE)
            return
        if outcome.hangup and not self._spare_emergency_call(call):
            reason = outcome.decision.reason.value if outcome.decision else "denied"
            undecided = outcome.decision is not None and outcome.decision.undecided
            self._kill(client, call, reason, UNAVAILABLE_CAUSE if undecided else HANGUP_CAUSE)

    def _spare_emergency_call(self, call: CallStarted) -> bool:
        """True for an emergency call ``uuid_kill`` must not end (enforce = both).

        There the dialplan refuses a blocked log-on's emergency call during the hunt, before it is
        answered or routed (from mod_hash); a call it let through (the block was stale, or
        FreeSWITCH had restarted and not been told yet) may already be connected to the emergency
        service, so it is never cut. With enforce = esl the kill is the only enforcement and stays.
        """
        if self.settings.freeswitch.enforce != "both" or call.direction is not Direction.OUTBOUND:
            return False
        if not self.service.is_emergency(call.number):
            return False
        log.info(
            "emergency call channel=%s logon=%s number=%s denied but not hung up: the dialplan"
            " refuses it before routing, and one it let through is never cut",
            call.channel,
            call.logon,
            call.number,
        )
        return True

    def _kill(self, client: EslClient, call: CallStarted, reason: str, cause: str = HANGUP_CAUSE) -> None:
        if not is_channel_uuid(call.channel):
            log.error("not hanging up channel %r of %s: not a channel UUID", call.channel[:60], call.logon)
            return
        answer = client.api(f"uuid_kill {call.channel} {cause}", timeout=self.command_timeout).strip()
        if answer.startswith("+OK"):
            log.info(
                "hung up channel %s of %s to %s (%s, %s)",
                call.channel,
                call.logon,
                call.number,
                reason,
                cause,
            )
        else:
            log.info("channel %s of %s was gone before uuid_kill: %s", call.channel, call.logon, answer[:80])

    def _observe_lag(self, event: EslEvent) -> None:
        if self.metrics is None:
            return
        created = event_time(event)
        if created is None:
            return
        try:
            self.metrics.observe_event_lag(max(0.0, self._wall_clock() - created))
        except Exception:
            log.exception("metrics.observe_event_lag failed")


class KeepaliveSweeper:
    """Logs off contacts that missed their keepalive, every ``interval`` seconds."""

    def __init__(
        self, service: BridgeService, interval: float = 1.0, on_recovered: Callable[[], None] | None = None
    ) -> None:
        """Sweep every ``interval`` s; ``on_recovered()`` runs when the database works again."""
        self.service = service
        self.interval = interval
        self.on_recovered = on_recovered
        self._stopping = GeventEvent()
        self._failing = False
        self.sweeps = 0  # finished sweeps, for tests and diagnostics

    def run(self) -> None:
        """Sweep until :meth:`stop`."""
        while not self._stopping.wait(self.interval):
            self.sweep_once()

    def sweep_once(self) -> list[str]:
        """One sweep; database trouble is logged once until it is over."""
        try:
            return self._sweep()
        finally:
            self.sweeps += 1

    def _sweep(self) -> list[str]:
        try:
            freed = self.service.expire_keepalives()
            self.service.flush_failure_summary()  # a flood of unknown log-ons, summarised per window
        except ForumBridgeError as exc:
            if not self._failing:
                log.error("keepalive sweep failed: %s (retrying every %g s)", exc, self.interval)
            self._failing = True
            return []
        except Exception:
            log.exception("keepalive sweep failed")
            return []
        if self._failing:
            log.warning("keepalive sweep works again")
            self._failing = False
            if self.on_recovered is not None:
                self.on_recovered()
        self.service.prune_if_due()  # retention: one short, bounded delete an hour; never raises
        return freed

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stopping.set()
