"""The GRPO/PPO policy loss as one Triton launch: a program per sequence writes the row's share of the loss, the
gradient w.r.t. every log-prob of the row, and the row's KL sum and clip counts. Same inputs, outputs and formulas
as ``compiled.py`` (whose docstring derives the gradient); the backward is then ``upstream * saved gradient``.
:func:`policy_rows` is the Triton implementation of ``fusedrl::policy_loss_rows``, with the signature of
``compiled.policy_rows``.

Legend: B sequences (one program each), T completion positions, BLOCK_T positions per loop step.

Each input is read once and the gradient written once. Sequence level (GSPO) needs the row's mean log-ratio before
any token's loss: a torch pre-pass (``compiled.sequence_log_ratio``, one reduction over ``[B, T]``) passes it in as
the row's ratio. Its gradient reaches every token through that mean, i.e. as the row's summed slope, known only
after the row: the kernel writes the per-token (KL) part and the slope per row, and the backward adds
``slope_b * mask`` in the same elementwise expression as the upstream multiply. The top-entropy mask is a quantile
over the whole batch: the caller computes it in torch (``compiled.high_entropy_keep``) and passes it as ``keep``.
The objective (clip, cispo, sapo, vespo) is a constexpr: each compiles its own kernel. VESPO's weight needs the row's
clamped log-ratio sum first: the same kind of torch pre-pass (``compiled.vespo_log_weight``) passes it in per row.
CISPO and VESPO differentiate ``logp`` directly, so at sequence level their gradient stays per token (no slope).
Optional inputs are constexpr-gated (absent ones cost no load); all math is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedrl.ops.policy.compiled import DIRECT_OBJECTIVES, PolicyRows, sequence_log_ratio, vespo_log_weight

KL_CODES = {"k1": 0, "k2": 1, "k3": 2}
OBJECTIVE_CODES = {"clip": 0, "cispo": 1, "sapo": 2, "vespo": 3}


@triton.jit
def _kl_terms(d, KL: tl.constexpr):
    """(kl, d kl / d logp) for d = logp - ref; codes as KL_CODES."""
    if KL == 0:
        kl = d
        dkl = tl.full(d.shape, 1.0, tl.float32)
    elif KL == 1:
        kl = 0.5 * d * d
        dkl = d
    else:
        e = tl.exp(-d)
        kl = e + d - 1.0
        dkl = 1.0 - e
    return kl, dkl


@triton.jit
def _clip_terms(ratio, adv, lo, hi, delta):
    """(pg, d pg / d log-ratio, is_low, is_high) for bounds lo = 1 - eps_low, hi = 1 + eps_high; a tie splits the
    slope as torch.minimum's backward does."""
    c1 = tl.minimum(ratio, delta)
    c2 = tl.minimum(tl.maximum(ratio, lo), hi)
    t1 = c1 * adv
    t2 = c2 * adv
    d1 = tl.where(ratio <= delta, ratio, 0.0)
    d2 = tl.where((ratio >= lo) & (ratio <= hi), ratio, 0.0)
    slope = tl.where(t1 < t2, d1, tl.where(t2 < t1, d2, 0.5 * (d1 + d2)))
    is_low = (c1 < lo) & (adv < 0.0)
    is_high = (c1 > hi) & (adv > 0.0)
    return -tl.minimum(t1, t2), -adv * slope, is_low, is_high


@triton.jit
def _objective_terms(ratio, adv, logp, log_w, lo, hi, delta, p0, p1, p2, p3, OBJECTIVE: tl.constexpr):
    """(pg, d pg, is_low, is_high) of one objective (OBJECTIVE_CODES): d pg w.r.t. the log-ratio for clip and sapo,
    w.r.t. logp for cispo and vespo; p0..p3 as compiled.objective_params; log_w VESPO's row log-weight."""
    if OBJECTIVE == 0:
        pg, slope, is_low, is_high = _clip_terms(ratio, adv, lo, hi, delta)
    elif OBJECTIVE == 1:
        capped = tl.minimum(ratio, p0)
        pg = -capped * adv * logp
        slope = -capped * adv
        is_low = ratio < 0.0  # never: a ratio is an exponential (an all-False mask of the right shape)
        is_high = (ratio > p0) & (adv > 0.0)
    elif OBJECTIVE == 2:
        tau = tl.where(adv > 0.0, p0, p1)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        pg = -(gate * 4.0 / tau) * adv
        slope = -adv * 4.0 * gate * (1.0 - gate) * ratio
        is_low = ratio < 0.0
        is_high = ratio < 0.0
    else:
        non_negative = adv >= 0.0
        k = tl.where(non_negative, p0, p2)
        lam = tl.where(non_negative, p1, p3)
        phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
        phi = tl.where(phi < float("inf"), phi, 0.0)  # +inf and NaN -> 0 (phi >= 0), as TRL's nan_to_num
        pg = -phi * adv * logp
        slope = -phi * adv
        is_low = ratio < 0.0
        is_high = ratio < 0.0
    return pg, slope, is_low, is_high


