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

from gevent.event import AsyncResult

__all__ = ["DATABASE_METHODS", "OffHub", "Pending", "call_now"]

DATABASE_METHODS = frozenset(
    {
        "apply",
        "apply_batch",
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

    @property
    def wrapped(self) -> Any:
        """The service whose database calls this runs in the threadpool."""
        return self._service

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._service, name)
        if name in DATABASE_METHODS:
            return functools.partial(self._run, value)
        return value

    def _run(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # apply() blocks only the calling greenlet and re-raises the function's exception here.
        return self._pool.apply(func, args, kwargs)

    def submit(self, name: str, /, *args: Any, **kwargs: Any) -> Pending:
        """Start the database method ``name`` in the threadpool and return at once.

        The caller may stop waiting (:meth:`Pending.wait` with a timeout) while the call goes on:
        the socket hook answers FreeSWITCH by its deadline whatever the database does.
        """
        return Pending(self._pool.spawn(_captured, getattr(self._service, name), args, kwargs))


class Pending:
    """A service call started by :meth:`OffHub.submit` (or already made, :func:`call_now`)."""

    def __init__(self, result: Any) -> None:
        """``result`` is a gevent ``AsyncResult`` whose value is ``(succeeded, value or error)``."""
        self._result = result

    def wait(self, timeout: float | None = None) -> Any:
        """The call's value, or its exception raised here; ``gevent.Timeout`` when not done in time."""
        succeeded, value = self._result.get(timeout=timeout)
        if succeeded:
            return value
        raise value


def call_now(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Pending:
    """Make the call here and now (a service that is not wrapped in :class:`OffHub`)."""
    result = AsyncResult()
    result.set(_captured(func, args, kwargs))
    return Pending(result)


def _captured(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    # The pool would print an exception no greenlet is waiting for any more (a decision rolled
    # back after its caller answered by the fail mode) as a traceback on stderr; hand it over instead.
    try:
        return True, func(*args, **kwargs)
    except Exception as exc:
        return False, exc
