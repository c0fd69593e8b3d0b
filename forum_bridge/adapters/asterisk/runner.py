"""``forum-bridge run asterisk``: the AMI listener, the FastAGI hook and the keepalive clock together.

:func:`run` is the process (logging, database, signals, status page); :func:`serve` is the part
that runs inside an event loop until a stop event is set, which the tests drive directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from forum_bridge.adapters.asterisk.agi import FastAgiServer
from forum_bridge.adapters.asterisk.ami import AmiListener, AmiObserver, RecentDecisions
from forum_bridge.adapters.asterisk.astdb import EmergencyState, ModuleObserver
from forum_bridge.adapters.asterisk.dialplan import local_path
from forum_bridge.config import Settings
from forum_bridge.errors import ForumBridgeError, StoreError
from forum_bridge.service import BridgeService
from forum_bridge.store import operations as ops
from forum_bridge.store.database import Database

__all__ = ["KEEPALIVE_SWEEP_SECONDS", "Bridge", "run", "serve"]

log = logging.getLogger(__name__)

KEEPALIVE_SWEEP_SECONDS = 1.0
# While a backlog of AMI frames waits (a registration storm), the sweep runs at most this often: it
# shares the one database thread with the backlog (and its periodic full pass reads every contact
# of this node), and what it judges is only as of the oldest frame still queued anyway.
BACKLOG_SWEEP_SECONDS = 3.0
# session.info key: this transaction changed the licence pool; tell the licensed set once committed.
_LICENCES_CHANGED = "forum_bridge.asterisk.licences_changed"


class Bridge:
    """The running parts of one Asterisk bridge (for tests that need to look inside)."""

    def __init__(
        self, settings: Settings, service: BridgeService, observer: AmiObserver | None = None
    ) -> None:
        """Build the parts; nothing runs until :meth:`serve`."""
        self.settings = settings
        self.service = service
        # One thread for everything that must stay in order (events, resyncs, the keepalive
        # clock); the hook decides in threads of its own (see agi.py) so a backlog never delays it.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="forum-bridge-db")
        decisions = RecentDecisions()
        self.ami = AmiListener(
            settings,
            service,
            observer=observer,
            executor=self.executor,
            decisions=decisions,
            on_blocked=self._blocked_changed,
        )
        # The blocked set is read in the event thread, so it sees every event applied before it.
        # With enforce = both the dialplan also answers licensed log-ons' calls from AstDB.
        local = local_path(settings)
        self.emergency = EmergencyState(
            service.blocked_logons,
            self.ami,
            licensed_logons=service.licensed_logons if local else None,
            executor=self.executor,
            observer=observer if isinstance(observer, ModuleObserver) else None,
            db_timeout=float(settings.asterisk.action_timeout),
        )
        # Answer (with the fail mode, logged) before the dialplan's own bound gives up on the hook.
        decision_timeout = min(
            float(settings.asterisk.action_timeout), max(0.2, settings.asterisk.hook_timeout - 0.5)
        )
        self.agi = FastAgiServer(
            settings,
            service,
            before_decision=self.ami.caught_up,
            after_decision=self.ami.decided,
            decisions=decisions,
            decision_timeout=decision_timeout,
        )
        self.started = asyncio.Event()
        if local:
            # Every licence change of this process (calls, log-offs, keepalive expiry, a reset
            # from the page...) marks its transaction for the pool watch; ahead of that watch,
            # which consumes the mark, this copies it and pokes the licensed set after the commit.
            service.database.add_commit_hooks(
                self._licences_before_commit, self._licences_after_commit, first=True
            )
            service.add_failure_listener(self.emergency.database_failed)

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then stop every part and return."""
        try:
            await self.agi.start()
            # The AMI session outlives the other parts by one step: the dialplan's local answers
            # are withdrawn over it once nothing decides calls any more.
            ami_stop = asyncio.Event()
            ami = asyncio.create_task(self.ami.run(ami_stop), name="forum-bridge-ami")
            tasks = [
                ami,
                asyncio.create_task(self._sweep(stop), name="forum-bridge-keepalive"),
                asyncio.create_task(self.emergency.run(stop), name="forum-bridge-emergency-state"),
            ]
            self.started.set()
            stopping = asyncio.ensure_future(stop.wait())
            watched: set[asyncio.Future[Any]] = {stopping, *tasks}
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            broken = None if stop.is_set() else next((t for t in tasks if t.done()), None)
            stop.set()
            await asyncio.gather(stopping, *tasks[1:], return_exceptions=True)
            await self.emergency.withdraw_local()
            ami_stop.set()
            await asyncio.gather(ami, return_exceptions=True)
            if broken is not None:
                # Only a bug ends a part early; stop the process so the service manager restarts it.
                error = broken.exception() if not broken.cancelled() else None
                log.error("%s ended unexpectedly: %r", broken.get_name(), error)
                raise ForumBridgeError(f"{broken.get_name()} ended unexpectedly")
        finally:
            await self.agi.close()
            self.executor.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _licences_before_commit(session: Any) -> None:
        if session.info.get(ops.POOL_CHANGED):
            session.info[_LICENCES_CHANGED] = True

    def _licences_after_commit(self, session: Any) -> None:
        if session.info.pop(_LICENCES_CHANGED, False):
            self.emergency.licences_changed()

    def _blocked_changed(self, logon: str, blocked: bool) -> None:
        self.emergency.blocked_changed(logon, blocked)

    def _expire(self, now: datetime | None) -> None:
        self.service.expire_keepalives(now)
        self.service.flush_failure_summary()

    async def _sweep(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        swept = float("-inf")
        while not stop.is_set():
            try:
                # Judged as of the oldest AMI frame not applied yet: a refresh that arrived in time
                # but waits behind a flood must not count as missed.
                now = self.ami.watermark()
                if now is not None and loop.time() - swept < BACKLOG_SWEEP_SECONDS:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), KEEPALIVE_SWEEP_SECONDS)
                    continue
                swept = loop.time()
                await loop.run_in_executor(self.executor, self._expire, now)
                # Retention: at most one short, bounded delete an hour (never raises).
                await loop.run_in_executor(self.executor, self.service.prune_if_due)
                if failing:
                    log.info("keepalive clock works again")
                    # Events that arrived while the database was away were not stored.
                    self.ami.request_resync("database back")
                failing = False
            except StoreError as exc:
                if not failing:
                    log.error("keepalive clock: %s", exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), KEEPALIVE_SWEEP_SECONDS)


