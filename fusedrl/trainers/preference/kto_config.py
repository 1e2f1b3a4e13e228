"""KTOConfig: ``trl.KTOConfig`` 1.16's fields and defaults on fusedrl's base config."""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedrl.trainers.config import FusedConfig, resolve_pad_to_multiple_of


@dataclass
class KTOConfig(FusedConfig):
    """Configuration of :class:`fusedrl.trainers.KTOTrainer`; every field means what it means in ``trl.KTOConfig``
    1.16, plus ``kernels`` (FusedConfig).

    Model: ``model_init_kwargs``, ``trust_remote_code``, ``disable_dropout``, ``router_aux_loss_coef``.
    Data: ``dataset_num_proc``, ``max_length`` (1024; None = no truncation), ``pad_to_multiple_of`` (``"auto"``: None
    off Neuron), ``precompute_ref_log_probs``, ``precompute_ref_batch_size``, ``train_sampling_strategy``
    (``"sequential"``: the KL pairs are built per batch of the dataset order).
    Loss: ``loss_type`` (kto, apo_zero_unpaired), ``beta``, ``desirable_weight``, ``undesirable_weight``.
    Reference: ``sync_ref_model`` with ``ref_model_mixup_alpha`` and ``ref_model_sync_steps`` (TR-DPO).
    Defaults that differ from TrainingArguments, as in TRL: ``learning_rate=1e-6``, ``logging_steps=10``,
    ``gradient_checkpointing=True``, ``bf16=True`` unless ``fp16``, ``train_sampling_strategy="sequential"``.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={"help": "Training sampler; the 'kto' loss needs 'sequential'.",
                  "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the MoE load-balancing loss; None uses the model config's, 0.0 disables it."},
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest tokenized sequence (its start is kept); None disables truncation."}
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad sequences to a multiple of this; 'auto' = 128 on Neuron, else None."}
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute the reference log-probs of the whole dataset before training."}
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the precompute pass; None = the per-device batch size."}
    )
    loss_type: str = field(
        default="kto", metadata={"help": "Type of loss to use.", "choices": ["kto", "apo_zero_unpaired"]}
    )
    beta: float = field(default=0.1, metadata={"help": "Deviation from the reference model."})
    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of the desirable examples' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of the undesirable examples' losses."})
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO: mix the policy into the reference every ref_model_sync_steps."}
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "ref <- alpha policy + (1 - alpha) ref."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Steps between reference syncs."})

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device)
