"""A throwaway real FreeSWITCH 1.10 on 127.0.0.1, for tests and demos.

FreeSWITCH is not in Debian's archive; the test command and the demo install a build of its public
source under ``/opt/fs`` first (see ``tests/run.sh``). ``FreeSwitchSandbox`` runs one private
instance of it with a configuration written here (one ``freeswitch.xml``, the bridge's dialplan
snippet included from a file beside it), its own log/db/run/temp directories and its own free ports
on 127.0.0.1: SIP (UDP and TCP), the event socket, and a small RTP range. Nothing outside its own
temporary directory is touched, and several instances can run side by side.

The phones' context is ``phones``:

* the bridge's snippet comes first (``forum_bridge/*.xml`` is included at the top of the context);
* ``7<number>`` is a call from outside to a call number: it rings every log-on of that number at
  once (``bridge user/a@domain,user/b@domain``);
* any other number is answered and echoed, so the call really connects until the phone hangs up.

The directory has one domain, ``sandbox.test``, with a user (log-on) and password per endpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote
from xml.sax.saxutils import escape

from tests.sandbox.asterisk import free_tcp_port, free_udp_port
from tests.sandbox.process import PbxProcess, SandboxError

__all__ = [
    "BIN_ENV_VAR",
    "FREESWITCH_BIN",
    "FREESWITCH_MODULES",
    "FreeSwitchSandbox",
    "free_sip_port",
    "freeswitch_binary",
]

FREESWITCH_BIN = Path("/opt/fs/bin/freeswitch")
# Another FreeSWITCH 1.10 build can be named here (tests, the demo); the default is where the test
# command installs it.
BIN_ENV_VAR = "FORUM_BRIDGE_FREESWITCH_BIN"
DOMAIN = "sandbox.test"
PROFILE = "internal"
CONTEXT = "phones"

# What the shared build has, and all a sandbox needs: SIP, the event socket, the XML dialplan,
# the dialplan tools (answer, echo, bridge, socket, transfer, hangup), mod_hash for the bridge's
# lists, loopback and tone streams for internal calls.
FREESWITCH_MODULES: tuple[str, ...] = (
    "mod_console",
    "mod_logfile",
    "mod_event_socket",
    "mod_sofia",
    "mod_loopback",
    "mod_commands",
    "mod_dptools",
    "mod_hash",
    "mod_dialplan_xml",
    "mod_native_file",
    "mod_sndfile",
    "mod_tone_stream",
)

# Registrations that lapse are swept every second and dropped at once, so tests can watch expiry
# without waiting the real defaults (30 s sweeps, 60 s late margin). Tests can override these.
DEFAULT_PROFILE_PARAMS: dict[str, str] = {
    "registration-thread-frequency": "1",
    "sip-expires-late-margin": "0",
}

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0
_API_TIMEOUT = 20.0
_TAIL_LINES = 40
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_SAFE_NUMBER = re.compile(r"^[0-9]{1,20}$")


def freeswitch_binary() -> Path:
    """The FreeSWITCH binary (``$FORUM_BRIDGE_FREESWITCH_BIN`` or ``/opt/fs/bin/freeswitch``).

    Raises ``SandboxError`` saying how to install it when it is not there.
    """
    binary = Path(os.environ.get(BIN_ENV_VAR, "").strip() or FREESWITCH_BIN)
    if not os.access(binary, os.X_OK):
        raise SandboxError(
            f"no FreeSWITCH at {binary}: run the test command (bash tests/run.sh) as root, which "
            f"installs it, or set {BIN_ENV_VAR}"
        )
    return binary


def free_sip_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (sofia binds both), outside the ephemeral range."""
    for _ in range(100):
        port = free_udp_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SandboxError("no port free for both UDP and TCP on 127.0.0.1")


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _attr(value: str) -> str:
    return escape(value, {'"': "&quot;"})


def _check_name(kind: str, value: str) -> None:
    if not _SAFE_NAME.match(value):
        raise ValueError(f"unsuitable {kind} for a sandbox config: {value!r}")


