"""Settings: a TOML file, then ``FORUM_BRIDGE_*`` environment variables, then command-line flags.

The file comes from ``--config PATH`` or ``FORUM_BRIDGE_CONFIG``; without either the defaults apply.
Every problem is reported as one :class:`ConfigError` that names the key. Secrets (AMI secret, ESL
password, web token) may come from the file or the environment and are never part of ``repr``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from forum_bridge.core.emergency import EmergencyNumbers, region_is_known
from forum_bridge.core.names import invisible_character
from forum_bridge.errors import ConfigError

ENV_PREFIX = "FORUM_BRIDGE_"
ENFORCE_MODES = ("hook", "ami", "both")
FREESWITCH_ENFORCE_MODES = ("hook", "esl", "both")
FAIL_MODES = ("closed", "open")
# Twice the bridge's heartbeat into the PBX (every 30 s), so one late heartbeat never drops a block.
MIN_BLOCK_STALE_AFTER = 60


def default_database_url() -> str:
    """SQLite in the service's state directory, so the CLI and the service find the same file."""
    state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    if state:
        directory = Path(state.split(":")[0])
    elif os.geteuid() == 0:
        directory = Path("/var/lib/forum-bridge")
    else:
        directory = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "forum-bridge"
    return f"sqlite:///{directory / 'forum-bridge.db'}"


def _hostname() -> str:
    """This host's name (what ``socket.gethostname`` says), the default node name."""
    # socket, ipaddress and tomllib are imported where they are used: a one-shot command such as
    # ``status`` or ``--help`` without a configuration file or allow-list needs none of them, and
    # importing them cost it about 15 ms. uname's node name is the same host name on POSIX.
    if hasattr(os, "uname"):
        return os.uname().nodename
    import socket

    return socket.gethostname()


@dataclass(frozen=True)
class Profile:
    """A log-on profile: its keepalive interval is the clock for automatic log-out."""

    name: str
    keepalive: int


@dataclass(frozen=True)
class AsteriskSettings:
    """``[asterisk]``: how to reach AMI and where the FastAGI hook listens."""

    ami_host: str = "127.0.0.1"
    ami_port: int = 5038
    ami_username: str = "forumbridge"
    ami_secret: str = field(default="", repr=False)
    agi_host: str = "127.0.0.1"
    agi_port: int = 4573
    # Addresses (networks) allowed to ask the FastAGI hook; anyone who can ask can take licences.
    agi_allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    enforce: str = "both"
    fail_mode: str = "closed"
    reconnect_max: float = 30.0
    action_timeout: float = 5.0
    # How long the dialplan waits for the hook before it applies fail_mode (TIMEOUT(absolute)).
    hook_timeout: float = 2.0


@dataclass(frozen=True)
class FreeswitchSettings:
    """``[freeswitch]``: how to reach mod_event_socket and where the socket hook listens."""

    esl_host: str = "127.0.0.1"
    esl_port: int = 8021
    esl_password: str = field(default="ClueCon", repr=False)
    socket_host: str = "127.0.0.1"
    socket_port: int = 8084
    # Addresses (networks) allowed to use the socket hook; anyone who can use it can take licences.
    socket_allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    enforce: str = "both"
    fail_mode: str = "closed"
    reconnect_max: float = 30.0
    # Whole seconds the dialplan waits for the socket hook before it applies fail_mode
    # (sched_transfer; FreeSWITCH's scheduler counts whole seconds and looks every 0.5 s).
    hook_timeout: int = 2


