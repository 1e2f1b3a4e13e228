"""KTO on unpaired sequence log-probs: the fp32 reference of TRL 1.16's ``KTOTrainer._compute_loss``
(``trl.KTOTrainer``, promoted to the stable API in 1.16; ``trl.experimental.kto`` re-exports it with a deprecation
warning).

Legend: N examples, each labelled desirable (``True``) or undesirable; M mismatched (prompt, completion) pairs used
for the KL estimate (TRL builds them by shifting the completions of the batch by one, so M = N).

With ``lr = logp - ref_logp`` per example and ``z`` the KL estimate:

    kto                 desirable:   w_d * (1 - sig(beta (lr - z)))     undesirable:  w_u * (1 - sig(beta (z - lr)))
    apo_zero_unpaired   desirable:   w_d * (1 - sig(beta lr))           undesirable:  w_u * sig(beta lr)

    z = max(0, mean_M(kl_logps - ref_kl_logps)), detached. TRL takes the mean on each rank, averages the ranks'
    means, then clamps; pass that all-reduced unclamped mean as ``kl`` to reproduce it across ranks.
    apo_zero_unpaired uses no KL (TRL does not even build the mismatched pairs for it).

Reduction, as TRL: ``loss = mean_N(losses)`` over desirable and undesirable examples together (TRL concatenates
desirable then undesirable and takes ``nanmean``; the order does not change the mean). The weights are not
renormalised: ``desirable_weight``/``undesirable_weight`` exist to counter unbalanced label counts.
Batch coupling: the KL estimate is a batch mean (detached, so it couples values, not gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOLossOutput(NamedTuple):
    """``losses`` ``[N]`` weighted, in input order (``loss = losses.mean()``); ``rewards`` ``[N]``:
    ``beta * (logp - ref)``, detached (TRL's ``chosen_rewards`` are ``rewards[labels]``, its ``rejected_rewards``
    ``rewards[~labels]``); ``kl``: the scalar detached clamped estimate that entered the loss (0 for
    ``apo_zero_unpaired``)."""

    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def kto_kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """Unclamped local KL estimate ``mean_M(kl_logps - ref_kl_logps)``, detached (scalar fp32).

    Average this over ranks (if any) and pass it as ``kl`` to ``kto_losses``, which clamps it at 0.
    """
    return (kl_logps.float() - ref_kl_logps.float()).mean().detach()


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
) -> KTOLossOutput:
    """Per-example KTO losses ``[N]`` (names and defaults of TRL 1.16's ``KTOConfig``), in fp32.

    logps, ref_logps: ``[N]`` policy / reference sequence log-probs (token sums over the completion).
    labels: ``[N]`` bool, True for desirable. A batch with one label only is fine (no empty tensors are formed).
    kl_logps, ref_kl_logps: ``[M]`` policy / reference log-probs of the mismatched pairs (TRL computes the policy's
        under ``no_grad``); or ``kl``: a precomputed unclamped scalar estimate (takes precedence). ``kto`` needs one
        of them; ``apo_zero_unpaired`` ignores them.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    logratios = logps.float() - ref_logps.float()
    if loss_type == "apo_zero_unpaired":
        kl_value = torch.zeros((), dtype=logratios.dtype, device=logratios.device)
        # 1 - sig(x) written as sig(-x): no cancellation to 0 for x > 17 in fp32.
        desirable = torch.sigmoid(-beta * logratios)
        undesirable = torch.sigmoid(beta * logratios)
    else:
        if kl is None:
            if kl_logps is None or ref_kl_logps is None:
                raise ValueError("loss_type='kto' needs kl, or kl_logps and ref_kl_logps of mismatched pairs")
            kl = kto_kl_estimate(kl_logps, ref_kl_logps)
        kl_value = kl.detach().float().reshape(()).clamp(min=0)
        desirable = torch.sigmoid(-beta * (logratios - kl_value))
        undesirable = torch.sigmoid(-beta * (kl_value - logratios))
    labels = labels.to(device=logratios.device, dtype=torch.bool)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    return KTOLossOutput(losses=losses, rewards=(beta * logratios).detach(), kl=kl_value)
