"""The ``forum-bridge`` command: a thin click layer over the service.

Logic lives in the library; this module parses arguments, prints tables or JSON, and turns library
errors into one-line messages with a non-zero exit code (2 for configuration errors).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from forum_bridge.config import Settings, load_settings, redact_url_secrets
from forum_bridge.errors import ConfigError, ForumBridgeError

if TYPE_CHECKING:
    from datetime import datetime

    from forum_bridge.service import BridgeService
    from forum_bridge.store.status_query import Reader

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What every command needs: the settings, and a service built on first use."""

    def __init__(self, config: str | None, database: str | None) -> None:
        self.config = config
        self.database = database
        self._settings: Settings | None = None
        self._service: BridgeService | None = None

    @property
    def settings(self) -> Settings:
        """The settings from file, environment and flags (loaded once)."""
        if self._settings is None:
            self._settings = load_settings(self.config, overrides={"database.url": self.database})
        return self._settings

    def status(self) -> dict[str, Any]:
        """The status document, read as :meth:`reader` would, without the service when it can.

        With the schema current, the driver alone reads it (see ``store.status_query``); otherwise
        :meth:`reader` creates, refuses or explains as for every other reading command.
        """
        from forum_bridge.store.status_query import open_reader, status_document, utcnow

        settings = self.settings
        with open_reader(
            settings.database_url, lambda text: redact_url_secrets(text, settings.database_url)
        ) as reader:
            if reader is not None:
                return status_document(reader, node=settings.node_name, now=utcnow())
        return self.reader().status()

    def status_json(self) -> str:
        """The status document as ``status --json`` prints it (see :func:`print_json`).

        On the short path of :meth:`status` the database encodes the subscribers itself (see
        ``store.status_query.subscriber_items``): with 10,000 of them, decoding their rows and
        encoding them again was most of the command's time. The text is the same.
        """
        from forum_bridge.store.status_query import open_reader, utcnow

        settings = self.settings
        with open_reader(
            settings.database_url, lambda text: redact_url_secrets(text, settings.database_url)
        ) as reader:
            if reader is not None:
                return status_text(reader, settings.node_name, utcnow())
        return _readable_json(self.reader().status(), 0)

    def service(self, *, started: bool = True) -> BridgeService:
        """The service for a command that changes the database.

        ``started`` checks the schema first and applies the configuration (licence slots,
        profiles) when it comes from a configuration file; see :meth:`reader`.
        """
        # Imported here: SQLAlchemy and the rest cost more than a command like --help takes.
        from forum_bridge.service import BridgeService

        if self._service is None:
            # One-shot commands leave the pool-pressure log to the running bridges (see pool_watch).
            self._service = BridgeService(self.settings, watch_pool=False)
            if started:
                if self.settings.source:
                    self._service.start()
                else:
                    self._prepare_without_applying(self._service)
        return self._service

    def reader(self) -> BridgeService:
        """The service for a command that only reads: it never writes the configuration.

        Without a configuration file the settings are the defaults (4 licences), and even with one
        a look at the status must not resize the pool the running bridges share. Only an empty
        database (a new installation) gets the schema and the configuration.
        """
        from forum_bridge.service import BridgeService

        if self._service is None:
            self._service = BridgeService(self.settings, watch_pool=False)
            self._prepare_without_applying(self._service)
        return self._service

    def close(self) -> None:
        """Give the database connections back (the command is done)."""
        if self._service is not None:
            self._service.database.dispose()

    @staticmethod
    def _prepare_without_applying(service: BridgeService) -> None:
        if service.database.current_revision() is None:
            service.start()  # nothing to rewrite yet: the new database gets schema and slots
        else:
            service.database.require_current_schema()


class ConfigUsageError(click.ClickException):
    """A configuration problem: one line, exit code 2."""

    exit_code = 2


