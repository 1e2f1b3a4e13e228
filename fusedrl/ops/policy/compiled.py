"""The GRPO/PPO policy loss with its analytic gradient, per row, in plain torch: the math the compiled backend runs
through ``torch.compile`` (:func:`policy_rows`: the compiled implementation of ``fusedrl::policy_loss_rows``).
``triton.py`` computes the same outputs from the same inputs in one Triton launch.

Legend: B sequences, T completion positions. Every tensor is fp32.

The caller folds the aggregation (``loss_type``) into a per-row weight ``row_scale_B``: token ``(b, t)`` enters the
loss with weight ``w = mask * row_scale_b`` (grpo ``1 / (B max(n_b, 1))``, bnpo ``1 / max(sum mask, 1)``, dr_grpo
``1 / (B L)``, dapo ``1 / num_items_in_batch``), so ``loss = sum_b loss_B[b]`` and every row is independent. With
``x`` the log-ratio the importance ratio ``r = exp(x)`` is formed from (per token, or the masked mean of the row at
sequence level), ``c1 = min(r, delta)``, ``c2 = clamp(r, 1 - eps_low, 1 + eps_high)``, ``pg = -min(c1 A, c2 A)``:

    d pg / d x = -A * (r 1[r <= delta]                       if c1 A < c2 A
                       r 1[1 - eps_low <= r <= 1 + eps_high]  if c2 A < c1 A
                       the mean of both                       on a tie, as torch.minimum's backward)

(clamp passes the gradient on its closed interval, as torch.clamp). The KL term adds ``beta w dkl/dlogp``:
``k1: 1``, ``k2: d``, ``k3: 1 - exp(-d)`` for ``d = logp - ref``. Token level: ``grad = w (keep dpg + beta dkl)``.
Sequence level: ``x_b = sum_t m (logp - old) / max(n_b, 1)`` (``sequence_log_ratio``, a per-row pre-pass), so
every token of row b receives ``slope_b = G_b / max(n_b, 1)`` with ``G_b = sum_u w_u keep_u dpg_u``, plus its own
KL gradient. The rows return ``grad_BT`` (the per-token part: everything at token level, the KL part at sequence
level) and ``slope_B``; the backward forms ``upstream_b * (grad_BT + slope_b * m)``, so no pass over the row has to
wait for the row's sum.

Positions with ``mask = 0`` contribute exactly 0 (selected with ``where``, so garbage such as ``-inf`` old log-probs
on padding cannot turn the row into NaN).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fusedrl.ops.compiler import compile_kernel


class PolicyRows(NamedTuple):
    loss_B: torch.Tensor  # this row's weighted share of the loss (sum over B is the loss)
    grad_BT: torch.Tensor  # per-token part of d loss / d logps
    slope_B: torch.Tensor  # sequence level: d loss / d logp of each masked token through the row's mean; else 0
    kl_B: torch.Tensor  # sum over the row's masked tokens of the KL estimate
    low_B: torch.Tensor  # masked count of r < 1 - eps_low with A < 0
    high_B: torch.Tensor  # masked count of r > 1 + eps_high with A > 0


def kl_terms(d: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl, d kl / d logp)`` for ``d = logp - ref``."""
    if estimator == "k1":
        return d, torch.ones_like(d)
    if estimator == "k2":
        return 0.5 * d * d, d
    e = torch.exp(-d)
    return e + d - 1.0, 1.0 - e


def clip_terms(ratio, adv, lo, hi, delta):
    """``(pg, d pg / d log-ratio, is_low, is_high)`` of the clipped objective with bounds ``lo = 1 - eps_low``,
    ``hi = 1 + eps_high`` (``delta = inf``: no dual clip)."""
    c1 = torch.minimum(ratio, delta)
    c2 = torch.minimum(torch.maximum(ratio, lo), hi)
    t1, t2 = c1 * adv, c2 * adv
    d1 = torch.where(ratio <= delta, ratio, 0.0)
    d2 = torch.where((ratio >= lo) & (ratio <= hi), ratio, 0.0)
    slope = torch.where(t1 < t2, d1, torch.where(t2 < t1, d2, 0.5 * (d1 + d2)))
    is_low = (c1 < lo) & (adv < 0)
    is_high = (c1 > hi) & (adv > 0)
    return -torch.minimum(t1, t2), -adv * slope, is_low, is_high


def scalar_params(beta: float, epsilon_low: float, epsilon_high: float, delta: float | None,
                  device: torch.device) -> torch.Tensor:
    """fp32 ``[4]``: beta, ``1 - eps_low``, ``1 + eps_high``, delta (inf: none). A tensor, not Python floats:
    torch 2.13's ``compile(dynamic=True)`` was measured to reuse a graph compiled for other float arguments
    (``eps_high`` 0.2 vs 0.28 gave the same loss), so the scalars travel as data. The bounds are formed in double
    and rounded once, as the reference's ``1 - epsilon_low`` scalar is."""
    values = [beta, 1.0 - epsilon_low, 1.0 + epsilon_high, math.inf if delta is None else delta]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _shared(logps, ref, mask, row_scale_B, beta, estimator):
    # beta: a 0-d tensor
    on = mask > 0
    w = torch.where(on, row_scale_B.unsqueeze(1), 0.0)
    kl, dkl = kl_terms(logps - ref, estimator)
    kl = torch.where(on, kl, 0.0)
    return on, w, kl, torch.where(on, w * beta * dkl, 0.0)


