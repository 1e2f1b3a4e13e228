"""The Triton backend: row statistics of a logits chunk as Triton kernels, and the entry points of the
``fusedrl::*token_logprobs*`` custom ops; same arguments and results as ``compiled.py``, same chunk drivers
(``chunked.py``).

Legend: N tokens, C rows of one chunk, V vocabulary, BLOCK_V vocabulary entries one program handles per step.

Forward: one program per row makes a single pass over V in BLOCK_V tiles with an online logsumexp, so each logit is
read once (plus the one target logit); it keeps three fp32 scalars per row, with s = logits / T and m the running
max of s:
    sum_exp  = sum_j e^(s_j - m)                 weighted = sum_j e^(s_j - m) (s_j - m)
When m grows to m' (d = m - m' <= 0) both are rescaled: sum_exp' = e^d sum_exp, weighted' = e^d (weighted + d
sum_exp). Then lse = m + log(sum_exp) and H = log(sum_exp) - weighted / sum_exp, the shifted form ``compiled.py`` uses.

Backward: grid (C, V / BLOCK_V); each program reads its logits tile once and writes the gradient tile once.

All math is fp32 whatever the logits dtype; row offsets are int64 because C * V passes 2^31 at C = 16k, V = 152k.

Soft cap (``SOFTCAP``, a constexpr: the uncapped kernels compile as before): each loaded logit z becomes
c tanh(z / c) before the temperature, and the backward multiplies its gradient by 1 - tanh(z / c)^2. tanh is
:func:`_tanh`, built from ``tl.exp``: libdevice's tanh does not run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusedrl.ops.logprobs import fused


@triton.jit
def _tanh(x):
    """fp32 tanh. Above |x| = 0.2 from one exp, (1 - e^(-2|x|)) / (1 + e^(-2|x|)), which saturates to 1 without
    overflow; below it 1 - e^(-2|x|) cancels (relative error of order 2^-24 / 2|x|, 3e-6 at |x| = 0.01), so the
    Taylor series x - x^3/3 + 2x^5/15 - 17x^7/315 takes over, whose first dropped term (62/2835 x^9) is 6e-8 x at
    |x| = 0.2."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    by_exp = (1.0 - e) / (1.0 + e)
    a2 = a * a
    by_series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.2, by_series, by_exp)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # [C, V] fp32/bf16/fp16; rows ``stride_row`` elements apart, columns contiguous
    labels_ptr,  # [C] int64
    logprobs_ptr,  # [C] fp32 out: s_y - lse, 0 for ignored rows
    entropy_ptr,  # [C] fp32 out: H, 0 for ignored rows or when not WITH_ENTROPY
    lse_ptr,  # [C] fp32 out: logsumexp of the scaled row, saved for the backward
    stride_row,  # elements between two rows of logits
    num_vocab,  # V
    inv_temperature,  # 1 / T, fp32
    softcap,  # c of the soft cap, fp32 (read only when SOFTCAP)
    ignore_index,  # label value of rows that take no part
    WITH_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    cols = tl.arange(0, BLOCK_V)

    running_max = float("-inf")
    sum_exp = 0.0
    weighted = 0.0
    for start in range(0, num_vocab, BLOCK_V):
        mask = start + cols < num_vocab
        logits = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if SOFTCAP:  # the masked tail stays -inf (capped it would be -c, a term of the sum)
            logits = tl.where(mask, softcap * _tanh(logits / softcap), float("-inf"))
        scaled = logits * inv_temperature
        new_max = tl.maximum(running_max, tl.max(scaled, 0))
        # Shift by 0 while the row is all -inf (compiled.py does the same), so -inf - -inf never makes a NaN.
        new_shift = tl.where(tl.abs(new_max) < float("inf"), new_max, 0.0)
        # Nothing has been summed while the old max is -inf, so any finite old shift is exact: take the new one.
        old_shift = tl.where(tl.abs(running_max) < float("inf"), running_max, new_shift)
        delta = old_shift - new_shift
        rescale = tl.exp(delta)
        weighted = rescale * (weighted + delta * sum_exp)
        sum_exp = rescale * sum_exp
        shifted = scaled - new_shift
        exp_shifted = tl.exp(shifted)
        sum_exp += tl.sum(exp_shifted, 0)
        # exp = 0 entries (-inf logits, masked tail) would give 0 * -inf = NaN; they contribute nothing.
        weighted += tl.sum(tl.where(exp_shifted > 0, exp_shifted * shifted, 0.0), 0)
        running_max = new_max

    shift = tl.where(tl.abs(running_max) < float("inf"), running_max, 0.0)
    log_sum_exp = tl.log(sum_exp)
    lse = shift + log_sum_exp
    safe_label = tl.where(valid, label, 0)
    target = tl.load(row_ptr + safe_label).to(tl.float32)
    if SOFTCAP:
        target = softcap * _tanh(target / softcap)
    target = target * inv_temperature
    tl.store(logprobs_ptr + row, tl.where(valid, target - lse, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, log_sum_exp - weighted / sum_exp, 0.0))
    else:
        tl.store(entropy_ptr + row, 0.0)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,  # [C, V] fp32/bf16/fp16; rows ``stride_row`` elements apart, columns contiguous
    labels_ptr,  # [C] int64
    lse_ptr,  # [C] fp32 from the forward
    entropy_ptr,  # [C] fp32 from the forward (read only when HAS_GRAD_ENTROPY)
    grad_logprobs_ptr,  # [C] fp32 upstream gradient of logprobs (a dummy when not HAS_GRAD_LOGPROBS)
    grad_entropy_ptr,  # [C] fp32 upstream gradient of entropy (a dummy when not HAS_GRAD_ENTROPY)
    grad_logits_ptr,  # [C, V] out, logits dtype, contiguous: rows ``num_vocab`` apart
    stride_row,  # elements between two rows of logits
    num_vocab,  # V
    inv_temperature,  # 1 / T, fp32
    softcap,  # c of the soft cap, fp32 (read only when SOFTCAP)
    ignore_index,  # label value of rows that take no part
    HAS_GRAD_LOGPROBS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < num_vocab
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    logits = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        tanh = _tanh(logits / softcap)
        logits = softcap * tanh
    scaled = logits * inv_temperature
    logp = scaled - tl.load(lse_ptr + row)
    probs = tl.exp(logp)
    grad = tl.zeros([BLOCK_V], dtype=tl.float32)
    if HAS_GRAD_LOGPROBS:
        grad_logprob = tl.load(grad_logprobs_ptr + row)
        grad += grad_logprob * (tl.where(cols == label, 1.0, 0.0) - probs)
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
        # p = 0 entries (-inf logits) have 0 * -inf = NaN in p (log p + H); their true gradient is 0.
        grad -= grad_entropy * tl.where(probs > 0, probs * (logp + entropy), 0.0)
    grad = grad * inv_temperature
    if SOFTCAP:  # through the cap: d logits / d z = 1 - tanh^2
        grad = grad * (1.0 - tanh * tanh)
    # Ignored rows get an exact 0, even where their own statistics are not finite.
    grad = tl.where(valid, grad, 0.0)
    tl.store(grad_logits_ptr + row * num_vocab + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logprobs_stats_kernel(
    logits_ptr,  # [C, V] fp32/bf16/fp16; rows ``stride_row`` elements apart, columns contiguous
    labels_ptr,  # [C] int64
    lse_ptr,  # [C] fp32 from the forward
    is_top1_ptr,  # [C] int8 out: 1 where the first maximal logit is the label's
    log_sum_sq_ptr,  # [C] fp32 out: log sum_j p_j^2 = logsumexp(2 s) - 2 lse
    stride_row,  # elements between two rows of logits
    num_vocab,  # V
    inv_temperature,  # 1 / T, fp32
    softcap,  # c of the soft cap, fp32 (read only when SOFTCAP)
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    best = float("-inf")
    best_index = 0
    running_max = float("-inf")
    sum_sq = 0.0
    for start in range(0, num_vocab, BLOCK_V):
        mask = start + cols < num_vocab
        logits = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            logits = tl.where(mask, softcap * _tanh(logits / softcap), float("-inf"))
        scaled = logits * inv_temperature
        block_best, block_index = tl.max(scaled, 0, return_indices=True, return_indices_tie_break_left=True)
        # Strictly greater: on a tie across blocks the earlier block keeps it, so this is torch.argmax's first index.
        best_index = tl.where(block_best > best, start + block_index, best_index)
        best = tl.maximum(best, block_best)
        # The forward kernel's online rescaling, for sum_j e^(2 (s_j - m)).
        new_max = tl.maximum(running_max, block_best)
        new_shift = tl.where(tl.abs(new_max) < float("inf"), new_max, 0.0)
        old_shift = tl.where(tl.abs(running_max) < float("inf"), running_max, new_shift)
        sum_sq = sum_sq * tl.exp(2.0 * (old_shift - new_shift)) + tl.sum(tl.exp(2.0 * (scaled - new_shift)), 0)
        running_max = new_max
    shift = tl.where(tl.abs(running_max) < float("inf"), running_max, 0.0)
    label = tl.load(labels_ptr + row)
    tl.store(is_top1_ptr + row, tl.where(best_index == label, 1, 0).to(tl.int8))
    tl.store(log_sum_sq_ptr + row, 2.0 * shift + tl.log(sum_sq) - 2.0 * tl.load(lse_ptr + row))


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int
    num_warps: int


def launch_config(num_vocab: int) -> LaunchConfig:
    """BLOCK_V and num_warps for both kernels: the whole row up to 4096 entries, else 4096-wide tiles.

    4096 entries over 8 warps (256 threads) is 16 values per thread, two (bf16) or four (fp32) 16-byte vector
    loads in flight per thread per step; the AOT report (``fusedrl aot``) gives 32-59 registers and no spills on
    sm_80/sm_90 at this size (32-64 for the soft-capped variants: the tanh's exp and series). At V = 32000 the
    forward makes 8 loop steps per row and the backward launches 8 programs per row.
    """
    block_v = min(4096, triton.next_power_of_2(max(num_vocab, 1)))
    num_warps = 8 if block_v >= 2048 else 4 if block_v >= 512 else 1
    return LaunchConfig(block_v=block_v, num_warps=num_warps)


def _columns_contiguous(logits_CV: torch.Tensor) -> torch.Tensor:
    """Row-slice views pass through (the row stride goes to the kernel); a column stride != 1 is copied once."""
    if logits_CV.dim() != 2:
        raise ValueError(f"logits must be 2-D [C, V], got shape {tuple(logits_CV.shape)}")
    return logits_CV if logits_CV.stride(-1) == 1 or logits_CV.shape[-1] == 1 else logits_CV.contiguous()


def _launch_fwd(
    logits_CV: torch.Tensor, labels_C: torch.Tensor, inv_temperature: float, ignore_index: int, with_entropy: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits_CV = _columns_contiguous(logits_CV)
    num_rows, num_vocab = logits_CV.shape
    logprobs_C, entropy_C, lse_C = (
        torch.empty(num_rows, dtype=torch.float32, device=logits_CV.device) for _ in range(3)
    )
    if num_rows == 0:
        return logprobs_C, entropy_C, lse_C
    config = launch_config(num_vocab)
    _logprobs_fwd_kernel[(num_rows,)](
        logits_CV, labels_C.contiguous(), logprobs_C, entropy_C, lse_C,
        logits_CV.stride(0), num_vocab, float(inv_temperature), float(softcap), int(ignore_index),
        WITH_ENTROPY=bool(with_entropy), SOFTCAP=softcap > 0, BLOCK_V=config.block_v, num_warps=config.num_warps,
    )
    return logprobs_C, entropy_C, lse_C


def _launch_bwd(
    logits_CV: torch.Tensor,
    labels_C: torch.Tensor,
    lse_C: torch.Tensor,
    entropy_C: torch.Tensor,
    grad_logprobs_C: torch.Tensor | None,
    grad_entropy_C: torch.Tensor | None,
    inv_temperature: float,
    ignore_index: int,
    softcap: float,
) -> torch.Tensor:
    logits_CV = _columns_contiguous(logits_CV)
    num_rows, num_vocab = logits_CV.shape
    grad_CV = torch.empty((num_rows, num_vocab), dtype=logits_CV.dtype, device=logits_CV.device)
    if grad_logprobs_C is None and grad_entropy_C is None:
        return grad_CV.zero_()
    if grad_CV.numel() == 0:
        return grad_CV
    lse_C = lse_C.float().contiguous()
    # Upstream gradients may be expanded views (stride 0, e.g. from ``logprobs.sum()``): materialise the [C] vector.
    grad_logprobs_C = None if grad_logprobs_C is None else grad_logprobs_C.float().contiguous()
    grad_entropy_C = None if grad_entropy_C is None else grad_entropy_C.float().contiguous()
    config = launch_config(num_vocab)
    grid = (num_rows, triton.cdiv(num_vocab, config.block_v))
    _logprobs_bwd_kernel[grid](
        logits_CV, labels_C.contiguous(), lse_C, entropy_C.float().contiguous(),
        lse_C if grad_logprobs_C is None else grad_logprobs_C,
        lse_C if grad_entropy_C is None else grad_entropy_C,
        grad_CV, logits_CV.stride(0), num_vocab, float(inv_temperature), float(softcap), int(ignore_index),
        HAS_GRAD_LOGPROBS=grad_logprobs_C is not None, HAS_GRAD_ENTROPY=grad_entropy_C is not None,
        SOFTCAP=softcap > 0, BLOCK_V=config.block_v, num_warps=config.num_warps,
    )
    return grad_CV


def _launch_stats(
    logits_CV: torch.Tensor, labels_C: torch.Tensor, lse_C: torch.Tensor, inv_temperature: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits_CV = _columns_contiguous(logits_CV)
    num_rows, num_vocab = logits_CV.shape
    is_top1_C = torch.zeros(num_rows, dtype=torch.int8, device=logits_CV.device)
    log_sum_sq_C = torch.empty(num_rows, dtype=torch.float32, device=logits_CV.device)
    if num_rows == 0:
        return is_top1_C.bool(), log_sum_sq_C
    config = launch_config(num_vocab)
    _logprobs_stats_kernel[(num_rows,)](
        logits_CV, labels_C.contiguous(), lse_C.float().contiguous(), is_top1_C, log_sum_sq_C,
        logits_CV.stride(0), num_vocab, float(inv_temperature), float(softcap), SOFTCAP=softcap > 0,
        BLOCK_V=config.block_v, num_warps=config.num_warps,
    )
    return is_top1_C.bool(), log_sum_sq_C


def rows_fwd(
    logits_CV: torch.Tensor,
    labels_C: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    with_entropy: bool,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(logprobs_C, entropy_C, lse_C)`` of ``logits_CV`` [C, V] (fp32/bf16/fp16) and int64 ``labels_C``;
    ignored rows give logprob 0 and entropy 0 (entropy is all zeros unless ``with_entropy``); ``softcap`` > 0 caps
    the logits first, 0 does not."""
    return _launch_fwd(logits_CV, labels_C, inv_temperature, ignore_index, with_entropy, softcap)


def rows_bwd(
    logits_CV: torch.Tensor,
    labels_C: torch.Tensor,
    lse_C: torch.Tensor,
    entropy_C: torch.Tensor,
    grad_logprobs_C: torch.Tensor | None,
    grad_entropy_C: torch.Tensor | None,
    inv_temperature: float,
    ignore_index: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Gradient [C, V] w.r.t. ``logits_CV``, a new tensor of its dtype, given the fp32 ``lse_C``/``entropy_C`` of
    :func:`rows_fwd` and the upstream fp32 gradients (None means zero); ignored rows get zero gradient; through the
    cap with ``softcap`` > 0."""
    return _launch_bwd(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, grad_entropy_C, inv_temperature,
                       ignore_index, softcap)


def rows_stats(
    logits_CV: torch.Tensor, labels_C: torch.Tensor, lse_C: torch.Tensor, inv_temperature: float,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``is_top1_C`` (first argmax == label) and fp32 ``log_sum_sq_probs_C`` of a tile, one pass over each row;
    ``lse_C`` is :func:`rows_fwd`'s. Same results as ``compiled.rows_stats`` (of the capped logits with
    ``softcap`` > 0)."""
    return _launch_stats(logits_CV, labels_C, lse_C, inv_temperature, softcap)


# ---------------------------------------------------------------------------------------------------------------
# Entry points of the custom ops: the signatures of compiled.py's. The row functions are looked up when called, so a
# test can replace them with a failing launch.


(
    token_logprobs_fwd,
    token_logprobs_bwd,
    linear_token_logprobs_fwd,
    linear_token_logprobs_bwd,
    linear_token_logprobs_stats_fwd,
) = fused.entry_points(lambda: fused.RowFunctions(rows_fwd, rows_bwd, rows_stats))