def handle_errors(func: F) -> F:
    """Turn library errors into one-line click errors (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            raise ConfigUsageError(str(exc)) from exc
        except ForumBridgeError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def json_option(func: F) -> F:
    """The shared ``--json`` flag."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(func)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON, each item of a list on one line.

    Python's indenting encoder is its slow pure-Python one; with 10,000 subscribers it took longer
    than reading them. The outer levels are indented here and every list item (a subscriber, an
    audit line) is written by the fast encoder on a line of its own, which also suits grep.
    """
    click.echo(_readable_json(data, 0))


# One encoder for every item: json.dumps with options builds a new encoder per call, which for
# 10,000 subscribers cost more than encoding them.
_encode = json.JSONEncoder(ensure_ascii=False).encode


def _pad(level: int) -> str:
    return "  " * level


def _readable_json(value: Any, level: int, encoded: dict[str, str] | None = None) -> str:
    # ``encoded``: lists of the top level whose items arrive as JSON text already, joined by
    # ",\n" and the padding of their level.
    pad = _pad(level + 1)
    if isinstance(value, dict) and value and level < 2:
        items = [
            f"{pad}{_encode(str(k))}: "
            + (
                ("[\n" + _pad(level + 2) + encoded[k] + "\n" + pad + "]" if encoded[k] else "[]")
                if encoded and k in encoded
                else _readable_json(v, level + 1)
            )
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + _pad(level) + "}"
    if isinstance(value, list) and value and level < 2:
        return "[\n" + ",\n".join([pad + _encode(v) for v in value]) + "\n" + "  " * level + "]"
    return _encode(value)


def status_text(reader: Reader, node: str, now: datetime) -> str:
    """The status document read through ``reader`` at ``now``, as :func:`print_json` prints it.

    The subscribers arrive encoded by the database and are spliced in as they are.
    """
    from forum_bridge.store.status_query import status_document, subscriber_items

    doc = status_document(reader, node=node, now=now, listed=False)
    return _readable_json(doc, 0, {"subscribers": subscriber_items(reader, ",\n" + _pad(2))})


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain text table with aligned columns."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    envvar="FORUM_BRIDGE_CONFIG",
    help="TOML configuration file (default: $FORUM_BRIDGE_CONFIG).",
)
@click.option("--database", metavar="URL", help="Database URL; overrides database.url.")
@click.version_option(package_name="forum-bridge")
@click.pass_context
def main(ctx: click.Context, config: str | None, database: str | None) -> None:
    """Forum 523/524 floating SIP licences for Asterisk and FreeSWITCH."""
    ctx.obj = Context(config, database)
    ctx.call_on_close(ctx.obj.close)


# --- db ---------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Create or migrate the database schema."""


@db.command("upgrade")
@pass_context
@handle_errors
def db_upgrade(obj: Context) -> None:
    """Create or migrate the schema to this version, then apply licence count and profiles."""
    service = obj.service(started=False)
    service.database.upgrade()
    service.sync_configuration()
    click.echo(f"database at revision {service.database.current_revision()}")


@db.command("downgrade")
@click.argument("revision", default="base")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_context
@handle_errors
def db_downgrade(obj: Context, revision: str, yes: bool) -> None:
    """Take the schema back to REVISION (default: remove every table)."""
    if not yes:
        click.confirm(f"Downgrade the database to {revision}? Data in dropped tables is lost", abort=True)
    service = obj.service(started=False)
    service.database.downgrade(revision)
    click.echo(f"database at revision {service.database.current_revision() or 'base'}")


@db.command("prune")
@json_option
@pass_context
@handle_errors
def db_prune(obj: Context, as_json: bool) -> None:
    """Delete audit lines and licence-use history older than [retention] allows (the running
    bridge does this every hour by itself)."""
    service = obj.service()
    retention = service.settings.retention
    audit = usage = 0
    while True:
        report = service.prune_history()
        audit, usage = audit + report.audit, usage + report.usage
        if not report.more:
            break
    if as_json:
        print_json(
            {
                "audit": audit,
                "usage": usage,
                "audit_days": retention.audit_days,
                "usage_days": retention.usage_days,
            }
        )
        return

    def kept(days: int) -> str:
        return "kept for ever" if days == 0 else f"older than {days} days"

    click.echo(f"deleted {audit} audit line(s) {kept(retention.audit_days)}")
    click.echo(f"deleted {usage} licence-use row(s) {kept(retention.usage_days)}")


@db.command("current")
@pass_context
@handle_errors
def db_current(obj: Context) -> None:
    """Show the schema revision of the database."""
    click.echo(
        obj.service(started=False).database.current_revision() or "empty (run 'forum-bridge db upgrade')"
    )


# --- subscribers --------------------------------------------------------------------------------


@main.group()
def subscriber() -> None:
    """Manage SIP log-ons (subscribers) and their call numbers."""


@subscriber.command("add")
@click.argument("logon")
@click.option("--number", required=True, help="The call number this log-on answers to.")
@click.option("--profile", help="Profile (keepalive clock); default: the default profile.")
@click.option("--reserved", is_flag=True, help="Keep a licence for this log-on (see 'subscriber reserve').")
@pass_context
@handle_errors
def subscriber_add(obj: Context, logon: str, number: str, profile: str | None, reserved: bool) -> None:
    """Provision LOGON (the SIP user name) with its call number."""
    obj.service().add_subscriber(logon, number, profile, reserved=reserved)
    click.echo(f"added {logon} with number {number}" + (", licence reserved" if reserved else ""))


