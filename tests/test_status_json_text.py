"""``status --json`` has the database encode the subscriber list: the text stays what it was.

The old way decoded every subscriber row, built a dict each and encoded it again with Python's
encoder; now PostgreSQL (``to_json``) or SQLite (``json_quote``) writes each subscriber's JSON and
the command splices it into the indented document. Hostile names, contacts and user agents
(quotes, backslashes, control characters, non-ASCII, values a peer could send) must come out byte
for byte as Python wrote them, and as ``/status.json`` serves them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from forum_bridge.cli import _readable_json, status_text
from forum_bridge.config import Settings, redact_url_secrets
from forum_bridge.errors import StoreError
from forum_bridge.service import BridgeService
from forum_bridge.store.models import RegistrationRow, SubscriberRow
from forum_bridge.store.status_query import Reader, open_reader, status_document, subscriber_items
from forum_bridge.web.app import make_app
from tests import status_population
from tests.conftest import SettingsFactory

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 24, 9, 30, 15, tzinfo=UTC)

# What a peer or an old row can put into a name, a contact or a user agent.
HOSTILE = [
    'q"uote',
    "back\\slash\\",
    "ctl\x01\x08\x0c\x1b\x1f\x7f",
    "ws\n\r\t end",
    "ünïcödé—€",
    "astral\U0001f4de",
    "line\u2028para\u2029",
    "</script><b>",
    '{"json": [1, 2]}, ',
    "nul\x00here",  # stored as U+FFFD
    "lone\ud800surrogate",  # stored with "?"
]


def hostile_rows(service: BridgeService) -> None:
    """Subscribers and registrations with hostile values, written as an older version or a peer could."""
    start = service.clock()
    with service.database.transaction() as session:
        for i, text in enumerate(HOSTILE):
            logon = f"h{i:02d}{text}"
            session.add(
                SubscriberRow(
                    logon=logon,
                    number=f"7{i:02d}",
                    profile="default",
                    last_logon_failed=i % 4 == 1,
                    last_failure_at=start - timedelta(minutes=i) if i % 2 else None,
                    created_at=start,
                    reserved=i % 3 == 0,
                )
            )
            if i % 5 == 3:
                continue  # logged off
            seen = start + timedelta(seconds=i)
            for n, at in enumerate([seen, seen + timedelta(seconds=5), seen + timedelta(seconds=5)]):
                # Two registrations seen at the same moment: the older row (lower id) comes first.
                session.add(
                    RegistrationRow(
                        node="pbx1" if n else f"node{text}",
                        logon=logon,
                        contact=f"sip:{n}{text}@192.0.2.{i}:5060",
                        source=f"192.0.2.{i}:{5060 + n}{text}",
                        user_agent=f"Phone {text}",
                        registered_at=at,
                        last_seen=at,
                    )
                )
        session.add(
            RegistrationRow(
                node="pbx1",
                logon='unmanaged"\\\x01',
                contact="sip:ü@198.51.100.1",
                source="198.51.100.1:5060",
                user_agent="\x7f",
                registered_at=start,
                last_seen=start,
            )
        )


def populated(
    make_settings: SettingsFactory, make_service: Callable[[Settings], BridgeService], url: str
) -> BridgeService:
    """Subscribers in every state, licences held, an unmanaged endpoint, and the hostile rows."""
    service = status_population.populated(make_settings, make_service, url, licences=4)
    hostile_rows(service)
    return service


@contextmanager
def cli_reader(url: str) -> Iterator[Reader]:
    """The reader ``forum-bridge status`` opens (the driver alone: libpq or sqlite3)."""
    with open_reader(url, lambda text: redact_url_secrets(text, url)) as reader:
        assert reader is not None, "the schema is current: the short path must take it"
        yield reader


def old_text(reader: Reader, now: datetime) -> str:
    """The document as the command printed it before: every subscriber decoded and encoded in Python."""
    return _readable_json(status_document(reader, node="pbx1", now=now), 0)


def status_json_body(service: BridgeService, settings: Settings) -> dict[str, Any]:
    """``GET /status.json`` of the bridge's web application."""
    app = make_app(service, settings, None)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/status.json",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "HTTP_HOST": "127.0.0.1:8080",
        "wsgi.url_scheme": "http",
        "wsgi.input": BytesIO(),
    }
    statuses: list[str] = []
    body = b"".join(app(environ, lambda status, _headers, _exc=None: statuses.append(status)))  # type: ignore[arg-type]
    assert statuses and statuses[0].startswith("200"), statuses
    result: dict[str, Any] = json.loads(body)
    return result


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without what depends on the reader's clock."""
    return {k: v for k, v in doc.items() if k not in ("generated_at", "usage_history")}


