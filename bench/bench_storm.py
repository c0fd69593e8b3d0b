"""Benchmark: a registration storm over AMI until ``status`` shows every phone logged on.

    .venv/bin/python bench/bench_storm.py --runs 3 [--size small|full] [--postgres URL]

What a PBX restart looks like to the bridge: every phone registers again within seconds. A fake
Asterisk in its own process (so it does not share the bridge's interpreter) streams, for each phone,
the frames Asterisk 22 sends to the bridge's event mask for a first REGISTER, in the real order:
``ChallengeSent``, then (one round trip later, with other phones' challenges in between)
``SuccessfulAuth``, ``PeerStatus`` and ``ContactStatus``. The fake applies the session filter the
bridge asks for at login (AMI ``Filter``), as Asterisk does, so the bridge is sent the
``SuccessfulAuth`` and ``ContactStatus`` frames only. The bridge is the real Asterisk side
(``forum-bridge run asterisk`` minus the process wrapper: AMI listener, FastAGI hook, keepalive clock)
on a database provisioned by the CLI in another process.

Figures (one JSON object per line on stdout; human text on stderr):

* ``storm_seconds_<db>``: from the first frame sent until the status document (what ``status --json``
  prints) shows every phone logged on, that last status read included. Floor: the time panoramisk
  alone takes to read the same frames from the same fake (same filter) with a handler that does
  nothing.
* ``storm_resyncs_<db>``: resyncs the storm triggered (target 0: the normal SuccessfulAuth-before-
  ContactStatus order is no disagreement with the PBX).
* ``storm_peak_rss_mb_<db>``: peak resident memory of the bridge process after the storm.
* ``storm_call_seconds_<db>``: a phone whose REGISTER arrived in the middle of the storm places a
  call at once through the FastAGI hook (the real ``agi_*`` block): seconds to the answer, which
  must be ``licence_acquired`` (``met`` false otherwise, whatever the time).
* ``storm_emergency_seconds_<db>``: at the same moment a phone registered before the storm calls
  112: seconds to the ``emergency`` answer (nothing of that phone is queued: it must not wait).

``full`` is 10,000 phones; ``small`` (500) is what CI runs as a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"small": 500, "full": 10_000}
TARGET_SECONDS = 2.0
TARGET_RSS_MB = 150.0


def storm_frames(count: int) -> bytes:
    """Every frame of ``count`` first REGISTERs (see ``tests/asterisk/storm.py``)."""
    from tests.asterisk.storm import storm

    return storm(0, count)


# --- the fake Asterisk, in a child process ---------------------------------------------------------


def serve_fake(count: int) -> None:
    """Child process: print the port, then stream the storm to every logged-in client on "go"."""
    from tests.asterisk.fake_ami import FakeAmi

    async def main() -> None:
        # Filters as Asterisk does: the bridge asks for only the events it reads (EVENT_FILTER).
        fake = FakeAmi(filtering=True)
        await fake.start()
        data = storm_frames(count)
        print(fake.port, flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"go":
                print(fake.push_bytes(data), flush=True)
            elif line.strip() == b"quit":
                break
        await fake.close()

    asyncio.run(main())


class Fake:
    """The fake Asterisk child process."""

    def __init__(self, count: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-fake", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def go(self) -> int:
        """Start streaming; the number of frames sent (what the client's filter let through)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        """Stop the child and wait for it."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def serve_agi_client(port: int) -> None:
    """Child process: play Asterisk's FastAGI side; ``NUMBER CHANNEL`` lines in, JSON answers out.

    Asterisk is a process of its own: a client inside the bridge's event loop would also wait for
    the storm the loop is parsing, and its time would be the client's as much as the bridge's.
    """
    from tests.asterisk.test_asterisk_agi import ask

    async def one(number: str, channel: str) -> None:
        started = time.perf_counter()
        answer = await ask(port, "outbound", number, channel=channel)
        print(
            json.dumps({"channel": channel, "answer": answer, "seconds": time.perf_counter() - started}),
            flush=True,
        )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print("ready", flush=True)
        while line := await reader.readline():
            requests = [r.split() for r in line.decode().strip().split(";") if r.strip()]
            await asyncio.gather(*(one(number, channel) for number, channel in requests))
            print("done", flush=True)

    asyncio.run(main())


# --- the measured bridge ---------------------------------------------------------------------------


def provision(url: str, count: int, workdir: Path) -> None:
    """Create the schema and import the phones with the CLI, in another process."""
    csv = workdir / "phones.csv"
    from tests.asterisk.storm import phone

    csv.write_text("".join(f"{phone(i)},{20000 + i}\n" for i in range(count)))
    cli = [sys.executable, "-m", "forum_bridge", "--database", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    for args in (["db", "upgrade"], ["subscriber", "import", str(csv)]):
        subprocess.run([*cli, *args], check=True, env=env, cwd=workdir, capture_output=True)


async def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.02) -> None:
    """Poll ``predicate`` until it holds; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(poll)


def storm_run(url: str, count: int) -> dict[str, float]:
    """One storm against a freshly provisioned database; returns the figures of this run."""
    from forum_bridge.adapters.asterisk.runner import Bridge
    from forum_bridge.config import load_settings
    from forum_bridge.core import LoggedOn
    from forum_bridge.service import BridgeService
    from forum_bridge.store.database import Database
    from tests.asterisk.storm import CHALLENGE_WINDOW, phone

    fake = Fake(count)
    try:
        settings = load_settings(
            environ={},
            overrides={
                "database.url": url,
                "licences.count": 100,
                "asterisk.ami_port": fake.port,
                "asterisk.ami_secret": "fake-ami-secret",
                "asterisk.agi_port": 0,
                "asterisk.enforce": "hook",
                "web.enabled": False,
            },
        )
        database = Database(url)
        service = BridgeService(settings, database)
        service.start()
        service.add_subscriber("e-phone", "99")
        service.apply(LoggedOn("e-phone", service.clock(), contact="sip:e-phone@127.0.0.1:5099"))
        bridge = Bridge(settings, service)

        async def scenario() -> dict[str, float]:
            stop = asyncio.Event()
            task = asyncio.create_task(bridge.serve(stop))
            client: asyncio.subprocess.Process | None = None
            try:
                await asyncio.wait_for(bridge.started.wait(), 30)
                client = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--agi-client",
                    str(bridge.agi.port),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=ROOT,
                )
                assert client.stdin is not None
                assert client.stdout is not None
                # Started and imported before the storm, so that its start costs the storm nothing.
                assert (await client.stdout.readline()).strip() == b"ready"
                await bridge.ami.wait_until(lambda: bridge.ami.resyncs >= 1, 30)
                resyncs_before = bridge.ami.resyncs
                loop = asyncio.get_running_loop()
                started = time.perf_counter()
                cpu = resource.getrusage(resource.RUSAGE_SELF)
                sent = await loop.run_in_executor(None, fake.go)
                # Half the frames arrived: every phone of the windows before is registered in Asterisk.
                await wait_for(lambda: bridge.ami.received >= sent // 2, 120, poll=0.001)
                caller = phone(max(0, count // 2 - CHALLENGE_WINDOW - 1))
                client.stdin.write(f"600 PJSIP/{caller}-00000001;112 PJSIP/e-phone-00000002\n".encode())
                await client.stdin.drain()
                answers: dict[str, Any] = {}
                while (line := (await client.stdout.readline()).decode().strip()) != "done":
                    if not line:
                        raise RuntimeError("the FastAGI client stopped")
                    got = json.loads(line)
                    answers[got["channel"]] = got
                call, answered = (
                    answers[f"PJSIP/{caller}-00000001"]["answer"],
                    answers[f"PJSIP/{caller}-00000001"]["seconds"],
                )
                emergency = answers["PJSIP/e-phone-00000002"]["answer"]
                emergency_seconds = answers["PJSIP/e-phone-00000002"]["seconds"]
                backlog = bridge.ami.received - bridge.ami.done_upto()
                await wait_for(lambda: bridge.ami.frames >= sent, 120)
                applied = time.perf_counter() - started
                # Applied; now what an operator sees: the status document with everyone logged on.
                while True:
                    doc = await loop.run_in_executor(None, service.status)
                    if sum(1 for s in doc["subscribers"] if s["state"] == "logged_on") == count:
                        break
                    await asyncio.sleep(0.02)
                elapsed = time.perf_counter() - started
                used = resource.getrusage(resource.RUSAGE_SELF)
                cpu_seconds = used.ru_utime - cpu.ru_utime + used.ru_stime - cpu.ru_stime
                # Give the unknown-registration timer its chance to (wrongly) fire.
                await asyncio.sleep(1.5)
                return {
                    "call_seconds": answered,
                    "emergency_seconds": emergency_seconds,
                    "call_ok": float(call.get("FORUM_BRIDGE_REASON") == "licence_acquired"),
                    "emergency_ok": float(emergency.get("FORUM_BRIDGE_REASON") == "emergency"),
                    "backlog_at_answer": float(backlog),
                    "seconds": elapsed,
                    "cpu_seconds": cpu_seconds,
                    "applied": applied,
                    "batches": float(bridge.ami.batches),
                    "resyncs": float(bridge.ami.resyncs - resyncs_before),
                    "frames": float(sent),
                    "filtered": float(bridge.ami.filtered),
                    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            finally:
                if client is not None:
                    if client.stdin is not None:
                        client.stdin.close()
                    await asyncio.wait_for(client.wait(), 10)
                stop.set()
                await asyncio.wait_for(task, 30)

        try:
            return asyncio.run(scenario())
        finally:
            database.dispose()
    finally:
        fake.close()


def floor_run(count: int) -> float:
    """Seconds panoramisk alone takes to read the storm's frames from the same fake.

    It asks for the same session filter as the bridge, so it reads what Asterisk sends the bridge.
    """
    from panoramisk import Manager

    from forum_bridge.adapters.asterisk.ami import EVENT_FILTER

    fake = Fake(count)
    try:

        async def scenario() -> float:
            seen = 0
            target = 4 * count  # until the fake says how many frames it sent
            done = asyncio.Event()

            def on_event(_manager: Any, _message: Any) -> None:
                nonlocal seen
                seen += 1
                if seen >= target:
                    done.set()

            manager = Manager(
                host="127.0.0.1",
                port=fake.port,
                username="forumbridge",
                secret="fake-ami-secret",
                events="system,call,security",
                ping_delay=3600,
                reconnect_timeout=3600,
                loop=asyncio.get_running_loop(),
            )
            manager.register_event("*", on_event)
            await manager.connect()
            await asyncio.wait_for(manager.authenticated_future, 10)
            answer = await manager.send_action(
                {"Action": "Filter", "Operation": "Add", "Filter": EVENT_FILTER}
            )
            assert answer.success, answer
            await asyncio.sleep(0.2)  # let FullyBooted pass before counting
            seen = 0
            started = time.perf_counter()
            target = await asyncio.get_running_loop().run_in_executor(None, fake.go)
            if seen >= target:
                done.set()
            await asyncio.wait_for(done.wait(), 120)
            elapsed = time.perf_counter() - started
            manager.close()
            return elapsed

        return asyncio.run(scenario())
    finally:
        fake.close()


# --- driver ------------------------------------------------------------------------------------------


def one(url_factory: Callable[[Path], str], count: int, cleanup: Callable[[str], None]) -> dict[str, float]:
    """Provision, run one storm in a child process (a fresh interpreter: honest peak RSS), clean up."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        url = url_factory(workdir)
        provision(url, count, workdir)
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--one-storm", url, str(count)],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
        finally:
            cleanup(url)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def drop_postgres(url: str) -> None:
    """Leave the PostgreSQL database empty again for the next run."""
    from forum_bridge.store.database import Database

    database = Database(url)
    database.downgrade()
    database.dispose()


def emit(
    figure: str, unit: str, runs: list[float], floor: float | None, note: str, target: str, met: bool | None
) -> None:
    """One figure as a JSON line."""
    line = {
        "figure": figure,
        "unit": unit,
        "median": statistics.median(runs),
        "runs": runs,
        "floor": floor,
        "floor_note": note,
        "target": target,
        "met": met,
    }
    print(json.dumps(line), flush=True)


def main() -> int:
    """Run the storm ``--runs`` times per database and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--postgres", help="URL of an empty PostgreSQL database")
    parser.add_argument("--serve-fake", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-storm", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--agi-client", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        serve_fake(args.serve_fake)
        return 0
    if args.agi_client:
        serve_agi_client(args.agi_client)
        return 0
    if args.one_storm:
        print(json.dumps(storm_run(args.one_storm[0], int(args.one_storm[1]))))
        return 0
    count = SIZES[args.size]
    floors = [floor_run(count) for _ in range(args.runs)]
    floor = statistics.median(floors)
    print(
        f"floor: panoramisk reads the {2 * count} frames Asterisk sends the bridge (of {4 * count})"
        f" in {floor:.3f}s (median)",
        file=sys.stderr,
    )
    targets: list[tuple[str, Callable[[Path], str], Callable[[str], None]]] = [
        ("sqlite", lambda d: f"sqlite:///{d / 'storm.db'}", lambda _url: None)
    ]
    if args.postgres:
        targets.append(("postgresql", lambda _d: str(args.postgres), drop_postgres))
    failed = False
    for name, url_factory, cleanup in targets:
        results = [one(url_factory, count, cleanup) for _ in range(args.runs)]
        seconds = [r["seconds"] for r in results]
        resyncs = [r["resyncs"] for r in results]
        rss = [r["rss_mb"] for r in results]
        full = args.size == "full"
        met = statistics.median(seconds) <= TARGET_SECONDS if full else None
        emit(
            f"storm_seconds_{name}",
            "s",
            seconds,
            floor,
            f"panoramisk alone reading the same {2 * count} frames (the session filter applied)",
            f"<= {TARGET_SECONDS} s for 10,000 phones",
            met,
        )
        emit(f"storm_resyncs_{name}", "resyncs", resyncs, 0.0, "none needed", "0", max(resyncs) == 0)
        calls = [r["call_seconds"] for r in results]
        emit(
            f"storm_call_seconds_{name}",
            "s",
            calls,
            None,
            "answer licence_acquired required",
            "decided on the REGISTER just before, never not_logged_on",
            all(r["call_ok"] for r in results),
        )
        emit(
            f"storm_emergency_seconds_{name}",
            "s",
            [r["emergency_seconds"] for r in results],
            None,
            "asked at the same moment as the call above",
            "112 allowed, not held up by the storm",
            all(r["emergency_ok"] for r in results),
        )
        rss_met = statistics.median(rss) <= TARGET_RSS_MB if full else None
        emit(f"storm_peak_rss_mb_{name}", "MB", rss, None, "", f"<= {TARGET_RSS_MB:.0f} MB", rss_met)
        applied = ", ".join(f"{r['applied']:.2f}" for r in results)
        backlogs = ", ".join(f"{r['backlog_at_answer']:.0f}" for r in results)
        emergencies = ", ".join(f"{r['emergency_seconds']:.3f}" for r in results)
        cpus = ", ".join(f"{r['cpu_seconds']:.2f}" for r in results)
        batches = ", ".join(f"{r['batches']:.0f}" for r in results)
        print(
            f"{name}: {count} phones logged on in {statistics.median(seconds):.2f}s (median of {args.runs};"
            f" runs {', '.join(f'{s:.2f}' for s in seconds)}), floor {floor:.2f}s;"
            f" resyncs {max(resyncs):.0f}; peak RSS {statistics.median(rss):.0f} MB;"
            f" all frames applied after {applied}s in {batches} batches, {cpus}s of CPU;"
            f" call and 112 during the storm answered in {', '.join(f'{c:.3f}' for c in calls)}s and"
            f" {emergencies}s"
            f" with {backlogs} frames still queued",
            file=sys.stderr,
        )
        failed |= max(resyncs) > 0 or not all(r["call_ok"] and r["emergency_ok"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
