"""The options of every ``torch.compile`` call fusedrl makes, and the compiled kernels of the ops.

Kept in the op layer (the bottom of ops -> runtime -> trainers -> cli) so that the ops' ``compiled`` backends and the
runtime's loss regions and blocks (``fusedrl.runtime.compile``) share one set of options. Nothing is compiled or
configured at import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def compile_options(*, exact_casts: bool = False) -> dict:
    """The arguments of every ``torch.compile`` call, with the reason for each.

    - ``fullgraph=True``: a graph break would silently fall back to eager for part of the region and lose the fusion
      that is the point; an error names the construct instead.
    - ``dynamic=True``: sequence lengths change every batch and the last chunk of a fused op is shorter; symbolic
      sizes from the first compile give one graph instead of one per shape (automatic dynamic would compile twice:
      static first, dynamic on the first new shape). Measured on the 2-core CPU, a [256, 32000] row-statistics chunk
      runs within noise of the static-shape code (26-34 ms both).
    - ``mode`` left at the default: ``reduce-overhead`` records CUDA graphs, which need static shapes and would
      re-record for every length; ``max-autotune`` benchmarks GEMM configurations for minutes per shape.
    - ``exact_casts`` (``emulate_precision_casts``): inside one fused kernel Inductor keeps ``x.to(bf16).float()``
      in fp32 and skips the rounding. An op that scores the value it rounds for storage asks for the rounding (the
      DDIM step's bf16 draw: scored unrounded, its log-prob was 1e-2 off the log-prob of the stored sample, and
      DDPO's clip range is 1e-4); the others keep the default.
    """
    options: dict = {"fullgraph": True, "dynamic": True}
    if exact_casts:
        options["options"] = {"emulate_precision_casts": True}
    return options


@functools.cache
def compile_kernel(fn: F, *, exact_casts: bool = False) -> F:
    """Compile one tensor-math function of an op, cached per function so every caller shares one
    compiled artifact and its recompile budget (torch's limit is 8 graphs per code object)."""
    return torch.compile(fn, **compile_options(exact_casts=exact_casts))
