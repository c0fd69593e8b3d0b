#!/usr/bin/env bash
# The main job: a real Asterisk 22 (Debian's, in a chroot), the bridge and SIPp phones.
#
#   sudo bash deploy/demo.sh [--keep]
#
# Installs what it needs (debootstrap, SIPp, a virtual environment .venv), then runs the demo
# described in tests/sandbox/demo.py and prints `forum-bridge status`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "the demo builds a chroot and must run as root" >&2
    exit 1
fi
missing=()
for pkg in sip-tester debootstrap python3-venv; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/python -m tests.sandbox.demo "$@"
