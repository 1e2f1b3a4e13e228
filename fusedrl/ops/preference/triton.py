"""The Triton backend of the ``preference`` op: pair-separable losses (DPO, CPO, ORPO) and KTO's per-example losses,
each as one launch computing the loss, the rewards and the gradient w.r.t. the policy log-probs. Same inputs and
results as ``compiled.py`` (whose docstring lists every formula and its derivative); the backward is then
``upstream * saved gradient``, with no second launch.

Legend: B pairs, N unpaired examples, BLOCK_B pairs (or examples) per program.

The loss and the score map are constexprs, so each (loss, score) pair compiles to straight-line code. Optional
inputs (reference log-probs, length scales, pair weights) are constexpr-gated: absent ones cost no load. All math
is fp32. Triton 3.9 has no ``log1p``/``expm1`` in ``tl.math``; the helpers below use Goldberg's and Kahan's
corrections, which keep full fp32 accuracy where ``log(1 + u)`` / ``exp(x) - 1`` would cancel (|u|, |x| < 1e-4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedrl.ops.preference.compiled import SCORES, PairInputs, PairLosses, PairParams, UnpairedLosses

# Loss and score codes of the constexprs, in the order of compiled.FORMULAS and compiled.SCORES.
LOSS_CODES = {name: code for code, name in enumerate((
    "logistic", "hinge", "square", "exo_pair", "robust", "discopop", "nca_pair", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down",
))}
SCORE_CODES = {name: code for code, name in enumerate(SCORES)}


@triton.jit
def _log1p(u):
    # Goldberg: log(w) * u / (w - 1) with w = 1 + u cancels the rounding of w exactly.
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _expm1(x):
    # Kahan: (e - 1) * x / log(e) with e = exp(x); x itself where e rounds to 1 (|x| < 6e-8), -1 at e = 0.
    e = tl.exp(x)
    regular = (e != 1.0) & (e > 0.0)
    ratio = tl.where(regular, x / tl.log(tl.where(regular, e, 2.0)), 1.0)
    return tl.where(e == 1.0, x, tl.where(e == 0.0, -1.0, tl.where(e == float("inf"), e, (e - 1.0) * ratio)))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    # From e^-|x| <= 1: no overflow for x << 0 (1 / (1 + e^-x) would form e^-x = inf there; harmless on GPUs,
    # but the interpreter warns) and full relative accuracy down to the fp32 subnormals.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _log1mexp(x):
    # log(1 - e^x) for x <= 0, branches as reference.orpo.log1mexp: log1p(-e^x) below -ln 2, log(-expm1(x)) above.
    return tl.where(x < -0.6931471805599453, _log1p(-tl.exp(x)), tl.log(-_expm1(x)))


@triton.jit
def _score(x, score_alpha, SCORE: tl.constexpr):
    """(s(x), s'(x)) of the score map; codes as SCORE_CODES."""
    if SCORE == 0:  # reverse_kl: identity
        s = x
        ds = tl.full(x.shape, 1.0, tl.float32)
    elif SCORE == 1:  # forward_kl
        ds = tl.exp(-x)
        s = 1.0 - ds
    elif SCORE == 2:  # js_divergence
        s = 0.6931471805599453 + _logsigmoid(x)  # log 2 + logsig(x)
        ds = _sigmoid(-x)
    elif SCORE == 3:  # alpha_divergence, clamped as compiled.ALPHA_DIVERGENCE_CLAMP
        scaled = (score_alpha - 1.0) * x
        e = tl.exp(tl.minimum(scaled, 80.0))
        s = (e - 1.0) / (score_alpha - 1.0)
        ds = tl.where(scaled <= 80.0, e, 0.0)
    elif SCORE == 4:  # alphapo
        s = -_expm1(-score_alpha * x) / score_alpha
        ds = tl.exp(-score_alpha * x)
    else:  # log_odds (ORPO): x - log(1 - e^x), derivative 1 / (1 - e^x)
        s = x - _log1mexp(x)
        ds = -1.0 / _expm1(x)
    return s, ds


@triton.jit
def _preference_fwd_kernel(
    chosen_ptr,  # [B] fp32 policy log-probs of the chosen completions
    rejected_ptr,  # [B] fp32 policy log-probs of the rejected completions
    ref_chosen_ptr,  # [B] fp32 reference log-probs (read only when HAS_REF)
    ref_rejected_ptr,  # [B] fp32 (read only when HAS_REF)
    chosen_scale_ptr,  # [B] fp32 1 / chosen length (read only when HAS_SCALE)
    rejected_scale_ptr,  # [B] fp32 1 / rejected length (read only when HAS_SCALE)
    pair_weight_ptr,  # [B] fp32 WPO weights (read only when HAS_PAIR_WEIGHT)
    losses_ptr,  # [B] fp32 out: weighted loss per pair
    chosen_rewards_ptr,  # [B] fp32 out: beta * log-ratio (beta * score for SCORE = alphapo, log_odds)
    rejected_rewards_ptr,  # [B] fp32 out
    grad_chosen_ptr,  # [B] fp32 out: d loss_i / d chosen_i (the reference's is its negative)
    grad_rejected_ptr,  # [B] fp32 out: d loss_i / d rejected_i
    num_pairs,  # B
    beta,  # fp32
    label_smoothing,  # fp32 eps
    discopop_tau,  # fp32
    margin,  # fp32, subtracted from beta * delta (SimPO's gamma)
    score_alpha,  # fp32, f_alpha_divergence_coef or AlphaPO's alpha
    loss_weight,  # fp32, multiplies loss and gradient
    LOSS: tl.constexpr,  # LOSS_CODES
    SCORE: tl.constexpr,  # SCORE_CODES
    HAS_REF: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_PAIR_WEIGHT: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = offs < num_pairs
    # Lanes past B read -1 (their results are never stored): 0 is where the log-odds score is infinite.
    c = tl.load(chosen_ptr + offs, mask=mask, other=-1.0)
    r = tl.load(rejected_ptr + offs, mask=mask, other=-1.0)
    if HAS_REF:
        c -= tl.load(ref_chosen_ptr + offs, mask=mask, other=0.0)
        r -= tl.load(ref_rejected_ptr + offs, mask=mask, other=0.0)
    s_c, ds_c = _score(c, score_alpha, SCORE)
    s_r, ds_r = _score(r, score_alpha, SCORE)
    if SCORE >= 4:
        reward_c, reward_r = s_c, s_r
    else:
        reward_c, reward_r = c, r
    if HAS_SCALE:
        scale_c = tl.load(chosen_scale_ptr + offs, mask=mask, other=1.0)
        scale_r = tl.load(rejected_scale_ptr + offs, mask=mask, other=1.0)
        s_c, ds_c, s_r, ds_r = s_c * scale_c, ds_c * scale_c, s_r * scale_r, ds_r * scale_r
    delta = s_c - s_r
    z = beta * delta - margin
    eps = label_smoothing
    a = beta * c
    b = beta * r

    # Losses of z: set `loss` and `grad_z`; the per-side losses set `grad_c` / `grad_r` w.r.t. c and r directly.
    if LOSS == 0:  # logistic
        loss = -(1.0 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z)
        grad_z = -(1.0 - eps) * _sigmoid(-z) + eps * _sigmoid(z)
    elif LOSS == 1:  # hinge
        loss = tl.maximum(1.0 - z, 0.0)
        grad_z = tl.where(z < 1.0, -1.0, 0.0)
    elif LOSS == 2:  # square
        gap = delta - 0.5 / beta
        loss = gap * gap
        grad_z = 2.0 * gap / beta  # the chain rule below multiplies by beta
    elif LOSS == 3:  # exo_pair
        log_keep = _log1p(-eps)
        log_flip = tl.log(eps)
        sig_pos = _sigmoid(z)
        sig_neg = _sigmoid(-z)
        loss = sig_pos * (_logsigmoid(z) - log_keep) + sig_neg * (_logsigmoid(-z) - log_flip)
        grad_z = sig_pos * sig_neg * (z - log_keep + log_flip)
    elif LOSS == 4:  # robust
        loss = (-(1.0 - eps) * _logsigmoid(z) + eps * _logsigmoid(-z)) / (1.0 - 2.0 * eps)
        grad_z = (-(1.0 - eps) * _sigmoid(-z) - eps * _sigmoid(z)) / (1.0 - 2.0 * eps)
    elif LOSS == 5:  # discopop
        logsig_z = _logsigmoid(z)
        gate_pos = _sigmoid(z / discopop_tau)
        gate_neg = _sigmoid(-z / discopop_tau)
        expo = tl.exp(_logsigmoid(z / discopop_tau) - z)
        loss = -logsig_z * gate_neg + expo
        grad_z = (-_sigmoid(-z) * gate_neg + logsig_z * gate_pos * gate_neg / discopop_tau
                  + expo * (gate_neg / discopop_tau - 1.0))
    elif LOSS == 6:  # nca_pair
        loss = -_logsigmoid(a) - 0.5 * _logsigmoid(-a) - 0.5 * _logsigmoid(-b)
        grad_c = beta * (0.5 * _sigmoid(a) - _sigmoid(-a))
        grad_r = beta * 0.5 * _sigmoid(b)
    elif LOSS == 7:  # bco_pair
        loss = -_logsigmoid(a) - _logsigmoid(-b)
        grad_c = -beta * _sigmoid(-a)
        grad_r = beta * _sigmoid(b)
    elif LOSS == 8:  # sppo_hard
        gap_c = c - 0.5 / beta
        gap_r = r + 0.5 / beta
        loss = gap_c * gap_c + gap_r * gap_r
        grad_c = 2.0 * gap_c
        grad_r = 2.0 * gap_r
    elif LOSS == 9:  # apo_zero
        sig_a = _sigmoid(-a)
        sig_b = _sigmoid(b)
        loss = sig_a + sig_b
        grad_c = -beta * _sigmoid(a) * sig_a
        grad_r = beta * sig_b * _sigmoid(-b)
    else:  # apo_down
        sig_a = _sigmoid(a)
        sig_m = _sigmoid(b - a)
        slope_m = sig_m * _sigmoid(a - b)
        loss = sig_a + sig_m
        grad_c = beta * (sig_a * _sigmoid(-a) - slope_m)
        grad_r = beta * slope_m
    if LOSS <= 5:
        grad_c = beta * grad_z * ds_c
        grad_r = -beta * grad_z * ds_r

    weight = tl.full(c.shape, 1.0, tl.float32) * loss_weight
    if HAS_PAIR_WEIGHT:
        weight *= tl.load(pair_weight_ptr + offs, mask=mask, other=0.0)
    tl.store(losses_ptr + offs, loss * weight, mask=mask)
    tl.store(chosen_rewards_ptr + offs, beta * reward_c, mask=mask)
    tl.store(rejected_rewards_ptr + offs, beta * reward_r, mask=mask)
    tl.store(grad_chosen_ptr + offs, grad_c * weight, mask=mask)
    tl.store(grad_rejected_ptr + offs, grad_r * weight, mask=mask)


@triton.jit
def _unpaired_fwd_kernel(
    logps_ptr,  # [N] fp32 policy log-probs
    ref_logps_ptr,  # [N] fp32 reference log-probs
    labels_ptr,  # [N] bool (i1): True = desirable
    kl_ptr,  # [] fp32 clamped batch KL estimate (0 for apo_zero_unpaired)
    losses_ptr,  # [N] fp32 out: weighted loss per example
    rewards_ptr,  # [N] fp32 out: beta * (logp - ref)
    grad_ptr,  # [N] fp32 out: d loss_i / d logps_i (the reference's is its negative)
    num_examples,  # N
    beta,  # fp32
    desirable_weight,  # fp32
    undesirable_weight,  # fp32
    BLOCK_B: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = offs < num_examples
    logratio = tl.load(logps_ptr + offs, mask=mask, other=0.0) - tl.load(ref_logps_ptr + offs, mask=mask, other=0.0)
    desirable = tl.load(labels_ptr + offs, mask=mask, other=0) != 0
    z = beta * (logratio - tl.load(kl_ptr))
    sig_neg = _sigmoid(-z)
    sig_pos = _sigmoid(z)
    slope = beta * sig_neg * sig_pos
    tl.store(losses_ptr + offs, tl.where(desirable, desirable_weight * sig_neg, undesirable_weight * sig_pos),
             mask=mask)
    tl.store(rewards_ptr + offs, beta * logratio, mask=mask)
    tl.store(grad_ptr + offs, tl.where(desirable, -desirable_weight * slope, undesirable_weight * slope), mask=mask)


def launch_config(num_pairs: int) -> tuple[int, int]:
    """``(BLOCK_B, num_warps)``: one program for any batch up to 1024 pairs (4 warps: 8 pairs per thread), else
    1024-pair programs. Preference batches hold 1-64 pairs (KTO: examples) per device, so this is one launch of one
    program."""
    block = min(1024, triton.next_power_of_2(max(num_pairs, 16)))
    return block, 4 if block >= 512 else 1


def pair_losses(x: PairInputs, p: PairParams, formula: str) -> PairLosses:
    """``compiled.FORMULAS[formula]`` of ``x`` and ``p`` in one launch; every tensor of ``x`` is fp32 ``[B]`` (or
    None)."""
    chosen_B = x.chosen_B.contiguous()
    num_pairs = chosen_B.shape[0]
    outs = [torch.empty_like(chosen_B, dtype=torch.float32) for _ in range(5)]
    if num_pairs == 0:
        return PairLosses(*outs)
    block, num_warps = launch_config(num_pairs)

    def ptr(t: torch.Tensor | None) -> torch.Tensor:
        return chosen_B if t is None else t.contiguous()  # absent inputs are never read (constexpr-gated)

    _preference_fwd_kernel[(triton.cdiv(num_pairs, block),)](
        chosen_B, ptr(x.rejected_B), ptr(x.ref_chosen_B), ptr(x.ref_rejected_B), ptr(x.chosen_scale_B),
        ptr(x.rejected_scale_B), ptr(x.pair_weight_B), *outs, num_pairs, float(p.beta), float(p.label_smoothing),
        float(p.discopop_tau), float(p.margin), float(p.score_alpha), float(p.loss_weight),
        LOSS=LOSS_CODES[formula], SCORE=SCORE_CODES[p.score], HAS_REF=x.ref_chosen_B is not None,
        HAS_SCALE=x.chosen_scale_B is not None, HAS_PAIR_WEIGHT=x.pair_weight_B is not None, BLOCK_B=block,
        num_warps=num_warps,
    )
    return PairLosses(*outs)


def pair_preference_losses(
    chosen_B: torch.Tensor, rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor | None,
    ref_rejected_B: torch.Tensor | None, chosen_scale_B: torch.Tensor | None, rejected_scale_B: torch.Tensor | None,
    pair_weight_B: torch.Tensor | None, formula: str, score: str, beta: float, label_smoothing: float,
    discopop_tau: float, margin: float, score_alpha: float, loss_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backend of ``fusedrl::pair_preference_losses``: ``compiled.pair_preference_losses``' signature and
    results, from :func:`pair_losses`."""
    x = PairInputs(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_scale_B, rejected_scale_B,
                   pair_weight_B)
    p = PairParams(score, beta, label_smoothing, discopop_tau, margin, score_alpha, loss_weight)
    return tuple(pair_losses(x, p, formula))


def unpaired_preference_losses(
    logps_N: torch.Tensor, ref_logps_N: torch.Tensor, labels_N: torch.Tensor, kl: torch.Tensor, beta: float,
    desirable_weight: float, undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backend of ``fusedrl::unpaired_preference_losses`` (``compiled.unpaired_preference_losses``'
    signature and results) in one launch. logps_N, ref_logps_N: fp32 ``[N]``; labels_N: bool ``[N]``; kl: fp32
    scalar, already clamped."""
    logps_N = logps_N.contiguous()
    num_examples = logps_N.shape[0]
    outs = [torch.empty_like(logps_N, dtype=torch.float32) for _ in range(3)]
    if num_examples == 0:
        return tuple(outs)
    block, num_warps = launch_config(num_examples)
    _unpaired_fwd_kernel[(triton.cdiv(num_examples, block),)](
        logps_N, ref_logps_N.contiguous(), labels_N.contiguous(), kl.reshape(1), *outs, num_examples, float(beta),
        float(desirable_weight), float(undesirable_weight), BLOCK_B=block, num_warps=num_warps,
    )
    return tuple(UnpairedLosses(*outs))
