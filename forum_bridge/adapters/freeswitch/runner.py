"""``forum-bridge run freeswitch``: the FreeSWITCH connector as one gevent process.

gevent and asyncio do not mix, so this side runs in its own process, and :func:`run` is the only
place that monkey-patches: importing this module (or any other of the package) patches nothing,
so tests and the asyncio side can import it safely.
"""

from __future__ import annotations

import logging
import signal
import warnings
from typing import Any

from forum_bridge.config import Settings

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # bad configuration: one line naming the key, as every other command (and run asterisk)


def _patch() -> None:
    from gevent import monkey

    if monkey.is_module_patched("socket"):
        return
    with warnings.catch_warnings():
        # Late patching (the CLI has imported ssl already) only warns about ssl, which the bridge
        # does not use in this process.
        warnings.simplefilter("ignore")
        monkey.patch_all()


def _configure_logging(settings: Settings) -> None:
    """Log like the rest of the bridge, at the configured level, with the secrets redacted."""
    from forum_bridge.logsetup import configure_logging

    configure_logging(settings.log_level, settings.secret_values())


def _start_web(service: Any, settings: Settings) -> tuple[Any, Any]:
    """The status web server and metrics, imported only when enabled."""
    try:
        from forum_bridge.metrics import Metrics
        from forum_bridge.web.server import start_web
    except ImportError as exc:
        raise RuntimeError(
            f"the status web server is not available in this installation ({exc}); "
            "set [web] enabled = false to run without it"
        ) from exc
    metrics = Metrics(service, pbx="freeswitch")
    return metrics, start_web(service, settings, metrics)


def _stop_web(server: Any) -> None:
    for name in ("stop", "shutdown", "close"):
        method = getattr(server, name, None)
        if callable(method):
            try:
                method()
            except Exception:
                log.exception("stopping the status web server failed")
            return


def run(settings: Settings) -> int:
    """Run the FreeSWITCH connector until SIGTERM or SIGINT; return the process exit code."""
    _patch()
    import gevent
    from gevent.event import Event
    from gevent.threadpool import ThreadPool

    from forum_bridge.errors import ConfigError, ForumBridgeError
    from forum_bridge.service import BridgeService
    from forum_bridge.store.database import Database

    from .listener import EslListener, KeepaliveSweeper
    from .offhub import OffHub
    from .socket_hook import SocketHookServer

    _configure_logging(settings)
    fs = settings.freeswitch
    database = Database(settings.database_url)
    # One native thread for all SQL: the hub never waits for the database, and no gevent lock
    # is ever contended between native threads (gevent cannot wake a waiter in another one).
    db_thread = ThreadPool(1)
    bridge = BridgeService(settings, database)
    service: Any = OffHub(bridge, db_thread)
    hook: SocketHookServer | None = None
    web: Any = None
    greenlets: list[Any] = []
    try:
        bridge.start()
        metrics: Any = None
        if settings.web.enabled:
            metrics, web = _start_web(service, settings)
        if fs.enforce in ("hook", "both"):
            hook = SocketHookServer(service, settings)
            hook.start()
        else:
            log.info("socket hook not started: freeswitch.enforce = %s", fs.enforce)
    except (ForumBridgeError, RuntimeError) as exc:
        log.error("cannot start the FreeSWITCH connector: %s", exc)
        if hook is not None:
            hook.stop()
        if web is not None:
            _stop_web(web)
        db_thread.kill()
        database.dispose()
        # systemd restarts a failed unit; a configuration that cannot work must say so distinctly.
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE

    listener = EslListener(service, settings, metrics=metrics)
    if hook is not None:
        hook.before_decision = listener.caught_up
    sweeper = KeepaliveSweeper(service, on_recovered=listener.request_resync)
    stopping = Event()

    def request_stop(signum: int) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stopping.set()

    handlers = [gevent.signal_handler(sig, request_stop, sig) for sig in (signal.SIGTERM, signal.SIGINT)]
    greenlets = [gevent.spawn(listener.run), gevent.spawn(sweeper.run)]
    log.info(
        "FreeSWITCH connector running: node %s, ESL %s:%d, enforce %s, fail_mode %s",
        settings.node_name,
        fs.esl_host,
        fs.esl_port,
        fs.enforce,
        fs.fail_mode,
    )
    try:
        # Wake up now and then so a worker that died is noticed instead of waited on forever.
        while not stopping.wait(1.0):
            if any(g.dead for g in greenlets):
                log.error("the FreeSWITCH connector's workers stopped; exiting")
                return EXIT_FAILURE
    finally:
        listener.stop()
        sweeper.stop()
        if hook is not None:
            hook.stop()
        gevent.joinall(greenlets, timeout=5.0)
        gevent.killall([g for g in greenlets if not g.dead], timeout=1.0)
        if web is not None:
            _stop_web(web)
        for handler in handlers:
            handler.cancel()
        db_thread.kill()
        database.dispose()
        log.info("FreeSWITCH connector stopped")
    return EXIT_OK
