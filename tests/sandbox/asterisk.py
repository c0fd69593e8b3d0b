"""A throwaway real Asterisk 22 in a Debian ``sid`` chroot, for tests and demos.

``build_root`` makes (once, then caches) a minimal Debian ``sid`` tree with Debian's
``asterisk`` packages in it.  ``AsteriskSandbox`` runs one private Asterisk instance in that
tree with its own generated configuration, its own run/spool/log/db directories and its own
free ports on 127.0.0.1, so several instances (and several test processes) never clash.

The chroot shares the host's network, so AMI, SIP and FastAGI all meet on 127.0.0.1.
Nothing is mounted into the chroot: Asterisk 22 starts without ``/proc``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tests.sandbox.process import PbxProcess, SandboxError, die_with_parent_preexec

__all__ = [
    "AMI_READ_CLASSES",
    "AMI_WRITE_CLASSES",
    "ASTERISK_MODULES",
    "DEFAULT_ROOT",
    "ROOT_ENV_VAR",
    "AsteriskSandbox",
    "SandboxBuildError",
    "SandboxError",
    "build_root",
    "default_root",
    "die_with_parent_preexec",
    "free_tcp_port",
    "free_udp_port",
]

ROOT_ENV_VAR = "FORUM_BRIDGE_SANDBOX_ROOT"
# A fixed, reboot-surviving cache location is the point; it is root-owned and checked by marker.
DEFAULT_ROOT = Path("/var/tmp/forum-bridge/asterisk-root")
# Optional override of debootstrap's default mirror (e.g. a local cache); unset means default.
MIRROR_ENV_VAR = "FORUM_BRIDGE_SANDBOX_MIRROR"

_MARKER_NAME = ".forum-bridge-sandbox-ready"
# Written before debootstrap runs: only a tree carrying one of the two markers is ever deleted.
_BUILDING_NAME = ".forum-bridge-sandbox-building"
_HOST_PACKAGES = ("debootstrap", "sip-tester")
_HOST_TOOLS = ("debootstrap", "sipp")
_CHROOT_PACKAGES = ("asterisk", "asterisk-modules")
# Generous: a slow mirror can take minutes; a hung one must still end in an error.
_BUILD_STEP_TIMEOUT = 1800.0
_TAIL_LINES = 40

# Least privilege for the bridge's AMI user, checked against a running Asterisk 22 by the
# smoke test: read ContactStatus/PeerStatus/FullyBooted (system), channel events (call) and
# SuccessfulAuth/ChallengeResponseFailed (security); write PJSIPShow* (system only),
# CoreShowChannels (system or reporting) and Hangup/Setvar/Redirect (call).  ``reporting`` is
# not needed and, if read, floods the session with TestEvent frames from Debian's build.
# Caveat: write ``system`` also grants GetConfig (config files, secrets included) and Reload,
# which Asterisk files under system *or* config; PJSIPShow* needs system, so there is no
# narrower set.  Command, Originate and UpdateConfig stay denied.
AMI_READ_CLASSES = "system,call,security"
AMI_WRITE_CLASSES = "system,call"


class SandboxBuildError(SandboxError):
    """Building the chroot failed; the message carries the tail of the failing command's output."""


# --------------------------------------------------------------------------------------------
# Free ports
# --------------------------------------------------------------------------------------------


_STABLE_LOW = 20000
"""Test ports are picked from here up to the kernel's ephemeral range (see :func:`_stable_port`)."""
_TRANSIENT_LOW = 28000
"""Ports held only while one SIPp run lasts (media, control) come from here up, the ports of
phones, PBXs and bridges (which are picked first and bound later, often more than once) from below:
a SIPp run started in between can then never take a phone's port."""
_RECENT_PORTS = 2000
# The ports handed out lately by this process: a port picked but not bound yet looks free, so
# without this two phones made one after the other could be given the same one.
_recent: collections.deque[int] = collections.deque(maxlen=_RECENT_PORTS)


