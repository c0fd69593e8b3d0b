"""A SIP scanner's flood against the real FreeSWITCH connector process (gevent, monkey-patched).

20,000 ``sofia::register_failure`` events arrive at once. The process must keep its memory bounded
(the event queue is bounded: when the listener falls behind, it drops and resyncs), answer
``/healthz`` and socket-hook calls during the flood, and end up equal to FreeSWITCH's
registrations.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_tcp_port
from tests.freeswitch.conftest import fake_esl, wait_until
from tests.freeswitch.fake_esl import (
    FakeEslServer,
    FakeSocketCall,
    channel_data,
    event_frame,
    register_failure_event,
)
from tests.freeswitch.test_runner import prepared_service, start_connector, stop_connector, write_config

__all__ = ["fake_esl"]  # the fixture, re-used

FLOOD = 20_000


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_flood_keeps_the_process_small_and_responsive(tmp_path: Path, fake_esl: FakeEslServer) -> None:
    hook_port, web_port = free_tcp_port(), free_tcp_port()
    config = write_config(tmp_path, fake_esl.port, hook_port, web_port=web_port)
    # The hook answers by the fail mode once hook_timeout - 1.25 s have passed (FreeSWITCH gives up
    # then); this test wants real decisions during the flood, also on a busy test machine where one
    # waits behind the flood's transactions for more than the default's 0.75 s.
    config.write_text(
        config.read_text().replace("[freeswitch]\n", "[freeswitch]\nhook_timeout = 10\n", 1), encoding="utf-8"
    )
    service = prepared_service(config)
    fake_esl.add_registration("1000", 5091)
    log_path = tmp_path / "connector.log"
    process = start_connector(config, log_path)
    try:
        wait_until(lambda: fake_esl.subscribed() == 1 or process.poll() is not None, 30, "the subscription")
        assert process.poll() is None, log_path.read_text()
        wait_until(
            lambda: "resync" in log_path.read_text() or process.poll() is not None, 30, "the first resync"
        )
        baseline = rss_mib(process.pid)

        frames = b"".join(event_frame(register_failure_event(f"scan{i}")) for i in range(FLOOD))
        sender = threading.Thread(target=fake_esl.send_raw, args=(frames,), daemon=True)
        sender.start()
        peak = baseline
        health: list[float] = []
        calls = 0
        deadline = time.monotonic() + 120

        def flood_handled() -> bool:
            # Every event applied (the listener kept up), or dropped and resynced (it fell behind).
            if "dropped them, resyncing" in log_path.read_text():
                return True
            url = f"http://127.0.0.1:{web_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            counts = [
                line for line in text.splitlines() if line.startswith("forum_bridge_event_lag_seconds_count")
            ]
            return bool(counts) and float(counts[0].split()[-1]) >= FLOOD

        while sender.is_alive() or not flood_handled():
            assert time.monotonic() < deadline, "the flood never ended"
            peak = max(peak, rss_mib(process.pid))
            began = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=10) as response:
                assert response.status == 200
            health.append(time.monotonic() - began)
            if calls < 3:
                calls += 1
                call = FakeSocketCall(hook_port, channel_data(f"c-{calls}", "1000", "600"))
                call.start()
                wait_until(call.finished.is_set, 12, "a socket hook session during the flood")
                assert call.commands[-2:] == ["resume", "exit"], (call.error, call.commands)
            time.sleep(0.2)
        peak = max(peak, rss_mib(process.pid))
        print(
            f"rss baseline={baseline:.0f} MiB peak={peak:.0f} MiB healthz max={max(health):.2f}s n={len(health)}"
        )
        assert peak - baseline < 150, (baseline, peak)
        state = {s["logon"]: s["state"] for s in service.status()["subscribers"]}
        assert state["1000"] == "logged_on"
    finally:
        code = stop_connector(process)
        service.database.dispose()
    assert code == 0, log_path.read_text()[-2000:]
