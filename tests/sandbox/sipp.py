"""SIPp-driven phones for the sandbox: register, unregister, call, and answer calls.

Each action runs the host's ``sipp`` (Debian package ``sip-tester``) once, to completion, with a
scenario from ``scenarios/`` and an injection CSV carrying the log-on and its
``[authentication username=... password=...]``.  Every socket SIPp opens (SIP, media, control)
is bound to 127.0.0.1.  The outcome is read from SIPp's own message trace, so a refused REGISTER
or a rejected call is a *result* (its status code), not a SIPp error.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from tests.sandbox.asterisk import free_transient_udp_port, free_udp_port, hold_back
from tests.sandbox.process import die_with_parent_preexec

__all__ = [
    "SipMessage",
    "SippError",
    "SippPhone",
    "SippResult",
    "SippRun",
]

_HOST = "127.0.0.1"
_TAIL_LINES = 30
# Extra wall-clock time on top of SIPp's own -timeout before we kill it ourselves.
_KILL_GRACE = 10.0
_SEPARATOR = re.compile(r"^-{20,}\s", re.MULTILINE)
_DIRECTION = re.compile(r"message (sent|received)", re.IGNORECASE)
_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.!~*'()&=+$-]+$")
_SAFE_NUMBER = re.compile(r"^[A-Za-z0-9*#+_.-]+$")


class SippError(RuntimeError):
    """SIPp could not be run at all (missing binary, bad arguments)."""


@dataclass(frozen=True)
class SipMessage:
    """One SIP message from SIPp's trace."""

    direction: Literal["sent", "received"]
    start_line: str
    #: The request method, or for a response the method named in its CSeq.
    method: str
    #: The status code of a response; ``None`` for a request.
    status: int | None
    #: The CSeq number (0 if absent).
    cseq: int
    text: str

    @property
    def is_request(self) -> bool:
        """Whether this is a request (as opposed to a response)."""
        return self.status is None


# A line of SIPp's error log: date, time and Unix time, then the message.
_LOGGED_ERROR = re.compile(r"^\d{4}-\d\d-\d\d\s+[\d:.]+\s+[\d.]+:\s*(.+)$")


class SippResult(int):
    """The final SIP status code of one SIPp run (``0``: no final answer), with the evidence.

    It *is* an ``int``, so ``phone.register() == 200`` reads naturally; the attributes say what
    else happened.  For a phone's own request (REGISTER, INVITE) the status is the last final
    response it received; for an answered incoming call it is the final status the phone sent.
    """

    exit_code: int
    elapsed: float
    messages: tuple[SipMessage, ...]
    error_tail: str
    scenario: str

    def __new__(
        cls,
        status: int,
        *,
        exit_code: int,
        elapsed: float,
        messages: Sequence[SipMessage],
        error_tail: str,
        scenario: str,
    ) -> SippResult:
        """Build a result; see the class docstring."""
        self = super().__new__(cls, status)
        self.exit_code = exit_code
        self.elapsed = elapsed
        self.messages = tuple(messages)
        self.error_tail = error_tail
        self.scenario = scenario
        return self

    @property
    def status(self) -> int:
        """The status code as a plain ``int``."""
        return int(self)

    @property
    def ok(self) -> bool:
        """Whether SIPp ran the scenario to its end (exit code 0)."""
        return self.exit_code == 0

    @property
    def remote_hangup(self) -> bool:
        """Whether the PBX sent a BYE (it ended a connected call)."""
        return any(m.direction == "received" and m.method == "BYE" and m.is_request for m in self.messages)

    @property
    def cancelled(self) -> bool:
        """Whether the PBX cancelled an incoming call before it was answered."""
        return any(m.direction == "received" and m.method == "CANCEL" and m.is_request for m in self.messages)

    @property
    def first_error(self) -> str:
        """SIPp's first logged error without its time stamps ("" if none), e.g. a failed bind."""
        for line in self.error_tail.splitlines():
            found = _LOGGED_ERROR.match(line)
            if found:
                return found.group(1)
        return ""

    def __repr__(self) -> str:
        # The first error comes first: pytest shortens a long repr in the middle.
        text = f"SippResult(status={int(self)}, exit_code={self.exit_code}, elapsed={self.elapsed:.3f}s"
        if self.first_error:
            text += f", first_error={self.first_error!r}"
        text += f", scenario={self.scenario!r}"
        if self.error_tail:
            text += f", errors=\n{self.error_tail}\n"
        return text + ")"


