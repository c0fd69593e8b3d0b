#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the linters and the whole suite.
#
#   bash tests/run.sh [pytest arguments]
#
# As root it installs Debian's PostgreSQL, SIPp (sip-tester), debootstrap, Chromium and prometheus
# (for promtool, which tests the alert rules), installs the real FreeSWITCH 1.10 from
# ../shared/freeswitch, builds the sandbox Asterisk 22 chroot once (cached), and creates the virtual
# environment .venv. Tests that need one of these parts fail loudly when it cannot start; none of
# them is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(postgresql sip-tester debootstrap chromium python3-venv prometheus)
if [ "$(id -u)" = 0 ]; then
    missing=()
    for pkg in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> installing Debian packages: ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
else
    echo "==> not root: assuming ${packages[*]} are installed" >&2
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$python" -m venv .venv
fi
echo "==> installing forum-bridge and its test tools into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# FreeSWITCH is not in Debian's archive: the shared folder beside the clone carries a build of its
# public source and its installer (idempotent, seconds). The FreeSWITCH tests need it; no skipping.
freeswitch_installer=../shared/freeswitch/install.sh
if [ "$(id -u)" = 0 ]; then
    echo "==> installing FreeSWITCH (../shared/freeswitch)"
    if [ ! -f "$freeswitch_installer" ]; then
        echo "cannot install FreeSWITCH: $freeswitch_installer is missing" >&2
        exit 1
    fi
    bash "$freeswitch_installer"
elif [ ! -x /opt/fs/bin/freeswitch ]; then
    echo "FreeSWITCH is not installed and this is not root: run bash $freeswitch_installer as root" >&2
    exit 1
fi

echo "==> building the sandbox Asterisk (cached after the first run)"
.venv/bin/python -m tests.sandbox build

echo "==> ruff"
.venv/bin/ruff check forum_bridge tests migrations bench
.venv/bin/ruff format --check --quiet forum_bridge tests migrations bench
echo "==> mypy"
.venv/bin/mypy

echo "==> pytest"
mkdir -p test-artifacts
set +e
.venv/bin/python -m pytest -W error -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest ran no tests: that is a failure" >&2
    exit 1
fi
exit "$status"
