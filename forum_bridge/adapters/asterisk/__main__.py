"""``python -m forum_bridge.adapters.asterisk [--config PATH]``: the same as ``forum-bridge run asterisk``."""

from __future__ import annotations

import argparse
import sys

from forum_bridge.adapters.asterisk.runner import run
from forum_bridge.config import load_settings
from forum_bridge.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Parse ``--config``, load the settings and run the bridge; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m forum_bridge.adapters.asterisk")
    parser.add_argument("--config", help="TOML configuration file (default: $FORUM_BRIDGE_CONFIG)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"forum-bridge: {exc}", file=sys.stderr)
        return 2
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