def parse_trace(text: str) -> list[SipMessage]:
    """Split SIPp's ``-trace_msg`` file into messages (header-less entries are skipped)."""
    messages: list[SipMessage] = []
    for block in _SEPARATOR.split(text):
        head, _, rest = block.partition("\n")
        direction_line, _, body = rest.partition("\n")
        found = _DIRECTION.search(direction_line) or _DIRECTION.search(head)
        if not found:
            continue
        sip = body.lstrip("\r\n")
        start_line = sip.split("\n", 1)[0].strip()
        if not start_line:
            continue
        cseq = re.search(r"^CSeq:\s*(\d+)\s+(\S+)", sip, re.MULTILINE | re.IGNORECASE)
        cseq_number = int(cseq.group(1)) if cseq else 0
        status: int | None = None
        if start_line.startswith("SIP/2.0 "):
            parts = start_line.split()
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            method = cseq.group(2).upper() if cseq else ""
        else:
            method = start_line.split()[0].upper()
        direction: Literal["sent", "received"] = "sent" if found.group(1).lower() == "sent" else "received"
        messages.append(SipMessage(direction, start_line, method, status, cseq_number, sip))
    return messages


def _final_status(messages: Sequence[SipMessage], method: str, direction: str) -> int:
    """The final response to the *last* ``method`` transaction (a challenge answered by a retry
    with credentials is superseded by the retry's answer, or by none)."""
    request_direction = "sent" if direction == "received" else "received"
    requests = [
        m.cseq for m in messages if m.is_request and m.method == method and m.direction == request_direction
    ]
    if not requests:
        return 0
    last = max(requests)
    finals = [
        m.status
        for m in messages
        if m.status is not None
        and m.status >= 200
        and m.method == method
        and m.direction == direction
        and m.cseq == last
    ]
    return finals[-1] if finals else 0


