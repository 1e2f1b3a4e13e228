"""The benchmark cases: what is measured, at which size, against which peers, and which targets must hold.

Legend: N tokens, H hidden, V vocabulary, B sequences of T tokens (N = B * T).

A case names an input builder and the paths to run on the same inputs (both in ``peers.py``); the runner measures
every path of a case side by side in one run. Later issues append cases (preference, GAE, GRPO) to ``CASES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    """A claim about ``path`` measured against ``vs`` (another path of the same case), checked in every run.

    Exactly one bound is set:
    - ``time_ratio_max``: time(path) / time(vs) <= value (e.g. 1.15 of the matmul floor).
    - ``speedup_min``: time(vs) / time(path) >= value (e.g. 1.8x faster than TRL).
    - ``peak_mb_max``: peak(path) <= value MB (``vs`` unused).
    - ``peak_ratio_max``: peak(path) / peak(vs) <= value (1.0 = no more memory than the peer).
    """

    path: str
    kind: str
    value: float
    vs: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("time_ratio_max", "speedup_min", "peak_mb_max", "peak_ratio_max"):
            raise ValueError(f"unknown target kind {self.kind!r}")
        if self.kind != "peak_mb_max" and self.vs is None:
            raise ValueError(f"target {self.kind} needs a `vs` path")


@dataclass(frozen=True)
class Case:
    """One benchmark: ``inputs`` (a builder in ``peers.INPUTS``) called with ``shape`` (or ``quick_shape`` under
    ``--quick``) and ``input_kwargs``; each name in ``paths`` is a function in ``peers.PATHS[inputs]`` doing one
    forward+backward, called with ``path_kwargs``. Ratios in the report are against ``base``."""

    name: str
    op: str
    inputs: str
    shape: Mapping[str, int]
    quick_shape: Mapping[str, int]
    paths: tuple[str, ...]
    base: str
    description: str
    dtype: str = "float32"
    input_kwargs: Mapping[str, object] = field(default_factory=dict)
    path_kwargs: Mapping[str, object] = field(default_factory=dict)
    targets: tuple[Target, ...] = ()
    # One full-size linear iteration takes ~5-15 s on the 2-core reference machine, so full runs keep few repeats.
    repeats: int = 3
    quick_repeats: int = 5
    # Timed iterations are preceded by this many untimed ones; the first one compiles (torch.compile, Inductor).
    warmup: int = 1
    quick_warmup: int = 2
    # Untimed iterations whose largest peak is reported (see measure.py on why one is not enough).
    memory_repeats: int = 2
    quick_memory_repeats: int = 3

    def __post_init__(self) -> None:
        missing = [t for t in self.targets if t.path not in self.paths or (t.vs and t.vs not in self.paths)]
        if self.base not in self.paths or missing:
            raise ValueError(f"case {self.name}: base or target paths not among its paths ({missing})")


_LINEAR_FULL = {"N": 4096, "H": 1024, "V": 32000}
# --quick: 1/4 of the tokens, 1/2 of the hidden, 1/4 of the vocabulary (~1/32 of the FLOPs); the whole quick suite
# then takes ~3 minutes on 2 cores, most of it interpreter start-up and Inductor compiles in the fresh processes.
_LINEAR_QUICK = {"N": 1024, "H": 512, "V": 8000}
_LOGITS_FULL = {"B": 4, "T": 1024, "V": 32000}
_LOGITS_QUICK = {"B": 4, "T": 256, "V": 8000}

_LINEAR_ENTROPY_PATHS = ("fusedrl", "trl_chunked", "naive", "floor")
# naive does the same work whatever the labels, so the half-labelled variants leave it out.
_HALF_LABELLED_ENTROPY_PATHS = ("fusedrl", "trl_chunked", "floor")
_LINEAR_ENTROPY_TARGETS = (
    Target("fusedrl", "time_ratio_max", 1.15, vs="floor"),
    Target("fusedrl", "speedup_min", 1.8, vs="trl_chunked"),
    Target("fusedrl", "peak_mb_max", 300.0),
)
_LINEAR_PATHS = ("fusedrl", "torch_native", "trl_chunked", "liger", "naive", "floor")
_HALF_LABELLED_PATHS = ("fusedrl", "torch_native", "trl_chunked", "floor")
_LINEAR_TARGETS = (
    Target("fusedrl", "speedup_min", 1.0, vs="torch_native"),
    Target("fusedrl", "peak_ratio_max", 1.0, vs="torch_native"),
)
# In preference and RL batches the prompt (and padding) positions carry label -100; half is typical.
_HALF_LABELLED = {"labelled_fraction": 0.5}
_HALF_DESCRIPTION = "as above with 50% of labels = -100 at random positions; naive left out (same work as above)"

CASES: tuple[Case, ...] = (
    Case(
        name="linear_logprobs_entropy",
        op="linear_logprobs_entropy",
        inputs="linear",
        shape=_LINEAR_FULL,
        quick_shape=_LINEAR_QUICK,
        paths=_LINEAR_ENTROPY_PATHS,
        base="fusedrl",
        description="hidden @ W.T -> log p(label) and entropy, fwd+bwd (grad hidden, weight), all tokens labelled",
        path_kwargs={"with_entropy": True},
        targets=_LINEAR_ENTROPY_TARGETS,
    ),
    Case(
        name="linear_logprobs_entropy.half_labelled",
        op="linear_logprobs_entropy",
        inputs="linear",
        shape=_LINEAR_FULL,
        quick_shape=_LINEAR_QUICK,
        paths=_HALF_LABELLED_ENTROPY_PATHS,
        base="fusedrl",
        description=_HALF_DESCRIPTION,
        input_kwargs=_HALF_LABELLED,
        path_kwargs={"with_entropy": True},
        targets=_LINEAR_ENTROPY_TARGETS,
    ),
    Case(
        name="linear_logprobs",
        op="linear_logprobs",
        inputs="linear",
        shape=_LINEAR_FULL,
        quick_shape=_LINEAR_QUICK,
        paths=_LINEAR_PATHS,
        base="fusedrl",
        description="hidden @ W.T -> log p(label) only, fwd+bwd (grad hidden, weight), all tokens labelled",
        path_kwargs={"with_entropy": False},
        targets=_LINEAR_TARGETS,
    ),
    Case(
        name="linear_logprobs.half_labelled",
        op="linear_logprobs",
        inputs="linear",
        shape=_LINEAR_FULL,
        quick_shape=_LINEAR_QUICK,
        paths=_HALF_LABELLED_PATHS,
        base="fusedrl",
        description=_HALF_DESCRIPTION,
        input_kwargs=_HALF_LABELLED,
        path_kwargs={"with_entropy": False},
        targets=_LINEAR_TARGETS,
    ),
    Case(
        name="logprobs_entropy",
        op="logprobs_entropy",
        inputs="logits",
        shape=_LOGITS_FULL,
        quick_shape=_LOGITS_QUICK,
        paths=("fusedrl", "trl", "reference"),
        base="fusedrl",
        description="given fp32 logits [B, T, V] -> log p(label) and entropy, fwd+bwd (grad logits)",
        targets=(Target("fusedrl", "speedup_min", 3.0, vs="trl"),),
        repeats=5,
    ),
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


# Preference: DPO from hidden states. 8 pairs of 512 positions = 8192 rows of the LM head, about half of them prompt.
CASES = CASES + (
    Case(
        name="linear_preference.dpo_sigmoid",
        op="linear_preference",
        inputs="preference",
        shape={"B": 8, "T": 512, "H": 1024, "V": 32000},
        quick_shape={"B": 4, "T": 256, "H": 512, "V": 8000},
        paths=("fusedrl", "liger", "naive"),
        base="fusedrl",
        description=(
            "DPO sigmoid (beta 0.1) from hidden states [2B, T, H]: policy LM head fwd+bwd (grad hidden, weight) and "
            "the reference model's hidden states and own head under no_grad. Each pair's prompt is ignore_index and "
            "takes ~half the row (uniform 40-60% of T, shared by chosen and rejected); the completions fill the rest"
        ),
        targets=(
            Target("fusedrl", "time_ratio_max", 0.8, vs="liger"),
            Target("fusedrl", "peak_ratio_max", 0.7, vs="liger"),
            Target("fusedrl", "peak_ratio_max", 0.15, vs="naive"),
        ),
        # Liger compiles inside its first call and marks the sequence dimension dynamic there: a second untimed
        # call keeps any recompile out of the timed repeats.
        warmup=2,
    ),
)


# Trainers: whole optimizer steps of a TRL-compatible trainer against TRL's own, run by ``benchmarks/trainers.py``.
@dataclass(frozen=True)
class TrainerCase:
    """``trainer`` (a key of ``trainers.TRAINERS``) on model preset ``model`` for ``steps`` optimizer steps; each
    name in ``paths`` is a key of ``trainers.PATHS`` (which trainer class, which kernels). The first
    ``warmup_steps`` steps (compiles, first allocations) are not timed. ``shape``: B pairs per device, P prompt
    tokens per row. ``config``: extra fields given to every path's config, so all paths train identically."""

    name: str
    op: str
    trainer: str
    model: str
    shape: Mapping[str, int]
    quick_shape: Mapping[str, int]
    paths: tuple[str, ...]
    base: str
    description: str
    dtype: str = "float32"
    config: Mapping[str, object] = field(default_factory=dict)
    targets: tuple[Target, ...] = ()
    steps: int = 8
    quick_steps: int = 5
    warmup_steps: int = 2
    quick_warmup_steps: int = 2
    # Logged values compared across paths (``agreement_metric``, the loss unless it is uninformative, e.g. GRPO's is
    # ~0 at ratio 1), and the largest absolute difference still counted as agreement.
    num_losses: int = 3
    loss_atol: float = 1e-4
    agreement_metric: str = "loss"
    worker_module: str = "benchmarks.trainers"

    def __post_init__(self) -> None:
        missing = [t for t in self.targets if t.path not in self.paths or (t.vs and t.vs not in self.paths)]
        if self.base not in self.paths or missing:
            raise ValueError(f"case {self.name}: base or target paths not among its paths ({missing})")


