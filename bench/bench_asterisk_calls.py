"""Benchmark: call set-up time through a real Asterisk 22, with and without the bridge's hook.

    .venv/bin/python bench/bench_asterisk_calls.py --runs N [--size small|full]

Needs root and the sandbox Asterisk (tests/sandbox: a Debian chroot with Debian's Asterisk 22,
cached after the first build) and SIPp (Debian's sip-tester). One Asterisk, one bridge
(``forum-bridge run asterisk``, SQLite, enforce = both) and one registered phone. SIPp then places
200 calls at 20 calls/s (full size; 20 at 10/s small), each held one second, twice per run:

* with the hook: the dialplan snippet ``forum-bridge dialplan asterisk`` renders, so every call
  asks the bridge through FastAGI (``forum-bridge-outbound``) before it is answered;
* without: the same dialplan with ``forum-bridge-outbound`` reduced to ``Return()``.

The bridge runs in both, so only the hook differs. Set-up time is taken from SIPp's message trace
(microsecond stamps): from the first INVITE sent to its 200 OK received, the digest challenge
included in both. The figure is the ratio of
the medians; the order of the two variants alternates between runs.
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
from datetime import datetime
from pathlib import Path

import _common

NO_HOOK_SNIPPET = """\
; The same routines without the question to the bridge.
[forum-bridge-outbound]
exten => s,1,Return()

[forum-bridge-inbound]
exten => s,1,Return()
"""
LOGON, PASSWORD = "21-desk", "bench-pw-21"


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
                        "-m",
                        "forum_bridge",
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
                with_hook: list[float] = []
                without: list[float] = []
                ratios: list[float] = []
                for run in range(args.runs):
                    order = [("with", snippet), ("without", NO_HOOK_SNIPPET)]
                    if run % 2:
                        order.reverse()
                    medians: dict[str, float] = {}
                    for name, text in order:
                        pbx.reload_dialplan(text)
                        times = load_run(tmp / f"run{run}-{name}", pbx.sip_port, calls, rate)
                        medians[name] = statistics.median(times)
                        _common.say(
                            f"run {run + 1} {name} hook: median {medians[name]:.1f} ms, "
                            f"p90 {statistics.quantiles(times, n=10)[-1]:.1f} ms over {len(times)} calls"
                        )
                    with_hook.append(medians["with"])
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
