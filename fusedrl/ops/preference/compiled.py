"""The compiled backend of the ``preference`` op: per-pair and per-example losses with their analytic gradients in
plain torch (the math ``torch.compile`` fuses), and ``torch.compile`` of the references for the requests that couple
the batch. ``triton.py`` computes the same per-pair and per-example results from the same inputs in one launch.

Legend: B pairs, N unpaired examples. Every tensor here is fp32 ``[B]`` / ``[N]``.

Each formula returns, per pair, the loss and its derivative w.r.t. the policy chosen and rejected log-probs; the
reference log-probs enter only through the log-ratios ``c = chosen - ref_chosen``, ``r = rejected - ref_rejected``,
so their derivatives are the negatives. The losses are those of ``dpo.py`` / ``cpo.py`` (same formulas, verified
against TRL 1.16 there); this module only adds the hand-derived gradients. With ``s`` the score map
(f-divergence ``f'``, AlphaPO reward or identity), optionally scaled by ``1 / length`` (``ipo``, ``sigmoid_norm``),
``delta = s(c) - s(r)``, ``z = beta * delta - margin`` (margin = SimPO's gamma, else 0), ``eps`` = label smoothing:

    logistic   -(1-eps) logsig(z) - eps logsig(-z)          dz: -(1-eps) sig(-z) + eps sig(z)
    hinge      relu(1 - z)                                  dz: -1[z < 1]
    square     (delta - 1/(2 beta))^2                       d delta: 2 (delta - 1/(2 beta))
    exo_pair   sig(z)(logsig(z) - log(1-eps)) + sig(-z)(logsig(-z) - log eps)
                                                            dz: sig(z) sig(-z) (z - log(1-eps) + log eps)
    robust     (-(1-eps) logsig(z) + eps logsig(-z)) / (1-2 eps)
                                                            dz: (-(1-eps) sig(-z) - eps sig(z)) / (1-2 eps)
    discopop   -logsig(z) sig(-z/tau) + exp(logsig(z/tau) - z)
                                                            dz: -sig(-z) sig(-z/tau) + logsig(z) sig(z/tau) sig(-z/tau)/tau
                                                                + exp(logsig(z/tau) - z) (sig(-z/tau)/tau - 1)
and, on the scaled log-ratios a = beta c, b = beta r (these take no score map):
    nca_pair   -logsig(a) - logsig(-a)/2 - logsig(-b)/2     da: -sig(-a) + sig(a)/2      db: sig(b)/2
    bco_pair   -logsig(a) - logsig(-b)                      da: -sig(-a)                 db: sig(b)
    sppo_hard  (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2      dc: 2 (c - 1/(2 beta))       dr: 2 (r + 1/(2 beta))
    apo_zero   sig(-a) + sig(b)                             da: -sig(a) sig(-a)          db: sig(b) sig(-b)
    apo_down   sig(a) + sig(-(a - b))                       da: sig(a) sig(-a) - sig(a-b) sig(b-a)   db: sig(a-b) sig(b-a)

ORPO is ``logistic`` on the log-odds score ``s(x) = x - log(1 - e^x)`` (``s'(x) = 1 / (1 - e^x)``) with beta 1 and
``loss_weight`` = ORPO's beta. KTO (``unpaired_losses``), per example with ``lr = logp - ref`` and the clamped
batch KL estimate ``kl`` (0 for ``apo_zero_unpaired``), ``z = beta (lr - kl)``:

    desirable    w_d sig(-z)                                d lr: -w_d beta sig(z) sig(-z)
    undesirable  w_u sig(z)                                 d lr:  w_u beta sig(z) sig(-z)

Every ``sig(-z)`` is computed as such (never ``1 - sig(z)``) so nothing cancels at ``|z| = 1e4``. The losses and
gradients are multiplied by ``loss_weight`` and the WPO pair weight. Rewards: ``beta * c`` (DPO: log-ratios, whatever
the f-divergence), or ``beta * s(c)`` for the AlphaPO and log-odds scores (CPO, ORPO).

The math runs in two stages, each a set of small functions: a score map (``SCORE_MAPS``) turns the log-probs into
log-ratios, scores and their derivatives, then a formula (``FORMULAS``) turns those into losses and gradients.
``pair_losses`` chains them, applying ``compile_fn`` to each stage. One function per score map and per formula
keeps one ``torch.compile`` cache per function: Dynamo counts recompiles per code object (8 by default, a hard
error under ``fullgraph=True``), and one function branching on both would exhaust that budget across loss types.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from fusedrl.ops.compiler import compile_kernel

R = TypeVar("R")

# Same bound as dpo.f_divergence_scores: exp(80) stays finite in fp32 after the (alpha - 1) scaling.
ALPHA_DIVERGENCE_CLAMP = 80.0
_LN2 = math.log(2.0)


class PairInputs(NamedTuple):
    chosen_B: torch.Tensor  # policy sequence log-probs
    rejected_B: torch.Tensor
    ref_chosen_B: torch.Tensor | None  # None: no reference model (CPO, reference-free)
    ref_rejected_B: torch.Tensor | None
    chosen_scale_B: torch.Tensor | None  # 1 / completion length (ipo, sigmoid_norm); None: 1
    rejected_scale_B: torch.Tensor | None
    pair_weight_B: torch.Tensor | None  # WPO weights; None: 1


class PairParams(NamedTuple):
    score: str  # one of SCORES; "reverse_kl" is the identity
    beta: float
    label_smoothing: float
    discopop_tau: float
    margin: float  # subtracted from beta * delta: SimPO's gamma, else 0
    score_alpha: float  # f_alpha_divergence_coef (alpha_divergence) or AlphaPO's alpha
    loss_weight: float


class PairScores(NamedTuple):
    chosen_logratio_B: torch.Tensor  # c
    rejected_logratio_B: torch.Tensor  # r
    delta_B: torch.Tensor  # s(c) - s(r), length-scaled
    d_chosen_B: torch.Tensor  # d s(c) / d c, length-scaled
    d_rejected_B: torch.Tensor
    chosen_reward_B: torch.Tensor  # before the beta factor
    rejected_reward_B: torch.Tensor


class PairLosses(NamedTuple):
    """fp32 ``[B]``: losses, rewards, and d losses_i / d chosen_i, d losses_i / d rejected_i (policy side)."""

    losses_B: torch.Tensor
    chosen_rewards_B: torch.Tensor
    rejected_rewards_B: torch.Tensor
    grad_chosen_B: torch.Tensor
    grad_rejected_B: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: score maps. Each gets every tensor (absent references as zeros, absent scales as ones).


def _expm1(x: torch.Tensor) -> torch.Tensor:
    """``expm1`` that stays accurate when Inductor compiles it: its vectorised CPU ``expm1`` is ``exp(x) - 1``
    (torch 2.13), 1.3% off at ``x = -1e-6`` and 0.02% at ``-1e-4``. Kahan's ``(e - 1) x / log(e)``, ``e = exp(x)``,
    is within 1e-7 there; ``x`` itself where ``e`` rounds to 1, and ``e - 1`` where ``e`` is 0 or inf."""
    e = torch.exp(x)
    regular = (e != 1.0) & (e > 0.0) & torch.isfinite(e)
    safe_e = torch.where(regular, e, 2.0)
    return torch.where(regular, (safe_e - 1.0) * (x / torch.log(safe_e)), torch.where(e == 1.0, x, e - 1.0))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x <= 0``, branched as ``reference.orpo.log1mexp`` (each branch sees only its inputs)."""
    small = x < -_LN2
    return torch.where(small, torch.log1p(-torch.exp(torch.where(small, x, -1.0))),
                       torch.log(-_expm1(torch.where(small, -0.5, x))))


