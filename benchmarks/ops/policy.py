"""Benchmark case of the ``policy`` op (``fusedrl/ops/policy/``): ``linear_policy_loss`` with TRL's default GRPO
loss (dapo, epsilon 0.2, beta 0) from hidden states.

Legend: B sequences (completions), T completion positions, H hidden, V vocabulary.

Inputs and paths: ``peers_grpo.py`` ("grpo"), imported here so that every process that loads the cases has them.
"""

from __future__ import annotations

from benchmarks import peers_grpo  # noqa: F401  (registers the "grpo" inputs and paths)
from benchmarks.spec import Case, Target

CASES: tuple[Case, ...] = (
    Case(
        name="linear_policy_loss.grpo",
        op="linear_policy_loss",
        inputs="grpo",
        shape={"B": 16, "T": 1024, "H": 1024, "V": 32000},
        quick_shape={"B": 4, "T": 256, "H": 512, "V": 8000},
        paths=("fusedrl", "fusedrl_recompute", "trl", "liger", "floor"),
        base="fusedrl",
        description=(
            "GRPO loss (dapo, epsilon 0.2, beta 0, token-level ratios, given old log-probs) from the completion "
            "positions' hidden states [B, T, H] and the LM head, fwd+bwd (grad hidden, weight); right-padded "
            "completions, lengths uniform in [T/2, T]. fusedrl computes entropies too (TRL logs them), Liger does not. "
            "floor: the 3 GEMM passes (logits, grad hidden, grad weight) over the completion tokens alone"
        ),
        targets=(
            Target("fusedrl", "peak_ratio_max", 0.5, vs="trl"),
            Target("fusedrl", "time_ratio_max", 1.0, vs="liger"),
            # Issue 10: the per-sequence loss gives each logits tile's gradient in forward, so no tile is recomputed.
            Target("fusedrl", "time_ratio_max", 1.1, vs="floor"),
        ),
        # Liger compiles inside its first call and marks the sequence dimension dynamic there: a second untimed
        # call keeps any recompile out of the timed repeats.
        warmup=2,
    ),
)