@subscriber.command("reserve")
@click.argument("logon")
@pass_context
@handle_errors
def subscriber_reserve(obj: Context, logon: str) -> None:
    """Reserve a licence for LOGON: it always gets one, even when the floating pool is full.

    The floating pool shrinks by one. At most licences.count log-ons can be reserved.
    """
    changed = obj.service().set_reserved(logon, True)
    click.echo(f"licence reserved for {logon}" if changed else f"{logon} has a reserved licence already")


@subscriber.command("unreserve")
@click.argument("logon")
@pass_context
@handle_errors
def subscriber_unreserve(obj: Context, logon: str) -> None:
    """Give LOGON's reserved licence back to the floating pool (a licence it holds now stays)."""
    # Not started: this must work even when licences.count was lowered below the reservations,
    # which makes every command that applies the configuration stop until this is fixed.
    service = obj.service(started=False)
    service.database.require_current_schema()
    changed = service.set_reserved(logon, False)
    click.echo(f"reservation of {logon} given back" if changed else f"{logon} has no reserved licence")


@subscriber.command("remove")
@click.argument("logon")
@pass_context
@handle_errors
def subscriber_remove(obj: Context, logon: str) -> None:
    """Stop managing LOGON; its licence is freed."""
    obj.service().remove_subscriber(logon)
    click.echo(f"removed {logon}")


@subscriber.command("list")
@json_option
@pass_context
@handle_errors
def subscriber_list(obj: Context, as_json: bool) -> None:
    """List every subscriber with its state."""
    subscribers = obj.reader().status()["subscribers"]
    if as_json:
        print_json(subscribers)
        return
    print_table(
        ["LOGON", "NUMBER", "PROFILE", "STATE", "LICENSED", "RESERVED"],
        [
            [
                s["logon"],
                s["number"],
                s["profile"],
                s["state"],
                "yes" if s["licensed"] else "no",
                "yes" if s["reserved"] else "no",
            ]
            for s in subscribers
        ],
    )


@subscriber.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@pass_context
@handle_errors
def subscriber_import(obj: Context, file: Any) -> None:
    """Import subscribers from a CSV FILE of logon,number[,profile[,reserved]] rows.

    All or nothing; - reads stdin. reserved is yes or no (empty: no).
    """
    count = obj.service().import_subscribers(file.read())
    click.echo(f"imported {count} subscriber(s)")


# --- profiles -----------------------------------------------------------------------------------


@main.group()
def profile() -> None:
    """Manage log-on profiles (the keepalive clock for automatic log-out)."""


@profile.command("set")
@click.argument("name")
@click.option("--keepalive", type=click.IntRange(min=1), required=True, help="Keepalive interval in seconds.")
@pass_context
@handle_errors
def profile_set(obj: Context, name: str, keepalive: int) -> None:
    """Create profile NAME or change its keepalive interval."""
    obj.service().set_profile(name, keepalive)
    click.echo(f"profile {name}: keepalive {keepalive} s")


@profile.command("list")
@json_option
@pass_context
@handle_errors
def profile_list(obj: Context, as_json: bool) -> None:
    """List profiles with their keepalive interval."""
    profiles = obj.reader().profiles()
    if as_json:
        print_json(profiles)
        return
    print_table(
        ["PROFILE", "KEEPALIVE_S", "SUBSCRIBERS"],
        [[p["name"], p["keepalive"], p["subscribers"]] for p in profiles],
    )


# --- status, licences, check ----------------------------------------------------------------------


@main.command()
@json_option
@pass_context
@handle_errors
def status(obj: Context, as_json: bool) -> None:
    """Show the licences, their assignment and every subscriber."""
    if as_json:
        click.echo(obj.status_json())
        return
    doc = obj.status()
    lic = doc["licences"]
    click.echo(
        f"Licences: {lic['used']} of {lic['total']} in use, {lic['free']} free, {lic['reserved']} reserved"
        f"  (node {doc['node']})"
    )
    click.echo("")
    if doc["assignments"]:
        print_table(
            ["SLOT", "LOGON", "NUMBER", "SINCE"],
            [[a["slot"], a["logon"], a["number"], a["since"]] for a in doc["assignments"]],
        )
    else:
        click.echo("No licence is assigned.")
    click.echo("")
    if doc["subscribers"]:
        print_table(
            ["LOGON", "NUMBER", "PROFILE", "STATE", "LICENSED", "RESERVED", "LAST_SEEN", "CONTACT"],
            [
                [
                    s["logon"],
                    s["number"],
                    s["profile"],
                    s["state"],
                    "yes" if s["licensed"] else "no",
                    "yes" if s["reserved"] else "no",
                    s["last_seen"],
                    s["contact"],
                ]
                for s in doc["subscribers"]
            ],
        )
    else:
        click.echo("No subscriber is provisioned ('forum-bridge subscriber add').")
    if doc["unmanaged"]:
        click.echo("")
        print_table(
            ["UNMANAGED", "CONTACT", "LAST_SEEN"],
            [[u["logon"], u["contact"], u["last_seen"]] for u in doc["unmanaged"]],
        )