@dataclass(frozen=True)
class WebSettings:
    """``[web]``: the status page and ``/metrics``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8088
    token: str = field(default="", repr=False)
    # Host names the page answers to (DNS rebinding defence); empty: the loopback names and ``host``.
    allowed_hosts: tuple[str, ...] = ()
    # Requests served at once; more wait in the listen queue, so the page can never take the file
    # descriptors that the call hook and the database need.
    max_connections: int = 32


@dataclass(frozen=True)
class Retention:
    """``[retention]``: how many days of history the database keeps (0: for ever)."""

    audit_days: int = 400
    usage_days: int = 90


@dataclass(frozen=True)
class Settings:
    """Every setting of one bridge process."""

    database_url: str = field(default_factory=default_database_url, repr=False)
    licence_count: int = 4
    licence_warn_at: int = 80  # percent of the floating pool in use that logs a warning; 0: never
    emergency: EmergencyNumbers = field(default_factory=EmergencyNumbers)
    block_after_failed_logon: bool = True
    # Seconds after the bridge's last heartbeat in the PBX from which its blocks no longer keep a
    # phone from emergency numbers; 0: never.
    block_stale_after: int = 300
    profiles: Mapping[str, Profile] = field(default_factory=lambda: {"default": Profile("default", 120)})
    default_profile: str = "default"
    keepalive_grace: int = 10
    node_name: str = field(default_factory=_hostname)
    node_dead_after: int = 60
    asterisk: AsteriskSettings = field(default_factory=AsteriskSettings)
    freeswitch: FreeswitchSettings = field(default_factory=FreeswitchSettings)
    web: WebSettings = field(default_factory=WebSettings)
    retention: Retention = field(default_factory=Retention)
    log_level: str = "INFO"
    source: str = ""  # the file the settings came from, for messages

    def secret_values(self) -> list[str]:
        """Every secret of these settings, for the log's redaction: the PBX credentials, the web
        token and the database password (with the pieces a mistyped URL could scatter)."""
        found = [self.asterisk.ami_secret, self.freeswitch.esl_password, self.web.token]
        found += url_secrets(self.database_url)
        return [s for s in found if s]


# A piece of a password shorter than this is not worth redacting on its own (it would blank out
# ordinary words); the whole password always is.
_MIN_FRAGMENT = 4


def url_secrets(url: str) -> list[str]:
    """The password of a database URL, as written and decoded, and the pieces of it that a URL
    parser could report elsewhere when it holds an unescaped ``@``, ``:`` or ``/``.

    The userinfo is taken up to the *last* ``@`` of the authority, because that is where a person
    meant it to end; a parser stops at the first, and then reports the rest as the host name.
    """
    if "://" not in url:
        return []
    rest = url.split("://", 1)[1].split("?", 1)[0]
    if "@" not in rest:
        return []
    userinfo = rest.rsplit("@", 1)[0]
    password = userinfo.partition(":")[2]
    if not password:
        return []
    found = {password, unquote(password)}
    for candidate in list(found):
        for separator in "@:/":
            found.update(p for p in candidate.split(separator) if len(p) >= _MIN_FRAGMENT)
    # What a parser that stopped at the first "@" would call the host: it starts with a password piece.
    found.update(p for p in rest.split("@")[1:-1] if len(p) >= _MIN_FRAGMENT)
    return sorted(found, key=len, reverse=True)


def redact_url_secrets(text: str, url: str) -> str:
    """``text`` with every piece of ``url``'s password replaced by ``[redacted]``."""
    for secret in url_secrets(url):
        text = text.replace(secret, "[redacted]")
    return text


# key -> (type, setter) tables keep parsing declarative and every key's error message uniform.
_SCALARS: dict[str, type] = {
    "database.url": str,
    "licences.count": int,
    "licences.warn_at": int,
    "emergency.region": str,
    "emergency.outside_line_prefix": str,
    "emergency.block_after_failed_logon": bool,
    "emergency.block_stale_after": int,
    "keepalive.grace": int,
    "keepalive.default_profile": str,
    "node.name": str,
    "node.dead_after": int,
    "log.level": str,
    "web.enabled": bool,
    "web.host": str,
    "web.port": int,
    "web.token": str,
    "web.max_connections": int,
    "retention.audit_days": int,
    "retention.usage_days": int,
}
_SECTION_TYPES = {"asterisk": AsteriskSettings, "freeswitch": FreeswitchSettings}
SECRET_KEYS = frozenset({"asterisk.ami_secret", "freeswitch.esl_password", "web.token", "database.url"})


