"""A real Asterisk 22, a real FreeSWITCH and real SIP phones on 127.0.0.1, for end-to-end tests and the demo.

* ``build_root()`` builds (once, then caches under ``/var/tmp/forum-bridge/asterisk-root`` or
  ``$FORUM_BRIDGE_SANDBOX_ROOT``) a Debian ``sid`` chroot with Debian's Asterisk packages.  It needs
  root and the Debian archive, installs ``debootstrap`` and ``sip-tester`` (SIPp) on the host when
  missing, and raises ``SandboxBuildError`` with the failing command's output on any failure.
* ``AsteriskSandbox`` runs one private Asterisk instance in that chroot: free SIP/AMI ports, a
  least-privilege AMI user for the bridge, the bridge's dialplan snippet ``#include``d, PJSIP
  endpoints for the given log-ons.  A context manager; it never outlives the test process.
* ``FreeSwitchSandbox`` runs one private real FreeSWITCH 1.10 (installed under ``/opt/fs`` by the
  test command) with a configuration written by the project: free SIP/ESL ports on 127.0.0.1, the
  bridge's dialplan snippet included at the top of the phones' context, directory users for the
  given log-ons.  It fails with the log tail when FreeSWITCH cannot start.
* ``SippPhone`` is a phone made of SIPp runs: ``register``, ``unregister``, ``call``,
  ``start_call``, ``start_uas`` / ``answer_incoming``; each returns the final SIP status code as a
  ``SippResult`` (an ``int`` with the evidence attached).
"""

from tests.sandbox.asterisk import (
    AMI_READ_CLASSES,
    AMI_WRITE_CLASSES,
    ASTERISK_MODULES,
    DEFAULT_ROOT,
    ROOT_ENV_VAR,
    AsteriskSandbox,
    SandboxBuildError,
    SandboxError,
    build_root,
    free_tcp_port,
    free_udp_port,
)
from tests.sandbox.freeswitch import FreeSwitchSandbox, free_sip_port, freeswitch_binary
from tests.sandbox.sipp import SipMessage, SippError, SippPhone, SippResult, SippRun

__all__ = [
    "AMI_READ_CLASSES",
    "AMI_WRITE_CLASSES",
    "ASTERISK_MODULES",
    "DEFAULT_ROOT",
    "ROOT_ENV_VAR",
    "AsteriskSandbox",
    "FreeSwitchSandbox",
    "SandboxBuildError",
    "SandboxError",
    "SipMessage",
    "SippError",
    "SippPhone",
    "SippResult",
    "SippRun",
    "build_root",
    "free_sip_port",
    "free_tcp_port",
    "free_udp_port",
    "freeswitch_binary",
]
