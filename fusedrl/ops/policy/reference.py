"""Readable fp32 reference of TRL 1.16's GRPO policy loss (``GRPOTrainer._compute_loss``, every ``loss_type``), its
entropy bonus, KL estimators and PPO's clipped value loss: the ground truth that the compiled and Triton backends,
the tests and the benchmarks share.

Legend: B sequences (completions), T completion positions.

Per token, with ``r`` the importance ratio ``pi / pi_old``, ``A`` the advantage and ``pg`` the loss type's
objective (below)::

    per_token_loss = pg  [* off_policy_keep]  [* keep]  + beta * kl

The clipped objective (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``)::

    pg = -min(min(r, delta) * A, clamp(r, 1 - epsilon_low, 1 + epsilon_high) * A)

The other objectives (``sg`` = stop-gradient: a constant factor, only ``logp`` itself is differentiated)::

    cispo  pg = -sg(min(r, epsilon_high)) * A * logp            (MiniMax-M1: epsilon_high caps the ratio itself)
    sapo   pg = -(4 / tau) * sigmoid(tau * (r - 1)) * A          (tau = sapo_temperature_pos if A > 0, else _neg)
    vespo  pg = -sg(phi) * A * logp,  phi = exp(lambda + k log w - lambda w)   (a gamma weight, phi(1) = 1)

VESPO's ``w`` is its own sequence weight, whatever ``importance_sampling_level``: ``log w = clamp(sum over the
row's masked tokens of clamp(logp - old_logp, -20, 20), ln 1e-8, 20)``; ``(k, lambda)`` are
``(vespo_k_pos, vespo_lambda_pos)`` where ``A >= 0``, else the ``_neg`` pair, lambda clamped to >= 1e-4; a
non-finite phi counts as 0. SAPO's and CISPO's ``r`` follow ``importance_sampling_level`` as the clipped one does.

``importance_sampling_level="token"``: ``r = exp(logp - old_logp)`` per token. ``"sequence"`` (GSPO):
``r = exp(masked mean over the sequence of (logp - old_logp))``, one ratio per sequence broadcast to its tokens.
TRL 1.16 differentiates that mean directly (no stop-gradient rewrite), so each token of sequence b receives
``d/d r_b * r_b / n_b`` from every token's loss term; this is what GSPO's gradient is. ``delta`` (INTELLECT-2's
two-sided clipping) caps the unclipped ratio from above whatever the sign of ``A``; TRL applies it after forming
the clipped ratio, and its clip metrics then read the capped ratio, as here. ``keep`` is the top-entropy mask: with
``top_entropy_quantile = rho < 1`` only tokens whose entropy is at or above the ``1 - rho`` quantile of the batch's
masked entropies (``torch.quantile``, linear interpolation) keep their policy term; the KL term is not masked.
``off_policy_keep`` is DeepSeek-V3.2's off-policy sequence mask (``off_policy_mask_threshold = delta``, TRL's
``get_off_policy_mask``): a sequence keeps its policy term when ``A >= 0`` or when the mean over its masked tokens of
``old_logp - logp`` (the sampling policy's log-probs minus the current ones, detached; NaN gaps count 0) is at most
``delta``. Like ``keep`` it scales the policy term only: the KL term, the aggregation's token counts, the entropy
bonus and the metrics still see every masked token, as in TRL.

KL estimators (``d = logp - ref_logp``): ``k1 = d``, ``k2 = d^2 / 2``, ``k3 = exp(-d) + d - 1`` (TRL's, the default).

Aggregation of the masked per-token loss (``m`` the completion mask, ``n_b`` the tokens of sequence b), named
after the loss type that introduced it (``AGGREGATIONS`` maps every loss type to one):
    grpo     mean over sequences of (sum_t m l / max(n_b, 1))   (also sapo)
    bnpo     sum m l / max(sum m, 1)                       (the tokens of this micro-batch)
    dr_grpo  sum m l / (B * max_completion_length)
    dapo     sum m l / num_items_in_batch                  (also cispo and vespo)
    luspo    mean over sequences of (sum_t m l)            (each sequence weighted by its length)
``dapo``'s "global batch" is TRL's: the completion tokens of the whole generation batch, i.e. every micro-batch of
the optimizer step on every process. TRL divides ``num_items_in_batch`` (that count) by the number of processes and
rescales it to one accumulation window (``* gradient_accumulation_steps / steps_per_generation``); the caller passes
that final normaliser. ``num_items_in_batch=None`` divides by this call's token count (then ``dapo == bnpo``).
Gradient accumulation scaling (TRL's division by ``gradient_accumulation_steps`` for grpo/bnpo/dr_grpo) is the
trainer's job, not the loss's.

Entropy bonus (``entropy_coef``, TRL's ``L = L_policy - entropy_coef * H``): ``H`` is the mean entropy over the
tokens the policy term acts on (``m``, times ``keep`` when ``top_entropy_quantile < 1``), whatever the loss type's
aggregation; its gradient flows into ``entropy_BT``. TRL also divides ``H`` by the accumulation steps: the trainer's
job, as for the policy term.

Metrics follow TRL's logging: ``kl`` and ``entropy`` are token means over the mask; ``clip_ratio_low`` is the share of
tokens with ``r < 1 - epsilon_low`` and ``A < 0``, ``clip_ratio_high`` of ``r > 1 + epsilon_high`` and ``A > 0``,
``clip_ratio_region`` either. At sequence level with ``[B]`` advantages they are shares of sequences (every sequence
counts, as TRL's ``x.shape[1] == 1`` branch), otherwise token shares over the mask. ``cispo`` has one clip metric
(TRL's ``cispo_clip_ratio``: ``r > epsilon_high`` and ``A > 0``), reported as ``clip_ratio_high`` (and region, low
0); ``sapo`` and ``vespo`` clip nothing (all three 0); ``vespo`` reports ``phi_mean`` (TRL's ``vespo/phi_seq_mean``:
phi's mean over sequences, over masked tokens with ``[B, T]`` advantages).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# The aggregation each loss type uses (TRL 1.16's pairing) and its per-token objective ("clip": the clipped ratio).
AGGREGATIONS = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "cispo": "dapo",
                "sapo": "grpo", "luspo": "luspo", "vespo": "dapo"}
OBJECTIVES = {"grpo": "clip", "bnpo": "clip", "dr_grpo": "clip", "dapo": "clip", "cispo": "cispo", "sapo": "sapo",
              "luspo": "clip", "vespo": "vespo"}
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# TRL's clamps of VESPO's log-weights: each token's log-ratio, then the row's sum (lower end ln 1e-8 = -18.42).
VESPO_TOKEN_LOG_RATIO_MAX = 20.0
VESPO_LOG_WEIGHT_MIN, VESPO_LOG_WEIGHT_MAX = math.log(1e-8), 20.0
VESPO_LAMBDA_MIN = 1e-4


class PolicyLossOutput(NamedTuple):
    """``loss``: fp32 scalar; ``per_token_loss``: fp32 ``[B, T]`` (``[B, 1]`` broadcast at sequence level without
    KL, as TRL) before masking, without the entropy bonus. Metrics are detached fp32 scalars; ``kl`` is None without
    reference log-probs, ``entropy`` None without entropies, ``phi_mean`` None unless ``vespo``. ``bonus_entropy_sum``
    and ``bonus_tokens`` (None without entropies): the entropy summed over the tokens the bonus acts on and their
    count, what TRL's adaptive entropy controller accumulates."""

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    kl: torch.Tensor | None
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor
    entropy: torch.Tensor | None
    phi_mean: torch.Tensor | None = None
    bonus_entropy_sum: torch.Tensor | None = None
    bonus_tokens: torch.Tensor | None = None


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


