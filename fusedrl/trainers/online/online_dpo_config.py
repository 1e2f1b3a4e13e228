"""``OnlineDPOConfig``: TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOConfig`` fields, names and defaults (the
transformers-generation ones), plus fusedrl's ``kernels`` and the reward fields shared with GRPO/PPO.

Differences from TRL: generation is always ``model.generate``: the vLLM fields exist with TRL's names, defaults and
checks (so configs and TRL's config tests carry over), but the trainer refuses ``use_vllm=True``;
``ds3_gather_for_generation`` is kept for the same reason and has no effect (under ZeRO-3 generation gathers layer
by layer, the processes stepping together: ``rollout.py``). ``reward_funcs`` / ``reward_failure`` /
``max_prompt_length`` / ``prompt_truncation`` are fusedrl's (the trainer's ``reward_funcs`` or ``judge`` argument
ranks the pairs).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from fusedrl.trainers.config import FusedConfig

LOSS_TYPES = ("sigmoid", "ipo")
VLLM_MODES = ("server", "colocate")


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
    # --- TRL's vLLM fields: accepted and checked as TRL does; OnlineDPOTrainer refuses use_vllm=True.
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (not supported by fusedrl)."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vLLM model implementation: vllm or transformers."})
    vllm_structured_outputs_regex: str | None = field(default=None, metadata={"help": "vLLM structured outputs."})
    vllm_gpu_memory_utilization: float | None = field(default=0.55, metadata={"help": "vLLM GPU memory share."})
    vllm_mode: str = field(default="colocate", metadata={"help": "server or colocate.", "choices": list(VLLM_MODES)})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "vLLM server URL."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vLLM server host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vLLM server port."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Seconds to wait for the vLLM server."})
    vllm_group_port: int = field(default=51216, metadata={"help": "vLLM weight-update group port."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "vLLM sleep mode between generations."})
    ds3_gather_for_generation: bool = field(
        default=True, metadata={"help": "TRL's ZeRO-3 gather for generation; fusedrl gathers layer by layer anyway."}
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
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"vllm_mode must be one of {VLLM_MODES}, got {self.vllm_mode!r}")
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
