"""Benchmark: call set-up time through a real Asterisk 22, with and without the bridge's hook.

    .venv/bin/python bench/bench_asterisk_calls.py --runs N [--size small|full]

Needs root and the sandbox Asterisk (tests/sandbox: a Debian chroot with Debian's Asterisk 22,
cached after the first build) and SIPp (Debian's sip-tester). One Asterisk, one bridge
(``forum-bridge run asterisk``, SQLite, enforce = both) and one registered phone. SIPp then places
200 calls at 20 calls/s (full size; 20 at 10/s small), each held one second, three times per run:

* with the hook: the dialplan snippet ``forum-bridge dialplan asterisk`` renders. The phone's log-on
  took its licence with its first call (before the runs), as every busy phone of a PBX has, so
  the dialplan answers its calls from AstDB without asking the bridge (enforce = both);
* hook path: the snippet rendered without that local answer, so every call asks the bridge through
  FastAGI before it is answered: the path of a log-on without a licence, and every call before
  the local answer existed (printed beside the figures, not a figure of the table);
* without: the same dialplan with ``forum-bridge-outbound`` reduced to ``Return()``.

The bridge runs in all three, so only the dialplan differs; it deciding every Newchannel over AMI
is part of each. Which calls asked the hook is counted from the hook's DEBUG line (one per
question; only that logger is at DEBUG). Set-up time is taken from SIPp's message trace
(microsecond stamps): from the first INVITE sent to its 200 OK received, the digest challenge
included in all. The figure is the ratio of the medians; the order of the variants rotates between
runs.
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import _common

NO_HOOK_SNIPPET = """\
; The same routines without the question to the bridge.
[forum-bridge-outbound]
exten => s,1,Return()

[forum-bridge-inbound]
exten => s,1,Return()
"""
LOGON, PASSWORD = "21-desk", "bench-pw-21"
# The bridge as "python -m forum_bridge" starts it, with only the hook's logger at DEBUG: it writes
# one line per question, which tells the calls that asked the hook from those answered by the
# dialplan, at the cost of one log line on the hook path alone.
_HOOK_DEBUG = (
    "import logging, sys; "
    "logging.getLogger('forum_bridge.adapters.asterisk.agi').setLevel(logging.DEBUG); "
    "sys.argv[0] = 'forum-bridge'; "
    "from forum_bridge.cli import entry; entry()"
)


def _asked(log_path: Path) -> int:
    """The hook's outbound questions the bridge has logged so far."""
    return log_path.read_text(encoding="utf-8", errors="replace").count("hook outbound channel=")


def _licensed(pbx: Any) -> set[str]:
    """The log-ons in AstDB's forum-bridge/licensed family, as Asterisk lists them."""
    lines = pbx.cli("database show forum-bridge/licensed").splitlines()
    return {line.split(" : ", 1)[0].strip().rsplit("/", 1)[-1] for line in lines if " : " in line}


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def _toml(path: Path, values: dict[str, dict[str, object]]) -> None:
    lines = []
    for section, body in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{name} = {json.dumps(value)}" for name, value in body.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"the bridge's FastAGI port {port} did not open within {timeout:.0f} s")


_BLOCK = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)$", re.MULTILINE)


def setup_times(trace: str) -> list[float]:
    """Per call (Call-ID) in SIPp's message trace: ms from the first INVITE sent to the 200 OK received.

    SIPp's own response-time statistics count in whole timer ticks (4 ms here); the trace is
    stamped to the microsecond.
    """
    first: dict[str, float] = {}
    answered: dict[str, float] = {}
    parts = _BLOCK.split(trace)
    for stamp, body in zip(parts[1::2], parts[2::2], strict=True):
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        call_id = re.search(r"^Call-ID:\s*(\S+)", body, re.MULTILINE | re.IGNORECASE)
        if call_id is None:
            continue
        key = call_id.group(1)
        sent = "message sent" in body[:80]
        if sent and "\nINVITE " in body[:200] and key not in first:
            first[key] = at
        elif not sent and "SIP/2.0 200" in body[:200] and re.search(r"^CSeq:\s*\d+ INVITE", body, re.M):
            answered.setdefault(key, at)
    return [(answered[k] - first[k]) * 1000 for k in answered if k in first]


def load_run(workdir: Path, sip_port: int, calls: int, rate: int) -> list[float]:
    """One SIPp run of ``calls`` calls at ``rate``/s; each answered call's set-up time in ms."""
    from tests.sandbox.asterisk import free_udp_port

    scenario = (_common.ROOT / "tests" / "sandbox" / "scenarios" / "call.xml").read_text(encoding="utf-8")
    scenario = scenario.replace("@RING_MS@", "15000").replace("@HOLD_MS@", "1000")
    workdir.mkdir(parents=True)
    (workdir / "call.xml").write_text(scenario, encoding="utf-8")
    (workdir / "phone.csv").write_text(
        f"SEQUENTIAL\n{LOGON};[authentication username={LOGON} password={PASSWORD}];\n", encoding="utf-8"
    )
    media = free_udp_port()
    media -= media % 2
    # fmt: off
    argv = [
        "sipp", f"127.0.0.1:{sip_port}",
        "-sf", "call.xml", "-inf", "phone.csv", "-s", "600",
        "-i", "127.0.0.1", "-p", str(free_udp_port()), "-mi", "127.0.0.1", "-mp", str(media),
        "-ci", "127.0.0.1", "-cp", str(free_udp_port()),
        "-r", str(rate), "-m", str(calls), "-l", str(rate * 4),
        "-recv_timeout", "15000", "-timeout", "180s", "-nostdin",
        "-trace_msg", "-message_file", "messages.log",
    ]
    # fmt: on
    result = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=240, check=False)
    times = setup_times((workdir / "messages.log").read_text(encoding="utf-8", errors="replace"))
    if len(times) != calls:
        raise SystemExit(
            f"SIPp: {len(times)} of {calls} calls were answered (exit {result.returncode}): "
            f"{result.stderr.strip()[-500:]}"
        )
    return times


