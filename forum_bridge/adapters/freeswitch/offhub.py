"""Database work of the FreeSWITCH side, off gevent's hub.

gevent runs every greenlet in one OS thread. A SQL call blocks that thread: while SQLite waits for
its write lock (up to its busy timeout) or PostgreSQL is slow, no ESL event, socket-hook session,
keepalive sweep or status page request would move. :class:`OffHub` hands each service call that
touches the database to gevent's threadpool, so only the greenlet that asked waits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["DATABASE_METHODS", "OffHub"]

DATABASE_METHODS = frozenset(
    {
        "apply",
        "audit_log",
        "authorize",
        "blocked_logons",
        "call_number",
        "check",
        "expire_keepalives",
        "logon_state",
        "profiles",
        "reset_licences",
        "resync",
        "ringable",
        "status",
    }
)
"""The service methods that run SQL; everything else (settings, clock, listeners) is used as is."""


class OffHub:
    """Wraps a :class:`forum_bridge.service.BridgeService`; its database calls run in a threadpool."""

    def __init__(self, service: Any, pool: Any) -> None:
        """``pool`` is a gevent threadpool (``gevent.get_hub().threadpool``)."""
        self._service = service
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._service, name)
        if name in DATABASE_METHODS:
            return functools.partial(self._run, value)
        return value

    def _run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # apply() blocks only the calling greenlet and re-raises the function's exception here.
        return self._pool.apply(func, args, kwargs)