def _scored(c, r, s_c, ds_c, s_r, ds_r, chosen_scale_B, rejected_scale_B, *, rewards_from_scores=False):
    reward_c, reward_r = (s_c, s_r) if rewards_from_scores else (c, r)
    s_c, ds_c = s_c * chosen_scale_B, ds_c * chosen_scale_B
    s_r, ds_r = s_r * rejected_scale_B, ds_r * rejected_scale_B
    return PairScores(c, r, s_c - s_r, ds_c, ds_r, reward_c, reward_r)


def reverse_kl(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_scale_B, rejected_scale_B, score_alpha):
    c, r = chosen_B - ref_chosen_B, rejected_B - ref_rejected_B
    return _scored(c, r, c, torch.ones_like(c), r, torch.ones_like(r), chosen_scale_B, rejected_scale_B)


def forward_kl(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_scale_B, rejected_scale_B, score_alpha):
    c, r = chosen_B - ref_chosen_B, rejected_B - ref_rejected_B
    e_c, e_r = torch.exp(-c), torch.exp(-r)
    return _scored(c, r, 1 - e_c, e_c, 1 - e_r, e_r, chosen_scale_B, rejected_scale_B)


def js_divergence(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_scale_B, rejected_scale_B, score_alpha):
    c, r = chosen_B - ref_chosen_B, rejected_B - ref_rejected_B
    return _scored(c, r, math.log(2) + F.logsigmoid(c), torch.sigmoid(-c), math.log(2) + F.logsigmoid(r),
                   torch.sigmoid(-r), chosen_scale_B, rejected_scale_B)


