"""End to end: emergency calls never wait on the bridge (real Asterisk 22, SIPp phones, the bridge process).

The rendered snippet decides emergency numbers inside Asterisk and reads the log-ons blocked by a
failed log-on from AstDB, where the running bridge keeps them; every other call waits on the hook
at most ``asterisk.hook_timeout`` seconds. These tests stop, hang (SIGSTOP) and cut off the bridge
and check what the phones get, and how fast. "Within 3 s" is measured over the whole SIPp run,
which includes starting SIPp, the INVITE's digest challenge and (for an answered call) 0.1 s
connected plus the BYE: a generous reading against the callers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forum_bridge.adapters.asterisk.dialplan import render_dialplan
from forum_bridge.config import load_settings
from tests.conftest import _postgres_bindir, wait_until
from tests.e2e import test_asterisk_e2e as _base
from tests.e2e.test_asterisk_e2e import Installation, by_logon, metrics
from tests.sandbox import SippPhone, SippResult, free_tcp_port

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(600)]

# The installation fixtures of the main end-to-end module, so both build installations alike.
sandbox_root = _base.sandbox_root
make_installation = _base.make_installation

ANSWER_WITHIN = 3.0  # seconds: the bound for an emergency call or a fail-mode answer
HOOK_TIMEOUT = 2.0  # the default asterisk.hook_timeout


def timed_call(inst: Installation, logon: str, number: str, password: str | None = None) -> SippResult:
    """One call from a fresh SIPp run of ``logon``, held 0.1 s when answered."""
    return inst.phone(logon, password).call(number, hold_seconds=0.1, ring_timeout=10.0)


def astdb(inst: Installation) -> dict[str, str]:
    """Everything the bridge keeps in Asterisk's AstDB (``database show forum-bridge``)."""
    out = inst.sandbox.cli("database show forum-bridge")
    return dict(re.findall(r"^/forum-bridge/(\S+)\s*:\s*(\S*)", out, re.M))


def fail_a_logon(inst: Installation, logon: str) -> None:
    """A REGISTER of ``logon`` with a wrong password: its latest log-on failed, so it is blocked."""
    assert inst.phone(logon, password="wrong-password").register() == 401
    inst.wait_status(lambda s: by_logon(s)[logon]["state"] == "logon_failed")
    wait_until(lambda: f"blocked/{logon}" in astdb(inst), 10, f"the block of {logon} in AstDB")


@contextlib.contextmanager
def hung(inst: Installation) -> Iterator[None]:
    """The bridge process stopped with SIGSTOP (the kernel still accepts its connections)."""
    assert inst.bridge is not None
    inst.bridge.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        inst.bridge.send_signal(signal.SIGCONT)


# --- not blocked: emergency numbers are decided inside Asterisk -----------------------------------


def test_with_the_bridge_hung_or_stopped_112_is_answered_and_other_calls_get_the_fail_mode_in_3_s(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1, **{"emergency.outside_line_prefix": "0"})
    assert inst.phone("22-soft").register() == 200
    inst.wait_status(lambda s: by_logon(s)["22-soft"]["state"] == "logged_on")
    with hung(inst):
        for number in ("112", "0112", "110"):
            result = timed_call(inst, "22-soft", number)
            assert result == 200, number
            assert result.elapsed < ANSWER_WITHIN, (number, result)
        refused = timed_call(inst, "22-soft", "600")
        # fail_mode closed: 503 ("the bridge could not be asked"), after the bound and not later.
        assert refused == 503
        assert HOOK_TIMEOUT - 0.1 <= refused.elapsed < ANSWER_WITHIN, refused
        # Open: the same hung bridge lets the call through after the bound.
        settings = load_settings(inst.config, environ={}, overrides={"asterisk.fail_mode": "open"})
        inst.sandbox.reload_dialplan(render_dialplan(settings))
        through = timed_call(inst, "22-soft", "601")
        assert through == 200
        assert through.elapsed < ANSWER_WITHIN + 0.5, through
        inst.sandbox.reload_dialplan(inst.snippet)
    # Resumed, the bridge answers again: the call takes the licence.
    assert timed_call(inst, "22-soft", "602") == 200
    inst.wait_status(lambda s: s["licences"]["used"] == 1)
    # Emergency calls never asked the hook: the bridge saw them only over AMI, as allowed.
    inst.wait_log("decision logon=22-soft number=112 direction=outbound result=allowed reason=emergency")
    # Stopped: nobody listens on the hook's port; the same answers, without even the bound.
    inst.stop_bridge()
    answered = timed_call(inst, "22-soft", "112")
    assert answered == 200
    assert answered.elapsed < ANSWER_WITHIN, answered
    refused = timed_call(inst, "22-soft", "600")
    assert refused == 503
    assert refused.elapsed < HOOK_TIMEOUT, refused