def _ephemeral_low() -> int:
    """The first port the kernel hands out to ``bind(0)`` and outgoing connections."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _stable_port(kind: socket.SocketKind, *, transient: bool = False) -> int:
    """A port on 127.0.0.1 that is free now and that the kernel will not hand out by itself.

    Phones, PBXs and the bridge keep their port across runs and restarts (a phone registers
    with one SIPp run and answers with the next). A port from ``bind(0)`` lies in the ephemeral
    range, where any outgoing connection or other ``bind(0)`` may take it in between; a port
    below that range is only ever taken by someone who asks for it by number. ``transient``
    ports (held by one SIPp run) come from a range of their own, and no port handed out lately
    is handed out again.
    """
    high = _ephemeral_low()
    low = _TRANSIENT_LOW if transient else _STABLE_LOW
    if not transient:
        high = min(high, _TRANSIENT_LOW)
    if high - low < 1000:  # an unusual kernel set-up: fall back to bind(0)
        return _bound_port(kind, 0)
    for _ in range(200):
        port = low + secrets.randbelow(high - low)
        if port in _recent:
            continue
        try:
            _bound_port(kind, port)
        except OSError:
            continue
        _recent.append(port)
        return port
    raise SandboxError(f"no free port on 127.0.0.1 from {low} to {high - 1}")


def _bound_port(kind: socket.SocketKind, port: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", port))
        bound: int = sock.getsockname()[1]
        return bound


def free_tcp_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now, outside the ephemeral range."""
    return _stable_port(socket.SOCK_STREAM)


def free_udp_port() -> int:
    """Return a UDP port on 127.0.0.1 that is free now, outside the ephemeral range."""
    return _stable_port(socket.SOCK_DGRAM)


def free_transient_udp_port() -> int:
    """Return a UDP port on 127.0.0.1 for one SIPp run's media or control socket (see
    :data:`_TRANSIENT_LOW`)."""
    return _stable_port(socket.SOCK_DGRAM, transient=True)


def hold_back(*ports: int) -> None:
    """Hand none of ``ports`` out for a while: a program will bind them besides the port it was
    given (SIPp binds its media port's neighbours too), so they must not become another socket's
    port before it does."""
    _recent.extend(ports)


# --------------------------------------------------------------------------------------------
# Building the chroot
# --------------------------------------------------------------------------------------------