def _alpha_score(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = (alpha - 1.0) * x
    e = torch.exp(torch.clamp(scaled, max=ALPHA_DIVERGENCE_CLAMP))
    return (e - 1.0) / (alpha - 1.0), torch.where(scaled <= ALPHA_DIVERGENCE_CLAMP, e, 0.0)


def alpha_divergence(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_scale_B, rejected_scale_B,
                     score_alpha):
    c, r = chosen_B - ref_chosen_B, rejected_B - ref_rejected_B
    return _scored(c, r, *_alpha_score(c, score_alpha), *_alpha_score(r, score_alpha), chosen_scale_B,
                   rejected_scale_B)


def alphapo(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_scale_B, rejected_scale_B, score_alpha):
    c, r = chosen_B - ref_chosen_B, rejected_B - ref_rejected_B
    s_c, s_r = -_expm1(-score_alpha * c) / score_alpha, -_expm1(-score_alpha * r) / score_alpha
    return _scored(c, r, s_c, torch.exp(-score_alpha * c), s_r, torch.exp(-score_alpha * r), chosen_scale_B,
                   rejected_scale_B, rewards_from_scores=True)


def log_odds(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_scale_B, rejected_scale_B, score_alpha):
    c, r = chosen_B - ref_chosen_B, rejected_B - ref_rejected_B
    # -1 / expm1(x) == 1 / (1 - e^x) without the cancellation of 1 - e^x near x = 0 (mean log-probs near 0).
    return _scored(c, r, c - _log1mexp(c), -1.0 / _expm1(c), r - _log1mexp(r), -1.0 / _expm1(r),
                   chosen_scale_B, rejected_scale_B, rewards_from_scores=True)


SCORE_MAPS: dict[str, Callable[..., PairScores]] = {
    "reverse_kl": reverse_kl,
    "forward_kl": forward_kl,
    "js_divergence": js_divergence,
    "alpha_divergence": alpha_divergence,
    "alphapo": alphapo,
    "log_odds": log_odds,
}
SCORES = tuple(SCORE_MAPS)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: formulas. Each gets the scores, the [B] weight (loss weight x pair weight) and the scalars.


def _finish(s: PairScores, weight_B, beta, loss, grad_c, grad_r) -> PairLosses:
    """Apply the weights; ``grad_c`` / ``grad_r`` are derivatives w.r.t. the log-ratios c and r."""
    return PairLosses(loss * weight_B, beta * s.chosen_reward_B, beta * s.rejected_reward_B, grad_c * weight_B,
                      grad_r * weight_B)


def _from_z(s: PairScores, weight_B, beta, loss, grad_z) -> PairLosses:
    """Chain rule for the losses of ``z = beta * delta - margin``."""
    grad_delta = beta * grad_z
    return _finish(s, weight_B, beta, loss, grad_delta * s.d_chosen_B, -grad_delta * s.d_rejected_B)


def logistic(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    z, eps = beta * s.delta_B - margin, label_smoothing
    loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return _from_z(s, weight_B, beta, loss, -(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z))


def hinge(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    z = beta * s.delta_B - margin
    return _from_z(s, weight_B, beta, torch.relu(1 - z), torch.where(z < 1, -1.0, 0.0))


def square(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    gap = s.delta_B - 0.5 / beta
    return _finish(s, weight_B, beta, gap * gap, 2 * gap * s.d_chosen_B, -2 * gap * s.d_rejected_B)


def exo_pair(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    z = beta * s.delta_B - margin
    # log(1 - eps) and log(eps) as tensor ops: math.log on a symbolic float would specialise the compiled graph.
    eps = torch.full_like(z, label_smoothing)
    log_keep, log_flip = torch.log1p(-eps), torch.log(eps)
    sig_pos, sig_neg = torch.sigmoid(z), torch.sigmoid(-z)
    loss = sig_pos * (F.logsigmoid(z) - log_keep) + sig_neg * (F.logsigmoid(-z) - log_flip)
    return _from_z(s, weight_B, beta, loss, sig_pos * sig_neg * (z - log_keep + log_flip))


def robust(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    z, eps = beta * s.delta_B - margin, label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    grad_z = (-(1 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z)) / (1 - 2 * eps)
    return _from_z(s, weight_B, beta, loss, grad_z)


def discopop(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    z, tau = beta * s.delta_B - margin, discopop_tau
    logsig_z = F.logsigmoid(z)
    gate_pos, gate_neg = torch.sigmoid(z / tau), torch.sigmoid(-z / tau)
    # exp(logsig(z/tau) - z) == exp(-z) sig(z/tau) without inf * 0 for z <~ -88 (see dpo.py).
    expo = torch.exp(F.logsigmoid(z / tau) - z)
    loss = -logsig_z * gate_neg + expo
    grad_z = -torch.sigmoid(-z) * gate_neg + logsig_z * gate_pos * gate_neg / tau + expo * (gate_neg / tau - 1)
    return _from_z(s, weight_B, beta, loss, grad_z)


def nca_pair(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    a, b = beta * s.chosen_logratio_B, beta * s.rejected_logratio_B
    loss = -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
    return _finish(s, weight_B, beta, loss, beta * (0.5 * torch.sigmoid(a) - torch.sigmoid(-a)),
                   beta * 0.5 * torch.sigmoid(b))


def bco_pair(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    a, b = beta * s.chosen_logratio_B, beta * s.rejected_logratio_B
    loss = -F.logsigmoid(a) - F.logsigmoid(-b)
    return _finish(s, weight_B, beta, loss, -beta * torch.sigmoid(-a), beta * torch.sigmoid(b))


def sppo_hard(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    gap_c, gap_r = s.chosen_logratio_B - 0.5 / beta, s.rejected_logratio_B + 0.5 / beta
    return _finish(s, weight_B, beta, gap_c * gap_c + gap_r * gap_r, 2 * gap_c, 2 * gap_r)


def apo_zero(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    a, b = beta * s.chosen_logratio_B, beta * s.rejected_logratio_B
    sig_a, sig_b = torch.sigmoid(-a), torch.sigmoid(b)
    return _finish(s, weight_B, beta, sig_a + sig_b, -beta * torch.sigmoid(a) * sig_a,
                   beta * sig_b * torch.sigmoid(-b))


def apo_down(s: PairScores, weight_B, beta, label_smoothing, discopop_tau, margin) -> PairLosses:
    a, b = beta * s.chosen_logratio_B, beta * s.rejected_logratio_B
    sig_a, sig_m = torch.sigmoid(a), torch.sigmoid(-(a - b))
    slope_a, slope_m = sig_a * torch.sigmoid(-a), sig_m * torch.sigmoid(a - b)
    return _finish(s, weight_B, beta, sig_a + sig_m, beta * (slope_a - slope_m), beta * slope_m)


FORMULAS: dict[str, Callable[..., PairLosses]] = {
    "logistic": logistic,
    "hinge": hinge,
    "square": square,
    "exo_pair": exo_pair,
    "robust": robust,
    "discopop": discopop,
    "nca_pair": nca_pair,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
}


def pair_losses(x: PairInputs, p: PairParams, formula: str, *, compile_fn: Callable = lambda fn: fn) -> PairLosses:
    """``FORMULAS[formula]`` of the ``SCORE_MAPS[p.score]`` scores; ``compile_fn`` wraps each stage (the compiled
    backend passes its ``torch.compile``). Absent optional inputs become dense zeros / ones here, outside the
    stages, so each stage sees one set of tensor arguments whatever the request (each its own tensor: Dynamo also
    guards on which arguments alias)."""

    def dense(t: torch.Tensor | None, fill: float) -> torch.Tensor:
        return torch.full_like(x.chosen_B, fill) if t is None else t

    scores = compile_fn(SCORE_MAPS[p.score])(
        x.chosen_B, x.rejected_B, dense(x.ref_chosen_B, 0.0), dense(x.ref_rejected_B, 0.0),
        dense(x.chosen_scale_B, 1.0), dense(x.rejected_scale_B, 1.0), p.score_alpha,
    )
    weight_B = dense(x.pair_weight_B, 1.0) * p.loss_weight
    return compile_fn(FORMULAS[formula])(scores, weight_B, p.beta, p.label_smoothing, p.discopop_tau, p.margin)


def pair_preference_losses(
    chosen_B: torch.Tensor, rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor | None,
    ref_rejected_B: torch.Tensor | None, chosen_scale_B: torch.Tensor | None, rejected_scale_B: torch.Tensor | None,
    pair_weight_B: torch.Tensor | None, formula: str, score: str, beta: float, label_smoothing: float,
    discopop_tau: float, margin: float, score_alpha: float, loss_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled backend of ``fusedrl::pair_preference_losses`` (its signature is the custom op's schema):
    :class:`PairLosses` of ``FORMULAS[formula]`` on ``SCORE_MAPS[score]``, each stage under ``torch.compile``."""
    # The gradient is analytic, so the stages need no autograd: detached inputs under no_grad give them one grad
    # mode and one requires_grad pattern, both of which Dynamo guards on (each variant would compile again).
    with torch.no_grad():
        x = PairInputs(*(None if t is None else t.detach() for t in (
            chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_scale_B, rejected_scale_B, pair_weight_B)))
        p = PairParams(score, beta, label_smoothing, discopop_tau, margin, score_alpha, loss_weight)
        return tuple(pair_losses(x, p, formula, compile_fn=compile_kernel))


# ---------------------------------------------------------------------------------------------------------------
# KTO: per-example losses against the batch KL estimate


class UnpairedLosses(NamedTuple):
    """fp32 ``[N]``: weighted losses, rewards ``beta * (logp - ref)`` and d losses_i / d logps_i (policy side)."""

    losses_N: torch.Tensor
    rewards_N: torch.Tensor
    grad_N: torch.Tensor


def kto(logps_N, ref_logps_N, labels_N, kl, beta, desirable_weight, undesirable_weight) -> UnpairedLosses:
    """KTO's per-example losses (module docstring); ``kl`` is the clamped fp32 scalar estimate."""
    logratios_N = logps_N - ref_logps_N
    z = beta * (logratios_N - kl)
    desirable, undesirable = torch.sigmoid(-z), torch.sigmoid(z)
    slope = beta * desirable * undesirable
    losses_N = torch.where(labels_N, desirable_weight * desirable, undesirable_weight * undesirable)
    grad_N = torch.where(labels_N, -desirable_weight * slope, undesirable_weight * slope)
    return UnpairedLosses(losses_N, beta * logratios_N, grad_N)


def unpaired_losses(logps_N, ref_logps_N, labels_N, kl, beta, desirable_weight, undesirable_weight, *,
                    compile_fn: Callable = lambda fn: fn) -> UnpairedLosses:
    """:func:`kto` with ``compile_fn`` applied (the compiled backend passes its ``torch.compile``)."""
    return compile_fn(kto)(logps_N, ref_logps_N, labels_N, kl, beta, desirable_weight, undesirable_weight)


def unpaired_preference_losses(
    logps_N: torch.Tensor, ref_logps_N: torch.Tensor, labels_N: torch.Tensor, kl: torch.Tensor, beta: float,
    desirable_weight: float, undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled backend of ``fusedrl::unpaired_preference_losses``: :class:`UnpairedLosses` of :func:`kto`.
    logps_N, ref_logps_N: fp32 ``[N]``; labels_N: bool ``[N]`` (True = desirable); kl: fp32 scalar, clamped."""
    with torch.no_grad():  # analytic gradient, as pair_preference_losses
        return tuple(unpaired_losses(logps_N.detach(), ref_logps_N.detach(), labels_N, kl.detach(), beta,
                                     desirable_weight, undesirable_weight, compile_fn=compile_kernel))


# ---------------------------------------------------------------------------------------------------------------
# The requests no custom op serves


def traced_reference(fn: Callable[..., R], /, *args, **kwargs) -> R:
    """The compiled backend of the requests that couple the batch (DPO ``aot``, ``aot_unpaired``, ``sft``, MPO lists,
    registered Python losses; KTO's KL estimate): ``torch.compile`` of the fp32 reference ``fn``, differentiated by
    AOT autograd. Inside a caller's ``torch.compile`` region ``fn`` is traced into that graph instead: compiling it
    again there would only nest a second compile."""
    if torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    return compile_kernel(fn)(*args, **kwargs)
