"""Readable fp32 reference of TRL 1.16's GRPO policy loss (``GRPOTrainer._compute_loss``), KL estimators and PPO's
clipped value loss: the ground truth that the compiled and Triton backends, the tests and the benchmarks share.

Legend: B sequences (completions), T completion positions.

Per token, with ``r`` the importance ratio ``pi / pi_old`` and ``A`` the advantage::

    per_token_loss = -min(min(r, delta) * A, clamp(r, 1 - epsilon_low, 1 + epsilon_high) * A)  [* keep]  + beta * kl

``importance_sampling_level="token"``: ``r = exp(logp - old_logp)`` per token. ``"sequence"`` (GSPO):
``r = exp(masked mean over the sequence of (logp - old_logp))``, one ratio per sequence broadcast to its tokens.
TRL 1.16 differentiates that mean directly (no stop-gradient rewrite), so each token of sequence b receives
``d/d r_b * r_b / n_b`` from every token's loss term; this is what GSPO's gradient is. ``delta`` (INTELLECT-2's
two-sided clipping) caps the unclipped ratio from above whatever the sign of ``A``; TRL applies it after forming
the clipped ratio, and its clip metrics then read the capped ratio, as here. ``keep`` is the top-entropy mask: with
``top_entropy_quantile = rho < 1`` only tokens whose entropy is at or above the ``1 - rho`` quantile of the batch's
masked entropies (``torch.quantile``, linear interpolation) keep their policy term; the KL term is not masked.

KL estimators (``d = logp - ref_logp``): ``k1 = d``, ``k2 = d^2 / 2``, ``k3 = exp(-d) + d - 1`` (TRL's, the default).

Aggregation of the masked per-token loss (``m`` the completion mask, ``n_b`` the tokens of sequence b):
    grpo     mean over sequences of (sum_t m l / max(n_b, 1))
    bnpo     sum m l / max(sum m, 1)                       (the tokens of this micro-batch)
    dr_grpo  sum m l / (B * max_completion_length)
    dapo     sum m l / num_items_in_batch
``dapo``'s "global batch" is TRL's: the completion tokens of the whole generation batch, i.e. every micro-batch of
the optimizer step on every process. TRL divides ``num_items_in_batch`` (that count) by the number of processes and
rescales it to one accumulation window (``* gradient_accumulation_steps / steps_per_generation``); the caller passes
that final normaliser. ``num_items_in_batch=None`` divides by this call's token count (then ``dapo == bnpo``).
Gradient accumulation scaling (TRL's division by ``gradient_accumulation_steps`` for grpo/bnpo/dr_grpo) is the
trainer's job, not the loss's.

Metrics follow TRL's logging: ``kl`` and ``entropy`` are token means over the mask; ``clip_ratio_low`` is the share of
tokens with ``r < 1 - epsilon_low`` and ``A < 0``, ``clip_ratio_high`` of ``r > 1 + epsilon_high`` and ``A > 0``,
``clip_ratio_region`` either. At sequence level with ``[B]`` advantages they are shares of sequences (every sequence
counts, as TRL's ``x.shape[1] == 1`` branch), otherwise token shares over the mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


class PolicyLossOutput(NamedTuple):
    """``loss``: fp32 scalar; ``per_token_loss``: fp32 ``[B, T]`` (``[B, 1]`` broadcast at sequence level without
    KL, as TRL) before masking. Metrics are detached fp32 scalars; ``kl`` is None without reference log-probs,
    ``entropy`` None without entropies."""

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    kl: torch.Tensor | None
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor
    entropy: torch.Tensor | None


def kl_penalty_reference(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate of ``pi || pi_ref`` from log-probs of the sampled tokens (any equal shapes, fp32 out)."""
    d = logps.float() - ref_logps.float()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) + d - 1.0
    raise ValueError(f"kl estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")