def test_the_database_writes_the_subscribers_as_python_did(
    make_settings: SettingsFactory, make_service: Callable[[Settings], BridgeService], database_url: str
) -> None:
    service = populated(make_settings, make_service, database_url)
    with cli_reader(database_url) as reader:
        before = old_text(reader, NOW)
        after = status_text(reader, "pbx1", NOW)
    assert after == before  # byte for byte: fields, order, values, escapes, layout
    doc = json.loads(after)
    assert len(doc["subscribers"]) == 4 + len(HOSTILE)
    assert [s["logon"] for s in doc["subscribers"]] == [s["logon"] for s in service.status()["subscribers"]]
    by_logon = {s["logon"]: s for s in doc["subscribers"]}
    quoted = by_logon['h00q"uote']
    # Newest first; of two seen at the same moment the older row first; the latest gives the rest.
    assert quoted["contacts"] == [
        'sip:1q"uote@192.0.2.0:5060',
        'sip:2q"uote@192.0.2.0:5060',
        'sip:0q"uote@192.0.2.0:5060',
    ]
    assert quoted["contact"] == 'sip:1q"uote@192.0.2.0:5060' and quoted["source"] == '192.0.2.0:5061q"uote'
    assert quoted["reserved"] is True and quoted["state"] == "logged_on" and quoted["licensed"] is False
    assert (
        by_logon["h03" + HOSTILE[3]]["contacts"] == []
        and by_logon["h03" + HOSTILE[3]]["state"] == "logged_off"
    )
    assert by_logon["h01back\\slash\\"]["state"] == "logon_failed"
    assert by_logon["h09nul\ufffdhere"]["user_agent"] == "Phone nul\ufffdhere"
    assert by_logon["h10lone?surrogate"]["node"] == "pbx1"
    assert by_logon["21-desk"]["licensed"] is True
    # Non-ASCII is written as it is and control characters as Python escapes them.
    assert "ünïcödé—€" in after and "astral\U0001f4de" in after and "\\u001b\\u001f\x7f" in after
    assert "\\n\\r\\t" in after and "\\b\\f" in after

    # The bridge's own connection (psycopg or sqlite3 through SQLAlchemy) writes the same text.
    with service.database.read() as session:
        bridge_reader = service.database.reader(session)
        assert status_text(bridge_reader, "pbx1", NOW) == before
    # And /status.json serves the same values for every field the two share.
    served = status_json_body(service, service.settings)
    assert comparable(served) == comparable(doc)


def test_no_subscriber_prints_an_empty_list_as_before(
    make_settings: SettingsFactory, make_service: Callable[[Settings], BridgeService], database_url: str
) -> None:
    make_service(make_settings(database__url=database_url))
    with cli_reader(database_url) as reader:
        assert subscriber_items(reader, ",\n    ") == ""
        text = status_text(reader, "pbx1", NOW)
        assert text == old_text(reader, NOW)
    assert '\n  "subscribers": [],\n' in text


def test_the_command_prints_it(
    make_settings: SettingsFactory, make_service: Callable[[Settings], BridgeService], database_url: str
) -> None:
    service = populated(make_settings, make_service, database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    env.update(FORUM_BRIDGE_NODE_NAME="pbx1", FORUM_BRIDGE_LICENCES_COUNT="4", PYTHONIOENCODING="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "forum_bridge", "--database", database_url, "status", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.decode("utf-8")
    doc = json.loads(printed)
    with cli_reader(database_url) as reader:
        expected = old_text(reader, datetime.fromisoformat(doc["generated_at"]))
    assert printed == expected + "\n"
    assert comparable(doc) == comparable(service.status())


def test_text_sqlite_cannot_decode_fails_the_same_way(
    make_settings: SettingsFactory, make_service: Callable[[Settings], BridgeService], sqlite_url: str
) -> None:
    # Another writer can leave bytes in SQLite that are not UTF-8 (an unpaired surrogate's
    # encoding): both ways refuse them with a one-line error rather than print garbage, and the
    # new one names no statement.
    service = populated(make_settings, make_service, sqlite_url)
    with service.database.transaction() as session:
        session.execute(
            sqlalchemy.text(
                "UPDATE registrations SET contact = CAST(x'7369703aeda080' AS TEXT) WHERE logon = 'lift'"
            )
        )
    with cli_reader(sqlite_url) as reader, pytest.raises(StoreError) as old:
        old_text(reader, NOW)
    with cli_reader(sqlite_url) as reader, pytest.raises(StoreError) as new:
        status_text(reader, "pbx1", NOW)
    for refused in (old.value, new.value):
        assert str(refused).startswith("database error: Could not decode to UTF-8 column"), refused
        assert "\n" not in str(refused)
    assert "column 'subscriber'" in str(new.value) and "SELECT" not in str(new.value)
    assert "json_quote" not in str(new.value)


# Runs the command in a fresh interpreter (no configuration file) and lists what it imported.
IMPORTS_PROBE = """
import io, json, sys
from contextlib import redirect_stdout
from forum_bridge.cli import main
with redirect_stdout(io.StringIO()) as out:
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "printed": len(out.getvalue()), "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("args", [("status", "--json"), ("--help",)])
def test_status_and_help_import_only_what_they_use(
    make_settings: SettingsFactory,
    make_service: Callable[[Settings], BridgeService],
    database_url: str,
    args: tuple[str, ...],
) -> None:
    populated(make_settings, make_service, database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORUM_BRIDGE_")}
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, "--database", database_url, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["code"] == 0 and result["printed"] > 0
    modules = set(result["modules"])
    # The rest of the bridge, the ORM and the event loop are not needed to print the status.
    for unused in (
        "sqlalchemy",
        "alembic",
        "psycopg",
        "asyncio",
        "forum_bridge.service",
        "forum_bridge.store.database",
        "forum_bridge.core.events",
        "forum_bridge.core.rules",
        "tomllib",
        "socket",
    ):
        assert unused not in modules, f"{' '.join(args)} imported {unused}"
    ours = {m for m in modules if m.startswith("forum_bridge")}
    if args[0] == "status":
        reader = {"forum_bridge.store.libpq"} if database_url.startswith("postgresql") else set()
        assert ours == {
            "forum_bridge",
            "forum_bridge.cli",
            "forum_bridge.clocks",
            "forum_bridge.config",
            "forum_bridge.core",
            "forum_bridge.core.emergency",
            "forum_bridge.core.names",
            "forum_bridge.errors",
            "forum_bridge.store",
            "forum_bridge.store.status_query",
            *reader,
        }