CASES = CASES + (
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
        # Measured by the issue author on this machine: TRL 0.097 steps/s and 4.6 GB peak RSS.
        targets=(
            Target("fusedrl", "speedup_min", 1.5, vs="trl"),
            Target("fusedrl", "peak_ratio_max", 1.0, vs="trl"),
        ),
    ),
)


# Graph capture: the same DPO steps with the loss region and every transformer block compiled, against eager.
CASES = CASES + (
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
)


# GAE: the compiled loop-free scan against the Python loop over T, forward only (no autograd). Inputs and paths are
# registered by benchmarks/peers_gae.py, imported here so that every process that loads the cases has them.
from benchmarks import peers_gae  # noqa: F401

CASES = CASES + (
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


# GRPO loss from hidden states (TRL's default loss: dapo, epsilon 0.2, beta 0). Inputs and paths are registered by
# benchmarks/peers_grpo.py, imported here so that every process that loads the cases has them.
from benchmarks import peers_grpo  # noqa: F401

CASES = CASES + (
    Case(
        name="linear_policy_loss.grpo",
        op="linear_policy_loss",
        inputs="grpo",
        shape={"B": 16, "T": 1024, "H": 1024, "V": 32000},
        quick_shape={"B": 4, "T": 256, "H": 512, "V": 8000},
        paths=("fusedrl", "trl", "liger"),
        base="fusedrl",
        description=(
            "GRPO loss (dapo, epsilon 0.2, beta 0, token-level ratios, given old log-probs) from the completion "
            "positions' hidden states [B, T, H] and the LM head, fwd+bwd (grad hidden, weight); right-padded "
            "completions, lengths uniform in [T/2, T]. fusedrl computes entropies too (TRL logs them), Liger does not"
        ),
        targets=(
            Target("fusedrl", "peak_ratio_max", 0.5, vs="trl"),
            Target("fusedrl", "time_ratio_max", 1.0, vs="liger"),
        ),
        # Liger compiles inside its first call and marks the sequence dimension dynamic there: a second untimed
        # call keeps any recompile out of the timed repeats.
        warmup=2,
    ),
)


# GRPO trainer steps (generation, scoring, loss): fusedrl.GRPOTrainer against trl.GRPOTrainer, same config.
CASES = CASES + (
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
