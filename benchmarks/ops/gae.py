"""Benchmark case of the ``gae`` op (``fusedrl/ops/gae/``): the compiled loop-free scan against the Python loop over
T, forward only (no autograd).

Legend: B rows, T positions.

Inputs and paths: ``peers_gae.py`` ("gae"), imported here so that every process that loads the cases has them.
"""

from __future__ import annotations

from benchmarks import peers_gae  # noqa: F401  (registers the "gae" inputs and paths)
from benchmarks.spec import Case, Target

CASES: tuple[Case, ...] = (
    Case(
        name="gae",
        op="gae",
        inputs="gae",
        shape={"B": 256, "T": 4096},
        quick_shape={"B": 64, "T": 1024},
        paths=("fusedrl", "loop"),
        base="fusedrl",
        description=(
            "GAE (gamma 1, lam 0.95) over [B, T] fp32 rewards and values, right-padded rows (lengths uniform in "
            "[T/4, T]): fusedrl compiled (blocked scan, no loop over T) vs the reverse Python loop over T"
        ),
        targets=(Target("fusedrl", "speedup_min", 25.0, vs="loop"),),
        # A fusedrl call takes a few ms, a loop call ~0.15 s at full size: more repeats keep the median stable.
        repeats=15,
        quick_repeats=10,
    ),
)
