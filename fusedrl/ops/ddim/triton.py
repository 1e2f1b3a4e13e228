"""The DDIM step with log-prob as one Triton launch per direction: the Triton implementations of
``fusedrl::ddim_logprob`` (:func:`ddim_step_fwd`) and ``fusedrl::ddim_logprob_backward`` (:func:`ddim_step_bwd`),
with the signatures and results of ``compiled.py`` (whose docstring derives the gradient).

Legend: B samples, N latent elements per sample, BLOCK_N elements per program; the grid is (B, cdiv(N, BLOCK_N)).

Forward, one pass over the latents: each program loads its sample's two cumulative alphas, forms the step's
per-sample terms in registers (std, the direction weight, sqrt(a_p)), then for its BLOCK_N elements the mean, the
draw ``mean + std * noise`` (rounded to the sample's dtype before it is scored, as stored), the squared residual
and, when asked, ``d log_prob / d model_output``. Each input element is read once and each output written once.

The log-prob is a mean over N, so the elements of one sample sit in cdiv(N, BLOCK_N) programs. Each program writes
its block's share of the mean to a ``[B, cdiv(N, BLOCK_N)]`` fp32 buffer and torch sums its rows (at B = 32,
N = 4 * 64 * 64 that is 32 x 16 floats, 2 KB against 1 MB of bf16 latents per input). Atomics would save that
small pass but add floats in an order that changes from run to run, and seeded DDPO runs are meant to reproduce
bit for bit; one program per sample would leave an A100's 108 SMs a third idle at B = 32.

Backward (only when the forward did not form the gradient: a drawn sample that carries gradient, as in AlignProp,
or a sample that requires grad): the same grid recomputes the mean from the saved inputs and writes both input
gradients in one pass. All math is fp32; inputs of any float dtype are cast after the load.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

PREDICTION_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
LOG_SQRT_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))  # a global a kernel reads must be a constexpr


@triton.jit
def _row_terms(alphas_ptr, row, eta):
    """Per-sample terms: (a_t, std, direction weight sqrt(1 - a_p - std^2), sqrt(a_p)), fp32 scalars."""
    alpha_t = tl.load(alphas_ptr + 2 * row)
    alpha_prev = tl.load(alphas_ptr + 2 * row + 1)
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    std = eta * tl.sqrt_rn(variance)
    return alpha_t, std, tl.sqrt_rn(1.0 - alpha_prev - std * std), tl.sqrt_rn(alpha_prev)


@triton.jit
def _step_mean(m, x, alpha_t, direction, sqrt_prev, clip_range, PREDICTION: tl.constexpr, CLIP: tl.constexpr):
    """(mean, x0 inside the clip range, d mean / d m, d mean / d x) per element; codes as PREDICTION_CODES."""
    sqrt_a = tl.sqrt_rn(alpha_t)
    sqrt_b = tl.sqrt_rn(1.0 - alpha_t)
    if PREDICTION == 0:
        x0 = (x - sqrt_b * m) / sqrt_a
        eps = m
        dx0_dm, deps_dm, dx0_dx, deps_dx = -sqrt_b / sqrt_a, 1.0, 1.0 / sqrt_a, 0.0
    elif PREDICTION == 1:
        x0 = m
        eps = (x - sqrt_a * m) / sqrt_b
        dx0_dm, deps_dm, dx0_dx, deps_dx = 1.0, -sqrt_a / sqrt_b, 0.0, 1.0 / sqrt_b
    else:
        x0 = sqrt_a * x - sqrt_b * m
        eps = sqrt_a * m + sqrt_b * x
        dx0_dm, deps_dm, dx0_dx, deps_dx = -sqrt_b, sqrt_a, sqrt_a, sqrt_b
    if CLIP:
        in_range = (x0 >= -clip_range) & (x0 <= clip_range)
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
        dmean_dm = sqrt_prev * tl.where(in_range, dx0_dm, 0.0) + direction * deps_dm
        dmean_dx = sqrt_prev * tl.where(in_range, dx0_dx, 0.0) + direction * deps_dx
    else:
        dmean_dm = sqrt_prev * dx0_dm + direction * deps_dm
        dmean_dx = sqrt_prev * dx0_dx + direction * deps_dx
    return sqrt_prev * x0 + direction * eps, dmean_dm, dmean_dx


@triton.jit
def _ddim_fwd_kernel(
    model_ptr,  # [B, N] model output (any float dtype), contiguous
    sample_ptr,  # [B, N] current latents, same layout
    target_ptr,  # [B, N] standard normal noise when DRAW, else the prev_sample to score
    alphas_ptr,  # [B, 2] fp32: a_t, a_p of each sample
    prev_ptr,  # [B, N] out in the sample's dtype: mean + std * noise (written only when DRAW)
    partial_ptr,  # [B, num_blocks] fp32 out: each block's share of the sample's mean log density
    grad_ptr,  # [B, N] fp32 out: d log_prob / d model_output (written only when WRITE_GRAD)
    num_cols,  # N
    num_blocks,  # cdiv(N, BLOCK_N)
    eta,  # fp32 DDIM eta
    clip_range,  # fp32 R of clamp(x0, -R, R) (read only when CLIP)
    inv_cols,  # fp32 1 / N
    PREDICTION: tl.constexpr,
    CLIP: tl.constexpr,
    DRAW: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    block = tl.program_id(1)
    alpha_t, std, direction, sqrt_prev = _row_terms(alphas_ptr, row, eta)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = cols < num_cols
    # int64: B * N passes 2^31 for video-sized latents (a few hundred of 16 x 4 x 128 x 128).
    offs = row.to(tl.int64) * num_cols + cols
    m = tl.load(model_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    x = tl.load(sample_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    mean, dmean_dm, _ = _step_mean(m, x, alpha_t, direction, sqrt_prev, clip_range, PREDICTION, CLIP)
    if DRAW:
        prev = (mean + std * target).to(prev_ptr.dtype.element_ty)
        tl.store(prev_ptr + offs, prev, mask=inb)
        residual = prev.to(tl.float32) - mean
    else:
        residual = target - mean
    square_sum = tl.sum(tl.where(inb, residual * residual, 0.0), axis=0)
    count = tl.minimum(num_cols - block * BLOCK_N, BLOCK_N)
    # std = 0 (eta 0) makes this NaN, as the reference's density: no log-prob exists there.
    share = (-square_sum / (2.0 * std * std) - count * (tl.log(std) + LOG_SQRT_2PI)) * inv_cols
    tl.store(partial_ptr + row * num_blocks + block, share)
    if WRITE_GRAD:
        inv_var_n = tl.where(std > 0.0, inv_cols / (std * std), 0.0)
        tl.store(grad_ptr + offs, residual * inv_var_n * dmean_dm, mask=inb)


@triton.jit
def _ddim_bwd_kernel(
    grad_prev_ptr,  # [B, N] upstream gradient of the drawn prev_sample (read only when HAS_GRAD_PREV)
    grad_lp_ptr,  # [B] fp32 upstream gradient of log_prob
    model_ptr,  # [B, N] model output, contiguous
    sample_ptr,  # [B, N] current latents
    prev_ptr,  # [B, N] the scored prev_sample (drawn or given)
    alphas_ptr,  # [B, 2] fp32: a_t, a_p
    grad_model_ptr,  # [B, N] fp32 out
    grad_sample_ptr,  # [B, N] fp32 out (written only when SAMPLE_GRAD)
    num_cols,  # N
    eta,  # fp32
    clip_range,  # fp32 (read only when CLIP)
    inv_cols,  # fp32 1 / N
    PREDICTION: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_GRAD_PREV: tl.constexpr,
    SAMPLE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = cols < num_cols
    alpha_t, std, direction, sqrt_prev = _row_terms(alphas_ptr, row, eta)
    grad_lp = tl.load(grad_lp_ptr + row)
    offs = row.to(tl.int64) * num_cols + cols
    m = tl.load(model_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    x = tl.load(sample_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    prev = tl.load(prev_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    mean, dmean_dm, dmean_dx = _step_mean(m, x, alpha_t, direction, sqrt_prev, clip_range, PREDICTION, CLIP)
    # d log_prob / d mean; 0 where std = 0 (the log-prob is NaN there and an unused one must not poison the chain).
    grad_mean = (prev - mean) * (grad_lp * tl.where(std > 0.0, inv_cols / (std * std), 0.0))
    if HAS_GRAD_PREV:
        grad_mean += tl.load(grad_prev_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(grad_model_ptr + offs, grad_mean * dmean_dm, mask=inb)
    if SAMPLE_GRAD:
        tl.store(grad_sample_ptr + offs, grad_mean * dmean_dx, mask=inb)


def launch_config(num_cols: int) -> tuple[int, int]:
    """``(BLOCK_N, num_warps)``: 1024 elements per program on 4 warps (8 per thread, 16-byte bf16 loads); shorter
    rows take the next power of two. The kernel is bound by its [B, N] reads: a few dozen flops per element."""
    block = min(1024, triton.next_power_of_2(max(num_cols, 16)))
    return block, 4 if block >= 512 else 1


def ddim_step_fwd(
    model_output: torch.Tensor, sample: torch.Tensor, target: torch.Tensor, alphas: torch.Tensor, eta: float,
    clip_range: float, prediction_type: str, draw: bool, write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``compiled.ddim_step_fwd``: ``(prev [B, N] or [0], log_prob fp32 [B], grad fp32 [B, N] or [0])``."""
    model_output, sample, target = model_output.contiguous(), sample.contiguous(), target.contiguous()
    num_rows, num_cols = model_output.shape
    block, num_warps = launch_config(num_cols)
    num_blocks = triton.cdiv(num_cols, block)
    prev = torch.empty_like(sample) if draw else sample.new_empty(0)
    grad = model_output.new_empty((num_rows, num_cols) if write_grad else (0,), dtype=torch.float32)
    partial = model_output.new_empty((num_rows, num_blocks), dtype=torch.float32)
    _ddim_fwd_kernel[(num_rows, num_blocks)](
        model_output, sample, target, alphas.contiguous(), prev if draw else sample, partial,
        grad if write_grad else partial, num_cols, num_blocks, float(eta), float(clip_range), 1.0 / num_cols,
        PREDICTION=PREDICTION_CODES[prediction_type], CLIP=math.isfinite(clip_range), DRAW=draw,
        WRITE_GRAD=write_grad, BLOCK_N=block, num_warps=num_warps,
    )
    return prev, partial.sum(1), grad