def high_entropy_mask(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, top_entropy_quantile: float,
                      threshold: torch.Tensor | float | None = None) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask``: bool ``[B, T]``, True where a masked-in token's entropy is at or above the
    ``1 - top_entropy_quantile`` quantile of the masked-in entropies (all False if none), or at or above
    ``threshold`` when the caller computed the quantile itself (over every process's tokens, as TRL gathers them:
    :func:`entropy_quantile`)."""
    mask_BT = mask_BT.bool()
    if threshold is None:
        local = entropy_BT[mask_BT].float()
        if local.numel() == 0:
            return torch.zeros_like(mask_BT)
        threshold = torch.quantile(local, 1.0 - top_entropy_quantile)
    return (entropy_BT.float() * mask_BT >= threshold) & mask_BT


def entropy_quantile(entropies_N: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor | None:
    """The entropy threshold of the ``top_entropy_quantile`` mask over a flat tensor of masked-in entropies (those of
    every process, gathered), or None when there are none."""
    if entropies_N.numel() == 0:
        return None
    return torch.quantile(entropies_N.float(), 1.0 - top_entropy_quantile)


def off_policy_keep(advantages: torch.Tensor, logps_BT: torch.Tensor, sampling_logps_BT: torch.Tensor,
                    mask_BT: torch.Tensor, threshold: float) -> torch.Tensor:
    """TRL 1.16's ``GRPOTrainer.get_off_policy_mask``: fp32 ``[B, 1]`` (``[B, T]`` with ``[B, T]`` advantages), 1
    keeps the sequence's policy term, 0 drops it (advantage < 0 and mean ``sampling - logps`` over the mask above
    ``threshold``). Example: mask [1, 1, 0], sampling 0, logps [-2, -2, 1e4], A = -1, threshold 1: mean KL 2 > 1
    -> 0 (the padded 1e4 never counts); with logps [-0.5, -0.5, ...] the mean is 0.5 -> 1."""
    mask = mask_BT.float()
    kl_BT = torch.nan_to_num(sampling_logps_BT.float() - logps_BT.detach().float(), nan=0.0)
    mean_kl_B1 = (kl_BT * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    adv = advantages.float()
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    return ((adv >= 0) | (mean_kl_B1 <= threshold)).float()


def aggregate(per_token_loss: torch.Tensor, mask_BT: torch.Tensor, loss_type: str, *,
              max_completion_length: int | None = None, num_items_in_batch=None) -> torch.Tensor:
    """Reduce a ``[B, T]`` (or ``[B, 1]``) per-token loss to the scalar of ``loss_type``'s aggregation (see the
    module docstring)."""
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    loss_type = AGGREGATIONS[loss_type]
    mask = mask_BT.float()
    masked = per_token_loss * mask
    if loss_type == "luspo":
        return masked.sum(-1).mean()
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (mask.shape[0] * max_completion_length)
    normaliser = mask.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
    return masked.sum() / normaliser  # dapo


@torch.no_grad()
def vespo_weights(log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor, advantages: torch.Tensor, *, k_pos: float,
                  lambda_pos: float, k_neg: float, lambda_neg: float) -> torch.Tensor:
    """VESPO's gamma weight ``phi`` (detached fp32, the shape of ``advantages`` broadcast against ``[B, 1]``): from
    the per-token log-ratios ``[B, T]``, the mask and the advantages ``[B, 1]`` or ``[B, T]`` (module docstring).
    Example: a row of log-ratios [0.1, 0.2] -> w = exp(0.3) = 1.35, A >= 0, k = 2, lambda = 3:
    phi = exp(3 + 2 * 0.3 - 3 * 1.35) = 0.637."""
    clamped = torch.clamp(log_ratio_BT.float(), -VESPO_TOKEN_LOG_RATIO_MAX, VESPO_TOKEN_LOG_RATIO_MAX)
    log_w = (clamped * mask_BT.float()).sum(-1, keepdim=True).clamp(VESPO_LOG_WEIGHT_MIN, VESPO_LOG_WEIGHT_MAX)
    non_negative = advantages >= 0
    k = torch.where(non_negative, k_pos, k_neg)
    lam = torch.where(non_negative, lambda_pos, lambda_neg).clamp(min=VESPO_LAMBDA_MIN)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def entropy_bonus(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, keep_BT: torch.Tensor | None):
    """``(mean, sum, count)`` of the entropy over the tokens the bonus acts on (the mask, times ``keep``): the mean
    differentiable w.r.t. ``entropy_BT``, sum and count detached fp32 scalars."""
    effective = mask_BT.float() if keep_BT is None else mask_BT.float() * keep_BT.float()
    total = (entropy_BT.float() * effective).sum()
    count = effective.sum()
    return total / count.clamp(min=1.0), total.detach(), count


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _objective(objective: str, coef_1, adv, logps, log_ratio, mask, *, epsilon_low, epsilon_high, delta, params):
    """``(pg, clipped ratio for the clip metrics or None, phi or None)`` of one objective (module docstring); ``coef_1``
    is the importance ratio at the requested level, ``log_ratio`` the per-token one (VESPO's input)."""
    if objective == "cispo":
        return -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logps, None, None
    if objective == "sapo":
        tau = torch.where(adv > 0, params["sapo_temperature_pos"], params["sapo_temperature_neg"])
        return -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv, None, None
    if objective == "vespo":
        phi = vespo_weights(log_ratio, mask, adv, k_pos=params["vespo_k_pos"], lambda_pos=params["vespo_lambda_pos"],
                            k_neg=params["vespo_k_neg"], lambda_neg=params["vespo_lambda_neg"])
        return -phi * adv * logps, None, phi
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * adv, coef_2 * adv), coef_1, None


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
    entropy_threshold: torch.Tensor | float | None = None,
    entropy_coef: float | torch.Tensor = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
) -> PolicyLossOutput:
    """TRL 1.16's GRPO/PPO loss of every ``loss_type`` in fp32 autograd torch (see the module docstring for every
    formula).

    logps_BT: ``[B, T]`` policy log-probs of the completion tokens (differentiable); old_logps_BT: ``[B, T]`` or None
    (on-policy: ``logps.detach()``, ratio 1); advantages: ``[B]`` or ``[B, T]``; mask_BT: ``[B, T]`` bool/int/float
    completion mask; ref_logps_BT: ``[B, T]``, used when ``beta != 0``; entropy_BT: ``[B, T]`` per-token entropies
    (metric, the top-entropy mask when ``top_entropy_quantile < 1``, and the bonus ``- entropy_coef * H``, through
    which its gradient flows). The ``sapo_*`` / ``vespo_*`` parameters are TRL's config fields of those loss types.
    ``off_policy_mask_threshold``: None, or the ``delta`` of :func:`off_policy_keep` (the old log-probs are the
    sampling ones; on-policy their gap is 0).
    """
    if loss_type not in OBJECTIVES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
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
    params = {"sapo_temperature_pos": sapo_temperature_pos, "sapo_temperature_neg": sapo_temperature_neg,
              "vespo_k_pos": vespo_k_pos, "vespo_lambda_pos": vespo_lambda_pos, "vespo_k_neg": vespo_k_neg,
              "vespo_lambda_neg": vespo_lambda_neg}
    objective = OBJECTIVES[loss_type]
    per_token_loss, clipped_ratio, phi = _objective(objective, coef_1, adv, logps, log_ratio, mask,
                                                    epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                                                    params=params)
    if off_policy_mask_threshold is not None:  # TRL applies it first, then the top-entropy mask
        per_token_loss = per_token_loss * off_policy_keep(adv, logps, old, mask, off_policy_mask_threshold)
    keep = None
    if entropy_BT is not None and top_entropy_quantile < 1.0:
        keep = high_entropy_mask(entropy_BT, mask_BT, top_entropy_quantile, entropy_threshold)
        per_token_loss = per_token_loss * keep
    kl = None
    if ref_logps_BT is not None:
        per_token_kl = kl_penalty_reference(logps, ref_logps_BT, kl_estimator)
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl
        kl = _masked_mean(per_token_kl, mask).detach()
    loss = aggregate(per_token_loss, mask_BT, loss_type, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch)
    bonus_sum = bonus_tokens = None
    if entropy_BT is not None:
        bonus, bonus_sum, bonus_tokens = entropy_bonus(entropy_BT, mask_BT, keep)
        if isinstance(entropy_coef, torch.Tensor) or entropy_coef != 0.0:
            loss = loss - entropy_coef * bonus

    with torch.no_grad():
        zero = torch.zeros_like(coef_1)
        if objective == "clip":
            is_low = ((clipped_ratio < 1 - epsilon_low) & (adv < 0)).float()
            is_high = ((clipped_ratio > 1 + epsilon_high) & (adv > 0)).float()
        elif objective == "cispo":
            is_low, is_high = zero.expand_as(coef_1 * adv), ((coef_1 > epsilon_high) & (adv > 0)).float()
        else:
            is_low = is_high = zero.expand_as(coef_1 * adv)
        is_region = torch.maximum(is_low, is_high)
        if is_low.shape[1] == 1:  # one value per sequence: share of sequences
            low, high, region = is_low.mean(), is_high.mean(), is_region.mean()
        else:
            low, high, region = (_masked_mean(x, mask) for x in (is_low, is_high, is_region))
        entropy = None if entropy_BT is None else _masked_mean(entropy_BT.float(), mask)
        phi_mean = None
        if phi is not None:  # one weight per sequence ([B] advantages): every sequence counts, as TRL
            phi_mean = phi.mean() if phi.shape[1] == 1 else _masked_mean(phi, mask)
    return PolicyLossOutput(loss, per_token_loss, kl, low, high, region, entropy, phi_mean, bonus_sum, bonus_tokens)


def value_loss_reference(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
                         mask_BT: torch.Tensor, *, clip_range_value: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss (TRL ``PPOTrainer``): ``0.5 * masked mean of max((v - R)^2, (v_clip - R)^2)`` with
    ``v_clip = old + clamp(v - old, -clip_range_value, clip_range_value)``; fp32 scalar, differentiable in values."""
    values = values_BT.float()
    old, returns = old_values_BT.float(), returns_BT.float()
    clipped = old + torch.clamp(values - old, -clip_range_value, clip_range_value)
    losses = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * _masked_mean(losses, mask_BT.float())
