"""The benchmark cases: what is measured, at which size, against which peers, and which targets must hold.

One declarative list, :data:`CASES`, assembled from one module per op (``benchmarks/ops/<op>.py`` holds the cases
of ``fusedrl/ops/<op>/``) and, below, the trainer cases (whole optimizer steps, run by ``benchmarks/trainers.py``).
A case names an input builder and the paths to run on the same inputs (``peers*.py``); the runner measures every
path of a case side by side in one run. What a case is: ``spec.py``.

Legend: B pairs per device, P prompt tokens per row (trainer cases; the op modules have their own).
"""

from __future__ import annotations

from benchmarks.ops import gae, logprobs, policy, preference
from benchmarks.spec import Case, Target, TrainerCase

__all__ = ["CASES", "Case", "Target", "TrainerCase", "by_name", "select"]

# Trainers: whole optimizer steps of a TRL-compatible trainer against TRL's own.
TRAINER_CASES: tuple[TrainerCase, ...] = (
    TrainerCase(
        name="dpo_trainer",
        op="dpo_trainer",
        trainer="dpo",
        model="bench-head",
        # 8 pairs of a 256-token prompt and a 2-4 token completion: 16 rows of ~260 positions, ~60 of them labelled.
        shape={"B": 8, "P": 256},
        quick_shape={"B": 4, "P": 128},
        paths=("fusedrl", "fusedrl_reference", "trl"),
        base="fusedrl",
        description=(
            "DPO (sigmoid, beta 0.1) optimizer steps, fp32, gradient checkpointing on (TRL's default), on the "
            "bench-head Llama (hidden 256, 4 layers, 32000 vocabulary rows, untied head); arithmetic prompts padded "
            "with few-shot examples to P tokens, completions of 2-4 tokens (answer + EOS). Same checkpoint, data, "
            "seed and config for every path; AdamW lr 1e-4, logging every step"
        ),
        config={"learning_rate": 1e-4, "beta": 0.1, "loss_type": ["sigmoid"]},
        # Measured for TRL on the reference machine (2 cores) when the targets were set: 0.097 steps/s, 4.6 GB peak RSS.
        targets=(
            Target("fusedrl", "speedup_min", 1.5, vs="trl"),
            Target("fusedrl", "peak_ratio_max", 1.0, vs="trl"),
        ),
    ),
    # Graph capture: the same DPO steps with the loss region and every transformer block compiled, against eager.
    TrainerCase(
        name="dpo_compile",
        op="dpo_compile",
        trainer="dpo",
        model="tiny",
        # 8 pairs of a 96-token prompt (the few-shot header needs ~70) and a 2-4 token completion, within the
        # preset's 128 positions; completion lengths vary, so padded lengths do.
        shape={"B": 8, "P": 96},
        quick_shape={"B": 4, "P": 80},
        paths=("fusedrl", "fusedrl_compiled"),
        base="fusedrl",
        description=(
            "DPO (sigmoid, beta 0.1) optimizer steps on the tiny preset Llama (hidden 64, 2 layers, vocabulary "
            "128), fp32, gradient checkpointing on: compile off vs compile=True + compile_blocks=True (fullgraph, "
            "dynamic shapes). The compiled path's first steps compile the blocks and the loss region (untimed); "
            "the first logged losses must agree"
        ),
        config={"learning_rate": 1e-4, "beta": 0.1, "loss_type": ["sigmoid"]},
        steps=16,
        quick_steps=8,
        warmup_steps=4,
        quick_warmup_steps=4,
    ),
    # GRPO trainer steps (generation, scoring, loss): fusedrl.GRPOTrainer against trl.GRPOTrainer, same config.
    TrainerCase(
        name="grpo_trainer",
        op="grpo_trainer",
        trainer="grpo",
        model="bench-head",
        # B completions per step (B / 4 prompts, 4 generations each) of a P-token prompt, up to 8 sampled tokens.
        shape={"B": 16, "P": 256},
        quick_shape={"B": 8, "P": 64},
        paths=("fusedrl", "fusedrl_reference", "trl"),
        base="fusedrl",
        description=(
            "GRPO optimizer steps (TRL's defaults: dapo loss, beta 0, one iteration; 4 generations per prompt, up "
            "to 8 sampled tokens at temperature 1, exact-answer + character-code rewards), fp32, gradient "
            "checkpointing on, on the bench-head Llama (hidden 256, 4 layers, 32000 vocabulary rows); arithmetic "
            "prompts padded with "
            "few-shot examples to P tokens. Each step samples its completions with model.generate (KV cache), "
            "scores them and takes one loss step; same checkpoint, data, seed and config for every path, so the "
            "completions and gradient norms agree (the dapo loss itself is ~0 at ratio 1, so it is not compared)"
        ),
        config={"learning_rate": 1e-4, "num_generations": 4, "max_completion_length": 8},
        agreement_metric="grad_norm",
    ),
)

CASES: tuple[Case | TrainerCase, ...] = (
    *logprobs.CASES, *preference.CASES, *gae.CASES, *policy.CASES, *TRAINER_CASES,
)


def select(names: list[str] | tuple[str, ...]) -> list[Case]:
    """Cases whose op or name is in ``names`` (all cases when empty); unknown names raise with the valid ones."""
    if not names:
        return list(CASES)
    known = {c.op for c in CASES} | {c.name for c in CASES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown case or op {unknown}; choose from {sorted(known)}")
    return [c for c in CASES if c.op in names or c.name in names]


def by_name(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise KeyError(name)
