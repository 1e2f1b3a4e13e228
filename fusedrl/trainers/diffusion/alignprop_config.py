"""``AlignPropConfig``: TRL 0.23's ``AlignPropConfig`` fields, names and defaults (the shared ones in
:class:`~fusedrl.trainers.diffusion.config.DiffusionConfig`, with its fusedrl additions and differences), plus
``gradient_checkpointing`` and the checks of the truncation settings TRL never made.

Truncated backpropagation (TRL's names; "timestep" there means the index of a sampling step, 0 = the noisiest):
the chain runs ``sample_num_steps`` steps and only steps ``i >= start`` keep an autograd graph, so the gradient
reaches the last ``sample_num_steps - start`` UNet calls. ``start`` is ``truncated_backprop_timestep`` (default 49 of
50: the last step only), or with ``truncated_backprop_rand`` (the default) a uniform draw from
``truncated_rand_backprop_minmax`` (both ends included, as ``random.randint``), made once per chain; a draw of
``sample_num_steps`` (TRL's default ``(0, 50)`` with 50 steps) keeps the last step, so every chain trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedrl.trainers.diffusion.config import DiffusionConfig, check_int


@dataclass
class AlignPropConfig(DiffusionConfig):
    """AlignProp's fields on top of :class:`DiffusionConfig` (every default TRL's)."""

    train_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate (TRL's AlignProp: 1e-3)."})
    truncated_backprop_rand: bool = field(
        default=True, metadata={"help": "Draw the first step that keeps a graph from truncated_rand_backprop_minmax "
                                        "for each chain (else use truncated_backprop_timestep)."}
    )
    truncated_backprop_timestep: int = field(
        default=49, metadata={"help": "Index of the first sampling step that keeps a graph when "
                                      "truncated_backprop_rand is False (sample_num_steps - 1: the last step only)."}
    )
    truncated_rand_backprop_minmax: tuple[int, int] = field(
        default=(0, 50), metadata={"help": "Range (both ends included) of the first step that keeps a graph when "
                                           "truncated_backprop_rand is True."}
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "fusedrl: recompute each UNet call of the chain in the backward (TRL's "
                                        "pipeline_step_with_grad did, always): the graph keeps each step's inputs "
                                        "instead of its activations."}
    )

    def __post_init__(self):
        super().__post_init__()
        num_steps = self.sample_num_steps
        check_int(self, "truncated_backprop_timestep", 0)
        minmax = self.truncated_rand_backprop_minmax
        if (not isinstance(minmax, (tuple, list)) or len(minmax) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in minmax)):
            raise ValueError(f"truncated_rand_backprop_minmax must be two ints (min, max), got {minmax!r}")
        self.truncated_rand_backprop_minmax = low, high = tuple(minmax)  # a YAML / CLI list becomes TRL's tuple
        if self.truncated_backprop_rand:
            if not 0 <= low <= high <= num_steps or low >= num_steps:
                raise ValueError(f"truncated_rand_backprop_minmax={minmax!r} must satisfy 0 <= min <= max <= "
                                 f"sample_num_steps ({num_steps}) and min < sample_num_steps (step indices; e.g. "
                                 f"(0, {num_steps}) to draw over the whole chain)")
        elif self.truncated_backprop_timestep >= num_steps:
            raise ValueError(f"truncated_backprop_timestep={self.truncated_backprop_timestep} must be < "
                             f"sample_num_steps ({num_steps}): it is the index of the first step that keeps a "
                             f"graph ({num_steps - 1}: the last step only, 0: the whole chain)")

    @property
    def backprop_start_range(self) -> tuple[int, int]:
        """``(low, high)``, both included: the first step index that keeps a graph is drawn from it (one value when
        ``truncated_backprop_rand`` is False). ``high`` is capped at ``sample_num_steps - 1``."""
        if not self.truncated_backprop_rand:
            return self.truncated_backprop_timestep, self.truncated_backprop_timestep
        low, high = self.truncated_rand_backprop_minmax
        return low, min(high, self.sample_num_steps - 1)
