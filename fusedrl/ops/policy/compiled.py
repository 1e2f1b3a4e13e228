"""The GRPO/PPO policy loss with its analytic gradient, per row, in plain torch: the math the compiled backend runs
through ``torch.compile`` (:func:`policy_rows`: the compiled implementation of ``fusedrl::policy_loss_rows``).
``triton.py`` computes the same outputs from the same inputs in one Triton launch.

Legend: B sequences, T completion positions. Every tensor is fp32.

The caller folds the aggregation (``loss_type``) into a per-row weight ``row_scale_B``: token ``(b, t)`` enters the
loss with weight ``w = mask * row_scale_b`` (grpo and sapo ``1 / (B max(n_b, 1))``, bnpo ``1 / max(sum mask, 1)``,
dr_grpo ``1 / (B L)``, dapo, cispo and vespo ``1 / num_items_in_batch``, luspo ``1 / B``), so
``loss = sum_b loss_B[b]`` and every row is independent. With
``x`` the log-ratio the importance ratio ``r = exp(x)`` is formed from (per token, or the masked mean of the row at
sequence level), ``c1 = min(r, delta)``, ``c2 = clamp(r, 1 - eps_low, 1 + eps_high)``, ``pg = -min(c1 A, c2 A)``:

    d pg / d x = -A * (r 1[r <= delta]                       if c1 A < c2 A
                       r 1[1 - eps_low <= r <= 1 + eps_high]  if c2 A < c1 A
                       the mean of both                       on a tie, as torch.minimum's backward)

(clamp passes the gradient on its closed interval, as torch.clamp). The other objectives (``reference.py``):

    sapo   pg = -(4 / tau) s A,  s = sigmoid(tau (r - 1))     d pg / d x = -A * 4 s (1 - s) r
    cispo  pg = -min(r, cap) A logp                           d pg / d logp = -min(r, cap) A   (ratio held constant)
    vespo  pg = -phi A logp                                   d pg / d logp = -phi A           (phi held constant)

CISPO and VESPO (``DIRECT_OBJECTIVES``) differentiate ``logp`` itself, never the ratio, so their gradient is per token
at either level. VESPO's ``phi`` needs the row's clamped sum of log-ratios (``vespo_log_weight``, a per-row
pre-pass like the sequence level's) and then is elementwise given the advantage's sign. The KL term adds
``beta w dkl/dlogp``: ``k1: 1``, ``k2: d``, ``k3: 1 - exp(-d)`` for ``d = logp - ref``. Token level:
``grad = w (keep dpg + beta dkl)``. Sequence level: ``x_b = sum_t m (logp - old) / max(n_b, 1)``
(``sequence_log_ratio``, a per-row pre-pass), so every token of row b receives ``slope_b = G_b / max(n_b, 1)`` with
``G_b = sum_u w_u keep_u dpg_u``, plus its own KL gradient. The rows return ``grad_BT`` (the per-token part:
everything at token level, the KL part at sequence level) and ``slope_B``; the backward forms
``upstream_b * (grad_BT + slope_b * m)``, so no pass over the row has to wait for the row's sum.

Positions with ``mask = 0`` contribute exactly 0 (selected with ``where``, so garbage such as ``-inf`` old log-probs
on padding cannot turn the row into NaN).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fusedrl.ops.compiler import compile_kernel
from fusedrl.ops.policy.reference import (
    VESPO_LAMBDA_MIN,
    VESPO_LOG_WEIGHT_MAX,
    VESPO_LOG_WEIGHT_MIN,
    VESPO_TOKEN_LOG_RATIO_MAX,
)

OBJECTIVES = ("clip", "cispo", "sapo", "vespo")
DIRECT_OBJECTIVES = ("cispo", "vespo")  # their gradient is d pg / d logp, never through the ratio
NUM_OBJECTIVE_PARAMS = 4  # cispo: cap; sapo: tau_pos, tau_neg; vespo: k_pos, lambda_pos, k_neg, lambda_neg


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


def objective_terms(objective: str, ratio, adv, logps, log_w, lo, hi, delta, p0, p1, p2, p3):
    """``(pg, d pg, is_low, is_high)``: ``d pg`` w.r.t. the log-ratio for clip / sapo, w.r.t. ``logp`` for cispo /
    vespo (module docstring); ``p0..p3`` as :func:`objective_params`; ``log_w`` VESPO's row log-weight ``[B, 1]``."""
    if objective == "clip":
        return clip_terms(ratio, adv, lo, hi, delta)
    never = torch.zeros_like(ratio * adv, dtype=torch.bool)
    if objective == "cispo":
        capped = torch.minimum(ratio, p0)
        return -capped * adv * logps, -capped * adv, never, (ratio > p0) & (adv > 0)
    if objective == "sapo":
        tau = torch.where(adv > 0, p0, p1)
        gate = torch.sigmoid(tau * (ratio - 1.0))
        return -(gate * 4.0 / tau) * adv, -adv * 4.0 * gate * (1.0 - gate) * ratio, never, never
    phi = vespo_phi(log_w, adv, p0, p1, p2, p3)
    return -phi * adv * logps, -phi * adv, never, never


