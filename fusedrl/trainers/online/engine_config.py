"""The generation-engine fields of TRL 1.16's ``GRPOConfig`` / ``RLOOConfig``, mixed into fusedrl's
``OnlineConfig`` so a TRL config ports unchanged.

- ``use_transformers_continuous_batching`` (and its deprecated alias ``use_transformers_paged``): sample with
  transformers' continuous-batching engine (``model.generate_batch``: a paged KV cache, prompts not padded), built
  from ``transformers_continuous_batching_config`` with TRL's training-aware ``max_memory_percent=0.5`` default
  (``rollout._sample_continuous``). Text prompts only, as TRL's (a VLM processor is refused), and without
  ``rank_invariant_sampling`` (the engine draws from the global RNG).
- ``use_vllm`` and every ``vllm_*`` field: TRL's names and defaults, so configs carry over; ``use_vllm=True`` is
  refused (fusedrl samples with transformers), and the other fields only matter with it, as in TRL.
- ``ds3_gather_for_generation``: kept and without effect: fusedrl generates under ZeRO-3 layer by layer, the
  processes stepping together (``rollout.py``).
- ``log_unique_prompts``: the printed completions table (``log_completions``) shows each prompt once.
- ``log_completions_hub_repo`` (GRPO): pushing the table to the Hub is not done by fusedrl; refused when set.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

VLLM_MODES = ("server", "colocate")
VLLM_IMPORTANCE_SAMPLING_MODES = ("sequence_mask", "sequence_truncate", "token_mask", "token_truncate")


@dataclass
class GenerationEngineFields:
    """TRL's generation-engine fields (module docstring); ``check_generation_engine`` validates them."""

    use_transformers_continuous_batching: bool = field(
        default=False, metadata={"help": "Sample with transformers' continuous batching (model.generate_batch)."}
    )
    transformers_continuous_batching_config: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments of transformers.generation.ContinuousBatchingConfig."}
    )
    use_transformers_paged: bool = field(
        default=False, metadata={"help": "Deprecated: use use_transformers_continuous_batching."}
    )
    log_unique_prompts: bool = field(
        default=False, metadata={"help": "Show each prompt once in the printed completions table."}
    )
    ds3_gather_for_generation: bool = field(
        default=True, metadata={"help": "TRL's ZeRO-3 gather for generation; fusedrl gathers layer by layer anyway."}
    )
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (not supported by fusedrl)."})
    vllm_mode: str = field(default="colocate", metadata={"help": "server or colocate.", "choices": list(VLLM_MODES)})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vLLM model implementation: vllm or transformers."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "vLLM sleep mode between generations."})
    vllm_structured_outputs_regex: str | None = field(default=None, metadata={"help": "vLLM structured outputs."})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "vLLM server URL."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vLLM server host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vLLM server port."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Seconds to wait for the vLLM server."})
    vllm_group_port: int = field(default=51216, metadata={"help": "vLLM weight-update group port."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM GPU memory share."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "vLLM context length."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size."})


def check_generation_engine(args) -> None:
    """TRL's checks and conversions of the engine fields (at the config's ``__post_init__``)."""
    if args.use_transformers_paged:
        warnings.warn("`use_transformers_paged` is deprecated and will be removed in TRL v2.0.0. Use "
                      "`use_transformers_continuous_batching` instead.", FutureWarning, stacklevel=3)
        args.use_transformers_continuous_batching = True
    if isinstance(args.transformers_continuous_batching_config, str):  # the command line passes JSON
        args.transformers_continuous_batching_config = json.loads(args.transformers_continuous_batching_config)
    if args.vllm_mode not in VLLM_MODES:
        raise ValueError(f"vllm_mode must be one of {VLLM_MODES}, got {args.vllm_mode!r}")
    mode = getattr(args, "vllm_importance_sampling_mode", None)
    if mode is not None and mode not in VLLM_IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {VLLM_IMPORTANCE_SAMPLING_MODES}, got "
                         f"{mode!r}")


def refuse_unsupported_engine(args, trainer: str, *, vision: bool = False) -> None:
    """At the trainer's construction, as TRL's own refusals sit there: vLLM, the Hub upload of completions, and
    continuous batching with a vision-language processor (TRL's words)."""
    if args.use_transformers_continuous_batching and vision:
        raise ValueError("`use_transformers_continuous_batching` does not support multimodal models. fusedrl: sample "
                         "VLMs with model.generate (use_transformers_continuous_batching=False)")
    if args.use_transformers_continuous_batching and getattr(args, "rank_invariant_sampling", False):
        raise ValueError("use_transformers_continuous_batching samples from the global RNG; it cannot give each row "
                         "its own seeded stream: set rank_invariant_sampling=False, or sample with model.generate")
    if args.use_vllm:
        fix = "use_transformers_continuous_batching=True for paged batched sampling, or " \
              if not args.use_transformers_continuous_batching else ""
        raise ValueError(f"use_vllm=True is not supported by fusedrl's {trainer}: it samples with transformers "
                         f"(model.generate, or continuous batching); set {fix}use_vllm=False")
    if getattr(args, "log_completions_hub_repo", None) is not None:
        raise ValueError("log_completions_hub_repo is not supported by fusedrl (it does not push completions to the "
                         "Hub); unset it and use log_completions / report_to for the completions table")


def continuous_batching_config(args):
    """The ``ContinuousBatchingConfig`` of ``args`` (TRL's ``max_memory_percent=0.5`` default: the engine's 0.9
    would leave too little memory for the training backward), or None when continuous batching is off."""
    if not args.use_transformers_continuous_batching:
        return None
    from transformers.generation import ContinuousBatchingConfig

    kwargs = dict(args.transformers_continuous_batching_config or {})
    kwargs.setdefault("max_memory_percent", 0.5)
    return ContinuousBatchingConfig(**kwargs)
