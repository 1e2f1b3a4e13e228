"""ORPO on length-normalised log-probs: the fp32 reference of TRL 1.16's ``ORPOTrainer``
(``trl.experimental.orpo``: ``odds_ratio_loss`` plus the NLL term of ``get_batch_loss_metrics``).

Legend: B pairs. ``chosen_logps`` / ``rejected_logps`` are per-token *means* over the completion (``log P`` per
token, so ``<= 0``). With ``odds(p) = p / (1 - p)``:

    log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))          = log odds(e^c) - log odds(e^r)
    odds_ratio_losses = -beta * logsig(log_odds)                 [B]
    loss = chosen_nll + mean_B(odds_ratio_losses)

TRL's ``odds_ratio_loss`` returns ``+beta * logsig(log_odds)`` and subtracts its mean; here the term is returned with
the sign of a loss. TRL logs ``log_odds_ratio = mean(logsig(log_odds))`` and ``log_odds_chosen = mean(log_odds)``;
here both are per pair (take ``.mean()`` for TRL's metrics). ORPO has no reference model. Its NLL is the token mean
over prompt *and* completion of the chosen rows (TRL masks with the attention mask there, unlike CPO).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Below -ln 2, 1 - e^x >= 1/2 so log1p(-e^x) is accurate; above it e^x is near 1 and -expm1(x) keeps the digits that
# 1 - e^x would cancel (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").
_LOG1MEXP_SWITCH = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (``-inf`` at ``x = 0``, ``0`` as ``x -> -inf``).

    Each branch sees only inputs it is accurate on (the other branch's input is replaced), so neither the value nor
    the gradient of ``torch.where`` picks up a NaN from the unused side.
    """
    small = x < _LOG1MEXP_SWITCH
    x_small = torch.where(small, x, torch.full_like(x, -1.0))
    x_large = torch.where(small, torch.full_like(x, -0.5), x)
    return torch.where(small, torch.log1p(-torch.exp(x_small)), torch.log(-torch.expm1(x_large)))


class ORPOLossOutput(NamedTuple):
    """``loss``: scalar; ``odds_ratio_losses`` ``[B]``; ``nll``: the scalar chosen NLL passed in; rewards ``[B]``:
    ``beta * mean logp``, detached; ``log_odds_ratio`` ``[B]``: ``logsig(log_odds)``; ``log_odds_chosen`` ``[B]``:
    ``log_odds`` (TRL's names for their batch means)."""

    loss: torch.Tensor
    odds_ratio_losses: torch.Tensor
    nll: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    log_odds_ratio: torch.Tensor
    log_odds_chosen: torch.Tensor


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> ORPOLossOutput:
    """ORPO loss ``chosen_nll + mean(-beta * logsig(log_odds))`` and its pieces, in fp32.

    chosen_logps, rejected_logps: ``[B]`` mean token log-probs (``sequence.sequence_logps(..., average=True)``).
    chosen_nll: scalar token-mean NLL of the chosen rows over prompt and completion (``sequence.token_mean_nll``).
    beta: ``ORPOConfig.beta`` (the paper's lambda), default 0.1.
    A mean log-prob of exactly 0 (probability 1) has infinite odds; that is the only non-finite case.
    """
    chosen, rejected = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_odds_ratio = F.logsigmoid(log_odds)
    odds_ratio_losses = -beta * log_odds_ratio
    nll = chosen_nll.float().reshape(())
    return ORPOLossOutput(
        loss=nll + odds_ratio_losses.mean(),
        odds_ratio_losses=odds_ratio_losses,
        nll=nll,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        log_odds_ratio=log_odds_ratio,
        log_odds_chosen=log_odds,
    )
