"""Benchmark cases of the ``preference`` op (``fusedrl/ops/preference/``): ``linear_preference_loss`` (DPO from
hidden states).

Legend: B pairs, T positions per row, H hidden, V vocabulary.

Inputs and paths: ``peers.py`` ("preference").
"""

from __future__ import annotations

from benchmarks.spec import Case, Target

# DPO from hidden states. 8 pairs of 512 positions = 8192 rows of the LM head, about half of them prompt.
CASES: tuple[Case, ...] = (
    Case(
        name="linear_preference.dpo_sigmoid",
        op="linear_preference",
        inputs="preference",
        shape={"B": 8, "T": 512, "H": 1024, "V": 32000},
        quick_shape={"B": 4, "T": 256, "H": 512, "V": 8000},
        paths=("fusedrl", "fusedrl_recompute", "liger", "naive", "floor"),
        base="fusedrl",
        description=(
            "DPO sigmoid (beta 0.1) from hidden states [2B, T, H]: policy LM head fwd+bwd (grad hidden, weight) and "
            "the reference model's hidden states and own head under no_grad. Each pair's prompt is ignore_index and "
            "takes ~half the row (uniform 40-60% of T, shared by chosen and rejected); the completions fill the rest. "
            "floor: the GEMMs alone over the labelled rows, 3 passes for the policy head (logits, grad hidden, grad "
            "weight) and 1 for the reference head, the least any method does"
        ),
        targets=(
            Target("fusedrl", "time_ratio_max", 0.8, vs="liger"),
            Target("fusedrl", "peak_ratio_max", 0.7, vs="liger"),
            Target("fusedrl", "peak_ratio_max", 0.15, vs="naive"),
            # Issue 10: the loss's gradient w.r.t. each logits tile is known in forward, so no tile is recomputed.
            Target("fusedrl", "time_ratio_max", 1.1, vs="floor"),
        ),
        # Liger compiles inside its first call and marks the sequence dimension dynamic there: a second untimed
        # call keeps any recompile out of the timed repeats.
        warmup=2,
    ),
)
