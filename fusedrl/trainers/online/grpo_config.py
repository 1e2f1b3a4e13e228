"""``GRPOConfig``: TRL 1.16's GRPOConfig fields, names and defaults for what fusedrl implements, plus fusedrl's
``kernels`` (from FusedConfig) and three additions; ``OnlineConfig`` holds what GRPO and RLOO share.

Additions: ``max_prompt_length`` + ``prompt_truncation`` (TRL 1.16 has no prompt limit; None keeps that),
``reward_funcs`` (reward names used when the trainer gets no ``reward_funcs`` argument, so YAML and the CLI can name
them) and ``reward_failure`` (``"raise"`` or ``"skip"`` a reward function that fails; ``rewards/scoring.py``).
Implemented as TRL 1.16 (``GRPOConfig`` only; TRL's RLOOConfig has neither): ``off_policy_mask_threshold``
(DeepSeek-V3.2's off-policy sequence mask on the policy term, from the old log-probs, on every kernel backend:
``fusedrl/ops/policy/reference.py``) and ``cast_lm_head_to_fp32`` (the fused head and the model's own lm_head run on
fp32 weights and hidden states under bf16 mixed precision: ``grpo_setup.py``) and ``max_tool_calling_iterations``
(the trainer's ``tools`` / ``environment_factory``: ``agents/``).
Generation engines (``engine_config.py``): transformers' continuous batching as TRL's; the vLLM fields exist with
TRL's names and defaults, but the trainers refuse ``use_vllm=True`` (so no vLLM importance-sampling correction).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from fusedrl.trainers.config import FusedConfig, resolve_pad_to_multiple_of
from fusedrl.trainers.online.engine_config import GenerationEngineFields, check_generation_engine
from fusedrl.trainers.online.rollout import PROMPT_TRUNCATION_MODES
from fusedrl.trainers.rewards.scoring import ON_ERROR

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# Loss types whose per-token terms are summed over a sequence: at sequence level they weight each sequence by its
# length (TRL 1.16 warns; GSPO's paper uses grpo).
TOKEN_SUMMED_LOSS_TYPES = ("bnpo", "dr_grpo", "dapo", "cispo")

logger = logging.getLogger("fusedrl")


@dataclass
class OnlineConfig(GenerationEngineFields, FusedConfig):
    """Fields shared by the sampling trainers (GRPO, RLOO): generation, batching, rewards, reference syncing.

    Batching is TRL's: ``per_device_train_batch_size`` counts completions; one generation round covers
    ``generation_batch_size = per_device_train_batch_size * num_processes * steps_per_generation`` completions
    (``num_generations`` per prompt), sampled once and consumed over ``steps_per_generation`` micro-batches, each
    round reused ``num_iterations`` times. Defaults that differ from TrainingArguments, as in TRL:
    ``learning_rate=1e-6``, ``logging_steps=10``, ``gradient_checkpointing=True``, ``bf16=True`` unless ``fp16``;
    ``disable_dropout=False`` and ``remove_unused_columns=False`` (reward functions read the other columns).
    """

    # JSON strings from the command line become dicts (TrainingArguments.__post_init__), as in TRL's configs.
    _VALID_DICT_FIELDS = FusedConfig._VALID_DICT_FIELDS + [
        "transformers_continuous_batching_config", "generation_kwargs", "chat_template_kwargs"]

    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability to 0."})
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep only the prompt column (reward functions then see no other column)."}
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the MoE load-balancing loss; None uses the model config's, 0.0 disables it."},
    )
    # --- data and generation
    num_generations: int | None = field(default=8, metadata={"help": "Completions sampled per prompt (G)."})
    num_generations_eval: int | None = field(
        default=None, metadata={"help": "Completions per prompt in evaluation; None = num_generations."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "fusedrl: longest prompt in tokens; None keeps prompts whole (TRL 1.16)."}
    )
    prompt_truncation: str = field(
        default="keep_end",
        metadata={"help": "fusedrl: a prompt over max_prompt_length keeps its last tokens (keep_end) or raises "
                          "(error).", "choices": list(PROMPT_TRUNCATION_MODES)},
    )
    max_completion_length: int | None = field(default=512, metadata={"help": "Longest generated completion."})
    shuffle_dataset: bool | None = field(default=True, metadata={"help": "Shuffle the training prompts."})
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad prompt and completion ids to a multiple of this; 'auto' = 128 on "
                                          "Neuron, else None."}
    )
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Completions per generation round; exclusive with steps_per_generation."}
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-batches per generation round; None = gradient_accumulation_steps."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also scales the log-probs)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling; 0 disables it."})
    min_p: float | None = field(default=None, metadata={"help": "Minimum token probability relative to the top."})
    generation_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra GenerationConfig fields; they override the ones above."}
    )
    chat_template_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra keyword arguments of apply_chat_template for conversational prompts."}
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty on repeated tokens (1.0 = none)."})
    cache_implementation: str | None = field(default=None, metadata={"help": "KV cache implementation of generate."})
    # --- training
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; 0.0 loads no reference model."})
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes per generation round (mu)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping epsilon (and upper when epsilon_high "
                                                          "is None)."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clipping epsilon; DAPO uses 0.28. With loss_type='cispo' it caps the "
                                        "ratio itself (ScaleRL recommends 5.0)."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function; None = 1.0 each."}
    )
    reward_funcs: list[str] | None = field(
        default=None, metadata={"help": "fusedrl: registered reward names or reward-model paths, used when the "
                                        "trainer is given no reward_funcs."}
    )
    reward_failure: str = field(
        default="raise", metadata={"help": "fusedrl: a reward function that raises or returns a bad value: raise, "
                                           "or skip it for that batch (its rewards count as None).",
                                   "choices": list(ON_ERROR)}
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Exclude completions without EOS from the loss (DAPO)."}
    )
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO: mix the policy into the reference every ref_model_sync_steps."}
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "ref <- alpha policy + (1 - alpha) ref."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Steps between reference syncs."})
    log_completions: bool = field(
        default=False, metadata={"help": "Print a sample of prompts, completions and rewards at each log."}
    )
    num_completions_to_print: int | None = field(default=None, metadata={"help": "Rows printed; None = all."})
    log_multimodal: bool = field(
        default=True, metadata={"help": "Keep the round's prompt images with the logged completions (TRL's _logs)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device)
        name = type(self).__name__.removesuffix("Config")
        if self.auto_find_batch_size:
            raise ValueError(f"auto_find_batch_size is not supported by {name}: shrinking the batch on OOM would "
                             "split the num_generations completions of a prompt; lower per_device_train_batch_size")
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError(f"{name} needs num_generations >= 2 (the advantages compare completions of one "
                             f"prompt), got {self.num_generations}")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.prompt_truncation not in PROMPT_TRUNCATION_MODES:
            raise ValueError(f"prompt_truncation must be one of {PROMPT_TRUNCATION_MODES}, "
                             f"got {self.prompt_truncation!r}")
        if self.reward_failure not in ON_ERROR:
            raise ValueError(f"reward_failure must be one of {ON_ERROR}, got {self.reward_failure!r}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        check_generation_engine(self)
        self._set_generation_batch()

    def _set_generation_batch(self) -> None:
        """TRL's rule: ``generation_batch_size`` and ``steps_per_generation`` determine each other (not both)."""
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is None and self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = global_batch * self.steps_per_generation
        elif self.generation_batch_size is not None and self.steps_per_generation is None:
            if self.generation_batch_size % global_batch != 0:
                raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be divisible by the "
                                 f"global batch size ({global_batch})")
            self.steps_per_generation = self.generation_batch_size // global_batch
        elif self.generation_batch_size is None:
            self.generation_batch_size = global_batch * self.steps_per_generation
        else:
            raise ValueError("generation_batch_size and steps_per_generation cannot both be set; set one")
        if self.generation_batch_size % self.num_generations != 0:
            raise ValueError(f"generation_batch_size ({self.generation_batch_size}) must be divisible by "
                             f"num_generations ({self.num_generations}): every prompt's group must be complete")
        if self.do_eval and self.eval_strategy != "no":
            num_eval = self.num_generations_eval or self.num_generations
            if (self.per_device_eval_batch_size * self.world_size) % num_eval != 0:
                raise ValueError(f"the global eval batch size ({self.per_device_eval_batch_size} x "
                                 f"{self.world_size}) must be divisible by num_generations_eval ({num_eval})")


