"""Logging for the bridge processes: one logfmt-style line per record on stderr.

``level=info logger=forum_bridge.decision msg="decision logon=21-desk result=denied ..."``

Under systemd the journal stamps every line itself, so the timestamp is left out and a ``<N>`` syslog
priority prefix lets ``journalctl -p`` filter by level; elsewhere each line starts with an ISO 8601
UTC timestamp. Log-on names and user agents come from the network, so control characters are escaped
to keep one record on one line (no forged log lines). A filter redacts configured secrets should one
ever reach a message: defence in depth, the code never logs them on purpose.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TextIO

REDACTED = "[redacted]"

# syslog priorities understood by journald's SyslogLevelPrefix= (on by default).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Secrets shorter than this are not redacted: replacing every "1" or "ab" in every line would make the
# log unreadable while protecting nothing worth protecting.
_MIN_SECRET = 4


def quote(value: str) -> str:
    """Quote a logfmt value: backslash escapes for quotes and every control character."""
    # Every call decision logs a line: the common case (nothing to escape) is one regex scan.
    return '"' + _NEEDS_ESCAPE.sub(_escape, value) + '"'


_NEEDS_ESCAPE = re.compile(r'[\\"\x00-\x1f\x7f-\x9f]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\x{ord(char):02x}"


class LogfmtFormatter(logging.Formatter):
    """``[ts=...] level=... logger=... msg="..." [exc="..."]`` on one line."""

    def __init__(self, *, timestamps: bool, priority_prefix: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line."""
        parts = []
        if self.timestamps:
            at = datetime.fromtimestamp(record.created, UTC)
            parts.append("ts=" + at.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"logger={record.name}")
        parts.append("msg=" + quote(record.getMessage()))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append("exc=" + quote(record.exc_text))
        line = " ".join(parts)
        if self.priority_prefix:
            line = f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class RedactSecrets(logging.Filter):
    """Replace every configured secret in a record's message (and traceback) by ``[redacted]``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact in place; never drops a record."""
        if not self.secrets:
            return True
        message = record.getMessage()
        cleaned = self.redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal connection systemd announced in ``JOURNAL_STREAM``.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for a service whose stderr goes to the journal;
    comparing it with the stream's own file keeps a child whose stderr was redirected (a pipe, a file)
    from writing priority prefixes where no journal will strip them.
    """
    announced = environ.get("JOURNAL_STREAM", "")
    if not announced:
        return False
    try:
        device, inode = (int(part) for part in announced.split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def configure_logging(
    level: str,
    secrets: Iterable[str] = (),
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Send every log record at ``level`` or above to stderr, one logfmt line each.

    Calling it again replaces the handler it installed before (tests, or a reload with a new level);
    handlers that others installed on the root logger are left alone.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    target = stream if stream is not None else sys.stderr
    journal = stream_is_journal(target, os.environ if environ is None else environ)
    handler = logging.StreamHandler(target)
    handler.setFormatter(LogfmtFormatter(timestamps=not journal, priority_prefix=journal))
    # On the handler, not a logger: handler filters see records propagated from every logger.
    handler.addFilter(RedactSecrets(secrets))
    handler.set_name("forum_bridge")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "forum_bridge"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
