"""Benchmarks of mmscale against the tools users would pick instead; see benchmarks/run.py."""