def _tail_of(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _udp_port_bound(port: int) -> bool:
    """Whether some socket is bound to UDP ``port`` (read from /proc, without touching it)."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii") as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    if len(fields) > 1 and fields[1].endswith(wanted):
                        return True
        except OSError:
            continue
    return False


def _free_media_port() -> int:
    """An even UDP port p on 127.0.0.1 with p and p+2 free (SIPp binds audio and video).

    p+1 to p+3 are held back from the ports handed out next: the same SIPp run's control port,
    picked right after, once landed on p+2, and SIPp then failed to bind it."""
    for _ in range(50):
        port = free_transient_udp_port()
        if port % 2 or port + 3 > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + 2):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    sock.bind((_HOST, candidate))
            except OSError:
                continue
            hold_back(port + 1, port + 2, port + 3)
            return port
    raise SippError("no free UDP port pair for SIPp media on 127.0.0.1")


def _scenario_text(name: str, values: dict[str, str]) -> str:
    text = (importlib.resources.files("tests.sandbox") / "scenarios" / name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.search(r"@[A-Z_]+@", text)
    if leftover:
        raise SippError(f"scenario {name}: placeholder {leftover.group(0)} not filled")
    return text


class SippRun:
    """One running ``sipp`` process; ``wait()`` turns it into a ``SippResult``.

    Use ``SippPhone.start_call()`` / ``SippPhone.start_uas()`` to get one.  It is a context
    manager: leaving the block stops the process if it is still running.
    """

    def __init__(
        self,
        argv: list[str],
        workdir: Path,
        scenario: str,
        local_port: int,
        deadline_seconds: float,
        status_of: tuple[str, str],
    ) -> None:
        """Start ``argv`` in ``workdir``; it is killed if it outlives ``deadline_seconds``."""
        self._workdir = workdir
        self._scenario = scenario
        self._local_port = local_port
        self._status_of = status_of
        self._started = time.monotonic()
        self._deadline = self._started + deadline_seconds
        self._result: SippResult | None = None
        self._lock = threading.Lock()
        out = (workdir / "sipp.out").open("wb")
        try:
            self._proc: subprocess.Popen[bytes] = subprocess.Popen(
                argv,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec(),
            )
        except OSError as exc:
            raise SippError(f"cannot run {argv[0]!r}: {exc}") from exc
        finally:
            out.close()

    @property
    def pid(self) -> int:
        """The SIPp process id."""
        return self._proc.pid

    def running(self) -> bool:
        """Whether SIPp is still running."""
        return self._proc.poll() is None

    def wait_listening(self, timeout: float = 5.0) -> None:
        """Block until SIPp has bound its SIP port (so a PBX can reach it) or raise ``SippError``."""
        deadline = time.monotonic() + timeout
        while not _udp_port_bound(self._local_port):
            if self._proc.poll() is not None:
                raise SippError(f"sipp exited before listening:\n{self._collect_errors()}")
            if time.monotonic() >= deadline:
                raise SippError(f"sipp not listening on {_HOST}:{self._local_port} after {timeout}s")
            time.sleep(0.01)

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for SIPp to finish and return the result.

        Past the run's own deadline SIPp is killed and the result says so.  If ``timeout`` runs out
        first, ``subprocess.TimeoutExpired`` is raised and SIPp keeps running.
        """
        with self._lock:
            if self._result is not None:
                return self._result
            limit = self._deadline - time.monotonic()
            if timeout is not None:
                limit = min(limit, timeout)
            killed = False
            try:
                self._proc.wait(timeout=max(0.0, limit))
            except subprocess.TimeoutExpired:
                if timeout is not None and time.monotonic() < self._deadline:
                    raise
                self._kill()
                killed = True
            self._result = self._build_result(killed)
            return self._result

    def stop(self) -> SippResult:
        """Stop SIPp now (if still running) and return what it did so far."""
        with self._lock:
            if self._result is not None:
                return self._result
            killed = self._proc.poll() is None
            if killed:
                self._kill()
            self._result = self._build_result(killed)
            return self._result

    def __enter__(self) -> SippRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGKILL)
        self._proc.wait(timeout=10)

    def _collect_errors(self) -> str:
        parts = [
            _tail_of(self._workdir / "errors.log"),
            _tail_of(self._workdir / "sipp.out", 8),
        ]
        return "\n".join(part for part in parts if part)

    def _build_result(self, killed: bool) -> SippResult:
        elapsed = time.monotonic() - self._started
        try:
            trace = (self._workdir / "messages.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            trace = ""
        messages = parse_trace(trace)
        method, direction = self._status_of
        exit_code = self._proc.returncode if self._proc.returncode is not None else -9
        errors = ""
        if killed or exit_code != 0:
            errors = self._collect_errors()
            if killed:
                errors = f"(killed after {elapsed:.1f}s)\n{errors}"
        return SippResult(
            _final_status(messages, method, direction),
            exit_code=exit_code,
            elapsed=elapsed,
            messages=messages,
            error_tail=errors,
            scenario=self._scenario,
        )


class SippPhone:
    """A SIP phone (one log-on on one device) made of SIPp runs, all on 127.0.0.1.

    The phone keeps one local SIP port for its life, so its registered contact
    ``sip:<logon>@127.0.0.1:<local_port>`` is where ``start_uas()`` answers incoming calls.
    Only one SIPp run can hold that port at a time: do not ``register()`` while a UAS started
    by ``start_uas()`` is waiting (calls use it too, but finish before returning).
    """

    def __init__(
        self,
        logon: str,
        password: str,
        sip_port_of_asterisk: int,
        local_port: int | None = None,
        *,
        sipp_binary: str = "sipp",
        from_user: str | None = None,
    ) -> None:
        """Describe the phone; nothing runs until a method is called.

        ``from_user`` makes the phone claim another user in its From, To and Contact headers while
        it still authenticates as ``logon`` (a spoofed caller identity); by default both are ``logon``.
        """
        from_user = logon if from_user is None else from_user
        for kind, value in (("logon", logon), ("password", password), ("from_user", from_user)):
            # Both end up inside SIPp's [authentication ...] keyword in a ';'-separated CSV.
            if not _SAFE_TOKEN.match(value):
                raise ValueError(f"unsuitable {kind} for a SIPp injection file: {value!r}")
        binary = shutil.which(sipp_binary)
        if binary is None:
            raise SippError(f"{sipp_binary!r} not found; install Debian's sip-tester")
        self._binary = binary
        self.logon = logon
        self.from_user = from_user
        self._password = password
        self.server_port = sip_port_of_asterisk
        self.local_port = local_port if local_port is not None else free_udp_port()
        self._tmp = Path(tempfile.mkdtemp(prefix="forum-bridge-sipp-"))
        self._runs = 0
        self._lock = threading.Lock()

    @property
    def contact_uri(self) -> str:
        """The contact this phone registers."""
        return f"sip:{self.from_user}@{_HOST}:{self.local_port}"

    # -- actions ------------------------------------------------------------------------------

    def register(self, expires: int = 60, timeout: float = 10.0) -> SippResult:
        """REGISTER (answering the digest challenge); returns the final status, e.g. 200.

        With a wrong password Asterisk 22 answers the second REGISTER with another ``401``.
        """
        if expires < 0:
            raise ValueError("expires must be >= 0")
        return self._start(
            "register.xml",
            {"EXPIRES": str(expires)},
            timeout=timeout,
            status_of=("REGISTER", "received"),
        ).wait()

    def unregister(self, timeout: float = 10.0) -> SippResult:
        """REGISTER this phone's contact with ``Expires: 0``; returns the final status (200)."""
        return self.register(expires=0, timeout=timeout)

    def call(self, number: str, hold_seconds: float = 1.0, ring_timeout: float = 15.0) -> SippResult:
        """Place a call and return the INVITE's final status.

        ``200``: answered; the phone stays connected ``hold_seconds`` (or until the PBX sends a
        BYE: see ``SippResult.remote_hangup``), then hangs up.  ``>= 300``: rejected (ACKed),
        e.g. ``403`` after ``Hangup(21)``.  ``487``: not answered within ``ring_timeout``, so the
        phone sent CANCEL.  ``0``: no final answer at all (see ``error_tail``).
        """
        return self.start_call(number, hold_seconds, ring_timeout).wait()

    def start_call(self, number: str, hold_seconds: float = 1.0, ring_timeout: float = 15.0) -> SippRun:
        """Like ``call()`` but in the background: returns the running ``SippRun``."""
        if not _SAFE_NUMBER.match(number):
            raise ValueError(f"unsuitable number {number!r}")
        ring_ms = max(1, round(ring_timeout * 1000))
        return self._start(
            "call.xml",
            {"HOLD_MS": str(max(1, round(hold_seconds * 1000))), "RING_MS": str(ring_ms)},
            timeout=ring_timeout + hold_seconds + 15.0,
            status_of=("INVITE", "received"),
            # Bounds every other wait (challenge, BYE answer, CANCEL answer) the same way.
            extra=["-s", number, "-recv_timeout", str(ring_ms)],
        )

    def start_uas(self, timeout: float = 60.0, ring_seconds: float = 0.0) -> SippRun:
        """Wait in the background, on this phone's contact port, for one incoming call.

        The call rings ``ring_seconds``, is answered with 200 and SDP, and ends when the PBX sends
        BYE; a CANCEL while ringing ends it as ``487``.  Returns once SIPp listens.  ``timeout``
        bounds the whole run: waiting for the call, ringing and the connected call.  The result's
        status is the final status the phone sent to the INVITE (``0``: no call came).
        """
        run = self._start(
            "answer.xml",
            {"RING_MS": str(max(1, round(ring_seconds * 1000)))},
            timeout=timeout,
            status_of=("INVITE", "sent"),
            # Answer stray OPTIONS/NOTIFY/INFO/UPDATE with 200 instead of failing the scenario.
            extra=["-aa"],
            server=True,
        )
        try:
            run.wait_listening()
        except BaseException:
            run.stop()
            raise
        return run

    def answer_incoming(self, timeout: float = 60.0, ring_seconds: float = 0.0) -> SippResult:
        """Blocking form of ``start_uas()``: answer one incoming call and return after its BYE."""
        return self.start_uas(timeout=timeout, ring_seconds=ring_seconds).wait()

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the phone's temporary trace files (kept if ``SIPP_KEEP_TRACES=1``)."""
        if not keep_traces_requested():
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> SippPhone:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _start(
        self,
        scenario: str,
        values: dict[str, str],
        *,
        timeout: float,
        status_of: tuple[str, str],
        extra: Sequence[str] = (),
        server: bool = False,
    ) -> SippRun:
        with self._lock:
            self._runs += 1
            workdir = self._tmp / f"{self._runs:03d}-{scenario.removesuffix('.xml')}"
        workdir.mkdir(parents=True)
        (workdir / scenario).write_text(_scenario_text(scenario, values), encoding="utf-8")
        (workdir / "phone.csv").write_text(
            f"SEQUENTIAL\n{self.from_user};"
            f"[authentication username={self.logon} password={self._password}];\n",
            encoding="utf-8",
        )
        argv = [self._binary]
        if not server:
            argv.append(f"{_HOST}:{self.server_port}")
        # fmt: off
        argv += [
            "-sf", scenario,
            "-inf", "phone.csv",
            "-i", _HOST,
            "-p", str(self.local_port),
            "-bind_local",
            "-mi", _HOST,
            "-mp", str(_free_media_port()),
            # SIPp's remote-control socket would otherwise listen on 0.0.0.0:8888.
            "-ci", _HOST,
            "-cp", str(free_transient_udp_port()),
            "-m", "1",
            "-l", "1",
            "-nostdin",
            "-timeout", f"{max(1, round(timeout))}s",
            "-timeout_error",
            "-trace_msg", "-message_file", "messages.log",
            "-trace_err", "-error_file", "errors.log",
            *extra,
        ]
        # fmt: on
        return SippRun(
            argv,
            workdir,
            scenario,
            self.local_port,
            deadline_seconds=timeout + _KILL_GRACE,
            status_of=status_of,
        )


def keep_traces_requested() -> bool:
    """Whether ``SIPP_KEEP_TRACES`` asks to keep SIPp's trace files for diagnosis.

    Not ``FORUM_BRIDGE_...``: the bridge reads every such variable as a configuration key and
    refuses one it does not know, so the in-process CLI of the e2e tests would fail.
    """
    return os.environ.get("SIPP_KEEP_TRACES", "") not in ("", "0")
