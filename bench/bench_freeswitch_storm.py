"""Benchmark: a registration storm over FreeSWITCH's event socket until every phone is logged on.

    .venv/bin/python bench/bench_freeswitch_storm.py --runs 3 [--size small|full] [--postgres URL]

What a FreeSWITCH restart looks like to the bridge: every phone registers again within seconds,
one ``sofia::register`` event each (FreeSWITCH 1.10.12's own, from the recorded capture). A fake
mod_event_socket in its own process (tests/freeswitch/fake_esl.py; it does not share the bridge's
interpreter) streams them all at once. The bridge is the FreeSWITCH side as ``forum-bridge run
freeswitch`` wires it (ESL listener, socket hook waiting for the listener, database calls in a
thread of their own), minus the process wrapper, on a database provisioned beforehand.

Figures (one JSON object per line on stdout; human text on stderr):

* ``freeswitch_storm_seconds_<db>``: from the first event sent until every phone is logged on in
  the database (the last status read included). Floor: the bridge's own ESL client alone reading
  and decoding the same events from the same fake, applying nothing.
* ``freeswitch_storm_resyncs_<db>``: resyncs the storm caused (the listener's queue overflowing).
* ``freeswitch_storm_call_seconds_<db>``: a phone whose REGISTER was sent last, behind the whole
  storm, places a call through the socket hook the moment the storm is sent: seconds to the
  verdict, which must be ``allowed`` (decided on that REGISTER; ``met`` false otherwise).
* ``freeswitch_reconnect_seconds_<db>``: then the event socket is cut with every phone still
  registered: seconds until the bridge has reconnected and resynced (FreeSWITCH's registration
  table read, parsed and compared with the database), back in step.
* ``freeswitch_storm_peak_rss_mb_<db>``: peak resident memory of the process running the bridge
  (a fresh one per run).

Emergency numbers never reach the bridge on FreeSWITCH (the dialplan decides them from mod_hash),
so no emergency figure is taken here. ``full`` is 10,000 phones; ``small`` (500) is what CI runs.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"small": 500, "full": 10_000}
TARGET_SECONDS = 2.0
CALLER = "1000"
CALL_UUID = "3b9f6c1d-8e2a-4f57-b0c4-6d1e9a2f5c80"


def serve_fake(count: int) -> None:
    """The fake FreeSWITCH: print the ESL port; on ``go HOOK_PORT``, stream the storm and the
    caller's REGISTER, then (HOOK_PORT > 0) place the caller's call and print its verdict as JSON."""
    from tests.freeswitch.fake_esl import (
        FakeEslServer,
        FakeSocketCall,
        channel_data,
        event_frame,
        register_event,
    )

    fake = FakeEslServer().start()
    phones = [(f"u{i}", 6000 + i % 1000) for i in range(count)] + [(CALLER, 5091)]
    frames = b"".join(event_frame(register_event(user, port)) for user, port in phones)
    print(fake.port, flush=True)
    for line in sys.stdin:
        if line.strip() == "drop":  # the event socket cut: the bridge reconnects and resyncs
            fake.drop()
            print(json.dumps({}), flush=True)
            continue
        hook_port = int(line.split()[1])
        # Restarted: its table was empty when the bridge connected; now every phone is back.
        for user, port in phones:
            fake.add_registration(user, port)
        if not fake.send_raw(frames):
            raise SystemExit("the bridge was not connected")
        answer: dict[str, Any] = {}
        if hook_port:
            began = time.monotonic()
            call = FakeSocketCall(hook_port, channel_data(CALL_UUID, CALLER, "600"))
            call.start()
            call.finished.wait(30)
            answer = {
                "seconds": time.monotonic() - began,
                "allowed": f"api uuid_setvar {CALL_UUID} forum_bridge_verdict allowed" in call.commands,
                "error": call.error,
            }
        print(json.dumps(answer), flush=True)
    fake.stop()


class Fake:
    """The fake FreeSWITCH process."""

    def __init__(self, count: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-fake", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(_common.wait_for_line(self.process, 120))

    def go(self, hook_port: int) -> None:
        """Stream the storm; with ``hook_port``, then place the caller's call there."""
        self._send(f"go {hook_port}")

    def drop(self) -> None:
        """Cut the event socket (its answer is read with :meth:`answer`)."""
        self._send("drop")

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n")
        self.process.stdin.flush()

    def answer(self) -> dict[str, Any]:
        return dict(json.loads(_common.wait_for_line(self.process, 60)))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def wait_for(condition: Any, timeout: float, what: str) -> None:
    """Poll ``condition`` while gevent runs the bridge; SystemExit after ``timeout`` seconds."""
    import gevent

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        gevent.sleep(0.005)