def default_root() -> Path:
    """The chroot directory: ``$FORUM_BRIDGE_SANDBOX_ROOT`` or ``/var/tmp/forum-bridge/asterisk-root``."""
    value = os.environ.get(ROOT_ENV_VAR, "").strip()
    return Path(value) if value else DEFAULT_ROOT


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _run_logged(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    groups_file: Path | None = None,
) -> None:
    """Run one build step, appending its output to the build log; raise with its tail on failure.

    The step runs in its own process group, recorded in ``groups_file`` when given, so that a
    later build can kill what an interrupted one left running (debootstrap's children outlive it).
    """
    with log_path.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        start = out.tell()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec(),
            )
        except OSError as exc:
            raise SandboxBuildError(f"cannot run {argv[0]!r}: {exc}") from exc
    if groups_file is not None:
        with groups_file.open("a", encoding="utf-8") as groups:
            groups.write(f"pgid {proc.pid}\n")
    try:
        returncode = proc.wait(timeout=_BUILD_STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise SandboxBuildError(
            f"build step timed out after {_BUILD_STEP_TIMEOUT:.0f}s: {' '.join(argv)}\n"
            f"--- last output (full log: {log_path}) ---\n{_log_tail(log_path, start)}"
        ) from None
    if returncode != 0:
        raise SandboxBuildError(
            f"build step failed with exit code {returncode}: {' '.join(argv)}\n"
            f"--- last output (full log: {log_path}) ---\n{_log_tail(log_path, start)}"
        )


def _log_tail(log_path: Path, start: int) -> str:
    with log_path.open("rb") as log:
        log.seek(start)
        return _tail(log.read().decode("utf-8", "replace"))


def _kill_leftover_groups(root: Path) -> None:
    """Kill processes an interrupted build left running in the tree (recorded process groups)."""
    try:
        lines = (root / _BUILDING_NAME).read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    groups = {
        int(line.split()[1]) for line in lines if line.startswith("pgid ") and line.split()[1].isdigit()
    }
    if not groups:
        return
    deadline = time.monotonic() + 15.0
    while True:
        members = [pid for pid in _pids_in_groups(groups) if _process_touches(pid, root)]
        if not members:
            return
        if time.monotonic() >= deadline:
            raise SandboxBuildError(f"processes {members} of an earlier build of {root} will not die")
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _pids_in_groups(groups: set[int]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) in groups:
            pids.append(int(entry.name))
    return pids


def _process_touches(pid: int, root: Path) -> bool:
    """Whether a process works on ``root``: chrooted into it, or naming it on its command line.

    Guards against a recorded process-group id that has since been reused by something else.
    """
    with contextlib.suppress(OSError):
        if Path(os.readlink(f"/proc/{pid}/root")).is_relative_to(root):
            return True
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        return str(root).encode() in cmdline
    return False


def _ensure_host_tools(log_path: Path) -> None:
    """Install debootstrap and SIPp on the host when missing (the sandbox needs both)."""
    if all(shutil.which(tool) for tool in _HOST_TOOLS):
        return
    if os.geteuid() != 0:
        raise SandboxBuildError(
            f"{', '.join(_HOST_TOOLS)} missing and not root: install {' '.join(_HOST_PACKAGES)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *_HOST_PACKAGES]
    try:
        _run_logged(install, log_path, env=env)
    except SandboxBuildError:
        # A fresh machine may have no package lists yet; one update is the usual cure.
        _run_logged(["apt-get", "update"], log_path, env=env)
        _run_logged(install, log_path, env=env)


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first), e.g. left by an interrupted debootstrap."""
    prefix = str(path).rstrip("/")
    found: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            if len(fields) < 5:
                continue
            # Octal escapes (\040 for space) are how mountinfo encodes odd characters.
            mount_point = fields[4].encode().decode("unicode_escape")
            if mount_point == prefix or mount_point.startswith(prefix + "/"):
                found.append(mount_point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """Remove a (half-built) chroot without ever following a mount back into the host."""
    for mount_point in _mounts_under(path):
        subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
    if _mounts_under(path):
        raise SandboxBuildError(f"cannot unmount everything below {path}; remove it by hand")
    if path.exists() or path.is_symlink():
        # --one-file-system: a mount we failed to see must not be emptied.
        proc = subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SandboxBuildError(f"cannot remove {path}: {_tail(proc.stderr)}")


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _chroot_argv(root: Path, *argv: str) -> list[str]:
    return ["chroot", str(root), *argv]


def _build(root: Path, log_path: Path) -> None:
    _ensure_host_tools(log_path)
    groups = root / _BUILDING_NAME
    debootstrap = ["debootstrap", "--variant=minbase", "sid", str(root)]
    mirror = os.environ.get(MIRROR_ENV_VAR, "").strip()
    if mirror:
        debootstrap.append(mirror)
    _run_logged(debootstrap, log_path, groups_file=groups)
    # Package scripts must not try to start services inside the chroot.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n", encoding="utf-8")
    policy.chmod(0o755)
    # sid's Release files can be "expired" relative to a skewed clock; that is no reason to fail.
    _run_logged(
        _chroot_argv(root, "apt-get", "-o", "Acquire::Check-Valid-Until=false", "update"),
        log_path,
        groups_file=groups,
    )
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LANG": "C.UTF-8",
        "HOME": "/root",
    }
    _run_logged(
        _chroot_argv(
            root,
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            *_CHROOT_PACKAGES,
        ),
        log_path,
        env=env,
        groups_file=groups,
    )
    if not (root / "usr/sbin/asterisk").exists():
        raise SandboxBuildError(f"asterisk is not in {root} after the install; see {log_path}")
    _run_logged(_chroot_argv(root, "apt-get", "clean"), log_path, env=env, groups_file=groups)


def build_root(root: Path | None = None) -> Path:
    """Return a chroot with Asterisk 22 in it, building it first if needed.

    The first call debootstraps Debian ``sid`` (minbase) into ``root`` (default
    ``$FORUM_BRIDGE_SANDBOX_ROOT`` or ``/var/tmp/forum-bridge/asterisk-root``) and installs
    ``asterisk`` and ``asterisk-modules``; a marker file written last makes later calls return at
    once.  A root without the marker is a half-built leftover and is removed and rebuilt.  An
    exclusive ``fcntl`` lock next to the root keeps two processes from building at the same time.
    Installs ``debootstrap`` and ``sip-tester`` on the host when they are missing.

    Raises ``SandboxBuildError`` (with the tail of the failing command's output) on any failure.
    """
    root = Path(root) if root is not None else default_root()
    root = root.absolute()
    marker = root / _MARKER_NAME
    if marker.is_file() and all(shutil.which(tool) for tool in _HOST_TOOLS):
        return root
    if os.geteuid() != 0:
        raise SandboxBuildError(f"building {root} needs root (debootstrap, chroot)")
    lock_path = root.parent / f"{root.name}.lock"
    log_path = root.parent / f"{root.name}.build.log"
    with _file_lock(lock_path):
        if marker.is_file():
            # Another process finished the build while we waited; the host tools may still lack.
            _ensure_host_tools(log_path)
            return root
        log_path.write_text(f"building {root} at {time.ctime()}\n", encoding="utf-8")
        _remove_leftover(root)
        started = time.monotonic()
        try:
            root.mkdir(parents=True)
            (root / _BUILDING_NAME).write_text(f"{os.getpid()}\n", encoding="utf-8")
            _build(root, log_path)
        except BaseException:
            # Leave no half-built tree that looks usable; the next run starts clean.
            with contextlib.suppress(SandboxBuildError):
                _remove_tree(root)
            raise
        version = _asterisk_version(root)
        marker.write_text(
            f"asterisk={version}\nbuilt={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
            f"build_seconds={time.monotonic() - started:.1f}\n",
            encoding="utf-8",
        )
        (root / _BUILDING_NAME).unlink()
    return root


def _remove_leftover(root: Path) -> None:
    """Remove a half-built root from an earlier run, but never a directory we did not make."""
    if not root.exists() and not root.is_symlink():
        return
    _kill_leftover_groups(root)
    ours = (root / _BUILDING_NAME).is_file() or (root / _MARKER_NAME).is_file()
    if root.is_symlink() or not root.is_dir() or len(root.parts) < 3 or not (ours or _is_empty(root)):
        raise SandboxBuildError(
            f"{root} exists but was not made by build_root (no {_BUILDING_NAME}); "
            f"refusing to delete it: remove it or choose another {ROOT_ENV_VAR}"
        )
    _remove_tree(root)


def _is_empty(path: Path) -> bool:
    return not any(path.iterdir())


def _asterisk_version(root: Path) -> str:
    proc = subprocess.run(
        _chroot_argv(root, "/usr/sbin/asterisk", "-V"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise SandboxBuildError(f"asterisk -V failed in {root}: {_tail(proc.stdout + proc.stderr)}")
    return proc.stdout.strip()


# --------------------------------------------------------------------------------------------
# Running one Asterisk instance
# --------------------------------------------------------------------------------------------

ASTERISK_MODULES: tuple[str, ...] = (
    # Sorcery backends res_pjsip reads its objects through.
    "res_sorcery_config.so",
    "res_sorcery_memory.so",
    "res_sorcery_astdb.so",
    # PJSIP: registrar with digest auth, endpoints identified by From user / auth user, calls with
    # SDP/RTP.  (res_pjsip_options.so no longer exists in 22: qualify is part of res_pjsip.)
    "res_pjproject.so",
    "res_pjsip.so",
    "res_pjsip_authenticator_digest.so",
    "res_pjsip_endpoint_identifier_user.so",
    "res_pjsip_registrar.so",
    "res_pjsip_session.so",
    # chan_pjsip declines to load without it ("Failed to resolve dependencies").
    "res_pjsip_pubsub.so",
    "res_pjsip_sdp_rtp.so",
    "res_pjsip_caller_id.so",
    "res_pjsip_rfc3326.so",
    "res_pjsip_header_funcs.so",
    "res_pjsip_logger.so",
    "res_rtp_asterisk.so",
    "chan_pjsip.so",
    "func_pjsip_endpoint.so",
    "func_pjsip_aor.so",
    "func_pjsip_contact.so",
    # Dialplan: extensions.conf, Gosub/Return, Dial, Echo, and the functions hooks commonly use.
    "pbx_config.so",
    "app_stack.so",
    "app_dial.so",
    "app_echo.so",
    "app_verbose.so",
    "app_exec.so",
    "func_callerid.so",
    "func_channel.so",
    "func_logic.so",
    "func_strings.so",
    "func_cut.so",
    "func_global.so",
    "func_math.so",
    "func_hangupcause.so",
    "func_dialplan.so",
    # The forum_bridge snippet: DB() reads the blocked log-ons, TIMEOUT() bounds the hook.
    "func_db.so",
    "func_timeout.so",
    # FastAGI; res_agi refuses to load without res_speech.
    "res_speech.so",
    "res_agi.so",
    # Two-party bridging for Dial(); media: G.711 both laws.
    "bridge_simple.so",
    "res_timing_timerfd.so",
    "codec_ulaw.so",
    "codec_alaw.so",
    "codec_a_mu.so",
)

_ASTERISK_BIN = "/usr/sbin/asterisk"
_CLI_TIMEOUT = 20.0
_STOP_TIMEOUT = 15.0
_AMI_USER = "forumbridge"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_instances(root: Path) -> None:
    """Remove instance directories whose owning process is gone (e.g. a SIGKILLed test run)."""
    for state_dir in (root / "var/lib").glob("asterisk-fb-*"):
        owner_file = state_dir / "owner.pid"
        try:
            owner = int(owner_file.read_text(encoding="utf-8").split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if _pid_alive(owner):
            continue
        instance = state_dir.name.removeprefix("asterisk-fb-")
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(root / "etc" / f"asterisk-fb-{instance}", ignore_errors=True)


def _check_conf_value(kind: str, value: str) -> None:
    # Values land in INI-style files; a newline, ';' or '[' would change their meaning.
    if not value or any(ch in value for ch in "\r\n;[]=#,") or value != value.strip():
        raise ValueError(f"unsuitable {kind} for a sandbox config: {value!r}")


class _AmiProbe:
    """A tiny blocking AMI conversation, just enough to see that Asterisk is up."""

    def __init__(self, port: int, timeout: float) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def read_line(self) -> str:
        while b"\r\n" not in self._buffer:
            self._fill()
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line.decode("utf-8", "replace")

    def read_message(self) -> dict[str, str]:
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        raw, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        message: dict[str, str] = {}
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            key, sep, value = line.partition(":")
            if sep:
                message.setdefault(key.strip(), value.strip())
        return message

    def send(self, **headers: str) -> None:
        text = "".join(f"{key}: {value}\r\n" for key, value in headers.items()) + "\r\n"
        self._sock.sendall(text.encode("utf-8"))

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("AMI closed the connection")
        self._buffer += chunk


class AsteriskSandbox(PbxProcess):
    """One private Asterisk 22 instance in the sandbox chroot, listening on 127.0.0.1 only.

    Use it as a context manager::

        with AsteriskSandbox(agi_port=port, dialplan_snippet=text,
                             endpoints=[("21-desk", "secret")]) as pbx:
            ...  # SIP on pbx.sip_port, AMI on pbx.ami_port as pbx.ami_username/pbx.ami_secret

    The instance gets a config dir ``/etc/asterisk-fb-<id>`` and a state dir
    ``/var/lib/asterisk-fb-<id>`` (run, spool, log, db) inside the chroot; both go on teardown.
    The bridge's dialplan snippet is written as ``forum_bridge.conf`` next to ``extensions.conf``,
    which ``#include``s it.  The ``[phones]`` context (where every endpoint lands) does:

    * ``7<number>``: an inbound call to ``<number>`` as if from a trunk:
      ``Gosub(forum-bridge-inbound,s,1(<number>))``, then ``Dial(${FORUM_BRIDGE_DIAL},30)`` when the
      hook set that variable, otherwise ``Hangup(21)`` (403 to the caller);
    * any other number: ``Gosub(forum-bridge-outbound,s,1(${EXTEN}))``, then ``Answer()`` and
      ``Echo()`` so the call really connects until the phone hangs up.

    The global ``FORUM_BRIDGE_AGI`` is ``agi://127.0.0.1:<agi_port>``.
    """

    def __init__(
        self,
        agi_port: int,
        dialplan_snippet: str,
        endpoints: Sequence[tuple[str, str]],
        root: Path | None = None,
        *,
        max_contacts: int = 2,
    ) -> None:
        """Prepare (but do not start) an instance; ``root`` defaults to ``build_root()``'s."""
        if not 0 < agi_port < 65536:
            raise ValueError(f"bad agi_port {agi_port}")
        for name, password in endpoints:
            _check_conf_value("endpoint name", name)
            _check_conf_value("password", password)
        if len({name for name, _ in endpoints}) != len(endpoints):
            raise ValueError("endpoint names must be unique")
        if max_contacts < 1:
            raise ValueError("max_contacts must be at least 1")
        super().__init__()
        self._root = build_root(root)
        self._agi_port = agi_port
        self._snippet = dialplan_snippet
        self._endpoints = list(endpoints)
        self._max_contacts = max_contacts
        self._instance = secrets.token_hex(4)
        self._chroot_conf = f"/etc/asterisk-fb-{self._instance}"
        self._chroot_state = f"/var/lib/asterisk-fb-{self._instance}"
        self._sip_port = free_udp_port()
        self._ami_port = free_tcp_port()
        # An even start inside a high, rarely used range; Asterisk skips ports in use.
        self._rtp_start = 40000 + 2 * secrets.randbelow(4000)
        self._ami_secret = secrets.token_hex(16)
        self._console: Path | None = None
        self._written = False

    # -- properties ---------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The chroot directory on the host."""
        return self._root

    @property
    def sip_port(self) -> int:
        """UDP port of the PJSIP transport on 127.0.0.1."""
        return self._sip_port

    @property
    def ami_port(self) -> int:
        """TCP port of AMI on 127.0.0.1."""
        return self._ami_port

    @property
    def ami_username(self) -> str:
        """The least-privilege AMI user meant for the bridge."""
        return _AMI_USER

    @property
    def ami_secret(self) -> str:
        """The AMI user's random secret."""
        return self._ami_secret

    @property
    def agi_port(self) -> int:
        """Where the dialplan expects the bridge's FastAGI server (127.0.0.1)."""
        return self._agi_port

    @property
    def config_dir(self) -> Path:
        """The instance's config dir as a host path."""
        return self._host_path(self._chroot_conf)

    @property
    def state_dir(self) -> Path:
        """The instance's run/spool/log/db dir as a host path."""
        return self._host_path(self._chroot_state)

    @property
    def log_path(self) -> Path:
        """Asterisk's ``messages`` log (notices, warnings, errors, verbose 3) as a host path."""
        return self.state_dir / "log" / "messages"

    # -- life cycle (see PbxProcess) -----------------------------------------------------------

    name = "asterisk"

    def _prepare(self) -> tuple[list[str], Path, Path | None]:
        self._write_config()
        self._console = self.state_dir / "log" / "console.out"
        argv = _chroot_argv(self._root, _ASTERISK_BIN, "-C", f"{self._chroot_conf}/asterisk.conf", "-f", "-n")
        return argv, self._console, None

    def _spawned(self, proc: subprocess.Popen[bytes]) -> None:
        # Another test run's sweep of stale instances tells ours by this file.
        (self.state_dir / "owner.pid").write_text(f"{os.getpid()} {proc.pid}\n", encoding="utf-8")

    def _probe(self, remaining: float) -> str | None:
        self._probe_ami(remaining)
        return None

    def _where(self) -> str:
        return f"AMI 127.0.0.1:{self._ami_port}"

    def _ask_to_stop(self) -> Callable[[], None]:
        def core_stop_now() -> None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(
                    self._cli_argv("core stop now"),
                    capture_output=True,
                    timeout=max(1.0, _STOP_TIMEOUT / 2),
                    check=False,
                )

        return core_stop_now

    def _remove(self) -> None:
        if self._written:
            shutil.rmtree(self.config_dir, ignore_errors=True)
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self._written = False

    # -- talking to it ------------------------------------------------------------------------

    def cli(self, command: str, timeout: float = _CLI_TIMEOUT) -> str:
        """Run one CLI command through the instance's own control socket; return its output."""
        if not self.running:
            raise SandboxError(f"asterisk is not running; cannot run {command!r}")
        try:
            proc = subprocess.run(
                self._cli_argv(command),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"CLI command {command!r} took over {timeout}s") from exc
        if proc.returncode != 0:
            raise SandboxError(
                f"CLI command {command!r} failed ({proc.returncode}): {_tail(proc.stdout + proc.stderr)}"
            )
        return proc.stdout

    def reload_dialplan(self, dialplan_snippet: str | None = None) -> None:
        """Optionally replace the bridge's snippet (``forum_bridge.conf``), then ``dialplan reload``."""
        if dialplan_snippet is not None:
            self._snippet = dialplan_snippet
            (self.config_dir / "forum_bridge.conf").write_text(dialplan_snippet, encoding="utf-8")
        out = self.cli("dialplan reload")
        if "reloaded" not in out.lower():
            raise SandboxError(f"dialplan reload said: {out.strip()!r}")

    def diagnostics(self, lines: int = _TAIL_LINES) -> str:
        """The tails of the console output and the messages log, for error messages."""
        parts = []
        for label, path in (("console", self._console), ("messages", self.log_path)):
            if path is None:
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            parts.append(f"--- {label} ({path}) ---\n{_tail(text, lines)}")
        return "\n".join(parts)

    # -- internals ----------------------------------------------------------------------------

    def _host_path(self, chroot_path: str) -> Path:
        return self._root / chroot_path.lstrip("/")

    def _cli_argv(self, command: str) -> list[str]:
        return _chroot_argv(
            self._root, _ASTERISK_BIN, "-C", f"{self._chroot_conf}/asterisk.conf", "-rx", command
        )

    def _probe_ami(self, timeout: float) -> None:
        """Log in, require FullyBooted, and require PJSIP to answer an endpoint listing."""
        probe = _AmiProbe(self._ami_port, timeout)
        try:
            banner = probe.read_line()
            if not banner.startswith("Asterisk Call Manager/"):
                raise SandboxError(f"unexpected AMI banner {banner!r}")
            probe.send(
                Action="Login",
                ActionID="probe-login",
                Username=_AMI_USER,
                Secret=self._ami_secret,
                Events="system",
            )
            booted = False
            logged_in = False
            while not (booted and logged_in):
                message = probe.read_message()
                if message.get("ActionID") == "probe-login":
                    if message.get("Response") != "Success":
                        raise SandboxError(f"AMI login refused: {message.get('Message')}")
                    logged_in = True
                elif message.get("Event") == "FullyBooted":
                    booted = True
            probe.send(Action="PJSIPShowEndpoints", ActionID="probe-pjsip")
            while True:
                message = probe.read_message()
                if message.get("ActionID") != "probe-pjsip":
                    continue
                if message.get("Event") == "EndpointListComplete":
                    break
                if message.get("Response") == "Error":
                    text = message.get("Message", "")
                    # With endpoints configured, an error means PJSIP is not (yet) there.
                    if self._endpoints or "No endpoints found" not in text:
                        raise SandboxError(f"PJSIPShowEndpoints: {text}")
                    break
            probe.send(Action="Logoff", ActionID="probe-logoff")
        finally:
            probe.close()

    def _write_config(self) -> None:
        _sweep_stale_instances(self._root)
        conf = self.config_dir
        state = self.state_dir
        conf.mkdir(parents=True, exist_ok=True)
        for sub in ("run", "spool", "log", "db", "cache"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        self._written = True
        files = {
            "asterisk.conf": self._asterisk_conf(),
            "modules.conf": self._modules_conf(),
            "logger.conf": _LOGGER_CONF,
            "manager.conf": self._manager_conf(),
            "pjsip.conf": self._pjsip_conf(),
            "extensions.conf": self._extensions_conf(),
            "forum_bridge.conf": self._snippet,
            "rtp.conf": f"[general]\nrtpstart = {self._rtp_start}\nrtpend = {self._rtp_start + 99}\n",
            "cdr.conf": "[general]\nenable = no\n",
            "cel.conf": "[general]\nenable = no\n",
            "indications.conf": _INDICATIONS_CONF,
            # Present but empty: the core then uses its defaults without logging an ERROR.
            **dict.fromkeys(_EMPTY_CONFIGS, ""),
        }
        for name, text in files.items():
            (conf / name).write_text(text, encoding="utf-8")

    def _asterisk_conf(self) -> str:
        state = self._chroot_state
        return (
            "[directories]\n"
            f"astetcdir => {self._chroot_conf}\n"
            f"astmoddir => {self._module_dir()}\n"
            "astvarlibdir => /var/lib/asterisk\n"
            "astdatadir => /usr/share/asterisk\n"
            "astkeydir => /var/lib/asterisk\n"
            "astagidir => /usr/share/asterisk/agi-bin\n"
            "astsbindir => /usr/sbin\n"
            f"astdbdir => {state}/db\n"
            f"astcachedir => {state}/cache\n"
            f"astspooldir => {state}/spool\n"
            f"astrundir => {state}/run\n"
            f"astlogdir => {state}/log\n"
            "\n[options]\n"
            "verbose = 3\n"
            "debug = 0\n"
            "defaultlanguage = en\n"
            "hideconnect = yes\n"
            "documentation_language = en_US\n"
        )

    def _module_dir(self) -> str:
        # Debian puts modules under the multiarch triplet (x86_64-linux-gnu, aarch64-linux-gnu...).
        found = sorted(self._root.glob("usr/lib/*/asterisk/modules"))
        if not found:
            raise SandboxError(f"no Asterisk module directory in {self._root}")
        return "/" + str(found[0].relative_to(self._root))

    def _modules_conf(self) -> str:
        loads = "".join(f"load = {name}\n" for name in ASTERISK_MODULES)
        return f"[modules]\nautoload = no\n{loads}"

    def _manager_conf(self) -> str:
        return (
            "[general]\n"
            "enabled = yes\n"
            f"port = {self._ami_port}\n"
            "bindaddr = 127.0.0.1\n"
            "displayconnects = no\n"
            f"\n[{_AMI_USER}]\n"
            f"secret = {self._ami_secret}\n"
            "deny = 0.0.0.0/0.0.0.0\n"
            "permit = 127.0.0.1/255.255.255.255\n"
            f"read = {AMI_READ_CLASSES}\n"
            f"write = {AMI_WRITE_CLASSES}\n"
            # The default 100 ms drops a client that stalls briefly, e.g. under a debugger.
            "writetimeout = 5000\n"
        )

    def _pjsip_conf(self) -> str:
        parts = [
            "[global]\n"
            "type = global\n"
            "user_agent = forum-bridge-sandbox\n"
            # Expired registrations are swept every 30 s by default; tests of expiry need 1 s.
            "contact_expiration_check_interval = 1\n"
            "\n[transport-udp]\n"
            "type = transport\n"
            "protocol = udp\n"
            f"bind = 127.0.0.1:{self._sip_port}\n"
        ]
        for name, password in self._endpoints:
            parts.append(
                f"\n[{name}]\n"
                "type = endpoint\n"
                "context = phones\n"
                "transport = transport-udp\n"
                "disallow = all\n"
                "allow = ulaw,alaw\n"
                f"auth = {name}\n"
                f"aors = {name}\n"
                "direct_media = no\n"
                # RTP on 127.0.0.1 too, not on every interface.
                "media_address = 127.0.0.1\n"
                "bind_rtp_to_media_address = yes\n"
                f"\n[{name}]\n"
                "type = auth\n"
                "auth_type = digest\n"
                f"username = {name}\n"
                f"password = {password}\n"
                f"\n[{name}]\n"
                "type = aor\n"
                f"max_contacts = {self._max_contacts}\n"
                # A device over the limit is refused (403) instead of silently evicting another
                # registered device behind the bridge's back.
                "remove_existing = no\n"
                "qualify_frequency = 0\n"
                # Short expiries let tests watch registrations lapse.
                "minimum_expiration = 1\n"
            )
        return "".join(parts)

    def _extensions_conf(self) -> str:
        return (
            "[general]\n"
            "static = yes\n"
            "writeprotect = yes\n"
            "clearglobalvars = yes\n"
            "\n[globals]\n"
            f"FORUM_BRIDGE_AGI = agi://127.0.0.1:{self._agi_port}\n"
            "\n[phones]\n"
            "; 7<number>: a call from outside to <number>; the hook says whom to ring.\n"
            "exten => _7X.,1,Set(FORUM_BRIDGE_DIAL=)\n"
            " same => n,Gosub(forum-bridge-inbound,s,1(${EXTEN:1}))\n"
            ' same => n,GotoIf($["${FORUM_BRIDGE_DIAL}" = ""]?nobody)\n'
            " same => n,Dial(${FORUM_BRIDGE_DIAL},30)\n"
            " same => n,Hangup()\n"
            " same => n(nobody),Hangup(21)\n"
            "\n; Anything else: a call made by the phone; if the hook allows it, it connects.\n"
            "exten => _X.,1,Gosub(forum-bridge-outbound,s,1(${EXTEN}))\n"
            " same => n,Answer()\n"
            " same => n,Echo()\n"
            " same => n,Hangup()\n"
            "\n#include forum_bridge.conf\n"
        )


_EMPTY_CONFIGS = (
    "acl.conf",
    "ccss.conf",
    "features.conf",
    "pjproject.conf",
    "stasis.conf",
    "udptl.conf",
)

# Tones for Dial() and Hangup() indications; without a default country the core warns.
_INDICATIONS_CONF = """\
[general]
country = us

[us]
description = United States
ringcadence = 2000,4000
dial = 350+440
busy = 480+620/500,0/500
ring = 440+480/2000,0/4000
congestion = 480+620/250,0/250
"""

_LOGGER_CONF = """\
[general]
dateformat = %F %T.%3q

[logfiles]
console => notice,warning,error
messages => notice,warning,error,verbose
"""
