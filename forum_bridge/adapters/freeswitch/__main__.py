"""``python -m forum_bridge.adapters.freeswitch [--config PATH]``: run the FreeSWITCH connector.

The same as ``forum-bridge run freeswitch``, for service managers and tests that want the connector
without the rest of the command line.
"""

from __future__ import annotations

import argparse
import sys

from forum_bridge.config import load_settings
from forum_bridge.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, load the settings and run the connector; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m forum_bridge.adapters.freeswitch",
        description="Run the forum_bridge FreeSWITCH connector (ESL listener and socket hook).",
    )
    parser.add_argument("--config", metavar="PATH", help="TOML settings file (default: FORUM_BRIDGE_CONFIG)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .runner import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
