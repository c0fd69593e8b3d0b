"""Metrics: an own registry, decisions counted through the service's listener, gauges read at scrape
time, connection state and event lag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from forum_bridge.core.events import LoggedOff, LogonFailed
from forum_bridge.metrics import Metrics

from .conftest import Bridge, make_bridge


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Render and parse the metrics: {(sample name, sorted labels): value}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_uses_its_own_registry_so_two_instances_coexist(bridge: Bridge, tmp_path: Path) -> None:
    other = make_bridge(tmp_path)
    second = Metrics(other.service, "freeswitch")  # would raise "Duplicated timeseries" on one registry
    assert bridge.metrics.registry is not second.registry
    assert REGISTRY.get_sample_value("forum_bridge_licences_total") is None
    assert ("forum_bridge_pbx_connected", (("pbx", "freeswitch"),)) in samples(second)
    other.service.database.dispose()


def test_gauges_follow_the_service_at_scrape_time(bridge: Bridge) -> None:
    bridge.log_on("21-desk", "21")
    bridge.log_on("22-soft", "22")
    bridge.service.add_subscriber("23-desk", "23")
    assert bridge.service.authorize("21-desk", "600").takes_licence
    first = samples(bridge.metrics)
    assert first[("forum_bridge_licences_used", ())] == 1
    assert first[("forum_bridge_database_up", ())] == 1
    assert first[("forum_bridge_subscribers", (("state", "logged_on"),))] == 2
    assert first[("forum_bridge_subscribers", (("state", "logged_off"),))] == 1
    assert first[("forum_bridge_subscribers", (("state", "logon_failed"),))] == 0
    bridge.service.apply(LogonFailed("22-soft", at=bridge.clock()))
    bridge.service.apply(LoggedOff("21-desk", at=bridge.clock()))
    second = samples(bridge.metrics)
    assert second[("forum_bridge_licences_used", ())] == 0
    assert second[("forum_bridge_subscribers", (("state", "logon_failed"),))] == 1
    assert second[("forum_bridge_subscribers", (("state", "logged_off"),))] == 2


def test_every_decision_is_counted_by_result_and_reason(bridge: Bridge) -> None:
    bridge.log_on("21-desk", "21")
    before = samples(bridge.metrics)
    # Every reason exists before it first happens, so rate() reads 0 rather than "no data".
    assert before[("forum_bridge_decisions_total", (("reason", "emergency_only"), ("result", "denied")))] == 0
    assert before[("forum_bridge_decisions_total", (("reason", "emergency"), ("result", "allowed")))] == 0
    bridge.service.authorize("21-desk", "600")  # licence_acquired
    bridge.service.authorize("21-desk", "601")  # licensed
    bridge.service.authorize("21-desk", "112")  # emergency
    bridge.service.authorize("nobody", "600")  # unmanaged
    bridge.service.add_subscriber("22-soft", "22")
    bridge.service.authorize("22-soft", "600")  # not_logged_on
    after = samples(bridge.metrics)
    for result, reason in (
        ("allowed", "licence_acquired"),
        ("allowed", "licensed"),
        ("allowed", "emergency"),
        ("allowed", "unmanaged"),
        ("denied", "not_logged_on"),
    ):
        assert after[("forum_bridge_decisions_total", (("reason", reason), ("result", result)))] == 1, reason


def test_connection_state_and_event_lag(bridge: Bridge) -> None:
    assert samples(bridge.metrics)[("forum_bridge_pbx_connected", (("pbx", "asterisk"),))] == 0
    bridge.metrics.set_connected(True)
    assert samples(bridge.metrics)[("forum_bridge_pbx_connected", (("pbx", "asterisk"),))] == 1
    bridge.metrics.set_connected(False)
    assert samples(bridge.metrics)[("forum_bridge_pbx_connected", (("pbx", "asterisk"),))] == 0
    bridge.metrics.observe_event_lag(0.003)
    bridge.metrics.observe_event_lag(1.5)
    bridge.metrics.observe_event_lag(-2.0)  # clock skew between PBX and bridge: counted as no lag
    values = samples(bridge.metrics)
    assert values[("forum_bridge_event_lag_seconds_count", ())] == 3
    assert values[("forum_bridge_event_lag_seconds_sum", ())] == 1.503
    assert values[("forum_bridge_event_lag_seconds_bucket", (("le", "0.005"),))] == 2
    assert values[("forum_bridge_event_lag_seconds_bucket", (("le", "2.5"),))] == 3


def test_a_missing_pbx_module_is_a_gauge_per_module(bridge: Bridge) -> None:
    name = "forum_bridge_pbx_module_missing"
    assert not [key for key in samples(bridge.metrics) if key[0] == name]  # nothing known before a check
    bridge.metrics.set_module_missing("func_db", True)
    bridge.metrics.set_module_missing("res_agi", False)
    found = {labels: value for (sample, labels), value in samples(bridge.metrics).items() if sample == name}
    pbx = bridge.metrics.pbx
    assert found == {
        (("module", "func_db"), ("pbx", pbx)): 1.0,
        (("module", "res_agi"), ("pbx", pbx)): 0.0,
    }
    bridge.metrics.set_module_missing("func_db", False)
    assert samples(bridge.metrics)[(name, (("module", "func_db"), ("pbx", pbx)))] == 0.0


def test_a_scrape_reads_counts_not_the_status_document(bridge: Bridge, monkeypatch: Any) -> None:
    bridge.log_on("21-desk", "21")

    def not_for_metrics(**_: Any) -> Any:
        raise AssertionError("/metrics read the whole status document")

    monkeypatch.setattr(bridge.service, "status", not_for_metrics)
    values = samples(bridge.metrics)
    assert values[("forum_bridge_database_up", ())] == 1
    assert values[("forum_bridge_subscribers", (("state", "logged_on"),))] == 1