def high_entropy_mask(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask`` on one process: bool ``[B, T]``, True where a masked-in token's entropy is at
    or above the ``1 - top_entropy_quantile`` quantile of the masked-in entropies (all False if none)."""
    mask_BT = mask_BT.bool()
    local = entropy_BT[mask_BT].float()
    if local.numel() == 0:
        return torch.zeros_like(mask_BT)
    threshold = torch.quantile(local, 1.0 - top_entropy_quantile)
    return (entropy_BT.float() * mask_BT >= threshold) & mask_BT


def aggregate(per_token_loss: torch.Tensor, mask_BT: torch.Tensor, loss_type: str, *,
              max_completion_length: int | None = None, num_items_in_batch=None) -> torch.Tensor:
    """Reduce a ``[B, T]`` (or ``[B, 1]``) per-token loss to the scalar of ``loss_type`` (see the module docstring)."""
    mask = mask_BT.float()
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (mask.shape[0] * max_completion_length)
    if loss_type == "dapo":
        normaliser = mask.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        return masked.sum() / normaliser
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss_reference(
    logps_BT: torch.Tensor,
    old_logps_BT: torch.Tensor | None,
    advantages: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    ref_logps_BT: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    entropy_BT: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
) -> PolicyLossOutput:
    """TRL 1.16's clipped GRPO/PPO loss in fp32 autograd torch (see the module docstring for every formula).

    logps_BT: ``[B, T]`` policy log-probs of the completion tokens (differentiable); old_logps_BT: ``[B, T]`` or None
    (on-policy: ``logps.detach()``, ratio 1); advantages: ``[B]`` or ``[B, T]``; mask_BT: ``[B, T]`` bool/int/float
    completion mask; ref_logps_BT: ``[B, T]``, used when ``beta != 0``; entropy_BT: ``[B, T]`` per-token entropies
    (metric, and the top-entropy mask when ``top_entropy_quantile < 1``).
    """
    logps = logps_BT.float()
    old = logps.detach() if old_logps_BT is None else old_logps_BT.float()
    mask = mask_BT.float()
    adv = advantages.float()
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    log_ratio = logps - old
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, "
                         f"got {importance_sampling_level!r}")
    coef_1 = torch.exp(log_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if entropy_BT is not None and top_entropy_quantile < 1.0:
        per_token_loss = per_token_loss * high_entropy_mask(entropy_BT, mask_BT, top_entropy_quantile)
    kl = None
    if ref_logps_BT is not None:
        per_token_kl = kl_penalty_reference(logps, ref_logps_BT, kl_estimator)
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl
        kl = _masked_mean(per_token_kl, mask).detach()
    loss = aggregate(per_token_loss, mask_BT, loss_type, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch)

    with torch.no_grad():
        is_low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).float()
        is_high = ((coef_1 > 1 + epsilon_high) & (adv > 0)).float()
        is_region = torch.maximum(is_low, is_high)
        if is_low.shape[1] == 1:  # one value per sequence: share of sequences
            low, high, region = is_low.mean(), is_high.mean(), is_region.mean()
        else:
            low, high, region = (_masked_mean(x, mask) for x in (is_low, is_high, is_region))
        entropy = None if entropy_BT is None else _masked_mean(entropy_BT.float(), mask)
    return PolicyLossOutput(loss, per_token_loss, kl, low, high, region, entropy)


def value_loss_reference(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
                         mask_BT: torch.Tensor, *, clip_range_value: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss (TRL ``PPOTrainer``): ``0.5 * masked mean of max((v - R)^2, (v_clip - R)^2)`` with
    ``v_clip = old + clamp(v - old, -clip_range_value, clip_range_value)``; fp32 scalar, differentiable in values."""
    values = values_BT.float()
    old, returns = old_values_BT.float(), returns_BT.float()
    clipped = old + torch.clamp(values - old, -clip_range_value, clip_range_value)
    losses = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * _masked_mean(losses, mask_BT.float())
