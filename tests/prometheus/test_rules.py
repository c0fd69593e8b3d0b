"""The Prometheus alert rules: checked and unit-tested by the real promtool, on metrics that exist.

promtool comes with Debian's ``prometheus`` package (the test command installs it). The unit tests in
``forum-bridge.rules.test.yml`` feed each alert series that must fire and series that must not; the
tests here also make sure every metric the rules and their tests name is one the bridge exports, so a
renamed metric cannot leave an alert that silently never fires.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forum_bridge.core.events import LoggedOn
from forum_bridge.errors import StoreError
from forum_bridge.metrics import Metrics
from tests.web.conftest import Bridge, make_bridge

HERE = Path(__file__).resolve().parent
RULES = HERE.parents[1] / "deploy" / "prometheus" / "forum-bridge.rules.yml"
RULE_TESTS = HERE / "forum-bridge.rules.test.yml"
ALERTS = {
    "ForumBridgeDown",
    "ForumBridgePbxDisconnected",
    "ForumBridgePbxModuleMissing",
    "ForumBridgeLicencePoolHigh",
    "ForumBridgeLicencePoolExhausted",
    "ForumBridgeDatabaseDown",
    "ForumBridgeDecisionsFailing",
    "ForumBridgeKeepaliveBacklog",
    "ForumBridgeEventsLagging",
    "ForumBridgeEventsDropped",
}


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Bridge]:
    """A started service with two licences on a fresh SQLite file, and its metrics."""
    made = make_bridge(tmp_path)
    yield made
    made.service.database.dispose()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is missing (Debian package 'prometheus'); the test command installs it", pytrace=False
        )
    return path


def run_promtool(*args: str) -> str:
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules() -> None:
    assert "SUCCESS: 10 rules found" in run_promtool("check", "rules", str(RULES))


def test_every_alert_fires_and_stays_quiet_where_it_should() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", RULE_TESTS.name)
    tested = set(re.findall(r'alertname: "(\w+)"', RULE_TESTS.read_text(encoding="utf-8")))
    assert tested == ALERTS == set(re.findall(r"- alert: (\w+)", RULES.read_text(encoding="utf-8")))
    text = RULE_TESTS.read_text(encoding="utf-8")
    for alert in ALERTS:  # each alert has a case that must not fire as well as one that must
        cases = re.findall(rf'alertname: "{alert}"\n\s+exp_alerts:( \[\])?', text)
        assert "" in cases and " []" in cases, alert


def exported(metrics: Metrics) -> set[str]:
    body, _ = metrics.render()
    return {s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_the_rules_only_use_metrics_the_bridge_exports(bridge: Bridge) -> None:
    bridge.metrics.observe_event_lag(0.2)
    bridge.metrics.set_module_missing("res_agi", False)  # exported once the PBX was checked
    names = exported(bridge.metrics)
    for path in (RULES, RULE_TESTS):
        used = set(re.findall(r"\bforum_bridge_[a-z_]+", path.read_text(encoding="utf-8")))
        assert used, path
        assert used <= names, f"{path.name} names metrics the bridge does not export: {sorted(used - names)}"


def sample(metrics: Metrics, name: str) -> float:
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name:
                return float(s.value)
    raise AssertionError(f"{name} not exported")


def test_pool_gauges_count_reserved_licences_apart(bridge: Bridge) -> None:
    bridge.log_on("21-desk", "21")
    bridge.service.add_subscriber("lift", "90", reserved=True)
    assert (
        sample(bridge.metrics, "forum_bridge_licences_reserved"),
        sample(bridge.metrics, "forum_bridge_licences_free"),
    ) == (1, 1)
    assert bridge.service.authorize("21-desk", "600").takes_licence
    assert sample(bridge.metrics, "forum_bridge_licences_free") == 0
    assert sample(bridge.metrics, "forum_bridge_licences_used") == 1


def test_keepalive_overdue_counts_contacts_the_sweep_has_not_logged_off(bridge: Bridge) -> None:
    bridge.log_on("21-desk", "21")
    bridge.service.apply(LoggedOn("trunk", at=bridge.clock(), contact="sip:trunk@127.0.0.1"))
    bridge.service.set_profile("short", 30)
    bridge.service.add_subscriber("22-desk", "22", "short")
    bridge.service.apply(LoggedOn("22-desk", at=bridge.clock(), contact="sip:22@127.0.0.1"))
    assert sample(bridge.metrics, "forum_bridge_keepalive_overdue") == 0
    bridge.clock.advance(seconds=30 + bridge.settings.keepalive_grace + 1)  # past "short" only
    assert sample(bridge.metrics, "forum_bridge_keepalive_overdue") == 1
    bridge.clock.advance(seconds=120)  # past the default profile too, the unmanaged trunk included
    assert sample(bridge.metrics, "forum_bridge_keepalive_overdue") == 3
    bridge.service.expire_keepalives()
    assert sample(bridge.metrics, "forum_bridge_keepalive_overdue") == 0


def test_a_call_the_database_could_not_decide_is_counted(bridge: Bridge) -> None:
    bridge.log_on("21-desk", "21")
    assert sample(bridge.metrics, "forum_bridge_decision_errors_total") == 0
    bridge.service.database.engine.dispose()
    bridge.service.database.downgrade()  # every query fails now
    with pytest.raises(StoreError):
        bridge.service.authorize("21-desk", "600")
    assert bridge.service.authorize("21-desk", "112").allowed  # emergency calls still pass ...
    assert sample(bridge.metrics, "forum_bridge_decision_errors_total") == 2  # ... but count too