@main.group()
def licences() -> None:
    """Act on the licence pool."""


@licences.command("reset")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--actor", default="cli", show_default=True, help="Who resets, for the audit log.")
@pass_context
@handle_errors
def licences_reset(obj: Context, yes: bool, actor: str) -> None:
    """Free every licence now (calls in progress go on; licences are taken again at the next call)."""
    if not yes:
        click.confirm("Free every licence now?", abort=True)
    freed = obj.service().reset_licences(actor)
    click.echo(f"{freed} licence(s) freed")


@main.command()
@click.argument("logon")
@click.argument("number")
@click.option("--inbound", is_flag=True, help="Ask whether LOGON's phone may ring for NUMBER instead.")
@json_option
@pass_context
@handle_errors
def check(obj: Context, logon: str, number: str, inbound: bool, as_json: bool) -> None:
    """What would happen now if LOGON called NUMBER (no licence is taken)."""
    from forum_bridge.core.events import Direction

    service = obj.reader()
    direction = Direction.INBOUND if inbound else Direction.OUTBOUND
    decision = service.check(logon, number, direction)
    doc = {
        "logon": logon,
        "number": number,
        "direction": direction.value,
        "emergency": direction is Direction.OUTBOUND and service.is_emergency(number),
        **decision.as_dict(),
    }
    if as_json:
        print_json(doc)
        return
    verdict = "allowed" if decision.allowed else "denied"
    extra = " (would take a licence)" if decision.takes_licence else ""
    click.echo(f"{logon} -> {number}: {verdict}, {decision.reason.value}{extra}")


@main.command()
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@pass_context
@handle_errors
def audit(obj: Context, limit: int, as_json: bool) -> None:
    """Show the newest audit log lines (acquisitions, releases, denials, failed log-ons, resets)."""
    lines = obj.reader().audit_log(limit)
    if as_json:
        print_json(lines)
        return
    print_table(
        ["AT", "KIND", "LOGON", "NUMBER", "REASON", "ACTOR", "DETAIL"],
        [[a["at"], a["kind"], a["logon"], a["number"], a["reason"], a["actor"], a["detail"]] for a in lines],
    )


# --- run and dialplan -----------------------------------------------------------------------------


@main.group()
def run() -> None:
    """Run the bridge beside a PBX (until stopped)."""


@run.command("asterisk")
@pass_context
@handle_errors
def run_asterisk(obj: Context) -> None:
    """Listen to Asterisk's AMI, serve the FastAGI hook and enforce the rules."""
    from forum_bridge.adapters.asterisk.runner import run as run_bridge

    sys.exit(run_bridge(obj.settings))


@run.command("freeswitch")
@pass_context
@handle_errors
def run_freeswitch(obj: Context) -> None:
    """Listen to FreeSWITCH's event socket, serve the socket hook and enforce the rules."""
    from forum_bridge.adapters.freeswitch.runner import run as run_bridge

    sys.exit(run_bridge(obj.settings))


@main.group()
def dialplan() -> None:
    """Print the dialplan snippet for a PBX, rendered from the configuration."""


@dialplan.command("asterisk")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file.")
@pass_context
@handle_errors
def dialplan_asterisk(obj: Context, output: Path | None) -> None:
    """The forum_bridge.conf snippet to #include from extensions.conf."""
    from forum_bridge.adapters.asterisk.dialplan import render_dialplan

    _emit(render_dialplan(obj.settings), output)


@dialplan.command("freeswitch")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file.")
@pass_context
@handle_errors
def dialplan_freeswitch(obj: Context, output: Path | None) -> None:
    """The forum_bridge.xml dialplan for FreeSWITCH."""
    from forum_bridge.adapters.freeswitch.dialplan import render_dialplan

    _emit(render_dialplan(obj.settings), output)


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}")


def entry() -> None:
    """The console script: quiet logging for one-shot commands (``run`` sets its own), then click."""
    from forum_bridge.logsetup import configure_logging

    # One-shot commands report through their own output; only real errors should reach stderr.
    configure_logging("ERROR")
    main()
