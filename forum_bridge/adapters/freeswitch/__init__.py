"""The FreeSWITCH connector: ESL events, the socket hooks, ``uuid_kill`` enforcement, resync, mod_hash.

It runs in its own gevent process (``forum-bridge run freeswitch``). Importing this package does
not import gevent and patches nothing; :func:`run` monkey-patches when it starts the process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .dialplan import render_dialplan

if TYPE_CHECKING:
    from forum_bridge.config import Settings

__all__ = ["render_dialplan", "run"]


def run(settings: Settings) -> int:
    """Run the connector until SIGTERM or SIGINT (see :func:`.runner.run`); return the exit code."""
    from .runner import run as run_connector

    return run_connector(settings)
