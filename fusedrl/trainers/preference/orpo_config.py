"""ORPOConfig: ``trl.experimental.orpo.ORPOConfig`` 1.16's fields and defaults on fusedrl's base config."""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedrl.trainers.config import FusedConfig


@dataclass
class ORPOConfig(FusedConfig):
    """Configuration of :class:`fusedrl.trainers.ORPOTrainer`; every field means what it means in TRL 1.16's
    ``trl.experimental.orpo.ORPOConfig``, plus ``kernels`` (FusedConfig).

    Model: ``model_init_kwargs``, ``trust_remote_code``, ``disable_dropout``. Data: ``max_length`` (1024; None means
    512, as in TRL), ``padding_value`` (None = the tokenizer's pad id), ``dataset_num_proc``. Loss: ``beta`` (the
    paper's lambda). Encoder-decoder models (T5): ``max_completion_length`` cuts the answers (None means 128, as in
    TRL); ``is_encoder_decoder`` is read from the model's config, as TRL does whenever it is given a model. Kept for
    compatibility, refused when set: ``generate_during_eval``.
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
    beta: float = field(default=0.1, metadata={"help": "Weight of the odds-ratio term (the paper's lambda)."})
    padding_value: int | None = field(
        default=None, metadata={"help": "Token id that pads input_ids; None uses the tokenizer's pad token."}
    )
    generate_during_eval: bool = field(
        default=False, metadata={"help": "Unsupported (TRL logs generations to W&B/Comet); must stay False."}
    )
    is_encoder_decoder: bool | None = field(
        default=None, metadata={"help": "Unused: the model's config says whether it is encoder-decoder (as in TRL)."}
    )
