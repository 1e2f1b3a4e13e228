"""Benchmark cases per fusedrl op: ``benchmarks/ops/<op>.py`` holds the cases of ``fusedrl/ops/<op>/``."""
