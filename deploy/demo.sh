#!/usr/bin/env bash
# The main job: a real PBX, the bridge and SIPp phones, showing the Forum licence rules at work.
#
#   sudo bash deploy/demo.sh [asterisk|freeswitch] [--keep]
#
# asterisk (the default): Debian's Asterisk 22, in a chroot built on first use.
# freeswitch: the real FreeSWITCH 1.10, installed from ../shared/freeswitch (a build of its public
# source kept beside the clone: FreeSWITCH is not in Debian's archive) when it is not there yet.
# Installs what it needs (SIPp, a virtual environment .venv), then runs the demo described in
# tests/sandbox/demo.py and prints `forum-bridge status`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "the demo starts a private PBX (a chroot for Asterisk) and must run as root" >&2
    exit 1
fi
pbx=asterisk
case "${1:-}" in
    asterisk|freeswitch) pbx=$1; shift ;;
esac
packages=(sip-tester python3-venv)
[ "$pbx" = asterisk ] && packages+=(debootstrap)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ "$pbx" = freeswitch ] && [ ! -x /opt/fs/bin/freeswitch ]; then
    if [ ! -f ../shared/freeswitch/install.sh ]; then
        echo "FreeSWITCH is not installed and ../shared/freeswitch/install.sh is missing" >&2
        exit 1
    fi
    bash ../shared/freeswitch/install.sh
fi
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/python -m tests.sandbox.demo "$pbx" "$@"
