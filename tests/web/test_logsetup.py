"""configure_logging: one logfmt line per record, timestamps unless stderr is the journal, secrets
redacted."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from forum_bridge.logsetup import REDACTED, configure_logging

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """Undo what configure_logging did to the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO | TextIO) -> list[str]:
    """Everything written to ``stream``, line by line."""
    stream.seek(0)
    return stream.read().splitlines()


def test_line_format_with_an_iso_timestamp_outside_the_journal() -> None:
    out = io.StringIO()
    configure_logging("info", stream=out, environ={})
    logging.getLogger("forum_bridge.decision").info(
        "decision logon=%s result=%s reason=%s", "21-desk", "denied", "emergency_only"
    )
    [line] = lines(out)
    assert re.fullmatch(
        rf"ts={ISO} level=info logger=forum_bridge\.decision "
        r'msg="decision logon=21-desk result=denied reason=emergency_only"',
        line,
    ), line


def test_no_timestamp_and_a_priority_prefix_when_stderr_is_the_journal(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w+", encoding="utf-8") as stream:
        info = os.fstat(stream.fileno())
        configure_logging("info", stream=stream, environ={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
        logging.getLogger("forum_bridge.decision").warning("decision logon=21-desk result=denied")
        logging.getLogger("forum_bridge.service").info("resync node=pbx1")
        stream.flush()
        assert lines(stream) == [
            '<4>level=warning logger=forum_bridge.decision msg="decision logon=21-desk result=denied"',
            '<6>level=info logger=forum_bridge.service msg="resync node=pbx1"',
        ]


def test_journal_stream_of_another_file_keeps_timestamps(tmp_path: Path) -> None:
    # JOURNAL_STREAM is inherited by children whose stderr may go elsewhere: only a match counts.
    out = io.StringIO()
    configure_logging("info", stream=out, environ={"JOURNAL_STREAM": "8:12345"})
    logging.getLogger("forum_bridge").info("hello")
    [line] = lines(out)
    assert re.match(rf"ts={ISO} level=info ", line)


def test_one_line_per_record_even_with_newlines_quotes_and_tracebacks() -> None:
    out = io.StringIO()
    configure_logging("debug", stream=out, environ={})
    log = logging.getLogger("forum_bridge.web")
    log.info("log-on failed logon=%s", 'evil\nlevel=error msg="forged"\x1b[31m')
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("handler failed")
    first, second = lines(out)
    assert first.endswith(r'msg="log-on failed logon=evil\nlevel=error msg=\"forged\"\x1b[31m"')
    assert 'msg="handler failed" exc="Traceback (most recent call last):\\n' in second
    assert "ValueError: boom\\nsecond line" in second


def test_level_filters_records() -> None:
    out = io.StringIO()
    configure_logging("WARNING", stream=out, environ={})
    logging.getLogger("forum_bridge").info("quiet")
    logging.getLogger("forum_bridge").error("loud")
    assert [line.split(" ", 1)[1] for line in lines(out)] == ['level=error logger=forum_bridge msg="loud"']
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("chatty", stream=out, environ={})


def test_secrets_are_redacted_from_messages_and_tracebacks() -> None:
    out = io.StringIO()
    configure_logging("info", secrets=["hunter2-token", "ami-secret-9", "", "ab"], stream=out, environ={})
    log = logging.getLogger("forum_bridge.adapters")
    log.info("login with secret=%s to %s", "ami-secret-9", "127.0.0.1:5038")
    log.info("token hunter2-token in a preformatted message ab")
    try:
        raise RuntimeError("auth failed for hunter2-token")
    except RuntimeError:
        log.exception("oops")
    text = "\n".join(lines(out))
    assert "hunter2-token" not in text
    assert "ami-secret-9" not in text
    assert f'msg="login with secret={REDACTED} to 127.0.0.1:5038"' in text
    assert f"auth failed for {REDACTED}" in text
    assert "message ab" in text  # secrets too short to be meaningful are not redacted everywhere


def test_configuring_again_replaces_its_own_handler_only() -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", stream=first, environ={})
    configure_logging("info", stream=second, environ={})
    logging.getLogger("forum_bridge").info("once")
    assert lines(first) == []
    assert len(lines(second)) == 1
    assert foreign in root.handlers
