"""What a benchmark case is: :class:`Case` (one op, its paths side by side), :class:`TrainerCase` (optimizer steps
of a trainer against TRL's) and :class:`Target` (a claim checked in every run). The cases themselves are in
``cases.py``: one per-op module under ``benchmarks/ops/`` each, the trainer cases in a section of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Target:
    """A claim about ``path`` measured against ``vs`` (another path of the same case, or of case ``vs_case`` when
    set: e.g. the bf16 row of a trainer against its fp32 row), checked in every run. A cross-case target is measured
    only when both cases ran in the same run (the runner evaluates it once both are done).

    Exactly one bound is set:
    - ``time_ratio_max``: time(path) / time(vs) <= value (e.g. 1.15 of the matmul floor).
    - ``speedup_min``: time(vs) / time(path) >= value (e.g. 1.8x faster than TRL).
    - ``peak_mb_max``: peak(path) <= value MB (``vs`` unused).
    - ``peak_ratio_max``: peak(path) / peak(vs) <= value (1.0 = no more memory than the peer).
    - ``peak_sum_ratio_max``: peak(path) / summed peak(vs) <= value, where a path standing for several separate runs
      (``benchmarks/multi_adapter.py``'s ``sequential_kK``) records the sum of its runs' peaks as ``peak_sum_mb``
      (what the runs need side by side); a path of one run has no sum, and its own peak counts.
    """

    path: str
    kind: str
    value: float
    vs: str | None = None
    vs_case: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("time_ratio_max", "speedup_min", "peak_mb_max", "peak_ratio_max", "peak_sum_ratio_max"):
            raise ValueError(f"unknown target kind {self.kind!r}")
        if self.kind != "peak_mb_max" and self.vs is None:
            raise ValueError(f"target {self.kind} needs a `vs` path")
        if self.vs_case is not None and self.kind == "peak_mb_max":
            raise ValueError("a peak_mb_max target compares with no other case")


def _check_paths(name: str, paths: tuple[str, ...], base: str, targets: tuple[Target, ...]) -> None:
    """The base and every target's paths are among the case's paths (a cross-case target's ``vs`` is checked
    against its own case in ``cases.py``, once every case exists)."""
    missing = [t for t in targets if t.path not in paths or (t.vs and t.vs_case is None and t.vs not in paths)]
    if base not in paths or missing:
        raise ValueError(f"case {name}: base or target paths not among its paths ({missing})")


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
        _check_paths(self.name, self.paths, self.base, self.targets)


@dataclass(frozen=True)
class TrainerCase:
    """``trainer`` (a key of ``trainers.TRAINERS``) on model preset ``model`` for ``steps`` optimizer steps; each
    name in ``paths`` is a key of ``trainers.PATHS`` (which trainer class, which kernels). The first
    ``warmup_steps`` steps (compiles, first allocations) are not timed. ``shape``: B pairs per device, P prompt
    tokens per row, optionally C completion tokens per preference row (default: the preset's 2-4 token answers).
    ``config``: extra fields given to every path's config, so all paths train identically. ``dtype``: the dtype the
    model is loaded in by every path (``model_init_kwargs``); ``"bfloat16"`` also sets ``bf16=True`` (autocast)."""

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
        _check_paths(self.name, self.paths, self.base, self.targets)