def _typed(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(key, f"expected true or false, got {_shown(key, value)}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a whole number, got {_shown(key, value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"expected a whole number, got {_shown(key, value)}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {_shown(key, value)}")
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {_shown(key, value)}")
    return value


def _shown(key: str, value: Any) -> str:
    """How a bad value is quoted in an error: never for secrets."""
    if key in SECRET_KEYS:
        return "a value of the wrong kind"
    return repr(value)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and name != "profiles" and not name.startswith("profiles."):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """``FORUM_BRIDGE_SECTION_KEY=value`` -> ``section.key``; section names never hold an underscore."""
    found: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if not key:
            continue
        if section == "emergency" and key == "numbers":
            found["emergency.numbers"] = [n for n in value.replace(";", ",").split(",") if n.strip()]
        else:
            found[f"{section}.{key}"] = value
    return found


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the file (if any), apply environment overrides and then ``overrides`` (from flags)."""
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    raw: dict[str, Any] = {}
    source = ""
    if path is not None:
        source = str(path)
        import tomllib

        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError as exc:
            raise ConfigError("", f"configuration file {source} does not exist") from exc
        except OSError as exc:
            raise ConfigError("", f"configuration file {source} cannot be read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", f"configuration file {source} is not valid TOML: {exc}") from exc
    flat = _flatten(raw)
    flat.update(_from_environment(env))
    flat.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _build(flat, source)


def _build(flat: dict[str, Any], source: str) -> Settings:
    settings = Settings(source=source)
    values: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {"asterisk": {}, "freeswitch": {}}
    profiles = dict(settings.profiles)
    numbers: list[str] | None = None
    for key, value in flat.items():
        if key in _SCALARS:
            values[key] = _typed(key, value, _SCALARS[key])
        elif key == "emergency.numbers":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(n, str | int) for n in value):
                raise ConfigError(key, 'expected a list of numbers as strings, e.g. ["110", "112"]')
            numbers = [str(n).strip() for n in value]
            bad = [n for n in numbers if not n or not all(c in "0123456789*#+" for c in n)]
            if bad:
                raise ConfigError(key, f"not a dialable number: {bad[0]!r}")
        elif key == "web.allowed_hosts":
            if isinstance(value, str):  # from the environment: comma separated
                value = [h for h in value.split(",") if h.strip()]
            if not isinstance(value, list) or not all(isinstance(h, str) and h.strip() for h in value):
                raise ConfigError(key, 'expected a list of host names, e.g. ["pbx1.example.net"]')
            values[key] = tuple(h.strip().lower().rstrip(".") for h in value)
        elif key == "profiles":
            if not isinstance(value, Mapping):
                raise ConfigError(key, "expected tables such as [profiles.default] keepalive = 120")
            for name, body in value.items():
                profiles[name] = _profile(name, body)
        elif key in ("asterisk.agi_allow", "freeswitch.socket_allow"):
            section, _, option = key.partition(".")
            sections[section][option] = _networks(key, value)
        elif key.partition(".")[0] in _SECTION_TYPES:
            section, _, option = key.partition(".")
            known = {f.name: f.type for f in fields(_SECTION_TYPES[section])}
            if option not in known:
                raise ConfigError(key, "unknown key")
            kind = {"int": int, "float": float, "str": str, "bool": bool}[str(known[option])]
            sections[section][option] = _typed(key, value, kind)
        else:
            raise ConfigError(key, "unknown key")
    return _validated(settings, values, sections, profiles, numbers)


def _networks(key: str, value: Any) -> tuple[str, ...]:
    """An allow-list: addresses or networks, as a list or one comma-separated string (environment)."""
    if isinstance(value, str):
        value = [part for part in value.replace(";", ",").split(",") if part.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, 'expected a list of addresses or networks, e.g. ["127.0.0.1", "10.1.2.0/24"]')
    import ipaddress

    networks: list[str] = []
    for item in value:
        try:
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError as exc:
            raise ConfigError(key, f"not an address or network: {item.strip()[:60]!r}") from exc
        if network.prefixlen == 0:
            raise ConfigError(key, f"{network} would let any host take licences; name the PBX's addresses")
        networks.append(str(network))
    return tuple(networks)


def _profile(name: str, body: Any) -> Profile:
    key = f"profiles.{name}"
    hidden = invisible_character(name)
    if hidden is not None or not name or len(name) > 64:
        problem = f"holds an invisible or control character ({hidden})" if hidden else "1 to 64 characters"
        raise ConfigError(key, f"not a profile name: {problem}")
    if not isinstance(body, Mapping):
        raise ConfigError(key, "expected a table with keepalive = SECONDS")
    unknown = set(body) - {"keepalive"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key")
    if "keepalive" not in body:
        raise ConfigError(f"{key}.keepalive", "missing")
    keepalive = _typed(f"{key}.keepalive", body["keepalive"], int)
    if keepalive < 1:
        raise ConfigError(f"{key}.keepalive", f"must be at least 1 second, got {keepalive}")
    return Profile(name, keepalive)


def _validated(
    settings: Settings,
    values: dict[str, Any],
    sections: dict[str, dict[str, Any]],
    profiles: dict[str, Profile],
    numbers: list[str] | None,
) -> Settings:
    count = values.get("licences.count", settings.licence_count)
    if not 0 <= count <= 100_000:
        raise ConfigError("licences.count", f"must be between 0 and 100000, got {count}")
    warn_at = values.get("licences.warn_at", settings.licence_warn_at)
    if not 0 <= warn_at <= 100:
        raise ConfigError("licences.warn_at", f"must be a percentage from 0 (off) to 100, got {warn_at}")
    region = values.get("emergency.region", "").strip().upper()
    if region and not region_is_known(region):
        raise ConfigError("emergency.region", f"unknown country code {region!r} (use e.g. DE, AT, GB, US)")
    prefix = values.get("emergency.outside_line_prefix", "").strip()
    if prefix and not prefix.isdigit():
        raise ConfigError("emergency.outside_line_prefix", f"must be digits, got {prefix!r}")
    stale_after = values.get("emergency.block_stale_after", settings.block_stale_after)
    if stale_after != 0 and not MIN_BLOCK_STALE_AFTER <= stale_after <= 86_400:
        raise ConfigError(
            "emergency.block_stale_after",
            f"must be 0 (never stale) or from {MIN_BLOCK_STALE_AFTER} to 86400 seconds, got {stale_after}",
        )
    grace = values.get("keepalive.grace", settings.keepalive_grace)
    if grace < 0:
        raise ConfigError("keepalive.grace", f"must not be negative, got {grace}")
    default_profile = values.get("keepalive.default_profile", settings.default_profile)
    if default_profile not in profiles:
        raise ConfigError("keepalive.default_profile", f"no profile named {default_profile!r}")
    level = values.get("log.level", settings.log_level).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("log.level", f"must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    node = values.get("node.name", settings.node_name).strip()
    if not node:
        raise ConfigError("node.name", "must not be empty")
    hidden = invisible_character(node)
    if hidden is not None or len(node) > 128:
        problem = f"holds an invisible or control character ({hidden})" if hidden else "over 128 characters"
        raise ConfigError("node.name", problem)
    dead_after = values.get("node.dead_after", settings.node_dead_after)
    if not 5 <= dead_after <= 86_400:
        raise ConfigError("node.dead_after", f"must be between 5 and 86400 seconds, got {dead_after}")
    asterisk = replace(settings.asterisk, **sections["asterisk"])
    freeswitch = replace(settings.freeswitch, **sections["freeswitch"])
    _check_section("asterisk", asterisk.enforce, ENFORCE_MODES, asterisk.fail_mode)
    if not 0.5 <= asterisk.hook_timeout <= 30.0:
        raise ConfigError(
            "asterisk.hook_timeout", f"must be from 0.5 to 30 seconds, got {asterisk.hook_timeout:g}"
        )
    _check_section("freeswitch", freeswitch.enforce, FREESWITCH_ENFORCE_MODES, freeswitch.fail_mode)
    if not 2 <= freeswitch.hook_timeout <= 30:
        # 1 could fire at once: the scheduler rounds to whole seconds.
        raise ConfigError(
            "freeswitch.hook_timeout", f"must be from 2 to 30 seconds, got {freeswitch.hook_timeout}"
        )
    for key, port in (
        ("asterisk.ami_port", asterisk.ami_port),
        ("asterisk.agi_port", asterisk.agi_port),
        ("freeswitch.esl_port", freeswitch.esl_port),
        ("freeswitch.socket_port", freeswitch.socket_port),
        ("web.port", values.get("web.port", settings.web.port)),
    ):
        if not 0 <= port <= 65535:
            raise ConfigError(key, f"must be a port number from 0 to 65535, got {port}")
    web = replace(
        settings.web,
        enabled=values.get("web.enabled", settings.web.enabled),
        host=values.get("web.host", settings.web.host),
        port=values.get("web.port", settings.web.port),
        token=values.get("web.token", settings.web.token),
        allowed_hosts=values.get("web.allowed_hosts", settings.web.allowed_hosts),
        max_connections=values.get("web.max_connections", settings.web.max_connections),
    )
    if not 1 <= web.max_connections <= 1024:
        raise ConfigError("web.max_connections", f"must be between 1 and 1024, got {web.max_connections}")
    retention = Retention(
        audit_days=values.get("retention.audit_days", settings.retention.audit_days),
        usage_days=values.get("retention.usage_days", settings.retention.usage_days),
    )
    for key, days in (
        ("retention.audit_days", retention.audit_days),
        ("retention.usage_days", retention.usage_days),
    ):
        if days < 0:
            raise ConfigError(key, f"must be 0 (keep for ever) or a number of days, got {days}")
        if 0 < days < 2 and key == "retention.usage_days":
            raise ConfigError(key, "must be 0 or at least 2: the status page draws the last 24 hours")
    url = values.get("database.url", settings.database_url).strip()
    if "://" not in url:
        raise ConfigError(
            "database.url", "expected a URL such as sqlite:///path/to/file.db or postgresql://..."
        )
    emergency = EmergencyNumbers.of(
        numbers if numbers is not None else sorted(settings.emergency.numbers), region, prefix
    )
    if not emergency.numbers and not emergency.region:
        raise ConfigError("emergency.numbers", "no emergency numbers: set a list or emergency.region")
    return replace(
        settings,
        database_url=url,
        licence_count=count,
        licence_warn_at=warn_at,
        emergency=emergency,
        block_after_failed_logon=values.get("emergency.block_after_failed_logon", True),
        block_stale_after=stale_after,
        profiles=profiles,
        default_profile=default_profile,
        keepalive_grace=grace,
        node_name=node,
        node_dead_after=dead_after,
        asterisk=asterisk,
        freeswitch=freeswitch,
        web=web,
        retention=retention,
        log_level=level,
    )


def _check_section(section: str, enforce: str, modes: tuple[str, ...], fail_mode: str) -> None:
    if enforce not in modes:
        raise ConfigError(f"{section}.enforce", f"must be one of {', '.join(modes)}, got {enforce!r}")
    if fail_mode not in FAIL_MODES:
        raise ConfigError(f"{section}.fail_mode", f"must be closed or open, got {fail_mode!r}")
