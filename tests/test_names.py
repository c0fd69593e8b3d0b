"""Names hold nothing invisible: a spreadsheet's byte order mark or a zero-width space must never
make a second, identical-looking log-on, nor a log-on the PBX's reports never match."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from forum_bridge.cli import main
from forum_bridge.config import Settings, load_settings
from forum_bridge.core import LoggedOn, Reason
from forum_bridge.errors import AlreadyExistsError, ConfigError, InvalidInputError
from forum_bridge.service import BridgeService
from forum_bridge.store.models import SubscriberRow
from tests.conftest import FakeClock, SettingsFactory

ServiceFactory = Callable[[Settings], BridgeService]


@pytest.fixture
def svc(make_settings: SettingsFactory, make_service: ServiceFactory, database_url: str) -> BridgeService:
    """One licence on the database under test."""
    return make_service(make_settings(**{"database.url": database_url, "licences.count": 1}))


def test_a_csv_with_a_byte_order_mark_imports_the_names_as_written(
    svc: BridgeService, clock: FakeClock
) -> None:
    assert svc.import_subscribers("\ufefflogon,number\r\n21-desk,21\r\n22-desk,22\r\n") == 2
    logons = [s["logon"] for s in svc.status()["subscribers"]]
    assert logons == ["21-desk", "22-desk"]
    with pytest.raises(AlreadyExistsError):
        svc.add_subscriber("21-desk", "21")
    # The PBX's 21-desk is the managed one: its call takes the licence, the next one is refused.
    svc.apply(LoggedOn("21-desk", clock(), contact="sip:21-desk@192.0.2.7"))
    svc.apply(LoggedOn("22-desk", clock(), contact="sip:22-desk@192.0.2.8"))
    assert svc.authorize("21-desk", "600").reason is Reason.LICENCE_ACQUIRED
    assert svc.authorize("22-desk", "600").reason is Reason.EMERGENCY_ONLY


def test_a_byte_order_mark_on_the_first_data_line_is_stripped_too(svc: BridgeService) -> None:
    assert svc.import_subscribers("\ufeff21-desk,21\n") == 1
    assert [s["logon"] for s in svc.status()["subscribers"]] == ["21-desk"]


@pytest.mark.parametrize(
    "name",
    [
        "21\u200b-desk",
        "21\u00addesk",
        "21-desk\x07",
        "\u202e21-desk",
        "21\u2028desk",
        "21\u00a0desk",
        "\ufeff21-desk",
    ],
)
def test_invisible_and_control_characters_are_refused_in_log_on_names(svc: BridgeService, name: str) -> None:
    with pytest.raises(InvalidInputError, match=r"invisible or control character \(U\+"):
        svc.add_subscriber(name, "21")
    assert svc.status()["subscribers"] == []


def test_an_invisible_character_anywhere_refuses_the_whole_import(svc: BridgeService) -> None:
    with pytest.raises(InvalidInputError, match=r"line 3: .*U\+200B"):
        svc.import_subscribers("21-desk,21\n22-desk,22\n\u200b21-desk,23\n")
    assert svc.status()["subscribers"] == []


def test_numbers_are_ascii_digits_only(svc: BridgeService) -> None:
    for number in ("\u0662\u0661", "\uff12\uff11", "2\u00b9"):  # Arabic-Indic, fullwidth, superscript
        with pytest.raises(InvalidInputError, match="invalid call number"):
            svc.add_subscriber("21-desk", number)
    with pytest.raises(ConfigError, match=r"emergency\.numbers"):
        load_settings(environ={}, overrides={"emergency.numbers": ["\uff11\uff11\uff12"]})


def test_profile_and_node_names_refuse_invisible_characters(svc: BridgeService, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        svc.set_profile("mobile\u200b", 600)
    config = tmp_path / "fb.toml"
    config.write_text('[profiles."mobile\\u200b"]\nkeepalive = 600\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"profiles\.mobile.*U\+200B"):
        load_settings(config, environ={})
    with pytest.raises(ConfigError, match=r"node\.name.*U\+0007"):
        load_settings(environ={"FORUM_BRIDGE_NODE_NAME": "pbx\x071"})


def test_the_command_imports_a_spreadsheet_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("FORUM_BRIDGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FORUM_BRIDGE_DATABASE_URL", f"sqlite:///{tmp_path}/fb.db")
    csv_file = tmp_path / "phones.csv"
    csv_file.write_text("logon,number\r\n21-desk,21\r\n", encoding="utf-8-sig")  # as spreadsheets save it
    runner = CliRunner()
    assert runner.invoke(main, ["db", "upgrade"]).exit_code == 0
    result = runner.invoke(main, ["subscriber", "import", str(csv_file)])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(main, ["subscriber", "list", "--json"])
    assert '"logon": "21-desk"' in listed.output and "\\ufeff" not in listed.output
    again = runner.invoke(main, ["subscriber", "add", "21-desk", "--number", "21"])
    assert again.exit_code == 1 and "exists already" in again.output


def test_a_name_stored_before_the_check_is_reported_at_start(
    make_settings: SettingsFactory, make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings()
    svc = make_service(settings)
    with svc.database.transaction() as session:  # as an earlier release stored a spreadsheet's name
        session.add(
            SubscriberRow(logon="\ufeff21-desk", number="21", profile="default", created_at=svc.clock())
        )
    caplog.clear()
    svc.start()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("'\\ufeff21-desk'" in w and "U+FEFF" in w for w in warnings), warnings
    svc.remove_subscriber("\ufeff21-desk")  # removing it needs no valid name
    caplog.clear()
    svc.start()
    assert not [r for r in caplog.records if "invisible" in r.getMessage()]
