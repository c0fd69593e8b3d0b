"""What FreeSWITCH needs to decide emergency calls without the bridge, kept in its mod_hash over ESL.

The dialplan snippet decides an emergency call inside FreeSWITCH (see :mod:`.dialplan`). The one
fact it needs from the bridge is which log-ons are blocked by a failed log-on. :class:`EmergencyHash`
keeps that set in mod_hash (realm ``forum_bridge``, keys ``blocked_<log-on>``):

* each change as it happens (``Outcome.blocked`` of an applied event): ``hash insert`` / ``hash
  delete``;
* the whole set after every connect and resync, and again every :data:`HEARTBEAT_SECONDS` as a
  cheap self-heal: ``hash_dump db forum_bridge`` is read back and only the differences are
  written, new keys before stale ones are deleted, so a blocked log-on is never missing meanwhile;
* with each full pass that read the set from the database, the heartbeat: the ``alive_<bucket>``
  keys from now to now + ``emergency.block_stale_after`` (``alive_forever`` when that is 0). The
  snippet honours blocks only while the current bucket's key exists, so a bridge that is stopped,
  hung or cut off from its database stops confirming, and its blocks stop keeping phones from
  emergency numbers on stale facts.

mod_hash lives in FreeSWITCH's memory: a restart of FreeSWITCH empties it, and until the bridge
has reconnected and rewritten it (seconds) no log-on is blocked from emergency numbers there:
emergency calls rather pass than wait (with ``enforce = esl`` the ``uuid_kill`` still ends them).

After every connect it also checks (``module_exists``) that FreeSWITCH has every module the snippet
uses and logs one error naming what is missing; the metrics show it per module.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from forum_bridge.config import Settings
from forum_bridge.errors import ForumBridgeError
from forum_bridge.service import BridgeService

from .dialplan import (
    ALIVE_PREFIX,
    BLOCKED_PREFIX,
    HASH_REALM,
    HASH_VALUE,
    REQUIRED_MODULES,
    alive_buckets,
    blocked_key,
)
from .esl import EslClient

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
"""How often the bridge confirms the blocked set (and rewrites what differs) while connected."""

# A key the bridge writes: no slash (mod_hash splits on it), no space or line break (ESL).
_SAFE_KEY = re.compile(r"^[^\s/]{1,200}$")


@runtime_checkable
class ModuleObserver(Protocol):
    """Who is told which modules the PBX lacks (the metrics implement this)."""

    def set_module_missing(self, module: str, missing: bool) -> None:
        """``module`` is missing (True) or loaded (False)."""


def parse_hash_dump(answer: str) -> dict[str, str]:
    """The keys of realm :data:`HASH_REALM` (without the realm) in a ``hash_dump db`` answer.

    mod_hash writes one ``D/<realm>_<key>/<value>`` line per entry and selects the realm by a
    substring match, so lines of other realms that merely contain the name are skipped here.
    """
    prefix = f"D/{HASH_REALM}_"
    found: dict[str, str] = {}
    for line in answer.splitlines():
        if not line.startswith(prefix):
            continue
        key, sep, value = line[len(prefix) :].partition("/")
        if sep and key:
            found[key] = value
    return found


class EmergencyHash:
    """Keeps the blocked log-ons and the heartbeat in FreeSWITCH's mod_hash; checks the modules."""

    def __init__(
        self,
        service: BridgeService,
        settings: Settings | None = None,
        *,
        observer: object = None,
        interval: float = HEARTBEAT_SECONDS,
        command_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.settings = settings if settings is not None else service.settings
        self.observer = observer if isinstance(observer, ModuleObserver) else None
        self.interval = interval
        self.command_timeout = command_timeout
        self.clock = clock  # Unix time, for the heartbeat buckets
        self._monotonic = monotonic
        self._next_sync = 0.0
        self._db_failing = False
        self._hash_failing = False
        self.syncs = 0  # full passes that ended with a heartbeat, for tests and diagnostics
        self.pushes = 0  # single changes written
        self.missing_modules: list[str] | None = None  # None: not checked yet

    # --- when to run ------------------------------------------------------------------------------

    def seconds_until_due(self) -> float:
        """Seconds until the next full pass is due (0 when it is due now)."""
        return max(0.0, self._next_sync - self._monotonic())

    def connected(self, client: EslClient) -> None:
        """After every connect and resync: check the modules, then rewrite the whole set."""
        self.check_modules(client)
        self.sync(client)

    def tick(self, client: EslClient) -> None:
        """Run the periodic pass when it is due."""
        if self.seconds_until_due() <= 0:
            self.sync(client)

    # --- the module check -------------------------------------------------------------------------

    def check_modules(self, client: EslClient) -> list[str]:
        """Ask FreeSWITCH for every module the snippet needs; log once what is missing."""
        missing: list[str] = []
        for module in REQUIRED_MODULES:
            answer = client.api(f"module_exists {module}", timeout=self.command_timeout).strip()
            if answer == "true":
                self._observe(module, False)
                continue
            missing.append(module)
            self._observe(module, True)
            if answer != "false":
                # module_exists itself comes from mod_commands: without it nothing else can be asked.
                log.debug("module_exists %s answered %r", module, answer[:80])
                break
        self.missing_modules = missing
        if missing:
            log.error(
                "FreeSWITCH lacks %s, which the forum_bridge dialplan needs: load %s in modules.conf."
                " Without mod_hash blocked log-ons are not kept from emergency numbers; without the"
                " others calls cannot be checked at all",
                ", ".join(missing),
                "them" if len(missing) > 1 else "it",
            )
        else:
            log.info("FreeSWITCH has every module the dialplan needs (%s)", ", ".join(REQUIRED_MODULES))
        return missing

    def _observe(self, module: str, missing: bool) -> None:
        if self.observer is None:
            return
        try:
            self.observer.set_module_missing(module, missing)
        except Exception:  # metrics must never take the listener down
            log.exception("metrics.set_module_missing failed")

    # --- single changes ---------------------------------------------------------------------------

    def blocked_changed(self, client: EslClient, logon: str, blocked: bool) -> None:
        """An applied event blocked ``logon`` (True) or cleared its block (False): tell FreeSWITCH now."""
        key = blocked_key(logon)
        if not _SAFE_KEY.match(key):
            log.error("not passing on the block of log-on %r: not usable as a mod_hash key", logon[:60])
            return
        if blocked:
            done = self._hash(client, f"insert/{HASH_REALM}/{key}/{HASH_VALUE}")
        else:
            done = self._hash(client, f"delete/{HASH_REALM}/{key}", missing_ok=True)
        if done:
            self.pushes += 1
            log.info("%s logon=%s in FreeSWITCH", "blocked" if blocked else "unblocked", logon)

    # --- the full pass ----------------------------------------------------------------------------

    def sync(self, client: EslClient) -> bool:
        """Rewrite what differs and write the heartbeat; False when the database could not be read.

        Without the database the blocks in FreeSWITCH stay as they are but are no longer confirmed,
        so they go stale after ``emergency.block_stale_after``.
        """
        self._next_sync = self._monotonic() + self.interval
        try:
            blocked = self.service.blocked_logons()
        except ForumBridgeError as exc:
            if not self._db_failing:
                log.error(
                    "cannot read the blocked log-ons (%s); FreeSWITCH keeps the last ones until they"
                    " go stale (emergency.block_stale_after = %d s)",
                    exc,
                    self.settings.block_stale_after,
                )
            self._db_failing = True
            return False
        if self._db_failing:
            log.warning("the blocked log-ons can be read again; confirming them to FreeSWITCH")
            self._db_failing = False
        keys = [blocked_key(logon) for logon in blocked]
        keys += alive_buckets(self.clock(), self.settings.block_stale_after)
        wanted = {key: HASH_VALUE for key in keys if _SAFE_KEY.match(key)}
        current = parse_hash_dump(client.api(f"hash_dump db {HASH_REALM}", timeout=self.command_timeout))
        # New keys first, then the stale ones: a blocked log-on is never missing in between.
        for key, value in sorted(wanted.items()):
            if current.get(key) != value and not self._hash(client, f"insert/{HASH_REALM}/{key}/{value}"):
                return False
        for key in sorted(set(current) - set(wanted)):
            if key.startswith((BLOCKED_PREFIX, ALIVE_PREFIX)) and _SAFE_KEY.match(key):
                self._hash(client, f"delete/{HASH_REALM}/{key}", missing_ok=True)
        self.syncs += 1
        log.debug("blocked log-ons confirmed to FreeSWITCH: %d", len(blocked))
        return True

    def _hash(self, client: EslClient, arguments: str, *, missing_ok: bool = False) -> bool:
        """One ``hash`` command; False (logged once until it works again) when FreeSWITCH refuses it.

        A refusal (mod_hash not loaded) must not end the event connection: only the emergency
        blocks are lost, and the module check has said so already.
        """
        answer = client.api(f"hash {arguments}", timeout=self.command_timeout).strip()
        if answer.startswith("+OK") or (missing_ok and answer.startswith("-ERR Not found")):
            if self._hash_failing:
                log.warning("FreeSWITCH's mod_hash takes the blocked log-ons again")
                self._hash_failing = False
            return True
        if not self._hash_failing:
            log.error(
                "FreeSWITCH refused 'hash %s': %s (is mod_hash loaded?); blocked log-ons are not"
                " kept from emergency numbers there",
                arguments.split("/", 1)[0],
                answer[:80],
            )
        self._hash_failing = True
        return False