def _finish(on, w, keep, pg, kl, beta, grad, slope, is_low, is_high) -> PolicyRows:
    loss = torch.where(on, w * (keep * pg + beta * kl), 0.0)
    low = torch.where(on & is_low, 1.0, 0.0)
    high = torch.where(on & is_high, 1.0, 0.0)
    return PolicyRows(loss.sum(-1), grad, slope, kl.sum(-1), low.sum(-1), high.sum(-1))


def sequence_log_ratio(logps, old, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked mean log-ratio [B], 1 / max(n_b, 1) [B])``: the per-row pre-pass of sequence level."""
    on = mask > 0
    inv_count = 1.0 / on.sum(-1).clamp(min=1).to(logps.dtype)
    return torch.where(on, logps - old, 0.0).sum(-1) * inv_count, inv_count


def token_level_rows(logps, old, adv, mask, row_scale_B, keep, ref, params_4, estimator: str) -> PolicyRows:
    """Token-level ratios. logps, old, adv, mask, keep, ref: ``[B, T]``; row_scale_B: ``[B]``; params_4: as
    :func:`scalar_params`."""
    beta, lo, hi, delta = params_4.unbind()
    on, w, kl, grad_kl = _shared(logps, ref, mask, row_scale_B, beta, estimator)
    ratio = torch.exp(torch.where(on, logps - old, 0.0))
    pg, dpg, is_low, is_high = clip_terms(ratio, adv, lo, hi, delta)
    grad = torch.where(on, w * keep * dpg, 0.0) + grad_kl
    return _finish(on, w, keep, pg, kl, beta, grad, torch.zeros_like(row_scale_B), is_low, is_high)


def sequence_level_rows(logps, old, adv, mask, row_scale_B, keep, ref, params_4, estimator: str) -> PolicyRows:
    """Sequence-level (GSPO) ratios: one ratio per row from the masked mean log-ratio; shapes as token level."""
    beta, lo, hi, delta = params_4.unbind()
    on, w, kl, grad_kl = _shared(logps, ref, mask, row_scale_B, beta, estimator)
    log_ratio_B, inv_count_B = sequence_log_ratio(logps, old, mask)
    pg, dpg, is_low, is_high = clip_terms(torch.exp(log_ratio_B).unsqueeze(1), adv, lo, hi, delta)
    slope = torch.where(on, w * keep * dpg, 0.0).sum(-1) * inv_count_B
    return _finish(on, w, keep, pg, kl, beta, grad_kl, slope, is_low, is_high)


def high_entropy_keep(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """``reference.high_entropy_mask`` as fp32 ``[B, T]`` without data-dependent shapes (so ``torch.compile`` keeps
    one graph): masked-out entropies sort to the end as +inf, and ``torch.quantile``'s linear interpolation is
    redone on the first ``n`` sorted values with the same ``lerp``, so the threshold is bitwise the reference's."""
    on = mask_BT > 0
    sorted_N = torch.sort(torch.where(on, entropy_BT, float("inf")).flatten()).values
    count = on.sum()
    # torch.quantile forms the rank in the input dtype: q (as fp32) times (n - 1).
    q = torch.full((), 1.0 - top_entropy_quantile, dtype=entropy_BT.dtype, device=entropy_BT.device)
    rank = q * (count - 1).clamp(min=0).to(entropy_BT.dtype)
    below = rank.long()
    above = rank.ceil().long()
    # gather with tensor indices, not sorted_N[below]: a 0-d tensor index would become a data-dependent int.
    ends = sorted_N.gather(0, torch.stack([below, above]))
    threshold = torch.lerp(ends[0], ends[1], rank - below.to(rank.dtype))
    return ((entropy_BT * on >= threshold) & on & (count > 0)).float()


def policy_rows(
    logps: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, row_scale: torch.Tensor,
    keep: torch.Tensor | None, ref: torch.Tensor | None, beta: float, epsilon_low: float, epsilon_high: float,
    delta: float, sequence: bool, kl_estimator: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled backend of ``fusedrl::policy_loss_rows``: :class:`PolicyRows` of :func:`token_level_rows` or
    (``sequence``) :func:`sequence_level_rows` through ``torch.compile``. logps, old, mask and the optional keep
    (top-entropy mask; None keeps every token) and ref (None: no KL term): fp32 ``[B, T]``; advantages: fp32 ``[B]``
    or ``[B, T]``; row_scale: fp32 ``[B]``; delta: the dual-clip cap (inf: none). ``triton.policy_rows`` has this
    signature too."""
    # The gradient is analytic: detached inputs under no_grad give the compiled function one grad mode and one
    # requires_grad pattern (Dynamo guards on both), and dense optional inputs one set of tensor arguments.
    with torch.no_grad():
        logps = logps.detach()
        adv = advantages.detach()
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(logps.shape).contiguous()
        keep = torch.ones_like(logps) if keep is None else keep
        # d = 0: a zero KL term. A copy, not logps itself: Dynamo guards on argument aliasing (a second graph).
        ref = logps.clone() if ref is None else ref
        params = scalar_params(beta, epsilon_low, epsilon_high, delta, logps.device)
        # Its length 4 stays static: else dynamic shapes give a batch of B = 4 rows the same symbolic size (duck
        # sizing) and unbind() specialises it, so every other B recompiled.
        torch._dynamo.mark_static(params, 0)
        fn = compile_kernel(sequence_level_rows if sequence else token_level_rows)
        return fn(logps, old, adv, mask, row_scale, keep, ref, params, kl_estimator)