def main() -> int:
    """Run both variants per run against one Asterisk and bridge; print the figures."""
    args = _common.options(__doc__.splitlines()[0], postgres=False)
    calls, rate = (200, 20) if args.size == "full" else (20, 10)
    from forum_bridge.adapters.asterisk.dialplan import render_dialplan
    from forum_bridge.config import load_settings
    from tests.sandbox import AsteriskSandbox, SippPhone, build_root, free_tcp_port

    build_root()
    with tempfile.TemporaryDirectory(prefix="forum-bridge-bench-calls-") as tmp_name:
        tmp = Path(tmp_name)
        agi_port = free_tcp_port()
        url = f"sqlite:///{tmp / 'bridge.db'}"
        values = {"database.url": url, "licences.count": 10, "asterisk.agi_port": agi_port}
        snippet = render_dialplan(load_settings(environ={}, overrides=values))
        # The same snippet without the local answer (it exists only with enforce = both).
        hook_values = {**values, "asterisk.enforce": "ami"}
        hook_only = render_dialplan(load_settings(environ={}, overrides=hook_values))
        if "forum-bridge/licensed" not in snippet or "forum-bridge/licensed" in hook_only:
            raise SystemExit("the rendered snippets do not differ in the local answer")
        service = _common.provision(url, subscribers=0, licences=10, node="pbx1")
        service.add_subscriber(LOGON, "21")
        service.database.dispose()
        bridge: subprocess.Popen[bytes] | None = None
        with AsteriskSandbox(agi_port, snippet, [(LOGON, PASSWORD)]) as pbx:
            _toml(
                tmp / "bridge.toml",
                {
                    "database": {"url": url},
                    "node": {"name": "pbx1"},
                    "licences": {"count": 10},
                    "web": {"enabled": False},
                    "log": {"level": "INFO"},
                    "asterisk": {
                        "ami_port": pbx.ami_port,
                        "ami_username": pbx.ami_username,
                        "ami_secret": pbx.ami_secret,
                        "agi_port": agi_port,
                        "enforce": "both",
                    },
                },
            )
            with (tmp / "bridge.log").open("wb") as log:
                bridge = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        _HOOK_DEBUG,
                        "--config",
                        str(tmp / "bridge.toml"),
                        "run",
                        "asterisk",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                _wait_port(agi_port, 60)
                phone = SippPhone(LOGON, PASSWORD, pbx.sip_port)
                if phone.register(expires=600) != 200:
                    raise SystemExit("the phone could not register")
                # The first call takes the log-on's licence (through the hook), as on a busy PBX.
                pbx.reload_dialplan(snippet)
                if phone.call("599", hold_seconds=0.2) != 200:
                    raise SystemExit("the first call was not answered")
                log_path = tmp / "bridge.log"
                _wait_for(lambda: _licensed(pbx) == {LOGON}, 15, "the licensed log-on to reach AstDB")
                with_hook: list[float] = []
                hook_path: list[float] = []
                without: list[float] = []
                ratios: list[float] = []
                variants = [("with", snippet), ("hook path", hook_only), ("without", NO_HOOK_SNIPPET)]
                for run in range(args.runs):
                    order = variants[run % 3 :] + variants[: run % 3]
                    medians: dict[str, float] = {}
                    for name, text in order:
                        pbx.reload_dialplan(text)
                        before = _asked(log_path)
                        workdir = tmp / f"run{run}-{name.replace(' ', '-')}"
                        times = load_run(workdir, pbx.sip_port, calls, rate)
                        medians[name] = statistics.median(times)
                        _common.say(
                            f"run {run + 1} {name}: median {medians[name]:.1f} ms, "
                            f"p90 {statistics.quantiles(times, n=10)[-1]:.1f} ms over {len(times)} calls;"
                            f" the hook was asked for {_asked(log_path) - before} of them"
                        )
                    with_hook.append(medians["with"])
                    hook_path.append(medians["hook path"])
                    without.append(medians["without"])
                    ratios.append(medians["with"] / medians["without"])
                phone.close()
            finally:
                if bridge is not None:
                    bridge.terminate()
                    try:
                        bridge.wait(20)
                    except subprocess.TimeoutExpired:
                        bridge.kill()
                        bridge.wait()
    floor = statistics.median(without)
    _common.emit(
        "asterisk_call_setup_with_hook",
        "ms",
        with_hook,
        floor=floor,
        floor_note=f"the same {calls} calls at {rate}/s without the hook (median of runs)",
        target="<= 1.15x floor",
        met=lambda median: median <= 1.15 * floor,
    )
    # Said, not emitted: the table's figures stay those the targets name.
    _common.say(
        f"hook path (every call asks the hook): median {statistics.median(hook_path):.2f} ms"
        f" (runs {', '.join(f'{t:.2f}' for t in hook_path)}),"
        f" {statistics.median(hook_path) / floor:.2f}x the set-up without the hook"
    )
    _common.emit(
        "asterisk_call_setup_ratio",
        "x",
        ratios,
        floor=1.0,
        floor_note="with / without the hook, per run",
        target="<= 1.15",
        met=lambda median: median <= 1.15,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