def vespo_log_weight(logps, old, mask) -> torch.Tensor:
    """VESPO's ``log w`` per row ``[B]``: the clamped sum of the masked, clamped log-ratios (a per-row pre-pass)."""
    log_ratio = torch.clamp(logps - old, -VESPO_TOKEN_LOG_RATIO_MAX, VESPO_TOKEN_LOG_RATIO_MAX)
    total = torch.where(mask > 0, log_ratio, 0.0).sum(-1)
    return total.clamp(VESPO_LOG_WEIGHT_MIN, VESPO_LOG_WEIGHT_MAX)


def vespo_phi(log_w, adv, k_pos, lambda_pos, k_neg, lambda_neg) -> torch.Tensor:
    """VESPO's gamma weight from ``log_w`` (broadcast against ``adv``); lambdas already clamped by
    :func:`objective_params`; non-finite weights are 0, as TRL's ``nan_to_num``."""
    non_negative = adv >= 0
    k = torch.where(non_negative, k_pos, k_neg)
    lam = torch.where(non_negative, lambda_pos, lambda_neg)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.where(torch.isfinite(phi), phi, 0.0)


def objective_params(loss_type_objective: str, *, epsilon_high: float, sapo_temperature_pos: float = 1.0,
                     sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                     vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, **_unused) -> list[float]:
    """The 4 objective parameters the row functions read (zeros where unused): cispo ``[cap = epsilon_high]``,
    sapo ``[tau_pos, tau_neg]``, vespo ``[k_pos, lambda_pos, k_neg, lambda_neg]`` with TRL's lambda floor."""
    values = {"cispo": [epsilon_high], "sapo": [sapo_temperature_pos, sapo_temperature_neg],
              "vespo": [vespo_k_pos, max(vespo_lambda_pos, VESPO_LAMBDA_MIN), vespo_k_neg,
                        max(vespo_lambda_neg, VESPO_LAMBDA_MIN)]}.get(loss_type_objective, [])
    return [float(v) for v in values] + [0.0] * (NUM_OBJECTIVE_PARAMS - len(values))


def scalar_params(beta: float, epsilon_low: float, epsilon_high: float, delta: float | None,
                  device: torch.device, extra: list[float] | None = None) -> torch.Tensor:
    """fp32 ``[8]``: beta, ``1 - eps_low``, ``1 + eps_high``, delta (inf: none), then the 4 objective parameters
    (``extra``, :func:`objective_params`; zeros when None). A tensor, not Python floats: torch 2.13's
    ``compile(dynamic=True)`` was measured to reuse a graph compiled for other float arguments (``eps_high`` 0.2 vs
    0.28 gave the same loss), so the scalars travel as data. The bounds are formed in double and rounded once, as
    the reference's ``1 - epsilon_low`` scalar is."""
    values = [beta, 1.0 - epsilon_low, 1.0 + epsilon_high, math.inf if delta is None else delta]
    values += list(extra) if extra is not None else [0.0] * NUM_OBJECTIVE_PARAMS
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


def token_level_rows(logps, old, adv, mask, row_scale_B, keep, ref, params_8, estimator: str,
                     objective: str) -> PolicyRows:
    """Token-level ratios. logps, old, adv, mask, keep, ref: ``[B, T]``; row_scale_B: ``[B]``; params_8: as
    :func:`scalar_params`; objective: one of ``OBJECTIVES``."""
    beta, lo, hi, delta, *extra = params_8.unbind()
    on, w, kl, grad_kl = _shared(logps, ref, mask, row_scale_B, beta, estimator)
    ratio = torch.exp(torch.where(on, logps - old, 0.0))
    log_w = vespo_log_weight(logps, old, mask).unsqueeze(1) if objective == "vespo" else None
    pg, dpg, is_low, is_high = objective_terms(objective, ratio, adv, logps, log_w, lo, hi, delta, *extra)
    grad = torch.where(on, w * keep * dpg, 0.0) + grad_kl
    return _finish(on, w, keep, pg, kl, beta, grad, torch.zeros_like(row_scale_B), is_low, is_high)


