"""What Asterisk needs to decide calls without asking the bridge, kept in Asterisk over AMI.

The dialplan snippet decides an emergency call inside Asterisk (see
:mod:`forum_bridge.adapters.asterisk.dialplan`). The one fact it needs from the bridge is which
log-ons are blocked by a failed log-on; with ``asterisk.enforce = both`` it also answers by itself
the calls of log-ons holding a licence. :class:`EmergencyState` keeps both sets in AstDB:

* each change as it happens (``Outcome.blocked`` of an applied event): ``DBPut`` / ``DBDel`` of
  ``forum-bridge/blocked/<log-on>``;
* the whole set after every login and resync, and again every :data:`HEARTBEAT_SECONDS` as a
  cheap self-heal: read with ``DBGetTree``, then only the differences are written, so there is no
  moment in which a blocked log-on is missing (a ``DBDelTree`` first would open one);
* the licensed set (``forum-bridge/licensed/<log-on>``, only with ``enforce = both``; otherwise
  it is kept empty, so entries left from an earlier configuration are deleted): after every
  committed transaction of this process that changed the licence pool (a call took a licence; a
  log-off, keepalive expiry, failed log-on, removal or reset from the page freed one) the holders
  are read again (a handful of rows: one per purchased licence) and the differences written; and
  in the same periodic full pass as the blocked set, which corrects within one heartbeat what other
  processes and nodes changed (e.g. ``forum-bridge licences reset`` from the command line);
* after each full pass that read the sets from the database, a heartbeat (Unix seconds) in
  ``forum-bridge/heartbeat``. The snippet honours blocks only while it is fresh
  (``emergency.block_stale_after``): a bridge that is stopped, hung or cut off from its database
  stops confirming, and its blocks stop keeping phones from 112 on stale facts; the licensed
  entries stop counting even sooner (:func:`~forum_bridge.adapters.asterisk.dialplan.local_stale_after`).

After every login it also checks (``ModuleCheck``) that Asterisk has every module the snippet uses
and logs one error naming what is missing; the metrics show it per module.

When the bridge stops, it deletes the licensed family (``DBDelTree``) before it logs off AMI, so
the dialplan asks the hook again at once and its fail mode applies.

Every AMI action used here (``DBPut``, ``DBDel``, ``DBDelTree``, ``DBGetTree``, ``ModuleCheck``) needs only
``write = system``, which the bridge's least-privilege AMI user has already.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar, runtime_checkable

from forum_bridge.adapters.asterisk.dialplan import (
    BLOCKED_FAMILY,
    HEARTBEAT_FAMILY,
    HEARTBEAT_KEY,
    LICENSED_FAMILY,
    REQUIRED_MODULES,
)
from forum_bridge.adapters.asterisk.events import headers_of
from forum_bridge.errors import PbxError, StoreError

__all__ = ["HEARTBEAT_SECONDS", "AmiActions", "EmergencyState", "ModuleObserver"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

HEARTBEAT_SECONDS = 30
"""How often the bridge confirms the blocked and licensed sets (and rewrites what differs) while connected."""

_RETRY_SECONDS = 1.0  # pause after a failed write before the pending changes are tried again
_MAX_TREE = 100_000  # entries of one family read back; far above any real installation


@runtime_checkable
class ModuleObserver(Protocol):
    """Who is told which modules the PBX lacks (the metrics implement this)."""

    def set_module_missing(self, module: str, missing: bool) -> None:
        """``module`` is missing (True) or loaded (False)."""


class AmiActions(Protocol):
    """The part of :class:`forum_bridge.adapters.asterisk.ami.AmiListener` used here."""

    connected: bool
    logins: int
    resyncs: int

    async def send_action(self, action: Mapping[str, str], timeout: float | None = None) -> list[Any]:
        """Send one action on the logged-in session; PbxError when that is not possible."""

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds after some frame, login or resync."""


