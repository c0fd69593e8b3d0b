"""Smoke test of the sandbox itself: a real Asterisk 22, real SIPp phones, a stub FastAGI hook.

Needs root and Debian's archive the first time (the chroot is then cached). Nothing here is
skipped: if the sandbox cannot be built or started, the test fails and says why.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from forum_bridge.adapters.asterisk.ami import EVENT_CLASSES, EVENT_FILTER
from forum_bridge.adapters.asterisk.events import EVENT_NAMES
from tests.sandbox import (
    AMI_READ_CLASSES,
    AMI_WRITE_CLASSES,
    AsteriskSandbox,
    SippPhone,
    build_root,
    free_tcp_port,
)

pytestmark = [pytest.mark.asterisk, pytest.mark.timeout(1800)]

DESK, DESK_PASSWORD = "21-desk", "desk-secret-1"
OTHER, OTHER_PASSWORD = "22", "other-secret-2"

OUTBOUND_STUB = """\
[forum-bridge-outbound]
exten => s,1,Set(FORUM_BRIDGE_RESULT=)
 same => n,AGI(${FORUM_BRIDGE_AGI}/outbound,${ARG1})
 same => n,GotoIf($["${FORUM_BRIDGE_RESULT}" = "allow"]?ok)
 same => n,Hangup(21)
 same => n(ok),Return()
"""

# Added later through reload_dialplan(): ring whoever the number names, no hook.
INBOUND_STUB = """
[forum-bridge-inbound]
exten => s,1,Set(FORUM_BRIDGE_DIAL=PJSIP/${ARG1})
 same => n,Return()
