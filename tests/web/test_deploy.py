"""The deployment files: the example configuration loads and explains every key, the secrets example
names real settings, and the systemd units are valid and carry the directives the install relies on."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from forum_bridge.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EXAMPLE = DEPLOY / "forum-bridge.example.toml"
SECRETS = DEPLOY / "secrets.env.example"
UNITS = {
    "asterisk": DEPLOY / "systemd/forum-bridge-asterisk.service",
    "freeswitch": DEPLOY / "systemd/forum-bridge-freeswitch.service",
}
SYSUSERS = DEPLOY / "systemd/forum-bridge.sysusers.conf"
BINARY = "/opt/forum-bridge/bin/forum-bridge"
CONFIG = "/etc/forum-bridge/forum-bridge.toml"

KEYS = {
    "database": ["url"],
    "licences": ["count", "warn_at"],
    "emergency": ["numbers", "region", "outside_line_prefix", "block_after_failed_logon"],
    "keepalive": ["grace", "default_profile"],
    "profiles.default": ["keepalive"],
    "node": ["name"],
    "log": ["level"],
    "retention": ["audit_days", "usage_days"],
    "web": ["enabled", "host", "port", "token", "allowed_hosts", "max_connections"],
    "asterisk": [
        "ami_host",
        "ami_port",
        "ami_username",
        "ami_secret",
        "agi_host",
        "agi_port",
        "enforce",
        "fail_mode",
        "reconnect_max",
        "action_timeout",
    ],
    "freeswitch": [
        "esl_host",
        "esl_port",
        "esl_password",
        "socket_host",
        "socket_port",
        "enforce",
        "fail_mode",
        "reconnect_max",
    ],
}
SECRET_KEYS = {("web", "token"), ("asterisk", "ami_secret"), ("freeswitch", "esl_password")}
_KEY_LINE = re.compile(r"^(#\s*)?([a-z_]+)\s*=")


def sections(text: str) -> dict[str, list[str]]:
    """Lines of the example file by [section]."""
    found: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        header = re.fullmatch(r"\[([a-z_.]+)\]", line.strip())
        if header:
            current = header.group(1)
            found[current] = []
        else:
            found[current].append(line)
    return found


def uncommented(text: str) -> str:
    """The example with its commented-out ``# key = value`` lines switched on."""
    return re.sub(r"^#\s*([a-z_]+\s*=)", r"\1", text, flags=re.MULTILINE)


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """``[Section] Key=Value`` lines of a unit file; repeated keys keep every value."""
    parsed: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            parsed[section] = {}
            continue
        key, _, value = line.partition("=")
        parsed[section].setdefault(key.strip(), []).append(value.strip())
    return parsed


# --- the example configuration --------------------------------------------------------------------


def test_example_configuration_loads() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert settings.licence_count == 4
    assert settings.emergency.numbers == frozenset({"110", "112"})
    assert settings.emergency.region == "DE"
    assert set(settings.profiles) == {"default", "mobile"}
    assert settings.node_name == "pbx1"
    assert (settings.web.enabled, settings.web.host, settings.web.port) == (True, "127.0.0.1", 8088)
    assert settings.web.token == ""  # a secret: not in the file
    assert settings.asterisk.enforce == "both"
    assert settings.freeswitch.socket_port == 8084


def test_example_configuration_names_and_explains_every_key() -> None:
    text = EXAMPLE.read_text()
    by_section = sections(text)
    for section, keys in KEYS.items():
        assert section in by_section, section
        present = {
            m.group(2): m.group(1) is not None for line in by_section[section] if (m := _KEY_LINE.match(line))
        }
        for key in keys:
            assert key in present, f"{section}.{key} is missing"
            # Secrets are shown commented out, everything else live, so the file works as it is.
            assert present[key] == ((section, key) in SECRET_KEYS), f"{section}.{key}"
        # Each run of key lines is introduced by a comment that explains it.
        lines = by_section[section]
        for i, line in enumerate(lines):
            if _KEY_LINE.match(line) and not line.startswith("#"):
                j = i - 1
                while j >= 0 and _KEY_LINE.match(lines[j]) and not lines[j].startswith("#"):
                    j -= 1
                assert j >= 0 and lines[j].startswith("#"), f"{section}: {line!r} has no comment"
    web_comments = " ".join(line.lstrip("# ") for line in by_section["web"] if line.startswith("#"))
    assert "Prefer the environment variable FORUM_BRIDGE_WEB_TOKEN" in web_comments