def _ok(responses: list[Any]) -> tuple[bool, str]:
    first = responses[0] if responses else None
    if first is None:
        return False, "no answer"
    return bool(first.success), str(first.get("Message", "") or "")


class EmergencyState:
    """Keeps the blocked and licensed log-ons and the heartbeat in AstDB; checks the snippet's modules."""

    def __init__(
        self,
        blocked_logons: Callable[[], list[str]],
        ami: AmiActions,
        *,
        licensed_logons: Callable[[], list[str]] | None = None,
        executor: Executor | None = None,
        observer: ModuleObserver | None = None,
        interval: float = HEARTBEAT_SECONDS,
        db_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``blocked_logons`` reads the set from the database (run in ``executor``).

        ``licensed_logons`` reads the log-ons holding a licence, likewise; None when the dialplan
        has no local path (``asterisk.enforce`` is not ``both``): the licensed family is then kept
        empty.
        """
        self._blocked_logons = blocked_logons
        self._licensed_logons = licensed_logons
        # What the licensed family holds as far as this process knows (None: not read yet); each
        # full pass reads the family back from Asterisk, so a stray write is corrected there.
        self._licensed_known: set[str] | None = None
        self._licensed_dirty = False
        self._withdraw_due = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ami = ami
        self._executor = executor
        self._observer = observer
        self.interval = interval
        self._db_timeout = db_timeout
        self._clock = clock
        self._lock = asyncio.Lock()
        self._pending: dict[str, bool] = {}
        self._wake = asyncio.Event()
        self._db_failing = False
        self._ami_failing = False
        self._retry_at = float("-inf")
        self.syncs = 0  # full passes that ended with a heartbeat
        self.pushes = 0  # single changes written
        self.licensed_passes = 0  # re-reads of the licensed set after a licence change
        self.missing_modules: list[str] | None = None  # None: not checked yet

    # --- called by the AMI listener ------------------------------------------------------------

    def blocked_changed(self, logon: str, blocked: bool) -> None:
        """An applied event blocked ``logon`` (True) or cleared its block (False): tell Asterisk now."""
        self._pending[logon] = blocked
        self._wake.set()

    def licences_changed(self) -> None:
        """A transaction of this process changed the licence pool: write the holders again soon.

        Safe from any thread (the commit hooks run in the thread that committed).
        """
        loop = self._loop
        if self._licensed_logons is None or loop is None:
            return  # no local path, or not running: the first full pass reads everything
        # A closing loop refuses: nothing is kept in Asterisk any more then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._mark_licensed_dirty)

    def _mark_licensed_dirty(self) -> None:
        self._licensed_dirty = True
        self._wake.set()

    # --- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: check modules after each login, sync after each login/resync and periodically."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._loop_until(stop)
        finally:
            self._loop = None

    async def _loop_until(self, stop: asyncio.Event) -> None:
        seen_login = seen_resync = 0
        last_sync = float("-inf")
        while not stop.is_set():
            ami = self._ami
            due = last_sync + self.interval - time.monotonic()
            if ami.connected and (ami.logins != seen_login or ami.resyncs != seen_resync or due <= 0):
                if ami.logins != seen_login:
                    seen_login = ami.logins
                    await self._guarded(self.check_modules)
                seen_resync = ami.resyncs
                await self._guarded(self.sync)
                last_sync = time.monotonic()
                continue
            # After a failed write, wait a little before the next try instead of hammering Asterisk.
            retry_in = self._retry_at - time.monotonic()
            if ami.connected and self._pending and retry_in <= 0:
                await self._guarded(self.flush)
                continue
            if ami.connected and self._withdraw_due and retry_in <= 0:
                await self._guarded(self.withdraw_for_outage)
                continue
            if ami.connected and self._licensed_dirty and retry_in <= 0:
                await self._guarded(self.flush_licensed)
                continue
            self._wake.clear()
            timeout = max(0.05, min(self.interval, due if due > 0 else self.interval))
            if (self._pending or self._licensed_dirty or self._withdraw_due) and retry_in > 0:
                timeout = min(timeout, retry_in)
            await self._wait(stop, functools.partial(self._session_changed, seen_login, seen_resync), timeout)

    def _session_changed(self, login: int, resync: int) -> bool:
        return self._ami.logins != login or self._ami.resyncs != resync

    async def _wait(self, stop: asyncio.Event, changed: Callable[[], bool], timeout: float) -> None:
        waiters = [
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._ami.wait_until(changed, timeout)),
        ]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _guarded(self, step: Callable[[], Awaitable[object]]) -> None:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not end the bridge; the next pass tries again
            log.exception("keeping the emergency state in Asterisk failed")

    # --- the steps -----------------------------------------------------------------------------

    async def sync(self) -> bool:
        """Make AstDB's blocked and licensed sets equal the database's, then write the heartbeat.

        True when done.
        """
        async with self._lock:
            # Changes reported so far are in the database already: the read below covers them.
            earlier, self._pending = self._pending, {}
            licensed_dirty, self._licensed_dirty = self._licensed_dirty, False
            try:
                wanted, licensed = await self._in_db(self._read_sets)
            except (StoreError, TimeoutError) as exc:
                self._licensed_dirty = self._licensed_dirty or licensed_dirty
                for logon, blocked in earlier.items():
                    self._pending.setdefault(logon, blocked)
                if not self._db_failing:
                    self._db_failing = True
                    log.error(
                        "cannot read the blocked log-ons (%s): the heartbeat in Asterisk is withheld,"
                        " so its blocks stop applying to emergency calls once it is stale",
                        "timed out" if isinstance(exc, TimeoutError) else exc,
                    )
                await self._withdraw_unlocked("the database cannot be read")
                return False
            if self._db_failing:
                self._db_failing = False
                log.info("blocked log-ons readable again; heartbeat in Asterisk resumed")
            try:
                present = await self._read_tree(BLOCKED_FAMILY)
                for logon in sorted(wanted - present):
                    await self._put(logon)
                for logon in sorted(present - wanted):
                    await self._delete(logon)
                # Read back rather than trusted: an operator or an earlier process may have
                # changed the family; writes of a licence change made meanwhile wait for the lock.
                self._licensed_known = None
                held = await self._read_tree(LICENSED_FAMILY)
                await self._write_licensed(licensed, held)
                await self._action(
                    {
                        "Action": "DBPut",
                        "Family": HEARTBEAT_FAMILY,
                        "Key": HEARTBEAT_KEY,
                        "Val": str(int(self._clock())),
                    }
                )
            except PbxError as exc:
                self._licensed_dirty = True  # the next pass or change writes what is left
                self._ami_failed(exc)
                return False
            self._ami_ok()
            if wanted != present:
                log.info(
                    "blocked log-ons in Asterisk rewritten: %d blocked (%d added, %d removed)",
                    len(wanted),
                    len(wanted - present),
                    len(present - wanted),
                )
            self.syncs += 1
            return True

    async def flush(self) -> None:
        """Write the changes reported since the last pass, one action each."""
        async with self._lock:
            changes, self._pending = self._pending, {}
            done: list[str] = []
            try:
                for logon, blocked in changes.items():
                    if blocked:
                        await self._put(logon)
                    else:
                        await self._delete(logon)
                    done.append(logon)
                    self.pushes += 1
                    log.info(
                        "emergency block of logon=%s %s in Asterisk", logon, "set" if blocked else "cleared"
                    )
            except PbxError as exc:
                # Newer changes win; the next full pass repairs whatever is left.
                for logon, blocked in changes.items():
                    if logon not in done:
                        self._pending.setdefault(logon, blocked)
                self._ami_failed(exc)
                return
            self._ami_ok()

    async def flush_licensed(self) -> None:
        """Read the log-ons holding a licence again and write what differs from AstDB's set."""
        async with self._lock:
            if not self._licensed_dirty:
                return
            self._licensed_dirty = False
            known = self._licensed_known
            if known is None or self._licensed_logons is None:
                return  # the full pass (due after every login) reads and writes everything
            try:
                wanted = set(await self._in_db(self._licensed_logons))
            except (StoreError, TimeoutError) as exc:
                # Stale entries are safe meanwhile (the AMI side decides every call); the next
                # full pass, or the next change, tries again.
                log.warning(
                    "cannot read the licensed log-ons (%s); AstDB is corrected later", exc or "timed out"
                )
                return
            try:
                await self._write_licensed(wanted, known)
            except PbxError as exc:
                self._licensed_known = None  # unknown now: written in part
                self._licensed_dirty = True
                self._ami_failed(exc)
                return
            self.licensed_passes += 1
            self._ami_ok()

    def database_failed(self) -> None:
        """A call could not be decided for the database: withdraw the local answers soon.

        The AMI side cannot decide those calls either, so they must meet the fail mode in the
        dialplan rather than be answered and then hung up. The next full pass that reads the
        database writes the set again. Safe from any thread.
        """
        loop = self._loop
        if self._licensed_logons is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._mark_withdraw)

    def _mark_withdraw(self) -> None:
        self._withdraw_due = True
        self._wake.set()

    async def withdraw_for_outage(self) -> None:
        """Withdraw the local answers after a failed decision (see :meth:`database_failed`)."""
        async with self._lock:
            self._withdraw_due = False
            await self._withdraw_unlocked("a call could not be decided (database)")

    async def _withdraw_unlocked(self, why: str) -> None:
        if self._licensed_logons is None or self._licensed_known == set():
            return  # nothing to withdraw (or no local path at all)
        self._licensed_dirty = False
        try:
            await self._action({"Action": "DBDelTree", "Family": LICENSED_FAMILY}, missing_ok=True)
        except PbxError as exc:
            self._licensed_known = None
            self._ami_failed(exc)
            return
        self._licensed_known = set()
        log.warning("licensed log-ons withdrawn from Asterisk while %s: every call asks the bridge", why)

    async def withdraw_local(self, timeout: float = 2.0) -> None:
        """The bridge stops: delete the licensed family, so Asterisk asks (and applies the fail mode).

        Without the bridge nobody decides the calls over AMI, which is what made the dialplan's
        own answer safe. Best effort and bounded: a bridge that dies instead leaves the entries
        until the heartbeat is stale. Never raises.
        """
        if self._licensed_logons is None or not self._ami.connected:
            return
        try:
            async with asyncio.timeout(timeout), self._lock:
                await self._action(
                    {"Action": "DBDelTree", "Family": LICENSED_FAMILY}, missing_ok=True, timeout=timeout
                )
            self._licensed_known = set()
            log.info("licensed log-ons withdrawn from Asterisk: every call asks the bridge again")
        except (PbxError, TimeoutError) as exc:
            log.warning(
                "could not withdraw the licensed log-ons from Asterisk (%s); they count until the"
                " heartbeat is stale",
                exc or "timed out",
            )

    async def check_modules(self) -> list[str] | None:
        """Ask Asterisk for every module the snippet needs; log one error naming the missing ones."""
        missing: list[str] = []
        for module, _why in REQUIRED_MODULES:
            try:
                responses = await self._ami.send_action({"Action": "ModuleCheck", "Module": f"{module}.so"})
            except PbxError as exc:
                log.warning("cannot check Asterisk's modules: %s", exc)
                return None
            ok, message = _ok(responses)
            if not ok and "not loaded" not in message.lower():
                log.warning("cannot check Asterisk's modules: ModuleCheck answered %r", message[:200])
                return None
            if not ok:
                missing.append(module)
            if self._observer is not None:
                try:
                    self._observer.set_module_missing(module, not ok)
                except Exception:  # metrics must never stop the bridge
                    log.exception("module observer failed")
        if missing:
            why = dict(REQUIRED_MODULES)
            log.error(
                "Asterisk lacks modules the forum_bridge dialplan needs: %s; load them (modules.conf)"
                " and restart Asterisk, or emergency calls and the hook fail",
                ", ".join(f"{module} ({why[module]})" for module in missing),
            )
        elif self.missing_modules != []:
            log.info("Asterisk has every module the dialplan needs (%d checked)", len(REQUIRED_MODULES))
        self.missing_modules = missing
        return missing

    # --- AMI and database helpers --------------------------------------------------------------

    async def _in_db(self, func: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(func))
        return await asyncio.wait_for(future, self._db_timeout)

    def _read_sets(self) -> tuple[set[str], set[str]]:
        """The blocked and the licensed log-ons, read together in the database thread."""
        blocked = set(self._blocked_logons())
        licensed = set(self._licensed_logons()) if self._licensed_logons is not None else set()
        return blocked, licensed

    async def _write_licensed(self, wanted: set[str], present: set[str]) -> None:
        """Make the licensed family hold ``wanted``, given it holds ``present``; log what changed."""
        added, removed = sorted(wanted - present), sorted(present - wanted)
        known = set(present)
        self._licensed_known = known
        for logon in added:
            await self._action(
                {"Action": "DBPut", "Family": LICENSED_FAMILY, "Key": logon, "Val": str(int(self._clock()))}
            )
            known.add(logon)
        for logon in removed:
            await self._action({"Action": "DBDel", "Family": LICENSED_FAMILY, "Key": logon}, missing_ok=True)
            known.discard(logon)
        if added or removed:
            log.debug(
                "licensed log-ons in Asterisk: %d (added %s; removed %s)",
                len(known),
                ",".join(added) or "-",
                ",".join(removed) or "-",
            )

    async def _action(
        self, action: Mapping[str, str], *, missing_ok: bool = False, timeout: float | None = None
    ) -> None:
        ok, message = _ok(await self._ami.send_action(action, timeout))
        if not ok and not (missing_ok and ("not found" in message.lower() or "could not" in message.lower())):
            raise PbxError(f"Asterisk refused {action['Action']}: {message or 'no reason given'}")

    async def _put(self, logon: str) -> None:
        await self._action(
            {"Action": "DBPut", "Family": BLOCKED_FAMILY, "Key": logon, "Val": str(int(self._clock()))}
        )

    async def _delete(self, logon: str) -> None:
        # Gone already is what we wanted.
        await self._action({"Action": "DBDel", "Family": BLOCKED_FAMILY, "Key": logon}, missing_ok=True)

    async def _read_tree(self, family: str) -> set[str]:
        """The keys of ``family`` in AstDB (at most :data:`_MAX_TREE`)."""
        responses = await self._ami.send_action({"Action": "DBGetTree", "Family": family})
        ok, message = _ok(responses)
        if not ok:
            raise PbxError(f"Asterisk refused DBGetTree: {message or 'no reason given'}")
        prefix = f"/{family}/"
        found: set[str] = set()
        for response in responses[1 : _MAX_TREE + 1]:
            headers = headers_of(response)
            if headers.get("event", "").lower() != "dbgettreeresponse":
                continue
            key = headers.get("key", "")
            if key.startswith(prefix) and len(key) > len(prefix):
                found.add(key[len(prefix) :])
        return found

    def _ami_failed(self, exc: PbxError) -> None:
        self._retry_at = time.monotonic() + _RETRY_SECONDS
        if not self._ami_failing:
            self._ami_failing = True
            log.warning("could not update the blocked log-ons in Asterisk: %s; retrying", exc)

    def _ami_ok(self) -> None:
        if self._ami_failing:
            self._ami_failing = False
            log.info("blocked log-ons in Asterisk up to date again")