def sequence_level_rows(logps, old, adv, mask, row_scale_B, keep, ref, params_8, estimator: str,
                        objective: str) -> PolicyRows:
    """Sequence-level (GSPO) ratios: one ratio per row from the masked mean log-ratio; shapes as token level. The
    direct objectives (cispo, vespo) keep a per-token gradient; the others reach each token through the mean."""
    beta, lo, hi, delta, *extra = params_8.unbind()
    on, w, kl, grad_kl = _shared(logps, ref, mask, row_scale_B, beta, estimator)
    log_ratio_B, inv_count_B = sequence_log_ratio(logps, old, mask)
    log_w = vespo_log_weight(logps, old, mask).unsqueeze(1) if objective == "vespo" else None
    pg, dpg, is_low, is_high = objective_terms(objective, torch.exp(log_ratio_B).unsqueeze(1), adv, logps, log_w,
                                               lo, hi, delta, *extra)
    pg_grad = torch.where(on, w * keep * dpg, 0.0)
    if objective in DIRECT_OBJECTIVES:
        return _finish(on, w, keep, pg, kl, beta, pg_grad + grad_kl, torch.zeros_like(row_scale_B), is_low, is_high)
    return _finish(on, w, keep, pg, kl, beta, grad_kl, pg_grad.sum(-1) * inv_count_B, is_low, is_high)


# One compiled function (one code object: torch keeps at most 8 graphs per code object, and a fullgraph compile
# raises past that) per level and objective, so that each specialises only on the KL estimator and 0/1 sizes. One
# function taking the objective as an argument spent its budget on 2 levels x 4 objectives x 3 estimators.
def _token_clip(*inputs):
    return token_level_rows(*inputs, "clip")


def _token_cispo(*inputs):
    return token_level_rows(*inputs, "cispo")


def _token_sapo(*inputs):
    return token_level_rows(*inputs, "sapo")


def _token_vespo(*inputs):
    return token_level_rows(*inputs, "vespo")


def _sequence_clip(*inputs):
    return sequence_level_rows(*inputs, "clip")


def _sequence_cispo(*inputs):
    return sequence_level_rows(*inputs, "cispo")


def _sequence_sapo(*inputs):
    return sequence_level_rows(*inputs, "sapo")


def _sequence_vespo(*inputs):
    return sequence_level_rows(*inputs, "vespo")


_ROW_VARIANTS = {(False, "clip"): _token_clip, (False, "cispo"): _token_cispo, (False, "sapo"): _token_sapo,
                 (False, "vespo"): _token_vespo, (True, "clip"): _sequence_clip, (True, "cispo"): _sequence_cispo,
                 (True, "sapo"): _sequence_sapo, (True, "vespo"): _sequence_vespo}


def high_entropy_keep(entropy_BT: torch.Tensor, mask_BT: torch.Tensor, top_entropy_quantile: float,
                      threshold: torch.Tensor | float | None = None) -> torch.Tensor:
    """``reference.high_entropy_mask`` as fp32 ``[B, T]`` without data-dependent shapes (so ``torch.compile`` keeps
    one graph): masked-out entropies sort to the end as +inf, and ``torch.quantile``'s linear interpolation is
    redone on the first ``n`` sorted values with the same ``lerp``, so the threshold is bitwise the reference's. A
    ``threshold`` the caller computed (every process's quantile) replaces the local one."""
    on = mask_BT > 0
    if threshold is not None:
        return ((entropy_BT * on >= threshold) & on).float()
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
    delta: float, sequence: bool, kl_estimator: str, objective: str, objective_params: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled backend of ``fusedrl::policy_loss_rows``: :class:`PolicyRows` of :func:`token_level_rows` or
    (``sequence``) :func:`sequence_level_rows` through ``torch.compile``. logps, old, mask and the optional keep
    (top-entropy mask; None keeps every token) and ref (None: no KL term): fp32 ``[B, T]``; advantages: fp32 ``[B]``
    or ``[B, T]``; row_scale: fp32 ``[B]``; delta: the dual-clip cap (inf: none); objective: one of ``OBJECTIVES``
    with its 4 ``objective_params`` (:func:`objective_params`). ``triton.policy_rows`` has this signature too."""
    # The gradient is analytic: detached inputs under no_grad give the compiled function one grad mode and one
    # requires_grad pattern (Dynamo guards on both), and dense optional inputs one set of tensor arguments.
    with torch.no_grad():
        logps = logps.detach()
        adv = advantages.detach()
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(logps.shape).contiguous()
        keep = torch.ones_like(logps) if keep is None else keep
        # d = 0: a zero KL term. A copy, not logps itself: Dynamo guards on argument aliasing (a second graph).
        ref = logps.clone() if ref is None else ref
        params = scalar_params(beta, epsilon_low, epsilon_high, delta, logps.device, objective_params)
        # Its length 8 stays static: else dynamic shapes give a batch of B = 8 rows the same symbolic size (duck
        # sizing) and unbind() specialises it, so every other B recompiled.
        torch._dynamo.mark_static(params, 0)
        fn = compile_kernel(_ROW_VARIANTS[sequence, objective])
        return fn(logps, old, adv, mask, row_scale, keep, ref, params, kl_estimator)