def test_example_with_every_commented_key_switched_on_still_loads(tmp_path: Path) -> None:
    full = tmp_path / "full.toml"
    full.write_text(uncommented(EXAMPLE.read_text()))
    data = tomllib.loads(full.read_text())
    assert {key for section, key in SECRET_KEYS} <= {
        key for section in data.values() if isinstance(section, dict) for key in section
    }
    settings = load_settings(full, environ={})
    assert settings.freeswitch.esl_password == "ClueCon"


def test_the_token_from_the_environment_overrides_the_file() -> None:
    settings = load_settings(EXAMPLE, environ={"FORUM_BRIDGE_WEB_TOKEN": "from-env"})
    assert settings.web.token == "from-env"


def test_secrets_example_names_real_settings() -> None:
    names = re.findall(r"^#?(FORUM_BRIDGE_[A-Z_]+)=", SECRETS.read_text(), flags=re.MULTILINE)
    assert set(names) == {
        "FORUM_BRIDGE_WEB_TOKEN",
        "FORUM_BRIDGE_ASTERISK_AMI_SECRET",
        "FORUM_BRIDGE_FREESWITCH_ESL_PASSWORD",
        "FORUM_BRIDGE_DATABASE_URL",
    }
    environ = {name: f"value-of-{name.lower()}" for name in names}
    environ["FORUM_BRIDGE_DATABASE_URL"] = "postgresql+psycopg://u:p@db/forum_bridge"
    settings = load_settings(EXAMPLE, environ=environ)
    assert settings.web.token == "value-of-forum_bridge_web_token"
    assert settings.asterisk.ami_secret == "value-of-forum_bridge_asterisk_ami_secret"
    assert settings.freeswitch.esl_password == "value-of-forum_bridge_freeswitch_esl_password"
    assert settings.database_url == "postgresql+psycopg://u:p@db/forum_bridge"
    # Shipped commented out: an empty value would replace a default (FreeSWITCH's ESL password).
    assert not re.search(r"^FORUM_BRIDGE_", SECRETS.read_text(), flags=re.MULTILINE)


# --- systemd --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pbx", ["asterisk", "freeswitch"])
def test_unit_has_the_required_directives(pbx: str) -> None:
    parsed = unit(UNITS[pbx])
    service = parsed["Service"]
    assert shlex.split(service["ExecStart"][0]) == [BINARY, "--config", CONFIG, "run", pbx]
    assert shlex.split(service["ExecStartPre"][0]) == [BINARY, "--config", CONFIG, "db", "upgrade"]
    expected = {
        "Restart": "on-failure",
        "RestartSec": "2",
        "User": "forum-bridge",
        "StateDirectory": "forum-bridge",
        "EnvironmentFile": "-/etc/forum-bridge/secrets.env",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "LimitNOFILE": "65536",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], key
    assert "ReadWritePaths" not in service  # StateDirectory= is the only writable place
    assert parsed["Install"]["WantedBy"] == ["multi-user.target"]


def test_sysusers_creates_the_unit_user() -> None:
    entries = [
        shlex.split(line) for line in SYSUSERS.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert entries == [
        [
            "u",
            "forum-bridge",
            "-",
            "forum_bridge licence bridge",
            "/var/lib/forum-bridge",
            "/usr/sbin/nologin",
        ]
    ]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the directives are checked by the test above")
    # A root with the distribution's units and a stand-in for the installed command, so verify can
    # check the ExecStart path without the bridge being installed on this machine.
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    binary = root / BINARY.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for path in UNITS.values():
        shutil.copy(path, root / "etc/systemd/system" / path.name)
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", *(path.name for path in UNITS.values())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys too, with a warning: any output is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
