"""``DiffusionConfig``: the fields DDPO and AlignProp share, with TRL's last names and defaults (``DDPOConfig`` /
``AlignPropConfig`` of TRL 0.23; a subclass redeclares a field whose default differs, as AlignProp's learning rate).

Like TRL's, a plain dataclass (not ``TrainingArguments``): the trainers run their own epoch loop on accelerate.
fusedrl's additions: ``output_dir`` (checkpoints, image grids; None = ``logdir``), ``log_image_freq`` for both
trainers (TRL had it on AlignProp only), ``use_lora`` / ``lora_rank`` (TRL put them on the pipeline: the trainer
builds the pipeline when given a path), ``kernels`` and ``compile``.
Differences from TRL: ``mixed_precision`` defaults to None, meaning TRL's ``"fp16"`` on CUDA and ``"no"`` elsewhere
(accelerate refuses fp16 on a CPU); ``train_use_8bit_adam=True`` raises unless bitsandbytes is importable (as TRL);
``push_to_hub=True`` raises (fusedrl never talks to a hub). Every numeric field is checked here, so a bad value
fails when the config is built, naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from fusedrl.ops.dispatch import parse_kernel_spec

MIXED_PRECISION = ("no", "fp16", "bf16")


def _default_exp_name() -> str:
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]  # TRL: the script's file name without ".py"


def check_int(config, name: str, low: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_number(config, name: str, low: float, *, inclusive: bool = True, high: float | None = None) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= low if inclusive else value > low)
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = f"{'>=' if inclusive else '>'} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")


@dataclass
class DiffusionConfig:
    """Fields of every diffusion trainer; see the module docstring for what differs from TRL."""

    exp_name: str = field(default_factory=_default_exp_name, metadata={"help": "Name of this experiment."})
    run_name: str = field(default="", metadata={"help": "Name of this run."})
    seed: int = field(default=0, metadata={"help": "Random seed (sampling noise, prompts, shuffles)."})
    log_with: str | None = field(
        default=None, metadata={"help": "accelerate tracker(s), e.g. 'wandb' or 'tensorboard'; None logs nowhere."}
    )
    log_image_freq: int = field(
        default=1, metadata={"help": "Epochs between image grids (a PNG in output_dir/images); 0 disables them."}
    )
    tracker_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments of the tracker."})
    accelerator_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments of "
                                                                                       "Accelerator."})
    project_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Keyword arguments of the "
                                                                                   "accelerate ProjectConfiguration."})
    tracker_project_name: str = field(default="trl", metadata={"help": "Project name of the trackers."})
    logdir: str = field(default="logs", metadata={"help": "Top-level directory of checkpoints (TRL's name)."})
    output_dir: str | None = field(
        default=None, metadata={"help": "fusedrl: checkpoints, image grids and the final model; None = logdir."}
    )
    num_epochs: int = field(default=100, metadata={"help": "Number of epochs to train."})
    save_freq: int = field(default=1, metadata={"help": "Epochs between checkpoints."})
    num_checkpoint_limit: int | None = field(
        default=5, metadata={"help": "Newest checkpoints kept; older ones are deleted (None keeps all)."}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no, fp16 or bf16; None = fp16 on CUDA (TRL's default), no elsewhere."}
    )
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls on Ampere GPUs."})
    resume_from: str = field(
        default="", metadata={"help": "A checkpoint directory, or a directory of checkpoint_N (the newest is used)."}
    )
    sample_num_steps: int = field(default=50, metadata={"help": "DDIM sampling steps."})
    sample_eta: float = field(default=1.0, metadata={"help": "DDIM eta (the noise of each sampling step)."})
    sample_guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance weight."})
    train_batch_size: int = field(default=1, metadata={"help": "Batch size (per process) for training."})
    train_use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes' 8-bit AdamW."})
    train_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate."})
    train_adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    train_adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    train_adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    train_adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    train_gradient_accumulation_steps: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    negative_prompts: str | None = field(
        default=None, metadata={"help": "The negative prompt of classifier-free guidance; None = the empty prompt."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Not supported: fusedrl never uses a hub."})
    use_lora: bool = field(default=True, metadata={"help": "fusedrl: train LoRA on the UNet attention projections "
                                                           "(else the whole UNet) when given a pipeline path."})
    lora_rank: int = field(default=4, metadata={"help": "fusedrl: LoRA rank (alpha = rank), as TRL's r=4."})
    kernels: str | None = field(
        default=None, metadata={"help": "fusedrl kernel backends for this trainer, e.g. 'ddim_logprob=triton'."}
    )
    compile: bool = field(
        default=False, metadata={"help": "fusedrl: torch.compile the UNet (fullgraph, static shapes); the first call "
                                         "of each batch shape compiles (minutes on a CPU)."}
    )

    def __post_init__(self):
        if self.mixed_precision == "none":
            self.mixed_precision = "no"  # TRL's AlignPropConfig spelling
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)} or None, got "
                             f"{self.mixed_precision!r}")
        for name in ("num_epochs", "sample_num_steps", "train_batch_size", "train_gradient_accumulation_steps",
                     "save_freq", "lora_rank"):
            check_int(self, name, 1)
        check_int(self, "log_image_freq", 0)
        if self.num_checkpoint_limit is not None:
            check_int(self, "num_checkpoint_limit", 1)
        check_number(self, "sample_eta", 0.0)
        check_number(self, "sample_guidance_scale", 0.0)
        check_number(self, "train_learning_rate", 0.0, inclusive=False)
        check_number(self, "train_adam_beta1", 0.0, high=1.0)
        check_number(self, "train_adam_beta2", 0.0, high=1.0)
        check_number(self, "train_adam_weight_decay", 0.0)
        check_number(self, "train_adam_epsilon", 0.0, inclusive=False)
        check_number(self, "train_max_grad_norm", 0.0, inclusive=False)
        if self.push_to_hub:
            raise ValueError("push_to_hub=True is not supported: fusedrl never talks to a hub; save with "
                             "trainer.save_pretrained(path) and upload the directory yourself")
        if self.train_use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("train_use_8bit_adam=True needs bitsandbytes (pip install bitsandbytes)")
        if self.kernels is not None:
            parse_kernel_spec(self.kernels, source="kernels")  # a typo fails here, not at the first step
        if self.output_dir is None:
            self.output_dir = self.logdir

    def to_dict(self) -> dict[str, Any]:
        """Every field, flattened one level (``tracker_kwargs/wandb_project``) as TRL's ``to_dict`` for trackers."""
        flat: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if isinstance(value, dict):
                flat.update({f"{key}/{inner}": item for inner, item in value.items()})
            else:
                flat[key] = value
        return flat