def test_with_the_bridge_hung_an_inbound_call_rings_nobody_after_the_bound(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=2)
    desk, trunk = inst.phone("21-desk"), inst.phone("90-trunk")
    assert desk.register() == 200 and trunk.register() == 200
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    with hung(inst), desk.start_uas(timeout=15) as rings:
        # No dial string after the bound: the sandbox dialplan rejects (403) instead of ringing.
        result = trunk.call("721", hold_seconds=0.1, ring_timeout=10.0)
        assert result == 403
        assert HOOK_TIMEOUT - 0.1 <= result.elapsed < ANSWER_WITHIN, result
        rang = rings.stop()
    assert rang == 0  # the phone never saw an INVITE


def test_112_is_answered_within_3_s_while_the_bridges_database_is_down(tmp_path: Path) -> None:
    with own_postgres() as server:
        # Built by hand: every database command runs as its own process, so no connection of
        # this test process is left open when the server goes away.
        inst = Installation(tmp_path, licences=1, **{"database.url": server.url})
        try:
            inst.sandbox.start()
            inst.cli_process("db", "upgrade")
            inst.cli_process("subscriber", "add", "22-soft", "--number", "22")
            inst.start_bridge()
            assert inst.phone("22-soft").register() == 200
            inst.wait_log("logged on logon=22-soft")
            server.stop()
            result = timed_call(inst, "22-soft", "112")
            assert result == 200
            assert result.elapsed < ANSWER_WITHIN, result
            # Any other call: the fail mode, 503 ("could not be asked"), whether the hook's answer
            # or the AMI enforcement's hang-up of a call it cannot decide comes first.
            other = timed_call(inst, "22-soft", "600")
            assert other == 503
            assert other.elapsed < ANSWER_WITHIN, other
            inst.wait_log("no decision for ")
            # While it cannot read the blocked set it stops confirming it (its blocks go stale).
            inst.wait_log("cannot read the blocked log-ons", timeout=40)
        finally:
            inst.close()