def storm_run(url: str, count: int) -> dict[str, float]:
    """One storm against the bridge on ``url``; its figures."""
    import gevent
    from gevent.threadpool import ThreadPool

    from forum_bridge.adapters.freeswitch.listener import EslListener
    from forum_bridge.adapters.freeswitch.offhub import OffHub
    from forum_bridge.adapters.freeswitch.socket_hook import SocketHookServer
    from forum_bridge.config import load_settings
    from forum_bridge.service import BridgeService
    from forum_bridge.store.database import Database

    fake = Fake(count)
    settings = load_settings(
        environ={},
        overrides={
            "database.url": url,
            "licences.count": 100,
            "node.name": "bench",
            "freeswitch.esl_port": fake.port,
            "freeswitch.socket_port": 0,
            "web.enabled": False,
        },
    )
    database = Database(url)
    database.upgrade()
    bridge = BridgeService(settings, database)
    bridge.start()
    bridge.import_subscribers("".join(f"u{i},{10000 + i}\n" for i in range(count)) + f"{CALLER},{CALLER}\n")
    pool = ThreadPool(1)
    service: Any = OffHub(bridge, pool)
    hook = SocketHookServer(service, settings)
    # Reconnects at once (not after the runner's first 0.5 s back-off): the reconnect figure is
    # the resync's own time.
    listener = EslListener(service, settings, initial_backoff=0.001)
    hook.before_decision = listener.caught_up  # as the runner wires them
    hook.start()
    greenlet = gevent.spawn(listener.run)
    try:
        wait_for(lambda: listener.connected, 30, "the listener to connect")
        began = time.monotonic()
        fake.go(hook.port)
        total = count + 1

        def all_logged_on() -> bool:
            if listener.events_handled < total:
                return False
            return int(service.counts()["subscribers"]["logged_on"]) == total

        wait_for(all_logged_on, 120, "every phone to be logged on")
        seconds = time.monotonic() - began
        # The fake's answer is read with a blocking read: only once the hook's session is over.
        wait_for(lambda: hook.sessions >= 1, 60, "the call's session to end")
        answer = fake.answer()
        if answer.get("error"):
            raise SystemExit(f"the hook call failed: {answer['error']}")
        # Then the event socket is cut: every phone is still registered, the bridge resyncs.
        sessions = listener.sessions
        cut = time.monotonic()
        fake.drop()
        wait_for(lambda: listener.sessions > sessions and listener.connected, 120, "the resync")
        reconnect = time.monotonic() - cut
        fake.answer()
        if int(service.counts()["subscribers"]["logged_on"]) != total:
            raise SystemExit("the resync lost phones")
        return {
            "reconnect": reconnect,
            "seconds": seconds,
            "resyncs": float(listener.overflow_resyncs),
            "call": float(answer["seconds"]),
            "allowed": 1.0 if answer["allowed"] else 0.0,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    finally:
        listener.stop()
        greenlet.join(timeout=5)
        hook.stop(timeout=1)
        fake.close()
        pool.kill()
        database.dispose()


def storm_in_process(url: str, count: int) -> dict[str, float]:
    """:func:`storm_run` in a fresh process of its own, so its peak memory is the bridge's alone."""
    result = subprocess.run(
        [sys.executable, __file__, "--one-run", url, str(count)],
        stdout=subprocess.PIPE,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"a storm run failed (exit {result.returncode})")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def floor_run(count: int) -> float:
    """Seconds for the ESL client alone to read and decode the same events."""
    import gevent

    from forum_bridge.adapters.freeswitch.esl import EslClient
    from forum_bridge.adapters.freeswitch.events import SUBSCRIPTION

    fake = Fake(count)
    client = EslClient("127.0.0.1", fake.port, "ClueCon")
    client.connect()
    try:
        client.command(SUBSCRIPTION, timeout=10)
        taken = 0
        total = count + 1

        def drain() -> None:
            nonlocal taken
            while taken < total:
                if client.next_event(timeout=30) is not None:
                    taken += 1
                taken += len(client.take_queued(total))

        began = time.monotonic()
        fake.go(0)
        reader = gevent.spawn(drain)
        reader.join(timeout=120)
        if taken < total:
            raise SystemExit(f"the floor read only {taken} of {total} events")
        fake.answer()
        return time.monotonic() - began
    finally:
        client.close()
        fake.close()


def verdict(value: bool) -> Callable[[float], bool]:
    """A ``met`` test that does not depend on the median (the answer's content decides)."""
    return lambda _median: value


def main() -> int:
    """Measure the floor, then the storm on each database; print the figures."""
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-fake":
        serve_fake(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 3 and sys.argv[1] == "--one-run":
        print(json.dumps(storm_run(sys.argv[2], int(sys.argv[3]))), flush=True)
        return 0
    args = _common.options(__doc__.splitlines()[0])
    count = SIZES[args.size]
    floors = [floor_run(count) for _ in range(args.runs)]
    floor = statistics.median(floors)
    _common.say(f"floor: {floors}")
    for name, url in _common.databases(args):
        runs: list[dict[str, float]] = []
        for run in range(args.runs):
            with _common.database_for_run(url) as db_url:
                runs.append(storm_in_process(db_url, count))
            _common.say(f"{name} run {run + 1}: {runs[-1]}")
        allowed = all(r["allowed"] for r in runs)
        # (figure, unit, key in the runs, floor, what the floor is, target, met)
        figures: list[tuple[str, str, str, float | None, str, str, Callable[[float], bool] | None]] = [
            (
                "freeswitch_storm_seconds",
                "s",
                "seconds",
                floor,
                f"the bridge's ESL client alone reading the same {count + 1} events",
                f"<= {TARGET_SECONDS} s for 10,000 phones",
                lambda median: median <= TARGET_SECONDS,
            ),
            ("freeswitch_storm_resyncs", "resyncs", "resyncs", 0, "none needed", "0", lambda m: m == 0),
            (
                "freeswitch_storm_call_seconds",
                "s",
                "call",
                None,
                "verdict allowed required",
                "decided on the REGISTER sent just before, behind the storm",
                verdict(allowed),
            ),
            (
                "freeswitch_reconnect_seconds",
                "s",
                "reconnect",
                None,
                "every phone still registered: FreeSWITCH's table read and compared",
                "the bridge is back in step (no number set)",
                None,
            ),
            (
                "freeswitch_storm_peak_rss_mb",
                "MB",
                "rss",
                None,
                "the process running the bridge (one per run), its imports included",
                "<= 150 MB",
                lambda median: median <= 150,
            ),
        ]
        for figure, unit, key, floor_value, note, target, met in figures:
            _common.emit(
                f"{figure}_{name}",
                unit,
                [r[key] for r in runs],
                floor=floor_value,
                floor_note=note,
                target=target,
                met=met,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
