"""Benchmarks: a declarative list of cases (``cases.py``, one module per op under ``ops/``), the paths they compare
(``peers*.py``), one runner (``run.py``)."""
