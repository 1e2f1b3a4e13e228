"""CPOTrainer: TRL 1.16's CPO recipe (``trl.experimental.cpo``), step for step, on fusedrl's fused LM head.

CPO (https://arxiv.org/abs/2401.08417) is DPO without the reference model: the preference term compares the policy's
own chosen and rejected log-probs, and a behaviour-cloning NLL on the chosen completions (weight ``cpo_alpha``)
keeps the policy near the preferred data. ``loss_type`` picks the preference term (``fusedrl.ops.preference.
linear_preference_loss`` with ``family="cpo"``, fused with the LM head: 3 head passes; the ``preference`` backend of
``kernels``): ``sigmoid`` and ``hinge`` on summed completion log-probs, ``ipo`` and ``simpo`` (SimPO,
https://arxiv.org/abs/2405.14734, margin ``simpo_gamma``) on length-averaged ones; ``alpha != 0`` swaps log p for the
AlphaPO reward ``(1 - p^-alpha) / alpha`` in any of them, and ``loss_type="alphapo"`` is SimPO with that reward and no
NLL.

The data path, batch layout and step skeleton are ORPO's (``fusedrl.trainers.preference.orpo.ReferenceFreeTrainer``:
TRL's ORPO and CPO sources are copies apart from the loss), encoder-decoder models and the deliberate differences
listed there included. One step: per-token log-probs of the completions of the 2B rows ``[chosen; rejected]``; sums
or means per row; the loss; TRL's metrics: rewards/{chosen,rejected,accuracies,margins}, logps/*, logits/* (over
every position of the padded rows, as TRL), nll_loss (0 when ``cpo_alpha == 0``, which TRL does not compute either).

AlphaPO rewards use ``-expm1(-alpha * logp) / alpha``; TRL's ``(1 - exp(logp) ** -alpha) / alpha`` is the same
value, but overflows to inf once ``p`` underflows (``logp < -104`` in fp32), where this stays finite.
"""

from __future__ import annotations

import logging

import torch

from fusedrl.ops.preference import CPO_LOSS_TYPES, LinearPreferenceLoss, linear_preference_loss
from fusedrl.trainers.preference.cpo_config import CPOConfig
from fusedrl.trainers.preference.orpo import ReferenceFreeTrainer

logger = logging.getLogger("fusedrl")

# TRL's concatenated_forward averages the completion log-probs for these losses and sums them for the others.
_AVERAGED_LOSS_TYPES = ("ipo", "simpo")


class CPOTrainer(ReferenceFreeTrainer):
    """Contrastive Preference Optimization and its variants (``loss_type``, ``alpha``). Arguments as
    ``trl.experimental.cpo.CPOTrainer`` 1.16: ``model`` is a path or a causal LM, or an encoder-decoder model
    instance (or a PeftModel); ``train_dataset`` has ``prompt``/``chosen``/``rejected`` (standard or conversational;
    the prompt may be implicit) or TRL's tokenized columns."""

    config_class = CPOConfig
    method = "CPO"

    def check_config(self, args: CPOConfig) -> None:
        if args.loss_type == "kto_pair":
            raise ValueError("loss_type='kto_pair' was removed from CPO (as in TRL); use KTOTrainer")
        if args.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {args.loss_type!r}; choose from {[*CPO_LOSS_TYPES, 'alphapo']}")
        if args.loss_type in ("hinge", "ipo") and args.label_smoothing > 0:
            logger.warning("label_smoothing=%s is ignored by the %s loss", args.label_smoothing, args.loss_type)

    def scored_rows(self, inputs):
        return inputs["completion_mask"]

    def head_loss(self, head, inputs):
        args = self.args
        out = self.loss_region(_cpo_region)(head.hidden_NTH, head.weight_VH, head.bias_V, head.labels_NT, args,
                                            softcap=head.softcap)
        # TRL logs nll_loss = 0 when cpo_alpha == 0 (it does not compute the NLL then).
        nll_loss = torch.zeros_like(out.chosen_nll) if args.cpo_alpha == 0 else out.chosen_nll.detach()
        metrics = {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards,
                   "chosen_logps": out.chosen_logps.detach(), "rejected_logps": out.rejected_logps.detach(),
                   "nll_loss": nll_loss.float().reshape(())}
        return out.loss, metrics


def _cpo_region(hidden_NTH, weight_VH, bias_V, labels_NT, args: CPOConfig,
                softcap: float | None = None) -> LinearPreferenceLoss:
    """The loss region (compiled whole with ``compile=True``): completion hidden states -> fused head -> sums or
    means per row and the chosen NLL -> the preference term plus ``cpo_alpha`` x NLL, 3 head passes
    (``linear_preference_loss(family="cpo", fused=True)``); softcap: the head's soft cap."""
    return linear_preference_loss(
        hidden_NTH, weight_VH, labels_NT, bias=bias_V, family="cpo", loss_type=args.loss_type, beta=args.beta,
        label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma, alpha=args.alpha,
        cpo_alpha=args.cpo_alpha, average_log_prob=args.loss_type in _AVERAGED_LOSS_TYPES, fused=True,
        softcap=softcap,
    )