def test_an_absolute_timeout_the_dialplan_set_before_the_routine_is_put_back(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    # A dialplan that set its own absolute timeout before asking (pbx_config merges the second
    # [phones] into the sandbox's): it must find it again after the routine, or the call fails.
    keeps_its_timeout = """
[phones]
exten => _55X,1,Set(TIMEOUT(absolute)=60)
 same => n,Gosub(forum-bridge-outbound,s,1(${EXTEN}))
 same => n,GotoIf($[${TIMEOUT(absolute)} > 50]?kept)
 same => n,Hangup(27)
 same => n(kept),Answer()
 same => n,Echo()
"""
    inst.sandbox.reload_dialplan(inst.snippet + keeps_its_timeout)
    assert inst.phone("22-soft").register() == 200
    inst.wait_status(lambda s: by_logon(s)["22-soft"]["state"] == "logged_on")
    assert timed_call(inst, "22-soft", "551") == 200  # the hook answered
    settings = load_settings(inst.config, environ={}, overrides={"asterisk.fail_mode": "open"})
    inst.sandbox.reload_dialplan(render_dialplan(settings) + keeps_its_timeout)
    with hung(inst):
        assert timed_call(inst, "22-soft", "552") == 200  # the bound fired (T), then fail_mode open


# --- blocked by a failed log-on: refused inside Asterisk, never answered ---------------------------


def test_a_blocked_log_on_cannot_call_112_with_the_bridge_up_or_hung(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    fail_a_logon(inst, "21-desk")
    # The phone (right password now, not registered again) authenticates its INVITE: only the
    # failed log-on keeps it from calling, 112 included, and Asterisk rejects before answering.
    refused = timed_call(inst, "21-desk", "112")
    assert refused == 403
    assert refused.elapsed < ANSWER_WITHIN, refused
    with hung(inst):
        refused = timed_call(inst, "21-desk", "112")
        assert refused == 403
        assert refused.elapsed < ANSWER_WITHIN, refused
        assert timed_call(inst, "21-desk", "600") == 403  # no call at all
    assert timed_call(inst, "22-soft", "112") == 200  # others are not affected
    # A successful log-on lifts the block in Asterisk at once.
    assert inst.phone("21-desk").register() == 200
    wait_until(lambda: "blocked/21-desk" not in astdb(inst), 10, "the block to be lifted in AstDB")
    assert timed_call(inst, "21-desk", "112") == 200


def test_a_registered_log_ons_blocked_112_stays_refused_until_it_registers_again(
    make_installation: Callable[..., Installation],
) -> None:
    # With the sample least-privilege AMI user: finding out whether a SuccessfulAuth was a REGISTER
    # (PJSIPShowEndpoint) must work with what that user may do.
    inst = make_installation(licences=1, start=False)
    use_the_sample_ami_user(inst)
    inst.start_bridge()
    desk = inst.phone("21-desk")
    assert desk.register() == 200
    registered_second = int(time.time())
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    # The same phone (same contact) tries again with a wrong password: its latest log-on failed.
    wrong = SippPhone("21-desk", "wrong-password", inst.sandbox.sip_port, local_port=desk.local_port)
    inst.phones.append(wrong)
    assert wrong.register() == 401
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logon_failed")
    wait_until(lambda: "blocked/21-desk" in astdb(inst), 10, "the block of 21-desk in AstDB")
    # Its right password now authenticates each INVITE (a SuccessfulAuth, like a REGISTER's), but
    # that is no log-on: 112 is refused again and again, and the block stays in AstDB.
    for _ in range(2):
        refused = timed_call(inst, "21-desk", "112")
        assert refused == 403
        assert refused.elapsed < ANSWER_WITHIN, refused
    assert "blocked/21-desk" in astdb(inst)
    assert by_logon(inst.status())["21-desk"]["state"] == "logon_failed"
    # A good REGISTER from the same contact with a new Call-ID (no ContactStatus: the contact
    # exists) lifts it. Asterisk states a contact's expiry in whole seconds, and the bridge tells a
    # REGISTER by the expiry it moves: let the clock leave the second of the first REGISTER.
    wait_until(lambda: int(time.time()) > registered_second, 5, "the next second")
    assert desk.register() == 200
    wait_until(lambda: "blocked/21-desk" not in astdb(inst), 10, "the block to be lifted in AstDB")
    inst.wait_status(lambda s: by_logon(s)["21-desk"]["state"] == "logged_on")
    answered = timed_call(inst, "21-desk", "112")
    assert answered == 200
    assert answered.elapsed < ANSWER_WITHIN, answered
    log = inst.log_text()
    assert "Permission denied" not in log and "could not read the contacts" not in log


def use_the_sample_ami_user(inst: Installation) -> None:
    """Give the sandbox's AMI user the privileges of deploy/asterisk/manager.conf.sample."""
    sample = _base.sample_ami_user()
    manager = inst.sandbox.config_dir / "manager.conf"
    lines = []
    for line in manager.read_text().splitlines():
        name = line.split("=", 1)[0].strip()
        lines.extend(sample[name] if name in ("read", "write") else [line])
    manager.write_text("\n".join(lines) + "\n")
    inst.sandbox.cli("manager reload")
    assert "write perm: system\n" in inst.sandbox.cli(f"manager show user {inst.sandbox.ami_username}")


def test_blocks_go_stale_without_the_bridges_heartbeat_and_come_back_with_the_bridge(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)  # emergency.block_stale_after = 300 (the default)
    fail_a_logon(inst, "21-desk")
    heartbeat = int(astdb(inst)["heartbeat"])
    assert abs(heartbeat - time.time()) < 60
    inst.stop_bridge()
    # Stopped a moment ago: its last word still holds.
    assert timed_call(inst, "21-desk", "112") == 403
    # Five minutes and more without a heartbeat (set back, as time would): the block is stale.
    inst.sandbox.cli(f"database put forum-bridge heartbeat {int(time.time()) - 301}")
    stale = timed_call(inst, "21-desk", "112")
    assert stale == 200
    assert stale.elapsed < ANSWER_WITHIN, stale
    assert timed_call(inst, "21-desk", "600") == 503  # other calls: the fail mode, as always
    # Back, the bridge rewrites the blocked set and confirms it: the block applies again.
    inst.sandbox.cli("database del forum-bridge/blocked 21-desk")
    inst.start_bridge()
    wait_until(lambda: "blocked/21-desk" in astdb(inst), 15, "the bridge to rewrite the blocked set")
    wait_until(
        lambda: int(astdb(inst).get("heartbeat", "0")) >= int(time.time()) - 60,
        15,
        "a fresh heartbeat",
    )
    assert timed_call(inst, "21-desk", "112") == 403


def test_a_block_lifted_while_the_bridge_was_away_is_removed_when_it_reconnects(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1)
    fail_a_logon(inst, "21-desk")
    inst.stop_bridge()
    # Cleared in the database behind Asterisk's back (as another node or an operator would).
    inst.cli("subscriber", "remove", "21-desk")
    inst.cli("subscriber", "add", "21-desk", "--number", "21")
    inst.start_bridge()
    wait_until(lambda: "blocked/21-desk" not in astdb(inst), 15, "the stale block to be removed")
    assert timed_call(inst, "21-desk", "112") == 200


# --- the module check ---------------------------------------------------------------------------


def test_a_missing_module_is_logged_and_shown_in_metrics_and_112_still_passes(
    make_installation: Callable[..., Installation],
) -> None:
    web_port = free_tcp_port()
    inst = make_installation(licences=1, start=False, **{"web.enabled": True, "web.port": web_port})
    inst.sandbox.cli("module unload func_db.so")
    assert "0 modules loaded" in inst.sandbox.cli("module show like func_db")
    inst.start_bridge()
    inst.wait_log("Asterisk lacks modules the forum_bridge dialplan needs: func_db (DB()")
    missing = 'forum_bridge_pbx_module_missing{module="func_db",pbx="asterisk"} 1.0'
    wait_until(lambda: missing in metrics(web_port), 10, "the gauge to show func_db missing")
    assert 'forum_bridge_pbx_module_missing{module="res_agi",pbx="asterisk"} 0.0' in metrics(web_port)
    assert inst.log_text().count("Asterisk lacks modules") == 1
    # Without DB() no block can be read: an emergency call errs on the side of the caller.
    assert inst.phone("22-soft").register() == 200
    assert timed_call(inst, "22-soft", "112") == 200
    # Asterisk restarted with every module: the check after the reconnect clears the gauge.
    inst.sandbox.restart()
    inst.wait_log("is back", 1)
    present = 'forum_bridge_pbx_module_missing{module="func_db",pbx="asterisk"} 0.0'
    wait_until(lambda: present in metrics(web_port), 20, "the gauge to show func_db loaded")
    inst.wait_log("Asterisk has every module the dialplan needs")


def test_the_sample_least_privilege_ami_user_may_keep_astdb_and_check_modules(
    make_installation: Callable[..., Installation],
) -> None:
    inst = make_installation(licences=1, start=False)
    use_the_sample_ami_user(inst)
    inst.start_bridge()
    inst.wait_log("Asterisk has every module the dialplan needs")
    fail_a_logon(inst, "21-desk")  # DBPut as that user
    assert "heartbeat" in astdb(inst)
    assert inst.phone("21-desk").register() == 200
    wait_until(lambda: "blocked/21-desk" not in astdb(inst), 10, "DBDel as that user")
    log = inst.log_text()
    assert "Permission denied" not in log and "could not update the blocked log-ons" not in log


# --- a PostgreSQL server of this test's own, so it can be stopped -----------------------------------


class _OwnPostgres:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_tcp_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._bindir = _postgres_bindir()
        self.running = False

    def _pg(self, *args: str) -> subprocess.CompletedProcess[str]:
        # PostgreSQL refuses to run as root; as root it runs as Debian's postgres user (as in conftest).
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> None:
        data, sockets = self.workdir / "data", self.workdir / "run"
        sockets.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            shutil.chown(sockets, "postgres", "postgres")
        init = self._pg(str(self._bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
        assert init.returncode == 0, f"initdb failed: {init.stderr[-500:]}"
        options = f"-p {self.port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.workdir / "log")
        start = self._pg(
            str(self._bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", log, "-w", "start"
        )
        assert start.returncode == 0, f"PostgreSQL did not start: {start.stderr[-500:]}"
        self.running = True

    def stop(self) -> None:
        if self.running:
            stopped = self._pg(
                str(self._bindir / "pg_ctl"),
                "-D",
                str(self.workdir / "data"),
                "-m",
                "immediate",
                "-w",
                "stop",
            )
            assert stopped.returncode == 0, stopped.stderr[-500:]
            self.running = False


@contextlib.contextmanager
def own_postgres() -> Iterator[_OwnPostgres]:
    """A PostgreSQL server for one test, stopped (if still running) and removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="forum-bridge-pg-emerg-"))
    server = _OwnPostgres(workdir)
    try:
        server.start()
        yield server
    finally:
        with contextlib.suppress(AssertionError):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