@triton.jit
def _policy_fwd_kernel(
    logps_ptr,  # [B, T] fp32 policy log-probs (contiguous)
    old_ptr,  # [B, T] fp32 old-policy log-probs (read only at token level)
    ratio_ptr,  # [B] fp32 exp(masked mean log-ratio) of each row (read only when SEQUENCE)
    log_w_ptr,  # [B] fp32 VESPO's clamped row log-weight (read only when OBJECTIVE is vespo)
    adv_ptr,  # [B, T] fp32 when ADV_PER_TOKEN, else [B]
    mask_ptr,  # [B, T] fp32 completion mask (> 0: token counts)
    row_scale_ptr,  # [B] fp32 aggregation weight of each of the row's tokens
    keep_ptr,  # [B, T] fp32 top-entropy mask (read only when HAS_KEEP)
    ref_ptr,  # [B, T] fp32 reference log-probs (read only when HAS_REF)
    loss_ptr,  # [B] fp32 out: the row's weighted loss
    grad_ptr,  # [B, T] fp32 out: per-token part of d loss / d logps (the KL part only when SEQUENCE)
    slope_ptr,  # [B] fp32 out: sum over the row of w keep d pg / d log-ratio (0 at token level)
    kl_ptr,  # [B] fp32 out: sum of the KL estimate over the row's masked tokens (0 without HAS_REF)
    low_ptr,  # [B] fp32 out: masked count of low-clipped tokens
    high_ptr,  # [B] fp32 out: masked count of high-clipped tokens
    num_cols,  # T
    beta,  # fp32 KL weight
    clip_low,  # fp32 1 - eps_low (formed in double on the host, as the reference's bound)
    clip_high,  # fp32 1 + eps_high
    delta,  # fp32 dual-clip cap of the ratio (inf: none)
    p0, p1, p2, p3,  # fp32 objective parameters (compiled.objective_params)
    KL: tl.constexpr,  # KL_CODES
    OBJECTIVE: tl.constexpr,  # OBJECTIVE_CODES
    DIRECT: tl.constexpr,  # the objective differentiates logp itself (cispo, vespo): per-token gradient, no slope
    SEQUENCE: tl.constexpr,  # one ratio per row (GSPO) instead of per token
    ADV_PER_TOKEN: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * num_cols
    row_scale = tl.load(row_scale_ptr + row)
    if not ADV_PER_TOKEN:
        row_adv = tl.load(adv_ptr + row)
    if SEQUENCE:
        row_ratio = tl.load(ratio_ptr + row)
    row_log_w = 0.0
    if OBJECTIVE == 3:
        row_log_w = tl.load(log_w_ptr + row)

    loss_acc = tl.zeros((BLOCK_T,), tl.float32)
    slope_acc = tl.zeros((BLOCK_T,), tl.float32)
    kl_acc = tl.zeros((BLOCK_T,), tl.float32)
    low_acc = tl.zeros((BLOCK_T,), tl.float32)
    high_acc = tl.zeros((BLOCK_T,), tl.float32)
    for start in range(0, num_cols, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        inb = offs < num_cols
        on = (tl.load(mask_ptr + base + offs, mask=inb, other=0.0) > 0.0) & inb
        if ADV_PER_TOKEN:
            adv = tl.load(adv_ptr + base + offs, mask=on, other=0.0)
        else:
            adv = tl.full((BLOCK_T,), 0.0, tl.float32) + row_adv
        if SEQUENCE:
            ratio = tl.full((BLOCK_T,), 0.0, tl.float32) + row_ratio
            if HAS_REF or DIRECT:
                logp = tl.load(logps_ptr + base + offs, mask=on, other=0.0)
            else:
                logp = ratio  # never read: the clip and sapo objectives see logp only through the ratio
        else:
            logp = tl.load(logps_ptr + base + offs, mask=on, other=0.0)
            old = tl.load(old_ptr + base + offs, mask=on, other=0.0)
            ratio = tl.exp(tl.where(on, logp - old, 0.0))
        pg, dpg, is_low, is_high = _objective_terms(ratio, adv, logp, row_log_w, clip_low, clip_high, delta, p0, p1,
                                                    p2, p3, OBJECTIVE)
        w = tl.where(on, row_scale, 0.0)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + base + offs, mask=on, other=0.0)
        else:
            keep = tl.full((BLOCK_T,), 1.0, tl.float32)
        term = keep * pg
        pg_grad = tl.where(on, w * keep * dpg, 0.0)
        grad = tl.zeros((BLOCK_T,), tl.float32)
        if HAS_REF:
            ref = tl.load(ref_ptr + base + offs, mask=on, other=0.0)
            kl, dkl = _kl_terms(logp - ref, KL)
            kl = tl.where(on, kl, 0.0)
            kl_acc += kl
            term += beta * kl
            grad += tl.where(on, w * beta * dkl, 0.0)
        if SEQUENCE and not DIRECT:
            slope_acc += pg_grad
        else:
            grad += pg_grad
        loss_acc += tl.where(on, w * term, 0.0)
        low_acc += tl.where(on & is_low, 1.0, 0.0)
        high_acc += tl.where(on & is_high, 1.0, 0.0)
        tl.store(grad_ptr + base + offs, grad, mask=inb)

    tl.store(loss_ptr + row, tl.sum(loss_acc, axis=0))
    tl.store(slope_ptr + row, tl.sum(slope_acc, axis=0))
    tl.store(kl_ptr + row, tl.sum(kl_acc, axis=0))
    tl.store(low_ptr + row, tl.sum(low_acc, axis=0))
    tl.store(high_ptr + row, tl.sum(high_acc, axis=0))


def launch_config(num_cols: int) -> tuple[int, int]:
    """``(BLOCK_T, num_warps)``: a row of up to 1024 positions in one loop step (4 warps, 8 positions per thread);
    longer rows loop. The work per token is a few dozen flops, so the kernel is bound by its [B, T] reads."""
    block = min(1024, triton.next_power_of_2(max(num_cols, 16)))
    return block, 4 if block >= 512 else 1


def policy_rows(
    logps: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, row_scale: torch.Tensor,
    keep: torch.Tensor | None, ref: torch.Tensor | None, beta: float, epsilon_low: float, epsilon_high: float,
    delta: float, sequence: bool, kl_estimator: str, objective: str, objective_params: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`PolicyRows` of ``compiled.token_level_rows`` / ``sequence_level_rows`` in one launch (after the
    sequence level's and VESPO's per-row torch pre-passes). logps, old, mask and the optional keep and ref: fp32
    ``[B, T]``; advantages: fp32 ``[B]`` or ``[B, T]``; row_scale: fp32 ``[B]``; delta: the dual-clip cap (inf:
    none); objective and its 4 objective_params as ``compiled.policy_rows``."""
    logps = logps.contiguous()
    num_rows, num_cols = logps.shape
    grad = torch.empty_like(logps)
    loss, slope, kl, low, high = (logps.new_empty(num_rows) for _ in range(5))
    if num_rows == 0:
        return PolicyRows(loss, grad, slope, kl, low, high)
    ratio, inv_count = None, None
    if sequence:
        log_ratio, inv_count = sequence_log_ratio(logps, old, mask)
        ratio = torch.exp(log_ratio)
    log_w = vespo_log_weight(logps, old, mask).contiguous() if objective == "vespo" else None
    direct = objective in DIRECT_OBJECTIVES
    block, num_warps = launch_config(num_cols)

    def ptr(t: torch.Tensor | None) -> torch.Tensor:
        return logps if t is None else t.contiguous()  # absent inputs are never read (constexpr-gated)

    _policy_fwd_kernel[(num_rows,)](
        logps, ptr(old), ptr(ratio), ptr(log_w), ptr(advantages), ptr(mask), ptr(row_scale), ptr(keep), ptr(ref),
        loss, grad, slope, kl, low, high, num_cols, float(beta), 1.0 - float(epsilon_low), 1.0 + float(epsilon_high),
        float(delta), *(float(p) for p in objective_params), KL=KL_CODES[kl_estimator],
        OBJECTIVE=OBJECTIVE_CODES[objective], DIRECT=direct, SEQUENCE=sequence, ADV_PER_TOKEN=advantages.dim() == 2,
        HAS_KEEP=keep is not None, HAS_REF=ref is not None, BLOCK_T=block, num_warps=num_warps,
    )
    if sequence and not direct:
        slope = slope * inv_count  # each token's share of the row's mean log-ratio
    return PolicyRows(loss, grad, slope, kl, low, high)
