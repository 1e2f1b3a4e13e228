"""The config every fusedrl trainer extends: ``transformers.TrainingArguments`` with TRL 1.16's trainer defaults and
fusedrl's shared fields (kernels, graph capture, memory, faults), plus TRL's ``pad_to_multiple_of`` rule.

Precision: TRL defaults ``bf16=True``, which transformers refuses on a machine without a bf16-capable accelerator
("Your setup doesn't support bf16/gpu") unless ``use_cpu=True``. Left unset (None), ``bf16`` here is True where
transformers accepts it and False (fp32) elsewhere, said in one log line; an explicit ``bf16=True`` is passed on
as it is, error included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from fusedrl.ops.dispatch import parse_kernel_spec
from fusedrl.runtime.resumable import DEFAULT_MAX_NONFINITE_STEPS
from fusedrl.trainers.models import pretrained_kwargs

logger = logging.getLogger("fusedrl")


@dataclass
class FusedConfig(TrainingArguments):
    """``TrainingArguments`` with TRL 1.16's trainer defaults (logging every 10 steps, gradient checkpointing on,
    bf16 unless fp16 is set or the machine cannot run it: module docstring) and the fields every fusedrl trainer
    shares.

    kernels: backend selection for this trainer's fused ops, e.g. ``"linear_logprobs=compiled"`` or
        ``"all=reference"`` (see ``fusedrl.ops.dispatch``); None leaves the process-wide selection
        (``configure_kernels``, ``FUSEDRL_KERNELS``, defaults) in charge.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (a float < 1 is a ratio)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in the backward."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None means True unless fp16 "
                                                               "or the machine has no bf16 support (then fp32)."})
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra scheduler arguments."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments of from_pretrained when the model is given as a path."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preprocessing."})
    kernels: str | None = field(
        default=None, metadata={"help": "fusedrl kernel backends for this trainer, e.g. 'linear_logprobs=compiled'."}
    )
    activation_offloading: bool = field(
        default=False, metadata={"help": "Copy saved activations to host memory on a side stream during the forward "
                                         "and prefetch them back in the backward (docs/offloading.md)."}
    )
    compile: bool = field(
        default=False, metadata={"help": "Compile the loss region (final hidden states -> fused head -> loss) with "
                                         "fullgraph=True and dynamic shapes (runtime/compile.py)."}
    )
    compile_blocks: bool = field(
        default=False, metadata={"help": "Also compile each transformer block in place (one shared graph)."}
    )
    checkpoint_every_n_layers: int = field(
        default=1, metadata={"help": "With gradient_checkpointing: checkpoint every n-th decoder layer only (1: all)."}
    )
    selective_checkpointing: bool = field(
        default=False, metadata={"help": "With gradient_checkpointing: keep matmul and attention outputs, recompute "
                                         "only the cheap elementwise ops in the backward (runtime/memory.py)."}
    )
    release_memory_every_step: bool = field(
        default=False, metadata={"help": "gc.collect() and empty the accelerator cache after every optimizer step "
                                         "(each gradient-accumulation boundary)."}
    )
    log_memory: bool = field(
        default=True, metadata={"help": "Log peak memory of each step: memory/peak_allocated_mb and "
                                        "memory/peak_reserved_mb on CUDA, memory/peak_rss_mb on CPU."}
    )

    # `None | str | list[str]` in this order, as TrainingArguments.report_to: HfArgumentParser reads such a field as
    # one string (a comma-separated list on the command line); `str | list[str] | None` would make it fail.
    model_adapter_name: None | str | list[str] = field(
        default=None, metadata={"help": "With a PEFT model: the adapter to train (the others stay frozen), or a list "
                                        "of adapters trained together; 'a,b' is the list ['a', 'b']. None: the "
                                        "active adapter."}
    )
    ref_adapter_name: str | None = field(
        default=None, metadata={"help": "With a PEFT model: an existing adapter that is the reference (never "
                                        "trained; with sync_ref_model the trained adapter is synced into it). None: "
                                        "the base (adapters disabled); with model_adapter_name unset too, the "
                                        "frozen 'ref' copy of a pretrained adapter."}
    )

    rank_invariant_sampling: bool = field(
        default=False, metadata={"help": "Online trainers: sample each completion from a random stream of its own, "
                                         "seeded from seed, the step and its global row, so a run samples the same "
                                         "completions on any number of processes (trainers/online/row_seeds.py). "
                                         "False: each process's global RNG, as TRL."}
    )

    shared_prefix: bool = field(
        default=True, metadata={"help": "Run rows that start alike (a pair's chosen and rejected, a prompt's "
                                         "completions) through the trunk once: the shared prompt once, each "
                                         "completion after it under a mask that keeps siblings apart "
                                         "(runtime/shared_prefix/). Used where it is exact and cheaper, decided "
                                         "per model (logged once) and per batch; False: every row whole."}
    )

    max_nonfinite_steps: int = field(
        default=DEFAULT_MAX_NONFINITE_STEPS,
        metadata={"help": "Optimizer steps with a non-finite loss or gradient to skip before training stops with an "
                          "error (0: stop at the first; runtime/faults.py)."},
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = default_bf16(fp16=self.fp16, use_cpu=self.use_cpu)
        if not (isinstance(self.max_nonfinite_steps, int) and self.max_nonfinite_steps >= 0):
            raise ValueError(f"max_nonfinite_steps must be an int >= 0 (0 stops at the first non-finite step), got "
                             f"{self.max_nonfinite_steps!r}")
        if not (isinstance(self.checkpoint_every_n_layers, int) and self.checkpoint_every_n_layers >= 1):
            raise ValueError(f"checkpoint_every_n_layers must be an int >= 1 (1 checkpoints every layer), got "
                             f"{self.checkpoint_every_n_layers!r}")
        super().__post_init__()
        if self.checkpoint_every_n_layers != 1:
            # transformers reads every_n_layers from the checkpointing kwargs (both names mirror each other).
            kwargs = {**(self.activation_checkpointing_kwargs or {}), "every_n_layers": self.checkpoint_every_n_layers}
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs
        if self.kernels is not None:
            parse_kernel_spec(self.kernels, source="kernels")  # a typo fails here, not at the first step
        pretrained_kwargs(self.model_init_kwargs, self.trust_remote_code)  # a bad dtype fails here, not at loading
        self.model_adapter_name = normalise_adapter_names(self.model_adapter_name, self.ref_adapter_name)


def default_bf16(*, fp16: bool, use_cpu: bool) -> bool:
    """TRL's ``bf16=True`` default where transformers accepts it (a bf16-capable accelerator, XLA, or the CPU with
    ``use_cpu=True``: autocast), else False; the choice is logged in one line."""
    if fp16:
        return False
    if use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available():
        logger.info("fusedrl: bf16 not set: training with bf16 mixed precision (TRL's default)%s",
                    " on the CPU (use_cpu=True: autocast)" if use_cpu else "")
        return True
    logger.warning("fusedrl: bf16 not set and this machine has no bf16-capable accelerator: training in fp32 "
                   "(bf16=False). Set bf16=False to silence this, or bf16=True with use_cpu=True for bf16 autocast "
                   "on the CPU")
    return False


def normalise_adapter_names(names: str | list[str] | None, ref_adapter_name: str | None) -> str | list[str] | None:
    """``model_adapter_name`` checked for its type: None, a name, or a list of distinct names ("a,b" is ["a", "b"]);
    neither may be the reference adapter. Whether the model has them is checked when the trainer prepares it."""
    if ref_adapter_name is not None and not (isinstance(ref_adapter_name, str) and ref_adapter_name):
        raise ValueError(f"ref_adapter_name must be an adapter name (a non-empty string), got {ref_adapter_name!r}")
    if names is None:
        return None
    if isinstance(names, str) and "," in names:
        names = [name.strip() for name in names.split(",")]
    listed = [names] if isinstance(names, str) else names
    if not (isinstance(listed, (list, tuple)) and listed and all(isinstance(n, str) and n for n in listed)):
        raise ValueError(f"model_adapter_name must be an adapter name or a non-empty list of names, got {names!r}")
    if len(set(listed)) != len(listed):
        raise ValueError(f"model_adapter_name lists an adapter twice: {list(listed)}; name each adapter once")
    if ref_adapter_name in listed:
        raise ValueError(f"ref_adapter_name={ref_adapter_name!r} is also in model_adapter_name={names!r}: the reference "
                         "adapter is never trained; choose another reference adapter or leave it out of the list")
    return names if isinstance(names, str) else list(names)


def resolve_pad_to_multiple_of(value: int | str | None, device: torch.device) -> int | None:
    """TRL's ``pad_to_multiple_of``: an int, None, or ``"auto"`` (128 on Neuron, which compiles once per input shape,
    so padding bounds the number of compilations; None elsewhere). Strings from the CLI/YAML are parsed."""
    if isinstance(value, str) and value != "auto":
        text = value.lower()
        return None if text in ("none", "null") else int(text)
    if value == "auto":
        return 128 if device.type == "neuron" else None
    return value
