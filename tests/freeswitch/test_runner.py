"""The process entry point: the real connector in a subprocess against the fake FreeSWITCH."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from forum_bridge.adapters.freeswitch import runner
from forum_bridge.config import load_settings
from forum_bridge.service import BridgeService
from forum_bridge.store.database import Database
from tests.conftest import free_tcp_port
from tests.freeswitch.conftest import wait_until
from tests.freeswitch.fake_esl import FakeEslServer, FakeSocketCall, channel_data

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_connector_patches_nothing() -> None:
    code = (
        "import sys, socket\n"
        "import forum_bridge.adapters.freeswitch as fs\n"
        "import forum_bridge.adapters.freeswitch.runner, forum_bridge.adapters.freeswitch.listener\n"
        "from gevent import monkey\n"
        "assert not monkey.is_module_patched('socket'), 'patched'\n"
        "assert socket.socket.__module__ == 'socket', socket.socket.__module__\n"
        "print('clean')\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "clean", result.stderr


def write_config(tmp_path: Path, esl_port: int, hook_port: int, *, web_port: int | None = None) -> Path:
    """A settings file for the connector under test."""
    web = f"enabled = true\nport = {web_port}" if web_port else "enabled = false"
    config = tmp_path / "forum-bridge.toml"
    config.write_text(
        f"""
[database]
url = "sqlite:///{tmp_path / "fs.db"}"
[licences]
count = 1
[node]
name = "fs1"
[freeswitch]
esl_port = {esl_port}
esl_password = "ClueCon"
socket_port = {hook_port}
reconnect_max = 0.5
[web]
{web}
[log]
level = "INFO"
"""
    )
    return config


def prepared_service(config: Path) -> BridgeService:
    """The database at the current schema, with subscriber 1000, as the CLI would leave it."""
    settings = load_settings(config, environ={})
    database = Database(settings.database_url)
    database.upgrade()
    service = BridgeService(settings, database)
    service.start()
    service.add_subscriber("1000", "1000")
    return service


def start_connector(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m forum_bridge.adapters.freeswitch --config ...`` with a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    with log_path.open("w") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "forum_bridge", "--config", str(config), "run", "freeswitch"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def stop_connector(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then the exit code (killing it if it does not stop)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_the_connector_runs_as_a_process_and_stops_on_sigterm(
    tmp_path: Path, fake_esl: FakeEslServer
) -> None:
    hook_port = free_tcp_port()
    config = write_config(tmp_path, fake_esl.port, hook_port)
    service = prepared_service(config)
    log_path = tmp_path / "connector.log"
    process = start_connector(config, log_path)
    try:
        wait_until(lambda: fake_esl.subscribed() == 1 or process.poll() is not None, 30, "the subscription")
        assert process.poll() is None, log_path.read_text()

        def state() -> str:
            return str(next(s for s in service.status()["subscribers"] if s["logon"] == "1000")["state"])

        assert fake_esl.register("1000") == 1
        wait_until(lambda: state() == "logged_on", 10, "the log-on to reach the database")

        call = FakeSocketCall(hook_port, channel_data("c-1", "1000", "600"))
        call.start()
        wait_until(call.finished.is_set, 10, "the socket hook session")
        assert call.commands[-2:] == ["resume", "exit"], (call.error, call.commands)
        assert service.status()["assignments"][0]["logon"] == "1000"
    finally:
        code = stop_connector(process)
        service.database.dispose()
    output = log_path.read_text()
    assert code == 0, output
    assert "FreeSWITCH connector stopped" in output
    assert (
        "decision logon=1000 number=600 direction=outbound result=allowed" in output
    )  # one line per decision
    assert "Traceback" not in output
    assert "Warning" not in output
    assert "ClueCon" not in output


def test_the_status_page_reports_the_freeswitch_connection(tmp_path: Path, fake_esl: FakeEslServer) -> None:
    web_port = free_tcp_port()
    config = write_config(tmp_path, fake_esl.port, free_tcp_port(), web_port=web_port)
    service = prepared_service(config)
    log_path = tmp_path / "connector.log"
    process = start_connector(config, log_path)

    def metrics() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    try:
        wait_until(lambda: fake_esl.subscribed() == 1 or process.poll() is not None, 30, "the subscription")
        assert process.poll() is None, log_path.read_text()
        assert fake_esl.register("1000") == 1
        wait_until(
            lambda: "forum_bridge_event_lag_seconds_count 1.0" in metrics(), 10, "the event in /metrics"
        )
        assert 'forum_bridge_pbx_connected{pbx="freeswitch"} 1.0' in metrics()
    finally:
        code = stop_connector(process)
        service.database.dispose()
    assert code == 0, log_path.read_text()


def test_an_older_schema_stops_the_connector_with_a_clear_error(
    tmp_path: Path, fake_esl: FakeEslServer
) -> None:
    config = write_config(tmp_path, fake_esl.port, free_tcp_port())
    database = Database(load_settings(config, environ={}).database_url)
    database.upgrade()
    with database.engine.begin() as connection:  # as if the file came from an older release
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    database.dispose()
    log_path = tmp_path / "connector.log"
    process = start_connector(config, log_path)
    try:
        assert process.wait(timeout=60) == 1
    finally:
        stop_connector(process)
    output = log_path.read_text()
    assert "forum-bridge db upgrade" in output
    assert "Traceback" not in output
    assert fake_esl.accepted == 0


def test_a_missing_web_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "forum_bridge.web.server", None)
    with pytest.raises(RuntimeError) as info:
        runner._start_web(object(), load_settings(environ={}))
    assert "[web] enabled = false" in str(info.value)


def test_the_sample_event_socket_config_is_loopback_with_an_acl() -> None:
    tree = ET.parse(ROOT / "deploy" / "freeswitch" / "event_socket.conf.xml")
    params = {p.get("name"): p.get("value") for p in tree.iter("param")}
    assert params["listen-ip"] == "127.0.0.1"
    assert params["listen-port"] == "8021"
    assert params["apply-inbound-acl"]
    assert params["password"] != "ClueCon"