async def serve(
    settings: Settings, service: BridgeService, *, stop: asyncio.Event, observer: AmiObserver | None = None
) -> None:
    """Run the Asterisk bridge for a started ``service`` until ``stop`` is set."""
    await Bridge(settings, service, observer).serve(stop)


def run(settings: Settings) -> int:
    """Run the bridge as a process until SIGTERM or SIGINT; return the exit code."""
    from forum_bridge.logsetup import configure_logging

    configure_logging(settings.log_level, settings.secret_values())
    if settings.log_level != "DEBUG":
        # The schema check at start-up makes Alembic log its routine set-up at INFO.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if not settings.asterisk.ami_secret:
        log.warning("asterisk.ami_secret is empty; Asterisk will refuse the AMI login")
    database = Database(settings.database_url)
    web: Any = None
    try:
        service = BridgeService(settings, database)
        try:
            service.start()
        except ForumBridgeError as exc:
            log.error("cannot start: %s", exc)
            return 2
        metrics: Any = None
        if settings.web.enabled:
            # Imported here: the status page is optional and pulls in its own dependencies.
            from forum_bridge.metrics import Metrics
            from forum_bridge.web.server import start_web

            metrics = Metrics(service, pbx="asterisk")
            try:
                web = start_web(service, settings, metrics)
            except ForumBridgeError as exc:
                log.error("cannot start the status page: %s", exc)
                return 2
        try:
            asyncio.run(_main(settings, service, metrics))
        except ForumBridgeError as exc:
            log.error("stopped: %s", exc)
            return 2
        log.info("stopped")
        return 0
    finally:
        if web is not None:
            web.stop()
        database.dispose()


async def _main(settings: Settings, service: BridgeService, observer: AmiObserver | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "bridge for Asterisk starting: node=%s enforce=%s fail_mode=%s",
        settings.node_name,
        settings.asterisk.enforce,
        settings.asterisk.fail_mode,
    )
    try:
        await serve(settings, service, stop=stop, observer=observer)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
