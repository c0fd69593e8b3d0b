"""``python -m tests.sandbox build``: build (or reuse) the sandbox Asterisk chroot."""

from __future__ import annotations

import sys
import time

from tests.sandbox.asterisk import SandboxError, build_root


def main(argv: list[str]) -> int:
    """Build the cached chroot and print where it is; exit 1 with the reason if that fails."""
    if argv != ["build"]:
        print("usage: python -m tests.sandbox build", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        root = build_root()
    except SandboxError as exc:
        print(f"sandbox build failed: {exc}", file=sys.stderr)
        return 1
    print(f"sandbox Asterisk root ready at {root} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