def ddim_step_bwd(
    grad_prev: torch.Tensor | None, grad_log_prob: torch.Tensor, model_output: torch.Tensor, sample: torch.Tensor,
    prev: torch.Tensor, alphas: torch.Tensor, eta: float, clip_range: float, prediction_type: str, sample_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``compiled.ddim_step_bwd``: ``(grad model_output fp32 [B, N], grad sample fp32 [B, N] or [0])``."""
    model_output = model_output.contiguous()
    num_rows, num_cols = model_output.shape
    block, num_warps = launch_config(num_cols)
    grad_model = torch.empty_like(model_output, dtype=torch.float32)
    grad_sample = torch.empty_like(grad_model) if sample_grad else grad_model.new_empty(0)
    _ddim_bwd_kernel[(num_rows, triton.cdiv(num_cols, block))](
        model_output if grad_prev is None else grad_prev.contiguous(), grad_log_prob.float().contiguous(),
        model_output, sample.contiguous(), prev.contiguous(), alphas.contiguous(), grad_model,
        grad_sample if sample_grad else grad_model, num_cols, float(eta), float(clip_range), 1.0 / num_cols,
        PREDICTION=PREDICTION_CODES[prediction_type], CLIP=math.isfinite(clip_range),
        HAS_GRAD_PREV=grad_prev is not None, SAMPLE_GRAD=sample_grad, BLOCK_N=block, num_warps=num_warps,
    )
    return grad_model, grad_sample
