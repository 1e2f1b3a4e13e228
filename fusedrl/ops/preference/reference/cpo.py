"""CPO / SimPO / AlphaPO on policy log-probs: the fp32 reference of TRL 1.16's ``CPOTrainer``
(``trl.experimental.cpo``: ``cpo_loss`` plus the ``cpo_alpha`` NLL term of ``get_batch_loss_metrics``).

Legend: B pairs. No reference model. What ``chosen_logps`` / ``rejected_logps`` hold depends on the loss, as in
TRL's ``concatenated_forward`` (``average_log_prob = loss_type in {"ipo", "simpo"}``):
token *sums* over the completion for ``sigmoid`` and ``hinge``, token *means* for ``ipo`` and ``simpo``.

With ``s(l) = l`` (``alpha = 0``) or the AlphaPO reward ``s(l) = (1 - e^(-alpha l)) / alpha`` and
``x = s(chosen) - s(rejected)``, ``eps = label_smoothing``:

    sigmoid   -(1-eps) logsig(beta x) - eps logsig(-beta x)
    simpo     the same with x -> x - gamma / beta   (i.e. beta x - simpo_gamma inside the logsigmoid)
    hinge     relu(1 - beta x)
    ipo       (x - 1/(2 beta))^2

    loss = mean_B(losses) + cpo_alpha * chosen_nll

``chosen_nll`` is the token-mean NLL of the chosen completions (TRL uses the labels, prompt masked), and TRL skips
computing it when ``cpo_alpha == 0``. ``CPOConfig(loss_type="alphapo")`` is config sugar for ``loss_type="simpo"``,
``cpo_alpha=0`` (with ``alpha != 0`` set by the user); it is not a separate formula here.
Rewards: ``beta * s(logp)``, detached.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


class CPOLossOutput(NamedTuple):
    """``loss``: scalar; ``losses`` ``[B]`` preference term; ``nll``: scalar (0 when ``cpo_alpha == 0`` and none
    given); ``chosen_rewards`` / ``rejected_rewards`` ``[B]``, detached."""

    loss: torch.Tensor
    losses: torch.Tensor
    nll: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def alphapo_rewards(logps: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """AlphaPO reward ``(1 - p^-alpha) / alpha`` with ``p = e^logps``; ``logps`` itself when ``alpha == 0``.

    Written ``-expm1(-alpha * logps) / alpha``: TRL's ``(1 - exp(logps).pow(-alpha)) / alpha`` underflows ``p`` to 0
    (and ``0^-alpha`` to inf) once ``logps < -104`` in fp32, while ``alpha * |logps| < 88`` is still representable.
    """
    if alpha == 0.0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def cpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
    chosen_nll: torch.Tensor | None = None,
) -> CPOLossOutput:
    """CPO-family losses (names and defaults of TRL 1.16's ``CPOConfig``), in fp32.

    chosen_logps, rejected_logps: ``[B]`` policy log-probs, summed or averaged per ``loss_type`` (module docstring).
    chosen_nll: scalar token-mean NLL of the chosen completions; required unless ``cpo_alpha == 0``.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"Unknown CPO loss_type {loss_type!r}; expected one of {CPO_LOSS_TYPES}")
    chosen_scores = alphapo_rewards(chosen_logps.float(), alpha=alpha)
    rejected_scores = alphapo_rewards(rejected_logps.float(), alpha=alpha)
    logits = chosen_scores - rejected_scores
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            logits = logits - simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2

    if chosen_nll is not None:
        nll = chosen_nll.float().reshape(())
    elif cpo_alpha == 0.0:
        nll = torch.zeros((), dtype=losses.dtype, device=losses.device)
    else:
        raise ValueError(f"cpo_alpha={cpo_alpha} needs chosen_nll (sequence.token_mean_nll of the chosen completions)")
    return CPOLossOutput(
        loss=losses.mean() + cpo_alpha * nll,
        losses=losses,
        nll=nll,
        chosen_rewards=(beta * chosen_scores).detach(),
        rejected_rewards=(beta * rejected_scores).detach(),
    )
