"""Smoke tests of the benchmarks (bench/): each runs at its small size, never timed."""
