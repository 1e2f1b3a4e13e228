"""Benchmarks: a declarative list of cases (``cases.py``), the paths they compare (``peers.py``), one runner (``run.py``)."""
