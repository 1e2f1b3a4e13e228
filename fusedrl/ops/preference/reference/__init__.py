"""Preference losses on sequence log-probs: readable fp32 references of TRL 1.16's DPO, ORPO, KTO and CPO trainers.

``sequence`` turns per-token log-probs into the sequence-level inputs (sums, means, LD-DPO sums, token-mean NLL,
WPO weights); the loss modules take ``[B]`` (paired) or ``[N]`` (unpaired) tensors and return NamedTuples.
"""

from fusedrl.ops.preference.reference.cpo import CPO_LOSS_TYPES, CPOLossOutput, alphapo_rewards, cpo_losses
from fusedrl.ops.preference.reference.dpo import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    DPOLossOutput,
    dpo_losses,
    f_divergence_scores,
)
from fusedrl.ops.preference.reference.kto import KTO_LOSS_TYPES, KTOLossOutput, kto_kl_estimate, kto_losses
from fusedrl.ops.preference.reference.orpo import ORPOLossOutput, log1mexp, orpo_loss
from fusedrl.ops.preference.sequence import (
    ld_sequence_logps,
    log_sum_sq_probs,
    sequence_logps,
    token_mean_nll,
    wpo_pair_weights,
)

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "KTO_LOSS_TYPES",
    "CPOLossOutput",
    "DPOLossOutput",
    "KTOLossOutput",
    "ORPOLossOutput",
    "alphapo_rewards",
    "cpo_losses",
    "dpo_losses",
    "f_divergence_scores",
    "kto_kl_estimate",
    "kto_losses",
    "ld_sequence_logps",
    "log1mexp",
    "log_sum_sq_probs",
    "orpo_loss",
    "sequence_logps",
    "token_mean_nll",
    "wpo_pair_weights",
]
