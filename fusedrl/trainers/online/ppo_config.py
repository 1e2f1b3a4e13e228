"""``PPOConfig``: the fields of TRL's PPOConfig (0.2x / ``trl.experimental.ppo``; TRL 1.16 ships no PPO trainer), with
their names and defaults, plus fusedrl's ``kernels`` and the online-trainer fields shared with GRPO.

Differences from TRL:

- reward: ``reward_funcs`` (registered names, callables or reward-model paths, ``fusedrl.trainers.rewards``) with
  ``reward_weights`` and ``reward_failure``; TRL's ``reward_model_path`` is accepted as one more reward model.
  There is no hub default for it or for ``sft_model_path`` (TRL's is ``EleutherAI/pythia-160m``).
- ``stop_token`` / ``stop_token_id``: completions always end at the first EOS (``fusedrl.trainers.online.rollout``); these
  add one more id that ends a completion. TRL left completions untruncated without them.
- dropped: ``exp_name``, ``world_size`` and the derived batch sizes (the trainer computes them), ``num_sample_generations``,
  ``ds3_gather_for_generation`` (under ZeRO-3 generation gathers layer by layer: ``rollout.py``).
  ``model_adapter_name`` / ``ref_adapter_name`` are every config's (``FusedConfig``; ``trainers/adapters/named.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedrl.trainers.config import FusedConfig

KL_ESTIMATORS = ("k1", "k3")


@dataclass
class PPOConfig(FusedConfig):
    """Configuration of :class:`fusedrl.PPOTrainer` (fields as TRL's PPOConfig unless the module docstring says).

    Batches: a rollout samples ``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches``
    prompts per process; it is optimised for ``num_ppo_epochs`` passes of ``num_mini_batches`` minibatches, one
    optimizer step each (so ``num_ppo_epochs * num_mini_batches`` Trainer steps per rollout).
    Generation: ``response_length`` tokens at most, at ``temperature``; ``stop_token``/``stop_token_id``;
    ``missing_eos_penalty`` is subtracted from the score of a completion without EOS. ``max_prompt_length``
    (fusedrl) keeps the last tokens of longer prompts, or raises with ``prompt_truncation="error"``.
    RL: ``kl_coef`` * ``kl_estimator`` per-token penalty, ``whiten_rewards``, GAE (``gamma``, ``lam``), clipped policy
    loss (``cliprange``), clipped value loss (``cliprange_value``) weighted by ``vf_coef``.
    """

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: reward functions receive them."}
    )
    num_mini_batches: int = field(default=1, metadata={"help": "Number of minibatches to split a rollout into."})
    total_episodes: int | None = field(
        default=None, metadata={"help": "Total prompts to train on; sets max_steps when max_steps is not given."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per no-grad forward (old, reference, values) in the rollout phase."}
    )
    response_length: int = field(default=53, metadata={"help": "Maximum completion length in tokens."})
    stop_token: str | None = field(
        default=None, metadata={"help": "'eos': the tokenizer's EOS ends a completion (always true here)."}
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "One more token id that ends a completion (exclusive with stop_token)."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a completion without EOS (>= 0)."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep the last max_prompt_length prompt tokens; None keeps prompts whole."}
    )
    prompt_truncation: str = field(
        default="keep_end", metadata={"help": "keep_end (drop the first tokens) or error.",
                                      "choices": ["keep_end", "error"]}
    )
    reward_funcs: list[str] | None = field(
        default=None, metadata={"help": "Registered reward names or reward-model paths (CLI); the trainer's "
                                        "reward_funcs argument takes callables and models too."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward; None = 1.0 each. The score is their weighted sum."}
    )
    reward_failure: str = field(
        default="raise", metadata={"help": "raise: a failing reward function stops training; skip: its rewards "
                                           "count as missing for that batch.", "choices": ["raise", "skip"]}
    )
    reward_model_path: str | None = field(default=None, metadata={"help": "Path of a reward model (TRL's field)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Optimisation passes over each rollout."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards (scale only)."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient of the per-token reward."})
    kl_estimator: str = field(
        default="k1", metadata={"help": "k1 (log-ratio) or k3 (lower variance) KL estimator.", "choices": ["k1", "k3"]}
    )
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value function."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS} (k2 is TRL's logging-only estimator), "
                             f"got {self.kl_estimator!r}")
        if self.stop_token is not None and self.stop_token != "eos":
            raise ValueError(f"stop_token must be 'eos' or None, got {self.stop_token!r}; use stop_token_id for "
                             "another token")
        if self.stop_token is not None and self.stop_token_id is not None:
            raise ValueError("stop_token and stop_token_id are mutually exclusive; set one of them")
        for name in ("num_ppo_epochs", "num_mini_batches", "local_rollout_forward_batch_size", "response_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        super().__post_init__()
