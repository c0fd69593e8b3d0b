"""Settings: file, then environment, then flags; every bad value is one error naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from forum_bridge.config import load_settings
from forum_bridge.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "forum-bridge.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_file_keys_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[database]
url = "sqlite:///x.db"
[licences]
count = 7
[emergency]
numbers = ["112", "110", "19222"]
region = "de"
outside_line_prefix = "0"
block_after_failed_logon = false
[profiles.desk]
keepalive = 300
[node]
name = "pbx-a"
[asterisk]
ami_port = 15038
ami_secret = "topsecret"
enforce = "ami"
""",
    )
    s = load_settings(path, environ={})
    assert s.database_url == "sqlite:///x.db"
    assert s.licence_count == 7
    assert s.emergency.numbers == frozenset({"112", "110", "19222"})
    assert s.emergency.region == "DE"
    assert s.emergency.is_emergency("019222")
    assert s.block_after_failed_logon is False
    assert s.profiles["desk"].keepalive == 300
    assert "default" in s.profiles
    assert s.node_name == "pbx-a"
    assert (s.asterisk.ami_port, s.asterisk.ami_secret, s.asterisk.enforce) == (15038, "topsecret", "ami")


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[licences]\ncount = 3\n")
    env = {
        "FORUM_BRIDGE_LICENCES_COUNT": "5",
        "FORUM_BRIDGE_WEB_TOKEN": "tok",
        "FORUM_BRIDGE_EMERGENCY_NUMBERS": "112,911",
    }
    assert load_settings(path, environ=env).licence_count == 5
    assert load_settings(path, environ=env, overrides={"licences.count": 9}).licence_count == 9
    assert load_settings(path, environ=env).web.token == "tok"
    assert load_settings(path, environ=env).emergency.numbers == frozenset({"112", "911"})


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[licences]\ncount = 11\n")
    assert load_settings(environ={"FORUM_BRIDGE_CONFIG": str(path)}).licence_count == 11


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[licences]\ncount = -1\n", "licences.count"),
        ("[licences]\ncount = 'many'\n", "licences.count"),
        ("[licences]\ncolour = 1\n", "licences.colour"),
        ("[emergency]\nnumbers = ['11a']\n", "emergency.numbers"),
        ("[emergency]\nregion = 'XX'\n", "emergency.region"),
        ("[emergency]\nblock_after_failed_logon = 'maybe'\n", "emergency.block_after_failed_logon"),
        ("[emergency]\nblock_stale_after = 30\n", "emergency.block_stale_after"),
        ("[emergency]\nblock_stale_after = -1\n", "emergency.block_stale_after"),
        ("[emergency]\nblock_stale_after = 'soon'\n", "emergency.block_stale_after"),
        ("[asterisk]\nhook_timeout = 0.1\n", "asterisk.hook_timeout"),
        ("[asterisk]\nhook_timeout = 31\n", "asterisk.hook_timeout"),
        ("[profiles.desk]\nkeepalive = 0\n", "profiles.desk.keepalive"),
        ("[profiles.desk]\n", "profiles.desk.keepalive"),
        ("[asterisk]\nenforce = 'never'\n", "asterisk.enforce"),
        ("[asterisk]\nami_port = 70000\n", "asterisk.ami_port"),
        ("[asterisk]\nbogus = 1\n", "asterisk.bogus"),
        ("[freeswitch]\nfail_mode = 'ajar'\n", "freeswitch.fail_mode"),
        ("[database]\nurl = 'nothing'\n", "database.url"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ={})
    assert info.value.key == key
    assert key in str(info.value)
    assert "\n" not in str(info.value)


def test_the_emergency_bounds_default_and_read(tmp_path: Path) -> None:
    defaults = load_settings(environ={})
    assert defaults.block_stale_after == 300
    assert defaults.asterisk.hook_timeout == 2.0
    text = "[emergency]\nblock_stale_after = 0\n[asterisk]\nhook_timeout = 1.5\n"
    settings = load_settings(
        write(tmp_path, text), environ={"FORUM_BRIDGE_EMERGENCY_BLOCK_STALE_AFTER": "600"}
    )
    assert settings.block_stale_after == 600  # the environment over the file
    assert settings.asterisk.hook_timeout == 1.5


def test_broken_toml_and_missing_file_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[licences\n"), environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_secrets_are_not_in_repr_or_errors(tmp_path: Path) -> None:
    s = load_settings(
        write(
            tmp_path,
            "[asterisk]\nami_secret = 'hunter2'\n[freeswitch]\nesl_password = 'pw-xyz'\n[web]\ntoken = 'tk-abc'\n",
        ),
        environ={},
    )
    shown = repr(s)
    assert "hunter2" not in shown and "pw-xyz" not in shown and "tk-abc" not in shown
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[asterisk]\nami_secret = 12345\n"), environ={})
    assert "12345" not in str(info.value)
