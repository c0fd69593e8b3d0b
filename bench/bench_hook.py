"""Benchmark: the FastAGI hook's answer time and throughput, beside the floor any hook has.

    .venv/bin/python bench/bench_hook.py --runs N [--size small|full] [--postgres URL]

The client plays Asterisk 22 (res_agi.c): it connects, writes the real ``agi_*`` environment,
answers ``200 result=1`` to each command and waits for the server to close. The server runs in a
process of its own (bench/_hook_server.py), so the client does not share its interpreter.

* floor: a server that reads the environment, sends one SET VARIABLE and closes (no decision).
* sequential: 1,000 log-ons (full size), all logged on, 800 licences: each calls once (every tenth
  to 112), one after the other; the figure is the median time from connect to close.
* concurrent: 20 clients at once, 4,000 calls from the same log-ons (now mostly licensed);
  decisions per second over the whole batch.
* with pollers: 200 calls one after the other (at most 20 s of them) while 64 clients poll the
  status page's ``/status.json`` (served by the same process, as ``forum-bridge run`` does) as fast
  as it answers.

Figures per database; each run uses a fresh database and a fresh server.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent
LICENCE_SHARE = 0.8
CLIENTS = 20
POLLERS = 64
POLL_SECONDS = 20.0  # the calls measured with pollers stop after this long


def environment(channel: str, number: str, port: int) -> bytes:
    """The block Asterisk 22 writes for ``AGI(agi://127.0.0.1:port/outbound,number)``."""
    lines = [
        "agi_network: yes",
        "agi_network_script: outbound",
        f"agi_request: agi://127.0.0.1:{port}/outbound",
        f"agi_channel: {channel}",
        "agi_language: en",
        "agi_type: PJSIP",
        "agi_uniqueid: 1795495164.3",
        "agi_version: 22.10.1",
        "agi_callerid: 21",
        "agi_calleridname: Desk",
        "agi_callingpres: 0",
        "agi_callingani2: 0",
        "agi_callington: 0",
        "agi_callingtns: 0",
        f"agi_dnid: {number}",
        "agi_rdnis: unknown",
        "agi_context: forum-bridge-outbound",
        "agi_extension: s",
        "agi_priority: 2",
        "agi_enhanced: 0.0",
        "agi_accountcode: ",
        "agi_threadid: 140234567890",
        f"agi_arg_1: {number}",
    ]
    return ("\n".join(lines) + "\n\n").encode()


async def one_call(port: int, channel: str, number: str) -> tuple[float, dict[str, str]]:
    """One FastAGI conversation; (seconds from connect to close, variables set)."""
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(environment(channel, number, port))
    answers: dict[str, str] = {}
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            words = line.decode().split(" ", 3)
            if words[:2] == ["SET", "VARIABLE"] and len(words) == 4:
                answers[words[2]] = words[3].strip().strip('"')
            writer.write(b"200 result=1\n")
    finally:
        writer.close()
    return time.perf_counter() - began, answers


def number_for(index: int) -> str:
    return "112" if index % 10 == 0 else "600"


async def sequential(
    port: int, calls: int, logons: int, offset: int = 0, budget: float | None = None
) -> list[float]:
    """``calls`` conversations one after the other (fewer if ``budget`` seconds run out); durations."""
    times: list[float] = []
    began = time.monotonic()
    for i in range(offset, offset + calls):
        if budget is not None and times and time.monotonic() - began > budget:
            break
        took, answers = await one_call(port, f"PJSIP/u{i % logons}-{i:08x}", number_for(i))
        if "FORUM_BRIDGE_RESULT" not in answers:
            raise SystemExit(f"call {i} got no answer: {answers}")
        times.append(took)
    return times


async def concurrent(port: int, calls: int, logons: int, offset: int) -> tuple[float, int]:
    """``calls`` conversations from CLIENTS clients at once; (elapsed seconds, answered)."""
    queue = iter(range(offset, offset + calls))
    answered = 0

    async def client() -> None:
        nonlocal answered
        for i in queue:
            _took, answers = await one_call(port, f"PJSIP/u{i % logons}-{i:08x}", number_for(i))
            answered += "FORUM_BRIDGE_RESULT" in answers

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return time.perf_counter() - began, answered


def start_server(*args: str) -> tuple[subprocess.Popen[str], int]:
    """Start bench/_hook_server.py with ``args``; the process and its port."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_hook_server.py"), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return process, int(_common.wait_for_line(process))


def stop_server(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def with_pollers(db_url: str, licences: int, calls: int, logons: int) -> float:
    """Median sequential latency (ms) while POLLERS clients poll /status.json of the same process."""
    web_port = _common.free_port()
    server, port = start_server("bridge", db_url, str(licences), "bench", str(web_port))
    poller = subprocess.Popen(
        [sys.executable, str(HERE / "_poller.py"), str(web_port), str(POLLERS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        _common.wait_for_line(poller)
        times = asyncio.run(sequential(port, calls, logons, offset=100_000, budget=POLL_SECONDS))
    finally:
        assert poller.stdin is not None
        poller.stdin.close()
        polled = poller.stdout.read().strip() if poller.stdout else "?"
        poller.wait(60)
        stop_server(server)
    _common.say(f"  with pollers: {len(times)} calls answered; status documents read meanwhile: {polled}")
    return statistics.median(times) * 1000


def measure(port: int, sequential_calls: int, concurrent_calls: int, logons: int) -> tuple[float, float]:
    """(median sequential latency in ms, concurrent decisions per second) against one server."""
    times = asyncio.run(sequential(port, sequential_calls, logons))
    elapsed, answered = asyncio.run(concurrent(port, concurrent_calls, logons, sequential_calls))
    if answered != concurrent_calls:
        raise SystemExit(f"only {answered} of {concurrent_calls} concurrent calls were answered")
    return statistics.median(times) * 1000, concurrent_calls / elapsed


def main() -> int:
    """Measure the floor, then the hook on each database; print the figures."""
    args = _common.options(__doc__.splitlines()[0])
    logons, seq_calls, conc_calls = (1000, 1000, 4000) if args.size == "full" else (50, 50, 100)
    floor_latency, floor_rate = [], []
    for run in range(args.runs):
        server, port = start_server("floor")
        try:
            latency, rate = measure(port, seq_calls, conc_calls, logons)
        finally:
            stop_server(server)
        floor_latency.append(latency)
        floor_rate.append(rate)
        _common.say(f"floor run {run + 1}: {latency:.3f} ms, {rate:.0f}/s")
    floor_ms, floor_per_s = statistics.median(floor_latency), statistics.median(floor_rate)
    _common.emit(
        "hook_floor_latency",
        "ms",
        floor_latency,
        floor=None,
        floor_note="asyncio server: read the AGI block, one SET VARIABLE, close",
        target="-",
        met=None,
    )
    for name, url in _common.databases(args):
        latencies, rates, polled = [], [], []
        for run in range(args.runs):
            with _common.database_for_run(url) as db_url:
                service = _common.provision(db_url, subscribers=logons, licences=int(logons * LICENCE_SHARE))
                service.database.dispose()
                server, port = start_server("bridge", db_url, str(int(logons * LICENCE_SHARE)))
                try:
                    latency, rate = measure(port, seq_calls, conc_calls, logons)
                finally:
                    stop_server(server)
                polled.append(with_pollers(db_url, int(logons * LICENCE_SHARE), seq_calls // 5, logons))
            latencies.append(latency)
            rates.append(rate)
            _common.say(f"{name} run {run + 1}: {latency:.3f} ms, {rate:.0f}/s")
        _common.emit(
            f"hook_latency_sequential_{name}",
            "ms",
            latencies,
            floor=floor_ms,
            floor_note="same client against the floor server, same run",
            target="<= 2x floor",
            met=lambda median: median <= 2 * floor_ms,
        )
        _common.emit(
            f"hook_latency_sequential_64_status_pollers_{name}",
            "ms",
            polled,
            floor=statistics.median(latencies),
            floor_note="the sequential figure without pollers, same runs",
            target="status reads must not slow decisions (no number set)",
            met=None,
        )
        _common.emit(
            f"hook_decisions_per_s_20_clients_{name}",
            "decisions/s",
            rates,
            floor=floor_per_s,
            floor_note="same 20 clients against the floor server",
            target=">= 1000/s",
            met=lambda median: median >= 1000,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
