"""CPOConfig: ``trl.experimental.cpo.CPOConfig`` 1.16's fields and defaults on fusedrl's base config."""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedrl.trainers.config import FusedConfig


@dataclass
class CPOConfig(FusedConfig):
    """Configuration of :class:`fusedrl.trainers.CPOTrainer`; every field means what it means in TRL 1.16's
    ``trl.experimental.cpo.CPOConfig``, plus ``kernels`` (FusedConfig).

    Model: ``model_init_kwargs``, ``trust_remote_code``, ``disable_dropout``. Data: ``max_length`` (1024; None means
    512, as in TRL), ``dataset_num_proc``. Loss: ``loss_type`` (sigmoid, hinge, ipo, simpo; ``"alphapo"`` becomes
    ``"simpo"`` with ``cpo_alpha=0``, as in TRL), ``beta``, ``label_smoothing`` (sigmoid/simpo only), ``cpo_alpha``
    (weight of the chosen NLL), ``simpo_gamma``, ``alpha`` (AlphaPO reward shape, any loss type). Encoder-decoder
    models (T5): ``max_completion_length`` cuts the answers (None means 128, as in TRL); ``is_encoder_decoder`` is read
    from the model's config, as TRL does whenever it is given a model. Kept for compatibility, refused when set:
    ``generate_during_eval``.
    Defaults that differ from TrainingArguments, as in TRL: ``learning_rate=1e-6``, ``logging_steps=10``,
    ``gradient_checkpointing=True``, ``bf16=True`` unless ``fp16``.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest prompt + completion; the completion is cut. None means 512."}
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Encoder-decoder models: longest answer (None means 128); else unused."}
    )
    beta: float = field(default=0.1, metadata={"help": "Inverse temperature of the preference term (tau for ipo)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the sigmoid/simpo losses."})
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "Type of loss to use.", "choices": ["sigmoid", "hinge", "ipo", "simpo", "alphapo"]},
    )
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the BC regularizer (chosen NLL)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "Target reward margin of the simpo loss."})
    alpha: float = field(
        default=0.0, metadata={"help": "AlphaPO reward shape: r = (1 - p^-alpha) / alpha; 0 uses log p."}
    )
    generate_during_eval: bool = field(
        default=False, metadata={"help": "Unsupported (TRL logs generations to W&B/Comet); must stay False."}
    )
    is_encoder_decoder: bool | None = field(
        default=None, metadata={"help": "Unused: the model's config says whether it is encoder-decoder (as in TRL)."}
    )

    def __post_init__(self):
        if self.loss_type == "alphapo":  # TRL's sugar: AlphaPO is SimPO without the NLL term
            self.loss_type = "simpo"
            self.cpo_alpha = 0.0
        super().__post_init__()
