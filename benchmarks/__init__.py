"""Benchmarks: scripts that measure and write their figures to benchmarks/results/."""
