"""``DPOConfig``: TRL 1.16's DPOConfig fields, names and defaults, plus fusedrl's ``kernels`` (from FusedConfig).

Differences from TRL: none in the fields. ``activation_offloading`` (shared by every fusedrl config) is
``fusedrl.runtime.offload.ActivationOffloader``; ``padding_free`` warns and falls back to padding, as TRL 1.16 does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from fusedrl.trainers.config import FusedConfig, resolve_pad_to_multiple_of


@dataclass
class DPOConfig(FusedConfig):
    """Configuration of :class:`fusedrl.DPOTrainer`; every field means what it means in ``trl.DPOConfig`` 1.16.

    Model: ``model_init_kwargs``, ``trust_remote_code``, ``disable_dropout`` (FusedConfig), ``router_aux_loss_coef``.
    Data: ``dataset_num_proc``, ``max_length`` (1024; None = no truncation), ``truncation_mode`` (``keep_start``),
    ``padding_free``, ``pad_to_multiple_of`` (``"auto"``: None off Neuron), ``precompute_ref_log_probs``,
    ``precompute_ref_batch_size``, ``pad_token`` (deprecated).
    Loss: ``loss_type`` (a name or a list, MPO; also names registered with ``fusedrl.register_preference_loss``)
    with ``loss_weights``, ``beta``, ``label_smoothing``, ``ld_alpha``, ``f_divergence_type`` +
    ``f_alpha_divergence_coef``, ``use_weighting`` (WPO), ``discopop_tau``.
    Reference: ``sync_ref_model`` with ``ref_model_mixup_alpha`` and ``ref_model_sync_steps`` (TR-DPO).
    Defaults that differ from TrainingArguments, as in TRL: ``learning_rate=1e-6``, ``logging_steps=10``,
    ``gradient_checkpointing=True``, ``bf16=True`` unless ``fp16``.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})

    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the MoE load-balancing loss; None uses the model config's, 0.0 disables it."},
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest tokenized sequence, truncated beyond; None disables truncation."}
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "keep_start (or the deprecated keep_end).", "choices": ["keep_end", "keep_start"]},
    )
    padding_free: bool = field(
        default=False, metadata={"help": "Unavailable in TRL 1.16 too: warns and falls back to padding."}
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
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "One or more of sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, "
                          "aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, or names registered with "
                          "fusedrl.register_preference_loss (summed with loss_weights)."},
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss_type; None = 1.0 each."}
    )
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO weight of the tokens beyond the shorter completion, in [0, 1]."}
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={"help": "reverse_kl, forward_kl, js_divergence or alpha_divergence (f-DPO)."},
    )
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "alpha of alpha_divergence."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label-flip probability of robust/aot, epsilon of exo_pair."}
    )
    beta: float = field(default=0.1, metadata={"help": "Deviation from the reference (tau for ipo)."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO weighting of each pair's loss."})
    discopop_tau: float = field(default=0.05, metadata={"help": "Temperature of the discopop loss."})
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO: mix the policy into the reference every ref_model_sync_steps."}
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "ref <- alpha policy + (1 - alpha) ref."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Steps between reference syncs."})
    pad_token: str | None = field(
        default=None, metadata={"help": "Deprecated: set tokenizer.pad_token instead."}
    )

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(self.loss_type)} loss types")
        if self.pad_token is not None:
            warnings.warn("pad_token is deprecated (as in TRL 1.16): set tokenizer.pad_token instead", FutureWarning,
                          stacklevel=3)
        if self.truncation_mode == "keep_end":
            warnings.warn("truncation_mode='keep_end' is deprecated (as in TRL 1.16); use 'keep_start'",
                          FutureWarning, stacklevel=3)
        super().__post_init__()
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device)
