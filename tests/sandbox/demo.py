"""The demo: a real PBX, the bridge and SIPp phones, showing the Forum licence rules at work.

``python -m tests.sandbox.demo [asterisk|freeswitch]`` (what ``deploy/demo.sh`` runs, as root)
starts a private PBX on free 127.0.0.1 ports with the bridge's own dialplan snippet: Asterisk 22
from the sandbox chroot (built or reused; the default), or the real FreeSWITCH 1.10 installed under
``/opt/fs``. It starts ``forum-bridge run asterisk`` (or ``run freeswitch``) on an embedded SQLite
database with two licences, and then lets phones register and call:

1. three log-ons register: the technical log-on always succeeds and takes no licence;
2. 21-desk calls 600: the first connection takes a licence;
3. 21-soft (a second log-on of call number 21) calls 600: it takes its own licence;
4. 22-desk calls 600: the pool is full, it is refused (Asterisk 403, FreeSWITCH 603); its call to
   112 is answered;
5. 23-desk fails to log on (wrong password): even 112 is refused for it;
6. 21-desk logs off: its licence is free at once, and 22-desk's call now gets it;

and prints ``forum-bridge status`` after the run. ``--keep`` leaves everything running (the status
page's address is printed) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forum_bridge.adapters.asterisk.dialplan import render_dialplan as render_asterisk
from forum_bridge.adapters.freeswitch.dialplan import render_dialplan as render_freeswitch
from forum_bridge.config import load_settings
from tests.sandbox.asterisk import AsteriskSandbox, SandboxError, build_root, free_tcp_port
from tests.sandbox.freeswitch import FreeSwitchSandbox, freeswitch_binary
from tests.sandbox.sipp import SippPhone

PHONES = {  # log-on: (call number, password)
    "21-desk": ("21", "desk21pw"),
    "21-soft": ("21", "soft21pw"),
    "22-desk": ("22", "desk22pw"),
    "23-desk": ("23", "desk23pw"),
}
LICENCES = 2
WAIT_SECONDS = 30.0
# The SIP answer to a call the bridge refuses: Asterisk's Hangup(21), FreeSWITCH's CALL_REJECTED.
REFUSED = {"asterisk": 403, "freeswitch": 603}


class DemoError(RuntimeError):
    """A step of the demo did not do what it should."""


def wait_for(what: str, condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Demo:
    """One run of the demo in a temporary directory."""

    def __init__(self, workdir: Path, pbx: str = "asterisk") -> None:
        self.workdir = workdir
        self.pbx = pbx
        self.config = workdir / "forum-bridge.toml"
        self.agi_port = free_tcp_port()  # the FastAGI hook (Asterisk) or the socket hook (FreeSWITCH)
        self.web_port = free_tcp_port()
        self.bridge: subprocess.Popen[bytes] | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}

    def write_config(self, pbx: AsteriskSandbox | FreeSwitchSandbox) -> None:
        """The bridge's configuration; the PBX password goes to the environment, as in production."""
        connection: dict[str, str | int]
        if isinstance(pbx, FreeSwitchSandbox):
            connection = {
                "esl_host": "127.0.0.1",
                "esl_port": pbx.esl_port,
                "socket_host": "127.0.0.1",
                "socket_port": self.agi_port,
            }
            self.env["FORUM_BRIDGE_FREESWITCH_ESL_PASSWORD"] = pbx.esl_password
        else:
            connection = {
                "ami_host": "127.0.0.1",
                "ami_port": pbx.ami_port,
                "ami_username": pbx.ami_username,
                "agi_host": "127.0.0.1",
                "agi_port": self.agi_port,
            }
            self.env["FORUM_BRIDGE_ASTERISK_AMI_SECRET"] = pbx.ami_secret
        section = "".join(f"{key} = {json.dumps(value)}\n" for key, value in connection.items())
        self.config.write_text(
            f"""# Written by the forum_bridge demo.
[database]
url = "sqlite:///{self.workdir / "forum-bridge.db"}"

[licences]
count = {LICENCES}

[keepalive]
grace = 5

[profiles.default]
keepalive = 120

[node]
name = "demo"

[web]
host = "127.0.0.1"
port = {self.web_port}

[{self.pbx}]
{section}enforce = "both"
fail_mode = "closed"
""",
            encoding="utf-8",
        )

    def cli(self, *args: str) -> str:
        """Run ``forum-bridge --config ... ARGS`` and return what it printed."""
        result = subprocess.run(
            [sys.executable, "-m", "forum_bridge", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise DemoError(f"forum-bridge {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def status(self) -> dict[str, Any]:
        """``forum-bridge status --json``."""
        doc: dict[str, Any] = json.loads(self.cli("status", "--json"))
        return doc

    def subscriber(self, logon: str) -> dict[str, Any]:
        """One subscriber's entry of the status document."""
        entry: dict[str, Any] = next(s for s in self.status()["subscribers"] if s["logon"] == logon)
        return entry

    def start_bridge(self) -> None:
        """Start ``forum-bridge run <pbx>`` and wait until it is connected to the PBX."""
        log = (self.workdir / "bridge.log").open("wb")
        self.bridge = subprocess.Popen(
            [sys.executable, "-m", "forum_bridge", "--config", str(self.config), "run", self.pbx],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        wait_for(f"the bridge to connect to {self.pbx}", self.connected)

    def connected(self) -> bool:
        """True once the bridge's /metrics says it is connected to the PBX."""
        if self.bridge is not None and self.bridge.poll() is not None:
            tail = (self.workdir / "bridge.log").read_text(errors="replace")[-1500:]
            raise DemoError(f"the bridge stopped (exit {self.bridge.returncode}):\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=2) as response:
                body = response.read().decode()
        except (urllib.error.URLError, OSError):
            return False
        return f'forum_bridge_pbx_connected{{pbx="{self.pbx}"}} 1.0' in body

    def stop_bridge(self) -> None:
        """Stop the bridge as systemd would (SIGTERM)."""
        if self.bridge is not None and self.bridge.poll() is None:
            self.bridge.send_signal(signal.SIGTERM)
            try:
                self.bridge.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.bridge.kill()
                self.bridge.wait()


def say(step: str, text: str) -> None:
    """Print one line of the demo's story."""
    print(f"[{step}] {text}", flush=True)


def expect(what: str, actual: object, expected: object) -> None:
    """Stop the demo if a step did not give the expected result."""
    if actual != expected:
        raise DemoError(f"{what}: expected {expected}, got {actual}")


def run_story(demo: Demo, sip_port: int) -> None:
    """Steps 1 to 6 (see the module docstring)."""
    refused = REFUSED[demo.pbx]
    phones = {logon: SippPhone(logon, password, sip_port) for logon, (_n, password) in PHONES.items()}

    def used() -> int:
        return int(demo.status()["licences"]["used"])

    def state_is(logon: str, state: str) -> Callable[[], bool]:
        return lambda: demo.subscriber(logon)["state"] == state

    for logon in ("21-desk", "21-soft", "22-desk"):
        code = phones[logon].register(expires=300)
        expect(f"REGISTER of {logon}", code, 200)
        wait_for(f"{logon} to be logged on", state_is(logon, "logged_on"))
    say("1", f"21-desk, 21-soft and 22-desk registered (200 each); licences in use: {used()} of {LICENCES}")

    code = phones["21-desk"].call("600")
    expect("21-desk calling 600", code, 200)
    say("2", f"21-desk called 600: answered ({int(code)}); licences in use: {used()} of {LICENCES}")

    code = phones["21-soft"].call("600")
    expect("21-soft calling 600", code, 200)
    holders = [a["logon"] for a in demo.status()["assignments"]]
    say("3", f"21-soft (also number 21) called 600: answered ({int(code)}); licences held by {holders}")

    code = phones["22-desk"].call("600")
    expect("22-desk calling 600 with the pool full", code, refused)
    say("4", f"22-desk called 600: refused ({int(code)}), every licence is taken: emergency calls only")
    code = phones["22-desk"].call("112")
    expect("22-desk calling 112", code, 200)
    say("4", f"22-desk called 112: answered ({int(code)}); it still holds no licence")

    wrong = SippPhone("23-desk", "not-the-password", sip_port)
    code = wrong.register(expires=300)
    wait_for("23-desk's failed log-on", state_is("23-desk", "logon_failed"))
    say("5", f"23-desk registered with a wrong password: refused ({int(code)}), state logon_failed")
    code = phones["23-desk"].call("112")
    if code == 200 and code.remote_hangup and demo.pbx == "freeswitch":
        # FreeSWITCH's snippet lets 112 through without asking; the event path then hangs it up.
        say("5", "23-desk called 112: hung up by the bridge (uuid_kill): a failed log-on may make no call")
    else:
        expect("23-desk calling 112 after a failed log-on", code, refused)
        say("5", f"23-desk called 112: refused ({int(code)}): a failed log-on may make no call at all")

    code = phones["21-desk"].unregister()
    expect("21-desk unregistering", code, 200)
    wait_for("21-desk's licence to be freed", lambda: not demo.subscriber("21-desk")["licensed"])
    say(
        "6",
        f"21-desk unregistered ({int(code)}): its licence is free at once ({used()} of {LICENCES} in use)",
    )
    code = phones["22-desk"].call("600")
    expect("22-desk calling 600 again", code, 200)
    say("6", f"22-desk called 600 again: answered ({int(code)}) with the freed licence")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when every step behaved as the Forum rules say."""
    parser = argparse.ArgumentParser(description="forum_bridge demo against a real Asterisk 22 or FreeSWITCH")
    parser.add_argument(
        "pbx", nargs="?", choices=sorted(REFUSED), default="asterisk", help="the PBX (default: asterisk)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the PBX and the bridge running until Ctrl-C"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="forum-bridge-demo-") as tmp:
        demo = Demo(Path(tmp), args.pbx)
        endpoints = [(logon, password) for logon, (_n, password) in PHONES.items()]
        if args.pbx == "freeswitch":
            try:
                freeswitch_binary()
            except SandboxError as exc:
                print(f"demo failed: {exc}", file=sys.stderr)
                return 1
            probe = load_settings(environ={}, overrides={"freeswitch.socket_port": demo.agi_port})
            with FreeSwitchSandbox(
                demo.agi_port, render_freeswitch(probe), endpoints, base_dir=Path(tmp)
            ) as fs:
                demo.write_config(fs)
                say("0", f"FreeSWITCH {fs.sip_port}/udp, ESL {fs.esl_port}; bridge with {LICENCES} licences")
                return play(demo, fs.sip_port, keep=args.keep)
        print("Building or reusing the sandbox Asterisk (the first time takes about a minute)...", flush=True)
        build_root()
        probe = load_settings(environ={}, overrides={"asterisk.agi_port": demo.agi_port})
        with AsteriskSandbox(demo.agi_port, render_asterisk(probe), endpoints) as pbx:
            demo.write_config(pbx)
            say("0", f"Asterisk {pbx.sip_port}/udp, AMI {pbx.ami_port}; bridge with {LICENCES} licences")
            return play(demo, pbx.sip_port, keep=args.keep)


def play(demo: Demo, sip_port: int, *, keep: bool) -> int:
    """Provision, start the bridge, run the story and print the status; the exit code."""
    demo.cli("db", "upgrade")
    for logon, (number, _pw) in PHONES.items():
        demo.cli("subscriber", "add", logon, "--number", number)
    try:
        demo.start_bridge()
        run_story(demo, sip_port)
        print("\n$ forum-bridge status", flush=True)
        print(demo.cli("status"), flush=True)
        if keep:
            print(f"Status page: http://127.0.0.1:{demo.web_port}/  (Ctrl-C to stop)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while demo.bridge is not None and demo.bridge.poll() is None:
                    time.sleep(1)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.stop_bridge()
    print("demo finished: every step followed the Forum licence rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
