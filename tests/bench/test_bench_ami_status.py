"""The storm and status benchmarks at a small size, as a correctness smoke test (no timing asserted).

Each must run alone, print one JSON figure per line, and get the answers right: every phone of the
storm logged on, no resync triggered, and the status figures produced on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"figure", "unit", "median", "runs", "floor", "floor_note", "target", "met"}


def figures(script: str, *args: str) -> dict[str, dict[str, Any]]:
    """Run ``bench/<script>`` and return its figures by name."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--size", "small", "--runs", "1", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    for line in lines:
        assert set(line) == KEYS, line
        assert len(line["runs"]) == 1
    return {line["figure"]: line for line in lines}


@pytest.mark.postgres
def test_the_storm_benchmark_logs_every_phone_on_without_a_resync(postgres_url: str) -> None:
    found = figures("bench_storm.py", "--postgres", postgres_url)
    for database in ("sqlite", "postgresql"):
        assert found[f"storm_seconds_{database}"]["median"] > 0
        assert found[f"storm_resyncs_{database}"]["median"] == 0
        assert found[f"storm_resyncs_{database}"]["met"] is True
        assert found[f"storm_peak_rss_mb_{database}"]["median"] > 0
    assert found["storm_seconds_sqlite"]["floor"] > 0  # panoramisk alone read the same frames


@pytest.mark.postgres
def test_the_status_benchmark_measures_the_cli_the_page_and_metrics(postgres_url: str) -> None:
    found = figures("bench_status.py", "--postgres", postgres_url)
    for database in ("sqlite", "postgresql"):
        for name in (
            "status_cli_seconds",
            "status_document_seconds",
            "page_seconds",
            "metrics_scrape_seconds",
        ):
            assert found[f"{name}_{database}"]["median"] > 0