"""


# --- a FastAGI stub ----------------------------------------------------------------------------


class AgiStub:
    """Answers every FastAGI request with ``SET VARIABLE FORUM_BRIDGE_RESULT <decision>``."""

    def __init__(self) -> None:
        self.decision = "allow"
        self.requests: list[dict[str, str]] = []
        stub = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 5

            def handle(self) -> None:
                env: dict[str, str] = {}
                while True:
                    line = self.rfile.readline()
                    if not line or line in (b"\n", b"\r\n"):
                        break
                    key, _, value = line.decode().rstrip("\r\n").partition(":")
                    env[key.strip()] = value.strip()
                stub.requests.append(env)
                self.wfile.write(f"SET VARIABLE FORUM_BRIDGE_RESULT {stub.decision}\n".encode())
                env["reply"] = self.rfile.readline().decode().strip()

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", free_tcp_port()), Handler)
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


# --- a raw AMI client ---------------------------------------------------------------------------


class AmiClient:
    """A blocking AMI session that collects every frame in a background thread."""

    def __init__(self, port: int, username: str, secret: str, events: str | None = None) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._sock.settimeout(None)
        self.frames: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._buffer = b""
        self.banner = self._read_banner()
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()
        extra = {"Events": events} if events is not None else {}
        self.login = self.action("Login", Username=username, Secret=secret, **extra)

    def _read_banner(self) -> str:
        while b"\r\n" not in self._buffer:
            self._buffer += self._sock.recv(4096)
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line.decode()

    def _reader(self) -> None:
        try:
            while True:
                while b"\r\n\r\n" in self._buffer:
                    raw, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
                    frame: dict[str, str] = {}
                    for line in raw.decode("utf-8", "replace").split("\r\n"):
                        key, sep, value = line.partition(":")
                        if sep:
                            frame.setdefault(key.strip(), value.strip())
                    with self._cond:
                        self.frames.append(frame)
                        self._cond.notify_all()
                chunk = self._sock.recv(65536)
                if not chunk:
                    return
                self._buffer += chunk
        except OSError:
            return

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for frame in self.frames:
                    if predicate(frame):
                        return frame
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching AMI frame in {timeout}s; got {self.frames[-20:]}")
                self._cond.wait(remaining)

    def action(self, name: str, **headers: str) -> dict[str, str]:
        action_id = f"{name}-{time.monotonic_ns()}"
        text = f"Action: {name}\r\nActionID: {action_id}\r\n"
        text += "".join(f"{key}: {value}\r\n" for key, value in headers.items()) + "\r\n"
        self._sock.sendall(text.encode())
        return self.wait_for(lambda f: f.get("ActionID") == action_id and "Response" in f)

    def events(self, name: str) -> list[dict[str, str]]:
        with self._cond:
            return [f for f in self.frames if f.get("Event") == name]

    def close(self) -> None:
        with contextlib.suppress(OSError):  # Asterisk may be gone already (restart test)
            self._sock.sendall(b"Action: Logoff\r\n\r\n")
        self._sock.close()
        self._thread.join(timeout=5)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agi() -> Iterator[AgiStub]:
    stub = AgiStub()
    yield stub
    stub.close()


@pytest.fixture(scope="module")
def pbx(agi: AgiStub) -> Iterator[AsteriskSandbox]:
    build_root()  # cached after the first run; fails loudly with the command's output
    with AsteriskSandbox(
        agi_port=agi.port,
        dialplan_snippet=OUTBOUND_STUB,
        endpoints=[(DESK, DESK_PASSWORD), (OTHER, OTHER_PASSWORD)],
    ) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def ami(pbx: AsteriskSandbox) -> Iterator[AmiClient]:
    client = AmiClient(pbx.ami_port, pbx.ami_username, pbx.ami_secret)
    yield client
    client.close()


@pytest.fixture
def desk(pbx: AsteriskSandbox) -> Iterator[SippPhone]:
    with SippPhone(DESK, DESK_PASSWORD, pbx.sip_port) as phone:
        yield phone


# --- tests --------------------------------------------------------------------------------------


def test_ami_login_as_least_privilege_user(pbx: AsteriskSandbox, ami: AmiClient) -> None:
    assert ami.banner.startswith("Asterisk Call Manager/")
    assert ami.login["Response"] == "Success", ami.login
    ami.wait_for(lambda f: f.get("Event") == "FullyBooted")
    assert (AMI_READ_CLASSES, AMI_WRITE_CLASSES) == ("system,call,security", "system,call")

    # What the bridge needs is allowed ...
    contacts = ami.action("PJSIPShowContacts")
    assert contacts.get("Message") != "Permission denied", contacts
    channels = ami.action("CoreShowChannels")
    assert channels["Response"] == "Success", channels
    hangup = ami.action("Hangup", Channel="PJSIP/nobody-00000000", Cause="21")
    assert hangup["Message"] == "No such channel", hangup
    # ... and what it does not need is not. (Write class "system" does allow GetConfig and Reload:
    # Asterisk files them under system *or* config, and PJSIPShow* leaves no narrower choice.)
    for name, headers in (
        ("Command", {"Command": "core show version"}),
        ("Originate", {"Channel": "PJSIP/22", "Application": "Echo"}),
        ("UpdateConfig", {"SrcFilename": "manager.conf", "DstFilename": "manager.conf"}),
    ):
        denied = ami.action(name, **headers)
        assert denied["Message"] == "Permission denied", (name, denied)


def test_register_right_password(desk: SippPhone, ami: AmiClient) -> None:
    result = desk.register(expires=60)
    assert result == 200, repr(result)
    ami.wait_for(
        lambda f: (
            f.get("Event") == "SuccessfulAuth" and f.get("Service") == "PJSIP" and f.get("AccountID") == DESK
        )
    )
    ami.wait_for(
        lambda f: (
            f.get("Event") == "ContactStatus"
            and f.get("AOR") == DESK
            and f.get("ContactStatus") == "NonQualified"
            and f.get("URI") == desk.contact_uri
        )
    )


def test_register_wrong_password_is_rechallenged(pbx: AsteriskSandbox, ami: AmiClient) -> None:
    with SippPhone(DESK, "not-the-password", pbx.sip_port) as intruder:
        result = intruder.register()
    # Asterisk 22 answers wrong credentials with a fresh 401 challenge, not 403.
    assert result == 401, repr(result)
    assert result.ok, repr(result)
    ami.wait_for(lambda f: f.get("Event") == "ChallengeResponseFailed" and f.get("AccountID") == DESK)


def test_call_allowed_by_hook_connects(desk: SippPhone, agi: AgiStub) -> None:
    agi.decision = "allow"
    before = len(agi.requests)
    result = desk.call("600", hold_seconds=0.5)
    assert result == 200, repr(result)
    assert not result.remote_hangup
    request = agi.requests[before]
    assert request["agi_network_script"] == "outbound"
    assert request["agi_arg_1"] == "600"
    assert request["agi_channel"].startswith(f"PJSIP/{DESK}-")
    assert request["reply"] == "200 result=1"


def test_call_denied_by_hook_is_forbidden(desk: SippPhone, agi: AgiStub, ami: AmiClient) -> None:
    agi.decision = "deny"
    try:
        result = desk.call("600")
    finally:
        agi.decision = "allow"
    assert result == 403, repr(result)
    ami.wait_for(lambda f: f.get("Event") == "Hangup" and f.get("Cause") == "21")


def test_inbound_call_rings_registered_phone(pbx: AsteriskSandbox, desk: SippPhone) -> None:
    pbx.reload_dialplan(OUTBOUND_STUB + INBOUND_STUB)
    assert "forum-bridge-inbound" in pbx.cli("dialplan show forum-bridge-inbound")
    with SippPhone(OTHER, OTHER_PASSWORD, pbx.sip_port) as other:
        assert other.register() == 200
        with other.start_uas(timeout=20) as uas:
            caller = desk.call(f"7{OTHER}", hold_seconds=0.5)
            answered = uas.wait()
        assert caller == 200, repr(caller)
        assert answered == 200, repr(answered)
        assert answered.remote_hangup
        assert other.unregister() == 200


def test_the_bridges_event_filter_lets_through_only_what_it_reads(
    pbx: AsteriskSandbox, desk: SippPhone, agi: AgiStub, ami: AmiClient
) -> None:
    # A session like the bridge's: its event classes, then its Filter, as the least-privilege user.
    filtered = AmiClient(pbx.ami_port, pbx.ami_username, pbx.ami_secret, events=EVENT_CLASSES)
    try:
        answer = filtered.action("Filter", Operation="Add", Filter=EVENT_FILTER)
        assert answer["Response"] == "Success", answer
        start, control = len(filtered.frames), len(ami.frames)
        agi.decision = "allow"
        assert desk.register(expires=60) == 200
        assert desk.call("600", hold_seconds=0.5) == 200
        for name in ("SuccessfulAuth", "ContactStatus", "Newchannel", "Hangup"):
            filtered.wait_for(lambda f, name=name: f.get("Event") == name and DESK in str(f))
        # The unfiltered session saw the frames the filter holds back...
        ami.wait_for(lambda f: f.get("Event") == "Hangup" and DESK in f.get("Channel", ""))
        seen = {f.get("Event") for f in ami.frames[control:]}
        assert {"ChallengeSent", "Newstate"} <= seen, seen
        # ... the filtered one got only the events the bridge maps.
        events = [f["Event"] for f in filtered.frames[start:] if "Event" in f and "ActionID" not in f]
        assert set(events) <= EVENT_NAMES, sorted(set(events) - EVENT_NAMES)
        # Answers to actions, list items included, are never filtered.
        listed = filtered.action("PJSIPShowContacts")
        assert listed["Response"] == "Success", listed
        filtered.wait_for(lambda f: f.get("Event") == "ContactListComplete")
        assert any(f.get("Event") == "ContactList" and f.get("Endpoint") == DESK for f in filtered.frames)
    finally:
        filtered.close()
        desk.unregister()


def test_unregister_removes_contact(desk: SippPhone, ami: AmiClient) -> None:
    assert desk.register() == 200
    result = desk.unregister()
    assert result == 200, repr(result)
    ami.wait_for(
        lambda f: (
            f.get("Event") == "ContactStatus"
            and f.get("URI") == desk.contact_uri
            and f.get("ContactStatus") == "Removed"
        )
    )


def test_restart_keeps_ports_and_users(pbx: AsteriskSandbox, desk: SippPhone) -> None:
    sip_port, ami_port = pbx.sip_port, pbx.ami_port
    pbx.restart()
    assert (pbx.sip_port, pbx.ami_port) == (sip_port, ami_port)
    assert desk.register() == 200
    assert desk.unregister() == 200
