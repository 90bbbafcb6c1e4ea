"""Reproducible performance suite for `landscapes` (not part of the test run).

Run ``python -m benchmarks --help``; ``docs/benchmarks.md`` explains the workloads, the
contenders and the targets.
"""
