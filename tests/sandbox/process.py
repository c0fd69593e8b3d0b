"""Starting and stopping the sandbox's processes (a PBX, SIPp) so that none outlives the tests.

Each process gets its own session (a Ctrl-C in the terminal reaches the test, which then stops
the PBX in order) and, when started from the main thread, the kernel's parent-death signal. Every
PBX still running when the interpreter exits (a crashed test run) is closed by an atexit hook.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["PbxProcess", "SandboxError", "die_with_parent_preexec", "end_process", "spawn"]


class SandboxError(RuntimeError):
    """Something in the sandbox did not work; the message says what and shows the evidence."""


# Looked up here, not in the forked child, where importing or dlopen-ing could deadlock.
_PRCTL = ctypes.CDLL(None).prctl
_PR_SET_PDEATHSIG = 1
_KILL_WAIT = 5.0  # seconds for each signal after the polite stop


def _die_with_parent() -> None:
    """Runs in the child before exec: have the kernel SIGKILL it if our process dies hard."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A Popen ``preexec_fn`` so a helper process (Asterisk, SIPp) cannot outlive this process.

    The kernel's parent-death signal fires when the *thread* that forked the child ends, so it is
    only used from the main thread; elsewhere atexit and context managers do the cleaning.
    """
    if threading.current_thread() is threading.main_thread():
        return _die_with_parent
    return None


def spawn(argv: Sequence[str], console: Path, *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, its output appended to ``console``."""
    with console.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C in the terminal reaches the test, which then stops the
            # process in order, instead of killing it behind the test's back.
            start_new_session=True,
            preexec_fn=die_with_parent_preexec(),
        )


def end_process(proc: subprocess.Popen[bytes], timeout: float, ask: Callable[[], None] | None = None) -> None:
    """End ``proc`` within ``timeout`` seconds if it cooperates, and for certain if it does not.

    ``ask`` requests an orderly stop (e.g. a CLI command); without it SIGTERM does. Then SIGTERM
    (after ``ask``) and SIGKILL follow, each given a few seconds.
    """
    deadline = time.monotonic() + timeout
    if proc.poll() is None:
        if ask is not None:
            ask()
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    later = (signal.SIGTERM, signal.SIGKILL) if ask is not None else (signal.SIGKILL,)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        return
    for sig in later:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_KILL_WAIT)


class PbxProcess:
    """The life cycle every sandbox PBX shares: start with a deadline, stop, close, ``with``.

    A subclass writes its configuration, says how to start the PBX (:meth:`_argv`), how to tell
    it is ready (:meth:`_probe`), how to ask it to stop (:meth:`_ask_to_stop`) and what to remove
    on :meth:`close` (:meth:`_remove`).
    """

    name = "the PBX"  # for messages
    _poll_interval = 0.05
    _start_timeout = 60.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None

    # -- what a subclass provides -------------------------------------------------------------

    def _prepare(self) -> tuple[list[str], Path, Path | None]:
        """Write the configuration; return the command line, the console file and the cwd."""
        raise NotImplementedError

    def _probe(self, remaining: float) -> str | None:
        """None once the PBX is ready, else what is still missing (or raise ``SandboxError``)."""
        raise NotImplementedError

    def _where(self) -> str:
        """Where readiness is probed, for messages (``AMI 127.0.0.1:5038``)."""
        raise NotImplementedError

    def _ask_to_stop(self) -> Callable[[], None] | None:
        """An orderly stop request, or None for SIGTERM."""
        return None

    def _spawned(self, proc: subprocess.Popen[bytes]) -> None:
        """Note the new process (e.g. in a file other test runs read)."""

    def _remove(self) -> None:
        """Remove what the instance wrote (after it stopped)."""

    def diagnostics(self) -> str:
        """The tails of the PBX's console and logs, for error messages."""
        return ""

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the PBX process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ fails: leave nothing behind
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, timeout: float | None = None) -> None:
        """Start the PBX and return once it is ready (``timeout``: the class's start timeout).

        Raises ``SandboxError`` with :meth:`diagnostics` if it dies or misses the deadline; the
        process is stopped again then.
        """
        if self.running:
            return
        argv, console, cwd = self._prepare()
        started = time.monotonic()
        self._proc = spawn(argv, console, cwd=cwd)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._spawned(self._proc)
        try:
            self._wait_until_ready(started + (self._start_timeout if timeout is None else timeout))
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the PBX: the orderly way first, signals if it does not end in time."""
        proc = self._proc
        if proc is None:
            return
        end_process(proc, timeout, self._ask_to_stop())
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def restart(self, timeout: float | None = None) -> None:
        """Stop and start again with the same ports, users and config (a PBX restart)."""
        self.stop()
        self.start(timeout=timeout)

    def close(self) -> None:
        """Stop the PBX and remove the instance's files."""
        try:
            self.stop()
        finally:
            self._remove()

    def _wait_until_ready(self, deadline: float) -> None:
        last_error = "no attempt yet"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise SandboxError(
                    f"{self.name} exited during start-up (exit code {code})\n{self.diagnostics()}"
                )
            try:
                missing = self._probe(min(5.0, max(0.5, deadline - time.monotonic())))
                if missing is None:
                    return
                last_error = missing
            except (OSError, ConnectionError, SandboxError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise SandboxError(
                    f"{self.name} not ready on {self._where()} in time (last: {last_error})\n{self.diagnostics()}"
                )
            time.sleep(self._poll_interval)


# Sandboxes still running, so an interpreter exit (a crashed test run) still stops them.
_LIVE: weakref.WeakSet[PbxProcess] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        sandboxes = list(_LIVE)
    for sandbox in sandboxes:
        with contextlib.suppress(Exception):
            sandbox.close()


atexit.register(_stop_all_at_exit)
