"""Run every benchmark (bench/bench_*.py) and print one table: each figure beside its floor and target.

    .venv/bin/python bench/run.py [--runs N] [--size small|full] [--postgres URL] [--only NAME ...]
                                  [--markdown FILE]

Each script runs as a subprocess with ``--runs N --size S`` (when it takes them) and ``--postgres``:
the URL given, or a throwaway PostgreSQL server started here from Debian's binaries (default
settings) for the length of the run, with a fresh database per script. The table lists medians of
the runs, the floor each figure is compared with, the target and whether it is met, then the
machine: CPU model, cores, memory, load, Python, SQLite and PostgreSQL versions. ``--markdown``
also writes it as Markdown (bench/README.md holds the latest). Exit status 1 when a script failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common

HERE = Path(__file__).resolve().parent


def machine(postgres_url: str | None) -> list[tuple[str, str]]:
    """What the figures were measured on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    postgres = "not measured"
    if postgres_url:
        with contextlib.suppress(Exception):
            import psycopg

            with psycopg.connect(postgres_url) as connection:
                row = connection.execute("SHOW server_version").fetchone()
                postgres = str(row[0]) if row else "unknown"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("memory", memory),
        ("load average at the end (1, 5, 15 min)", load),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("SQLite", sqlite3.sqlite_version),
        ("PostgreSQL", postgres),
    ]


def takes_postgres(script: Path) -> bool:
    """Whether a benchmark script accepts ``--postgres``."""
    text = script.read_text(encoding="utf-8")
    return "--postgres" in text or ("_common.options(" in text and "postgres=False" not in text)


def run_script(
    script: Path, args: argparse.Namespace, postgres: str | None
) -> tuple[list[dict[str, Any]], str]:
    """Run one benchmark; its figure lines and, if it failed, why."""
    argv = [sys.executable, str(script)]
    if "--size" in script.read_text(encoding="utf-8"):
        argv += ["--runs", str(args.runs), "--size", args.size]
    if postgres and takes_postgres(script):
        argv += ["--postgres", postgres]
    _common.say(f"==> {script.name}")
    began = time.monotonic()
    result = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    figures = []
    for line in result.stdout.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(line)
            if isinstance(value, dict) and "figure" in value:
                figures.append(value)
    took = time.monotonic() - began
    _common.say(f"    {len(figures)} figures in {took:.0f} s, exit {result.returncode}")
    return figures, "" if result.returncode == 0 else f"{script.name} exited {result.returncode}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(
    figures: list[dict[str, Any]], machine_rows: list[tuple[str, str]], args: argparse.Namespace
) -> str:
    """The Markdown table of every figure, then the machine."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"Medians of {args.runs} run(s) each, size {args.size}, measured {when}.",
        "",
        "| figure | unit | median | runs | floor | target | met | floor is |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        met = {True: "yes", False: "**no**", None: "-"}[f.get("met")]
        runs = ", ".join(_fmt(r) for r in f.get("runs", []))
        lines.append(
            f"| {f['figure']} | {f['unit']} | {_fmt(f['median'])} | {runs} | {_fmt(f.get('floor'))} |"
            f" {f.get('target', '-')} | {met} | {f.get('floor_note', '')} |"
        )
    lines += ["", "| machine | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in machine_rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the benchmarks and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--postgres", help="URL of a PostgreSQL server's admin database (default: start one)")
    parser.add_argument("--only", nargs="*", help="run only these scripts (e.g. bench_hook)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    # Stopped with SIGTERM: still stop the throwaway PostgreSQL on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem in args.only or s.name in args.only]
    figures: list[dict[str, Any]] = []
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        admin = args.postgres or stack.enter_context(_common.throwaway_postgres())
        for n, script in enumerate(scripts):
            database = (
                _common.create_database(admin, f"forum_bridge_bench_{n}") if takes_postgres(script) else None
            )
            found, failure = run_script(script, args, database)
            figures += found
            if failure:
                failures.append(failure)
        machine_rows = machine(admin)
    text = table(figures, machine_rows, args)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    for failure in failures:
        _common.say(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
