"""Every torch.compile setting fusedrl uses, in one place, applied when first needed (never at import)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


@functools.cache
def compile_kernel(fn: F) -> F:
    """Compile one tensor-math function of ``fusedrl.kernels`` (a chunk of row statistics, a loss tail).

    - ``fullgraph=True``: these functions are pure tensor math; a graph break would silently fall back to eager
      and lose the fusion that is the whole point.
    - ``dynamic=True``: chunk rows, vocabulary and hidden sizes vary (the last chunk of a call is shorter, each
      model has its own V); symbolic sizes from the first compile give one graph per dtype instead of a recompile
      per shape. Measured on the 2-core CPU, a [256, 32000] row-statistics chunk runs within noise of the
      static-shape code (26-34 ms both).
    - cached per function so every caller shares one compiled artifact and its recompile budget.
    """
    return torch.compile(fn, fullgraph=True, dynamic=True)
