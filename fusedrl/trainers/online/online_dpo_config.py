"""``OnlineDPOConfig``: TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOConfig`` fields, names and defaults (the
transformers-generation ones), plus fusedrl's ``kernels`` and the reward fields shared with GRPO/PPO.

Differences from TRL: no vLLM fields (generation is ``model.generate``); ``reward_funcs`` / ``reward_failure`` /
``max_prompt_length`` / ``prompt_truncation`` are fusedrl's (the trainer's ``reward_funcs`` or ``judge`` argument
ranks the pairs); ``ds3_gather_for_generation`` is dropped (under ZeRO-3 generation gathers layer by layer, the
processes stepping together: ``rollout.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from fusedrl.trainers.config import FusedConfig

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class OnlineDPOConfig(FusedConfig):
    """Configuration of :class:`fusedrl.OnlineDPOTrainer`; every TRL field means what it means in TRL 1.16.

    Generation: ``max_new_tokens`` (64), ``temperature`` (0.9), ``top_p``, ``top_k`` (0 = off), ``min_p``,
    ``repetition_penalty``, ``generation_kwargs``, ``cache_implementation``. Scoring: ``missing_eos_penalty`` is
    subtracted from the score of a completion without EOS (reward functions only). Loss: ``loss_type`` ``sigmoid`` or
    ``ipo`` on sequence log-prob sums, ``beta`` (a list: one per epoch, the last one after). ``max_length`` bounds
    prompt + completion in the scoring forward (the prompt's first tokens are dropped beyond it).
    """

    learning_rate: float = field(default=5e-7, metadata={"help": "The initial learning rate for AdamW."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: reward functions receive them."}
    )
    reward_model_path: str | None = field(default=None, metadata={"help": "Path to the reward model."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum number of tokens per completion."})
    max_length: int = field(
        default=512, metadata={"help": "Longest prompt + completion in the log-prob forward (left-truncated)."}
    )
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold in (0, 1]."})
    top_k: int = field(default=0, metadata={"help": "Top-k filtering; 0 disables it."})
    min_p: float | None = field(default=None, metadata={"help": "Minimum token probability relative to the top."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty for repeated tokens (> 1 penalises)."})
    generation_kwargs: dict | None = field(
        default=None, metadata={"help": "Extra GenerationConfig fields; they override the named ones."}
    )
    cache_implementation: str | None = field(default=None, metadata={"help": "KV cache implementation."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a completion without EOS (>= 0)."}
    )
    beta: list[float] = field(
        default_factory=lambda: [0.1],
        metadata={"help": "Deviation from the reference (tau for ipo); a list gives one value per epoch."},
    )
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid or ipo.", "choices": list(LOSS_TYPES)})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function; None = 1.0 each."}
    )
    reward_funcs: list[str] | None = field(
        default=None, metadata={"help": "Registered reward names or reward-model paths (CLI); the trainer's "
                                        "reward_funcs argument takes callables and models too."}
    )
    reward_failure: str = field(
        default="raise", metadata={"help": "raise, or skip: a failing reward function's rewards count as missing.",
                                   "choices": ["raise", "skip"]}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep the last max_prompt_length prompt tokens; None keeps prompts whole."}
    )
    prompt_truncation: str = field(
        default="keep_end", metadata={"help": "keep_end or error.", "choices": ["keep_end", "error"]}
    )

    def __post_init__(self):
        if isinstance(self.beta, (int, float)):
            self.beta = [float(self.beta)]
        if not self.beta:
            raise ValueError("beta must be a float or a non-empty list of floats")
        if len(self.beta) == 1:
            self.beta = self.beta[0]
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES} (TRL's online DPO), got {self.loss_type!r}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_new_tokens >= self.max_length:
            warnings.warn(f"max_new_tokens ({self.max_new_tokens}) >= max_length ({self.max_length}): prompts will be "
                          "truncated away in the log-prob forward; raise max_length", stacklevel=3)
        super().__post_init__()
