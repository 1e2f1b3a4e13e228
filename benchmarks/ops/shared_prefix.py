"""Benchmark cases of the shared-prefix attention mask (``fusedrl/runtime/shared_prefix/``): which mask form to use
on this CPU, and what one attention call costs in each layout.

Legend: G prompts, K completions per prompt, P prompt tokens, C completion tokens, A heads, D head width.

Inputs and paths: ``peers_shared_prefix.py``, imported here so that every process that loads the cases has them.
"""

from __future__ import annotations

from benchmarks import peers_shared_prefix  # noqa: F401  (registers the "shared_prefix" inputs and paths)
from benchmarks.spec import Case

# A GRPO batch of the bench-head model's attention (4 heads of 64): 4 prompts of 256 tokens, 8 completions of 32.
_SHAPE = {"G": 4, "K": 8, "P": 256, "C": 32, "A": 4, "D": 64}
_QUICK_SHAPE = {"G": 2, "K": 4, "P": 64, "C": 16, "A": 4, "D": 64}
_DESCRIPTION = (
    "One attention call of a GRPO-shaped batch (G prompts x K completions), the shared-prefix layout under "
    "fusedrl's dense bool mask through SDPA against the plain layout's causal rows; shared rows are P + K * C "
    "positions, plain rows P + C"
)

CASES: tuple[Case, ...] = (
    Case(
        name="shared_prefix_attention",
        op="shared_prefix_attention",
        inputs="shared_prefix",
        shape=_SHAPE,
        quick_shape=_QUICK_SHAPE,
        paths=("fusedrl", "plain"),
        base="fusedrl",
        description=_DESCRIPTION + "; forward + backward (FlexAttention has no backward on CPU in torch 2.13)",
        repeats=10,
        quick_repeats=5,
    ),
    Case(
        name="shared_prefix_attention.no_grad",
        op="shared_prefix_attention",
        inputs="shared_prefix_no_grad",
        shape=_SHAPE,
        quick_shape=_QUICK_SHAPE,
        paths=("fusedrl", "flex", "plain"),
        base="fusedrl",
        description=_DESCRIPTION + "; forward only (a reference pass), plus the same rule as a compiled "
        "FlexAttention BlockMask",
        repeats=10,
        quick_repeats=5,
        warmup=2,
    ),
)
