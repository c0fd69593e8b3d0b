"""Every benchmark runs at ``--size small --runs 1`` and prints well-formed figures.

These are correctness smoke tests of the benchmark scripts: nothing here asserts a speed. What
they do assert is what a benchmark checks on the way (every hook call answered, no licence ever
held twice in the shared pool), and the output convention bench/run.py relies on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"figure", "unit", "median", "runs", "floor", "floor_note", "target", "met"}


def bench(script: str, *args: str, timeout: float = 600) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--size", "small", "--runs", "1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    for figure in figures:
        assert set(figure) == KEYS, figure
        assert figure["median"] is not None and figure["runs"], figure
    return figures


def by_name(figures: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f["figure"]: f for f in figures}


@pytest.mark.postgres
def test_decision_benchmark(postgres_url: str) -> None:
    names = by_name(bench("bench_decisions.py", "--postgres", postgres_url))
    assert set(names) == {"service_decisions_per_s_sqlite", "service_decisions_per_s_postgresql"}


@pytest.mark.postgres
def test_hook_benchmark_answers_every_call_on_both_databases(postgres_url: str) -> None:
    # The script exits non-zero when a call got no answer.
    names = by_name(bench("bench_hook.py", "--postgres", postgres_url))
    assert set(names) == {
        "hook_floor_latency",
        *(f"hook_latency_sequential_{db}" for db in ("sqlite", "postgresql")),
        *(f"hook_latency_sequential_64_status_pollers_{db}" for db in ("sqlite", "postgresql")),
        *(f"hook_decisions_per_s_20_clients_{db}" for db in ("sqlite", "postgresql")),
    }
    assert names["hook_latency_sequential_sqlite"]["floor"] == names["hook_floor_latency"]["median"]


@pytest.mark.postgres
def test_pool_benchmark_never_gives_a_licence_twice(postgres_url: str) -> None:
    names = by_name(bench("bench_pool.py", "--postgres", postgres_url))
    for db in ("sqlite", "postgresql"):
        assert names[f"pool_licences_held_twice_{db}"]["median"] == 0
        assert names[f"pool_operations_per_s_4_processes_{db}"]["median"] > 0
    # The floor: the same transactions sent by pgbench (Debian's PostgreSQL ships it).
    assert names["pool_operations_per_s_4_processes_postgresql"]["floor"] > 0


@pytest.mark.asterisk
@pytest.mark.timeout(900)
def test_asterisk_call_benchmark_connects_every_call_with_and_without_the_hook() -> None:
    # The script exits non-zero unless SIPp got a 200 OK for every call of both variants.
    names = by_name(bench("bench_asterisk_calls.py", timeout=900))
    assert set(names) == {"asterisk_call_setup_with_hook", "asterisk_call_setup_ratio"}


@pytest.mark.postgres
def test_run_prints_the_table_with_the_machine(postgres_server: PostgresServer, tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--size",
            "small",
            "--runs",
            "1",
            "--only",
            "bench_decisions",
            "--postgres",
            postgres_server.url("postgres"),
            "--markdown",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert text == result.stdout.rstrip("\n") + "\n" or text.strip() == result.stdout.strip()
    assert "| service_decisions_per_s_sqlite | decisions/s |" in text
    assert "| service_decisions_per_s_postgresql | decisions/s |" in text
    for row in ("| CPU |", "| cores |", "| memory |", "| Python |", "| SQLite |", "| PostgreSQL | 1"):
        assert row in text, row


@pytest.mark.postgres
def test_freeswitch_storm_benchmark_decides_the_call_behind_the_storm(postgres_url: str) -> None:
    names = by_name(bench("bench_freeswitch_storm.py", "--postgres", postgres_url))
    for db in ("sqlite", "postgresql"):
        assert names[f"freeswitch_storm_seconds_{db}"]["floor"] > 0
        # The call placed behind the storm was allowed: decided on the REGISTER sent before it.
        assert names[f"freeswitch_storm_call_seconds_{db}"]["met"] is True
        assert names[f"freeswitch_storm_peak_rss_mb_{db}"]["median"] > 0
