"""Benchmarks, run as `launch/bench.py <name>`: scripts whose numbers go to bench/RESULTS.md (never timed
tests)."""
