"""``RLOOConfig``: TRL 1.16's RLOOConfig fields, names and defaults for what fusedrl implements (the shared
generation, batching and reward fields live in ``grpo_config.OnlineConfig``; the same features are absent)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedrl.trainers.online.grpo_config import OnlineConfig


@dataclass
class RLOOConfig(OnlineConfig):
    """Configuration of :class:`fusedrl.RLOOTrainer`; every field means what it means in ``trl.RLOOConfig`` 1.16.

    Differences from GRPO's defaults, as in TRL: ``num_generations=2``, ``beta=0.05`` (a k1 KL penalty subtracted
    from the reward, so a reference model is loaded). RLOO-only: ``normalize_advantages`` (whiten the advantages
    over the generation batch), ``reward_clip_range`` (clamp the summed reward before the KL penalty).
    """

    num_generations: int | None = field(default=2, metadata={"help": "Completions sampled per prompt (G)."})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient of the reward penalty; 0.0 = no reference."})
    normalize_advantages: bool = field(
        default=False, metadata={"help": "Normalise the advantages to mean 0, std 1 over the generation batch."}
    )
    reward_clip_range: list[float] | None = field(
        default=None, metadata={"help": "Clamp the rewards to (min, max) before the KL penalty; None = no clip."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.reward_clip_range is not None:
            if len(self.reward_clip_range) != 2 or self.reward_clip_range[0] > self.reward_clip_range[1]:
                raise ValueError(f"reward_clip_range must be (min, max) with min <= max, got {self.reward_clip_range}")
            self.reward_clip_range = tuple(float(v) for v in self.reward_clip_range)
