"""A crowd of slow clients on the status page must not take the process's file descriptors: the
call hook (112 included) keeps answering, and the page serves again once the crowd is gone.

A real ``forum-bridge run asterisk`` process, with a low open-file limit so that a bounded number
of loopback clients is enough to show what 1,080 did under systemd's default of 1,024.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.asterisk.aio import run
from tests.asterisk.test_asterisk_agi import ask
from tests.conftest import wait_until
from tests.sandbox.asterisk import free_tcp_port

ROOT = Path(__file__).resolve().parents[2]
FD_LIMIT = 256
CLIENTS = 320  # more than the limit: enough to exhaust it if each one took a descriptor


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def test_slow_clients_leave_the_hook_and_the_page_working(tmp_path: Path) -> None:
    web_port, agi_port = free_tcp_port(), free_tcp_port()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "b.db"}"\n[node]\nname = "pbx1"\n'
        f'[web]\nhost = "127.0.0.1"\nport = {web_port}\n'
        f'[asterisk]\nami_port = {free_tcp_port()}\nami_secret = "capacity-test-secret"\n'
        f"agi_port = {agi_port}\nreconnect_max = 1.0\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "forum_bridge", "--config", str(config), "run", "asterisk"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit_files,  # only sets a limit; no threads in this child yet
    )
    crowd: list[socket.socket] = []
    try:
        health = f"http://127.0.0.1:{web_port}/healthz"
        wait_until(lambda: _healthy(health) or proc.poll() is not None, timeout=60, what="the page")
        assert proc.poll() is None, proc.communicate()[1]
        # Slow clients: each starts a request and then says nothing more. They come until the
        # server stops taking them (a connect that times out: its listen queue is full).
        for _ in range(CLIENTS):
            sock = socket.socket()
            sock.settimeout(3)
            try:
                sock.connect(("127.0.0.1", web_port))
            except TimeoutError:
                sock.close()
                break
            crowd.append(sock)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert len(crowd) > 100, "the page refused the crowd outright"
        # The hook answers during the crowd, an emergency call as well as an ordinary one.
        emergency = run(ask(agi_port, "outbound", "112", channel="PJSIP/21-desk-00000001"), timeout=20)
        assert emergency["FORUM_BRIDGE_RESULT"] == "allow"
        ordinary = run(ask(agi_port, "outbound", "600", channel="PJSIP/90-trunk-00000002"), timeout=20)
        assert ordinary["FORUM_BRIDGE_RESULT"] == "allow"  # an unmanaged endpoint
        assert _open_fds(proc.pid) < FD_LIMIT // 2
        for sock in crowd:
            sock.close()
        crowd.clear()
        wait_until(lambda: _healthy(health), timeout=60, what="the page serving again")
        assert proc.poll() is None
    finally:
        for sock in crowd:
            sock.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert "capacity-test-secret" not in err
