"""``DDPOConfig``: TRL 0.23's ``DDPOConfig`` fields, names and defaults (the shared ones in
:class:`~fusedrl.trainers.diffusion.config.DiffusionConfig`, with its fusedrl additions and differences), plus the
checks TRL left to the first step or never made.

Batching is TRL's: an epoch samples ``sample_num_batches_per_epoch`` batches of ``sample_batch_size`` prompts per
process, then trains ``train_num_inner_epochs`` passes over them in batches of ``train_batch_size``, each batch on
``int(sample_num_steps * train_timestep_fraction)`` of its steps (a random subset, drawn per sample), one optimizer
step per ``train_gradient_accumulation_steps`` batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedrl.trainers.diffusion.config import DiffusionConfig, check_int, check_number


@dataclass
class DDPOConfig(DiffusionConfig):
    """DDPO's fields on top of :class:`DiffusionConfig` (every default TRL's)."""

    sample_batch_size: int = field(default=1, metadata={"help": "Prompts per sampling batch (per process)."})
    sample_num_batches_per_epoch: int = field(default=2, metadata={"help": "Sampling batches per epoch."})
    train_num_inner_epochs: int = field(default=1, metadata={"help": "Training passes over each epoch's samples."})
    train_cfg: bool = field(
        default=True, metadata={"help": "Score the steps under classifier-free guidance, as they were sampled."}
    )
    train_adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clipped to +-this."})
    train_clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range of the probability ratio."})
    train_timestep_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of each sample's steps trained on, in (0, 1]."}
    )
    per_prompt_stat_tracking: bool = field(
        default=False, metadata={"help": "Normalise each reward by its prompt's recent rewards, not the batch's."}
    )
    per_prompt_stat_tracking_buffer_size: int = field(
        default=16, metadata={"help": "Recent rewards kept per prompt."}
    )
    per_prompt_stat_tracking_min_count: int = field(
        default=16, metadata={"help": "Rewards a prompt needs before its own statistics are used (else the "
                                      "batch's)."}
    )
    async_reward_computation: bool = field(
        default=False, metadata={"help": "Score each sampled batch in a thread while the next one samples."}
    )
    max_workers: int = field(default=2, metadata={"help": "Threads of async_reward_computation."})
    negative_prompts: str | None = field(
        default="", metadata={"help": "The negative prompt of classifier-free guidance (TRL's default: empty)."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("sample_batch_size", "sample_num_batches_per_epoch", "train_num_inner_epochs",
                     "per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count", "max_workers"):
            check_int(self, name, 1)
        # The policy is the step's Gaussian: with eta = 0 its std is 0 and the log-probs DDPO optimises are undefined.
        check_number(self, "sample_eta", 0.0, inclusive=False)
        check_number(self, "train_adv_clip_max", 0.0, inclusive=False)
        check_number(self, "train_clip_range", 0.0, inclusive=False)
        check_number(self, "train_timestep_fraction", 0.0, inclusive=False, high=1.0)
        if int(self.sample_num_steps * self.train_timestep_fraction) < 1:
            raise ValueError(f"train_timestep_fraction={self.train_timestep_fraction} of sample_num_steps="
                             f"{self.sample_num_steps} trains on no step; raise it to at least "
                             f"{1 / self.sample_num_steps:.4g}")
        if self.per_prompt_stat_tracking and (
                self.per_prompt_stat_tracking_min_count > self.per_prompt_stat_tracking_buffer_size):
            raise ValueError(f"per_prompt_stat_tracking_min_count ({self.per_prompt_stat_tracking_min_count}) must "
                             f"not exceed per_prompt_stat_tracking_buffer_size "
                             f"({self.per_prompt_stat_tracking_buffer_size}): a prompt's buffer never holds more, "
                             "so its own statistics would never be used")

    @property
    def num_train_timesteps(self) -> int:
        """Steps of each sample trained on: ``int(sample_num_steps * train_timestep_fraction)``, as TRL."""
        return int(self.sample_num_steps * self.train_timestep_fraction)