@dataclass
class GRPOConfig(OnlineConfig):
    """Configuration of :class:`fusedrl.GRPOTrainer`; every field means what it means in ``trl.GRPOConfig`` 1.16
    (see :class:`OnlineConfig` for the shared ones and the module docstring for what is absent).

    Loss: ``loss_type`` (``dapo``; or ``grpo``, ``bnpo``, ``dr_grpo``, ``cispo``, ``sapo``, ``luspo``, ``vespo``;
    ``fusedrl/ops/policy/reference.py`` gives each formula), ``epsilon``/``epsilon_high`` (cispo: the ratio cap),
    ``sapo_temperature_pos``/``_neg``, ``vespo_k_pos``/``vespo_lambda_pos``/``vespo_k_neg``/``vespo_lambda_neg``,
    ``delta`` (two-sided clipping), ``importance_sampling_level`` (``token`` or ``sequence``: GSPO), ``beta`` with
    the k3 KL, ``top_entropy_quantile``, ``use_bias_correction_kl``; the entropy bonus ``entropy_coef`` (``- coef *
    mean entropy``) and its adaptive controller (``use_adaptive_entropy``, ``entropy_coef_min``/``_max``/``_delta``,
    ``entropy_target``: ``grpo_loss.py``), ``off_policy_mask_threshold``. Model: ``cast_lm_head_to_fp32``.
    Advantages: ``scale_rewards`` (``group``, ``batch``, ``none``;
    True/False map to group/none), ``multi_objective_aggregation`` (``sum_then_normalize`` or
    ``normalize_then_sum``).
    """

    cast_lm_head_to_fp32: bool = field(
        default=False, metadata={"help": "Run the LM head of the policy and reference in float32 (weights and hidden "
                                         "states, generation included), as the ScaleRL recipe recommends."}
    )
    # TRL's vLLM importance-sampling and Hub fields (engine_config.py: use_vllm=True is refused, these follow it).
    vllm_importance_sampling_correction: bool = field(default=True, metadata={"help": "vLLM only (refused)."})
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata={"help": "vLLM only (refused)."})
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata={"help": "vLLM only (refused)."})
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata={"help": "vLLM only (refused)."})
    vllm_importance_sampling_cap: float | None = field(default=None, metadata={"help": "Deprecated (vLLM only)."})
    log_completions_hub_repo: str | None = field(
        default=None, metadata={"help": "Hub repository for the completions table (refused: fusedrl does not push)."}
    )
    max_tool_calling_iterations: int | None = field(
        default=None, metadata={"help": "Most tool-calling turns per rollout (tools / environment_factory); None: "
                                        "until no tool is called or max_completion_length is reached."}
    )
    off_policy_mask_threshold: float | None = field(
        default=None, metadata={"help": "Off-policy sequence masking (DeepSeek-V3.2's delta, e.g. 0.5): drop the "
                                        "policy term of negative-advantage sequences whose mean log-prob drop since "
                                        "sampling exceeds it; None disables it."}
    )
    delta: float | None = field(default=None, metadata={"help": "Upper cap of the unclipped ratio (INTELLECT-2)."})
    importance_sampling_level: str = field(
        default="token", metadata={"help": "token, or sequence (GSPO)."}
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={"help": "sum_then_normalize (weighted sum, then group advantages) or normalize_then_sum "
                          "(normalise each reward in its group, weighted sum, then batch-normalise)."},
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "Advantage scaling: group, batch or none (True/False = group/none)."}
    )
    loss_type: str = field(
        default="dapo", metadata={"help": "grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo or vespo."}
    )
    sapo_temperature_neg: float = field(
        default=1.05, metadata={"help": "SAPO's gate temperature for tokens with non-positive advantage."}
    )
    sapo_temperature_pos: float = field(
        default=1.0, metadata={"help": "SAPO's gate temperature for tokens with positive advantage."}
    )
    vespo_k_pos: float = field(
        default=2.0, metadata={"help": "VESPO's power exponent k for non-negative advantages (down-weights w < 1)."}
    )
    vespo_lambda_pos: float = field(
        default=3.0, metadata={"help": "VESPO's decay lambda for non-negative advantages (down-weights w > 1)."}
    )
    vespo_k_neg: float = field(default=3.0, metadata={"help": "VESPO's power exponent k for negative advantages."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "VESPO's decay lambda for negative advantages."})
    top_entropy_quantile: float = field(
        default=1.0, metadata={"help": "Keep the policy term of the top-rho quantile of tokens by entropy."}
    )
    use_bias_correction_kl: bool = field(
        default=True, metadata={"help": "Multiply the KL term by the importance ratio (DeepSeek-V3.2): unbiased "
                                        "reverse-KL gradient; changes the gradient whenever beta != 0."}
    )
    entropy_coef: float = field(
        default=0.0, metadata={"help": "Entropy bonus: subtract entropy_coef x the mean per-token entropy (the same "
                                       "meaning for every loss_type); the initial value when adaptive."}
    )
    use_adaptive_entropy: bool = field(
        default=False, metadata={"help": "Skywork-OR1's controller: each optimizer step, entropy_coef += "
                                         "entropy_coef_delta while entropy <= entropy_target, else -=; the bonus "
                                         "applies only while entropy <= entropy_target."}
    )
    entropy_coef_min: float = field(default=0.0, metadata={"help": "Lower bound of the adaptive entropy_coef."})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "Upper bound of the adaptive entropy_coef."})
    entropy_coef_delta: float = field(
        default=0.005, metadata={"help": "Step of the adaptive entropy_coef per optimizer step."}
    )
    entropy_target: float = field(
        default=0.2, metadata={"help": "Target mean per-token entropy (nats) of the adaptive controller, over the "
                                       "tokens the policy term acts on."}
    )

    def __post_init__(self):
        self.scale_rewards = {True: "group", False: "none", "true": "group", "false": "none"}.get(
            self.scale_rewards if not isinstance(self.scale_rewards, str) else self.scale_rewards.lower(),
            self.scale_rewards)
        super().__post_init__()
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES} in fusedrl's GRPO, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level must be token or sequence, "
                             f"got {self.importance_sampling_level!r}")
        if self.multi_objective_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ValueError("multi_objective_aggregation must be sum_then_normalize or normalize_then_sum, got "
                             f"{self.multi_objective_aggregation!r}")
        threshold = self.off_policy_mask_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):
            raise ValueError(f"off_policy_mask_threshold must be a finite number (e.g. 0.5) or None to disable the "
                             f"off-policy mask, got {threshold!r}")
        turns = self.max_tool_calling_iterations
        if turns is not None and (isinstance(turns, bool) or not isinstance(turns, int) or turns < 0):
            raise ValueError(f"max_tool_calling_iterations must be an integer >= 0 or None (no limit), got {turns!r}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {self.top_entropy_quantile}")
        self._check_loss_type_fields()
        self._check_entropy_fields()

    def _check_loss_type_fields(self) -> None:
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number > 0 (SAPO divides by it), got {value!r}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        # TRL 1.16's warnings about combinations that depart from the papers' setups, in its words.
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            logger.warning("When using `'luspo'` loss, `importance_sampling_level` should be set to `'sequence'` to "
                           "mirror the paper's setup.")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            logger.warning("VESPO computes sequence-level importance weights internally. `importance_sampling_level` "
                           "should be set to `'token'` (the default).")
        if self.importance_sampling_level == "sequence" and self.loss_type in TOKEN_SUMMED_LOSS_TYPES:
            logger.warning(f"When using `importance_sampling_level='sequence'`, the `'{self.loss_type}'` loss sums "
                           "per-token contributions, which effectively weights each sequence by its completion length "
                           "instead of optimizing the per-sequence objective. To reproduce the GSPO paper's setup, set "
                           "`loss_type='grpo'`.")

    def _check_entropy_fields(self) -> None:
        for name in ("entropy_coef", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.use_adaptive_entropy:
            if self.entropy_coef_min > self.entropy_coef_max:
                raise ValueError(f"entropy_coef_min ({self.entropy_coef_min}) must be <= entropy_coef_max "
                                 f"({self.entropy_coef_max}): they bound the adaptive entropy_coef")
            if self.entropy_coef_delta < 0:
                raise ValueError(f"entropy_coef_delta must be >= 0 (the adaptive controller's step), got "
                                 f"{self.entropy_coef_delta}")
