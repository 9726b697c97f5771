"""Timing suites (pytest-benchmark and scripts); importable as `benchmarks.*` from the repository root."""
