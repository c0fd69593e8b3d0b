"""bench_sweep.py runs at ``--size small --runs 1`` on both databases and prints well-formed figures.

A smoke test of the script, never of a speed: the script itself asserts that nothing expires in its
simulated minute (every contact is well inside its keepalive).
"""

from __future__ import annotations

import pytest

from tests.bench.test_bench_smoke import bench, by_name


@pytest.mark.postgres
def test_sweep_benchmark_measures_both_databases(postgres_url: str) -> None:
    names = by_name(bench("bench_sweep.py", "--postgres", postgres_url))
    for db in ("sqlite", "postgresql"):
        cpu = names[f"sweep_cpu_ms_per_second_{db}"]
        assert cpu["unit"] == "ms" and cpu["floor"] is not None
        assert names[f"sweep_wall_ms_per_second_{db}"]["runs"]