class _EslProbe:
    """A tiny blocking inbound event-socket conversation: authenticate, run ``api`` commands."""

    def __init__(self, port: int, password: str, timeout: float) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""
        try:
            headers, _ = self._read_frame()
            if headers.get("Content-Type") != "auth/request":
                raise SandboxError(f"unexpected event-socket greeting: {headers}")
            self._send(f"auth {password}")
            headers, _ = self._read_frame()
            if not headers.get("Reply-Text", "").startswith("+OK"):
                raise SandboxError(f"event-socket login refused: {headers.get('Reply-Text')!r}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def api(self, command: str) -> str:
        self._send(f"api {command}")
        while True:
            headers, body = self._read_frame()
            if headers.get("Content-Type") == "api/response":
                return body.decode("utf-8", "replace")

    def _send(self, text: str) -> None:
        if "\n" in text or "\r" in text:
            raise ValueError("one line per command")
        self._sock.sendall(f"{text}\n\n".encode())

    def _read_frame(self) -> tuple[dict[str, str], bytes]:
        while b"\n\n" not in self._buffer:
            self._fill()
        head, _, self._buffer = self._buffer.partition(b"\n\n")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").splitlines():
            name, sep, value = line.partition(":")
            if sep:
                headers.setdefault(name.strip(), unquote(value.strip()))
        length = int(headers.get("Content-Length", "0") or 0)
        while len(self._buffer) < length:
            self._fill()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return headers, body

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("the event socket closed the connection")
        self._buffer += chunk


class FreeSwitchSandbox(PbxProcess):
    """One private FreeSWITCH instance listening on 127.0.0.1 only.

    Use it as a context manager::

        with FreeSwitchSandbox(socket_port=port, dialplan_snippet=xml,
                               endpoints=[("21-desk", "secret")],
                               numbers={"21": ["21-desk"]}) as pbx:
            ...  # SIP on pbx.sip_port, ESL on pbx.esl_port with pbx.esl_password

    ``socket_port`` is where the snippet's ``socket`` application expects the bridge (the snippet
    carries it; it is kept here for the tests' convenience). ``profile_params`` add to or override
    the sofia profile's settings (``DEFAULT_PROFILE_PARAMS`` and the fixed loopback ones).
    """

    def __init__(
        self,
        socket_port: int,
        dialplan_snippet: str,
        endpoints: Sequence[tuple[str, str]],
        numbers: Mapping[str, Sequence[str]] | None = None,
        *,
        profile_params: Mapping[str, str] | None = None,
        base_dir: Path | None = None,
        start_timeout: float = _START_TIMEOUT,
    ) -> None:
        """Prepare (but do not start) an instance; its files go into a new temporary directory.

        ``start_timeout`` bounds :meth:`start` (and so ``with``) unless it is given a timeout.
        """
        if not 0 < socket_port < 65536:
            raise ValueError(f"bad socket_port {socket_port}")
        for name, password in endpoints:
            _check_name("endpoint name", name)
            _check_name("password", password)
        if len({name for name, _ in endpoints}) != len(endpoints):
            raise ValueError("endpoint names must be unique")
        known = {name for name, _ in endpoints}
        for number, logons in (numbers or {}).items():
            if not _SAFE_NUMBER.match(number):
                raise ValueError(f"unsuitable call number {number!r}")
            unknown = [logon for logon in logons if logon not in known]
            if unknown or not logons:
                raise ValueError(f"call number {number}: log-ons {unknown or '(none)'} are no endpoints")
        params = {**DEFAULT_PROFILE_PARAMS, **(profile_params or {})}
        for name, value in params.items():
            _check_name("profile parameter", name)
            if any(ch in value for ch in '<>"&\r\n'):
                raise ValueError(f"unsuitable value for profile parameter {name}: {value!r}")
        super().__init__()
        self._binary = freeswitch_binary()
        self._socket_port = socket_port
        self._snippet = dialplan_snippet
        self._endpoints = list(endpoints)
        self._numbers = {number: list(logons) for number, logons in (numbers or {}).items()}
        self._profile_params = params
        self._dir = Path(tempfile.mkdtemp(prefix="forum-bridge-fs-", dir=base_dir))
        self._sip_port = free_sip_port()
        self._esl_port = free_tcp_port()
        self._esl_password = secrets.token_hex(16)
        # An even start below every port the test helpers hand out (phones, PBXs and SIPp's media
        # from 20000 up) and apart from the Asterisk sandbox's range: FreeSWITCH binds its RTP
        # ports while calls are set up, and a phone's port picked earlier must still be free.
        self._rtp_start = 10000 + 2 * secrets.randbelow(4900)
        self._start_timeout = start_timeout
        self._removed = False

    # -- properties ---------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The instance's own directory (conf, log, db, run, tmp)."""
        return self._dir

    @property
    def config_dir(self) -> Path:
        """Where ``freeswitch.xml`` and the bridge's snippet are."""
        return self._dir / "conf"

    @property
    def snippet_path(self) -> Path:
        """The bridge's dialplan snippet, included at the top of the ``phones`` context."""
        return self.config_dir / "forum_bridge" / "00_forum_bridge.xml"

    @property
    def log_path(self) -> Path:
        """FreeSWITCH's log file (mod_logfile, level info and up)."""
        return self._dir / "log" / "freeswitch.log"

    @property
    def sip_port(self) -> int:
        """UDP (and TCP) port of the sofia profile on 127.0.0.1."""
        return self._sip_port

    @property
    def esl_port(self) -> int:
        """TCP port of the event socket on 127.0.0.1."""
        return self._esl_port

    @property
    def esl_password(self) -> str:
        """The event socket's random password."""
        return self._esl_password

    @property
    def socket_port(self) -> int:
        """Where the dialplan snippet expects the bridge's socket hook."""
        return self._socket_port

    @property
    def domain(self) -> str:
        """The directory domain of every user."""
        return DOMAIN

    @property
    def profile(self) -> str:
        """The sofia profile's name."""
        return PROFILE

    @property
    def pid(self) -> int | None:
        """The FreeSWITCH process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    # -- life cycle (see PbxProcess) -----------------------------------------------------------

    name = "FreeSWITCH"
    _poll_interval = 0.1

    def _prepare(self) -> tuple[list[str], Path, Path | None]:
        if self._removed:
            raise SandboxError("this sandbox was closed; make a new one")
        self._write_config()
        d = self._dir
        argv = [
            str(self._binary),
            # Foreground, no console: this process owns it, and it dies with the test run.
            "-nf",
            "-nc",
            "-nonat",
            "-nonatmap",
            "-conf",
            str(d / "conf"),
            "-log",
            str(d / "log"),
            "-db",
            str(d / "db"),
            "-run",
            str(d / "run"),
            "-temp",
            str(d / "tmp"),
        ]
        return argv, d / "log" / "console.out", d

    def _probe(self, remaining: float) -> str | None:
        probe = _EslProbe(self._esl_port, self._esl_password, 5.0)
        try:
            status = probe.api("sofia status")
        finally:
            probe.close()
        # "internal  profile  sip:mod_sofia@127.0.0.1:5060  RUNNING (0)"
        if re.search(rf"^\s*{PROFILE}\s+profile\s.*\bRUNNING\b", status, re.MULTILINE):
            return None
        return f"profile not running yet: {status.strip()[:200]!r}"

    def _where(self) -> str:
        return f"the event socket 127.0.0.1:{self._esl_port}"

    def _remove(self) -> None:
        if not self._removed:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._removed = True

    # -- talking to it ------------------------------------------------------------------------

    def api(self, command: str, timeout: float = _API_TIMEOUT) -> str:
        """Run one API command over the event socket (like ``fs_cli -x``); return its output."""
        if not self.running:
            raise SandboxError(f"FreeSWITCH is not running; cannot run {command!r}")
        try:
            probe = _EslProbe(self._esl_port, self._esl_password, timeout)
        except (OSError, ConnectionError) as exc:
            raise SandboxError(f"cannot reach the event socket for {command!r}: {exc}") from exc
        try:
            return probe.api(command)
        except (OSError, ConnectionError) as exc:
            raise SandboxError(f"API command {command!r} failed: {exc}") from exc
        finally:
            probe.close()

    def reload_dialplan(self, dialplan_snippet: str | None = None) -> None:
        """Optionally replace the bridge's snippet, then ``reloadxml``; ``SandboxError`` if refused.

        FreeSWITCH's preprocessor reads an included file line by line: ``<include>`` and
        ``</include>`` must be on lines of their own, or the file is silently left out.
        """
        if dialplan_snippet is not None:
            self._snippet = dialplan_snippet
            self.snippet_path.write_text(dialplan_snippet, encoding="utf-8")
        out = self.api("reloadxml")
        # A broken file still gets "+OK [[error near line N]: ...]" (and the old XML stays).
        if not out.startswith("+OK [Success]"):
            raise SandboxError(f"reloadxml said: {out.strip()!r}\n{self.diagnostics()}")

    def diagnostics(self, lines: int = _TAIL_LINES) -> str:
        """The tails of the console output and the log file, for error messages."""
        parts = []
        for label, path in (("console", self._dir / "log" / "console.out"), ("log", self.log_path)):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            parts.append(f"--- {label} ({path}) ---\n{_tail(text, lines)}")
        return "\n".join(parts)

    # -- internals ----------------------------------------------------------------------------

    def _write_config(self) -> None:
        for sub in ("conf/forum_bridge", "log", "db", "run", "tmp"):
            (self._dir / sub).mkdir(parents=True, exist_ok=True)
        (self.config_dir / "freeswitch.xml").write_text(self._freeswitch_xml(), encoding="utf-8")
        self.snippet_path.write_text(self._snippet, encoding="utf-8")

    def _freeswitch_xml(self) -> str:
        modules = "".join(f'        <load module="{name}"/>\n' for name in FREESWITCH_MODULES)
        profile = {
            "sip-ip": "127.0.0.1",
            "rtp-ip": "127.0.0.1",
            "ext-sip-ip": "127.0.0.1",
            "ext-rtp-ip": "127.0.0.1",
            "sip-port": str(self._sip_port),
            "context": CONTEXT,
            "dialplan": "XML",
            "auth-calls": "true",
            "force-register-domain": DOMAIN,
            "force-register-db-domain": DOMAIN,
            "challenge-realm": DOMAIN,
            "inbound-codec-prefs": "PCMU,PCMA",
            "outbound-codec-prefs": "PCMU,PCMA",
            "manage-presence": "false",
            "user-agent-string": "forum-bridge-sandbox",
            **self._profile_params,
        }
        params = "".join(
            f'            <param name="{_attr(k)}" value="{_attr(v)}"/>\n' for k, v in profile.items()
        )
        users = "".join(
            f'          <user id="{_attr(name)}"><params>'
            f'<param name="password" value="{_attr(password)}"/></params></user>\n'
            for name, password in self._endpoints
        )
        log_file = _attr(str(self.log_path))
        return f"""<?xml version="1.0"?>
<document type="freeswitch/xml">
  <section name="configuration">
    <configuration name="switch.conf">
      <settings>
        <param name="loglevel" value="info"/>
        <param name="colorize-console" value="false"/>
        <param name="max-sessions" value="200"/>
        <param name="sessions-per-second" value="100"/>
        <param name="rtp-start-port" value="{self._rtp_start}"/>
        <param name="rtp-end-port" value="{self._rtp_start + 199}"/>
      </settings>
    </configuration>
    <configuration name="modules.conf">
      <modules>
{modules}      </modules>
    </configuration>
    <configuration name="console.conf">
      <mappings><map name="all" value="console,info,notice,warning,err,crit,alert"/></mappings>
      <settings><param name="colorize" value="false"/><param name="loglevel" value="info"/></settings>
    </configuration>
    <configuration name="logfile.conf">
      <settings><param name="rotate-on-hup" value="true"/></settings>
      <profiles>
        <profile name="default">
          <settings><param name="logfile" value="{log_file}"/></settings>
          <mappings><map name="all" value="info,notice,warning,err,crit,alert"/></mappings>
        </profile>
      </profiles>
    </configuration>
    <configuration name="event_socket.conf">
      <settings>
        <param name="listen-ip" value="127.0.0.1"/>
        <param name="listen-port" value="{self._esl_port}"/>
        <param name="password" value="{self._esl_password}"/>
      </settings>
    </configuration>
    <configuration name="sofia.conf">
      <global_settings><param name="log-level" value="0"/></global_settings>
      <profiles>
        <profile name="{PROFILE}">
          <domains/>
          <settings>
{params}          </settings>
        </profile>
      </profiles>
    </configuration>
  </section>
  <section name="dialplan">
    <context name="{CONTEXT}">
      <X-PRE-PROCESS cmd="include" data="forum_bridge/*.xml"/>
{self._number_extensions()}      <extension name="sandbox_echo">
        <condition field="destination_number" expression="^.+$">
          <action application="answer"/>
          <action application="echo"/>
        </condition>
      </extension>
    </context>
  </section>
  <section name="directory">
    <domain name="{DOMAIN}">
      <params>
        <param name="dial-string"
               value="{{presence_id=${{dialed_user}}@${{dialed_domain}}}}${{sofia_contact(${{dialed_user}}@${{dialed_domain}})}}"/>
      </params>
      <groups><group name="default"><users>
{users}      </users></group></groups>
    </domain>
  </section>
</document>
"""

    def _number_extensions(self) -> str:
        parts = []
        for number, logons in sorted(self._numbers.items()):
            targets = ",".join(f"user/{logon}@{DOMAIN}" for logon in logons)
            parts.append(
                f'      <extension name="sandbox_number_{number}">\n'
                f'        <condition field="destination_number" expression="^7{number}$">\n'
                '          <action application="set" data="call_timeout=30"/>\n'
                '          <action application="set" data="hangup_after_bridge=true"/>\n'
                f'          <action application="bridge" data="{_attr(targets)}"/>\n'
                "        </condition>\n"
                "      </extension>\n"
            )
        return "".join(parts)
