"""The compiled backend: row statistics of a logits chunk in plain torch, the formulation ``torch.compile`` fuses,
and the entry points of the ``fusedrl::*token_logprobs*`` custom ops, which run them through ``chunked.py``.

Legend: N tokens, H hidden, V vocabulary, C rows of one chunk. ``triton.py`` has the same row functions
(``rows_fwd``/``rows_bwd``) and entry points with the same arguments and results, as Triton kernels.

Math, with s = logits / T, p = softmax(s), lse = logsumexp(s), y the label:
    logp = s_y - lse                       H = lse - sum_j p_j s_j
    d logp / d logits_j = (1[j = y] - p_j) / T
    d H    / d logits_j = -p_j (log p_j + H) / T
With a soft cap c (Gemma 2's ``final_logit_softcapping``) the head's output z is capped first, in fp32:
logits = c tanh(z / c), and every gradient above is multiplied by d logits / d z = 1 - tanh(z / c)^2.
"""

from __future__ import annotations

import torch

from fusedrl.ops.compiler import compile_kernel
from fusedrl.ops.logprobs import fused


# One plain function per flag combination: torch.compile keeps one cache (and one recompile budget of 8) per
# function, and dtype x flags x shapes in a single function overran it in the test suite. The capped variants
# (softcap > 0) are functions of their own for the same reason; the uncapped ones ignore their softcap argument.
def fwd_variant(with_entropy: bool, capped: bool = False):
    if capped:
        return _fwd_logprobs_entropy_capped if with_entropy else _fwd_logprobs_capped
    return _fwd_logprobs_entropy if with_entropy else _fwd_logprobs


def bwd_variant(has_logprobs_grad: bool, has_entropy_grad: bool, capped: bool = False):
    if has_logprobs_grad and has_entropy_grad:
        return _bwd_both_capped if capped else _bwd_both
    if has_logprobs_grad:
        return _bwd_logprobs_capped if capped else _bwd_logprobs
    return _bwd_entropy_capped if capped else _bwd_entropy


def _fwd_logprobs(logits_CV, labels_C, inv_temperature, ignore_index, _softcap):
    return _fwd(logits_CV, labels_C, inv_temperature, ignore_index, with_entropy=False)


def _fwd_logprobs_entropy(logits_CV, labels_C, inv_temperature, ignore_index, _softcap):
    return _fwd(logits_CV, labels_C, inv_temperature, ignore_index, with_entropy=True)


def _fwd_logprobs_capped(logits_CV, labels_C, inv_temperature, ignore_index, softcap):
    return _fwd(logits_CV, labels_C, inv_temperature, ignore_index, with_entropy=False, softcap=softcap)


def _fwd_logprobs_entropy_capped(logits_CV, labels_C, inv_temperature, ignore_index, softcap):
    return _fwd(logits_CV, labels_C, inv_temperature, ignore_index, with_entropy=True, softcap=softcap)


def _bwd_both(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, grad_entropy_C, inv_temperature, ignore_index,
              _softcap):
    return _bwd(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, grad_entropy_C, inv_temperature, ignore_index)


def _bwd_logprobs(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, _grad_entropy_C, inv_temperature,
                  ignore_index, _softcap):
    return _bwd(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, None, inv_temperature, ignore_index)


def _bwd_entropy(logits_CV, labels_C, lse_C, entropy_C, _grad_logprobs_C, grad_entropy_C, inv_temperature,
                 ignore_index, _softcap):
    return _bwd(logits_CV, labels_C, lse_C, entropy_C, None, grad_entropy_C, inv_temperature, ignore_index)


def _bwd_both_capped(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, grad_entropy_C, inv_temperature,
                     ignore_index, softcap):
    return _bwd(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, grad_entropy_C, inv_temperature, ignore_index,
                softcap)


def _bwd_logprobs_capped(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, _grad_entropy_C, inv_temperature,
                         ignore_index, softcap):
    return _bwd(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, None, inv_temperature, ignore_index, softcap)


def _bwd_entropy_capped(logits_CV, labels_C, lse_C, entropy_C, _grad_logprobs_C, grad_entropy_C, inv_temperature,
                        ignore_index, softcap):
    return _bwd(logits_CV, labels_C, lse_C, entropy_C, None, grad_entropy_C, inv_temperature, ignore_index, softcap)


def _capped(logits_CV, softcap):
    """fp32 ``(logits, tanh(z / c))`` of a tile: the capped logits and the tanh the backward's factor needs, or the
    fp32 logits and None without a cap (``softcap`` None)."""
    logits_CV = logits_CV.float()
    if softcap is None:
        return logits_CV, None
    tanh_CV = torch.tanh(logits_CV / softcap)
    return softcap * tanh_CV, tanh_CV


def _fwd(logits_CV, labels_C, inv_temperature, ignore_index, with_entropy, softcap=None):
    scaled_CV = _capped(logits_CV, softcap)[0] * inv_temperature
    max_C = scaled_CV.amax(-1)
    # An all -inf row would give max = -inf and NaN below; shifting by 0 instead keeps its lse at -inf.
    max_C = torch.where(torch.isfinite(max_C), max_C, torch.zeros_like(max_C))
    shifted_CV = scaled_CV - max_C.unsqueeze(-1)
    exp_CV = shifted_CV.exp()
    sum_exp_C = exp_CV.sum(-1)
    lse_C = max_C + sum_exp_C.log()
    valid_C = labels_C != ignore_index
    safe_labels_C = torch.where(valid_C, labels_C, torch.zeros_like(labels_C))
    target_C = scaled_CV.gather(-1, safe_labels_C.unsqueeze(-1)).squeeze(-1)
    logprobs_C = torch.where(valid_C, target_C - lse_C, torch.zeros_like(lse_C))
    if with_entropy:
        # H = log(sum e) - sum(e * shifted) / sum(e): the shifted form avoids cancelling two ~1e4 terms in fp32.
        weighted_C = torch.where(exp_CV > 0, exp_CV * shifted_CV, torch.zeros_like(exp_CV)).sum(-1)
        entropy_C = sum_exp_C.log() - weighted_C / sum_exp_C
        entropy_C = torch.where(valid_C, entropy_C, torch.zeros_like(entropy_C))
    else:
        entropy_C = torch.zeros_like(lse_C)
    return logprobs_C, entropy_C, lse_C


def _bwd(logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, grad_entropy_C, inv_temperature, ignore_index,
         softcap=None):
    capped_CV, tanh_CV = _capped(logits_CV, softcap)
    scaled_CV = capped_CV * inv_temperature
    logp_CV = scaled_CV - lse_C.unsqueeze(-1)
    probs_CV = logp_CV.exp()
    valid_C = labels_C != ignore_index
    grad_CV = torch.zeros_like(probs_CV)
    if grad_logprobs_C is not None:
        g_C = torch.where(valid_C, grad_logprobs_C.float(), torch.zeros_like(lse_C))
        vocab_V = torch.arange(logits_CV.shape[-1], device=logits_CV.device)
        onehot_CV = (vocab_V == labels_C.unsqueeze(-1)).float()
        grad_CV = grad_CV + g_C.unsqueeze(-1) * (onehot_CV - probs_CV)
    if grad_entropy_C is not None:
        g_C = torch.where(valid_C, grad_entropy_C.float(), torch.zeros_like(lse_C))
        term_CV = torch.where(probs_CV > 0, probs_CV * (logp_CV + entropy_C.unsqueeze(-1)), torch.zeros_like(probs_CV))
        grad_CV = grad_CV - g_C.unsqueeze(-1) * term_CV
    if tanh_CV is not None:  # through the cap: d logits / d z = 1 - tanh^2
        grad_CV = grad_CV * (1.0 - tanh_CV * tanh_CV)
    return (grad_CV * inv_temperature).to(logits_CV.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Row functions: one chunk of C rows


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    # Compiled kernels guard on requires_grad and strides: saved activations arrive with requires_grad and
    # upstream gradients of a .sum() arrive expanded (stride 0). Detached, contiguous inputs keep one compiled
    # graph per dtype instead of a recompile per variation (the limit is 8 per function).
    return None if t is None else t.detach().contiguous()


def rows_fwd(
    logits_CV: torch.Tensor, labels_C: torch.Tensor, inv_temperature: float, ignore_index: int, with_entropy: bool,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(logprobs_C, entropy_C, lse_C)``; ignored rows give logprob 0 and entropy 0 (entropy is all zeros
    unless ``with_entropy``); ``lse_C`` is what the backward needs. ``softcap`` > 0 caps the tile first (module
    docstring), 0 leaves it as is."""
    variant = compile_kernel(fwd_variant(with_entropy, softcap > 0))
    return variant(_plain(logits_CV), _plain(labels_C), inv_temperature, ignore_index, float(softcap))


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
    """Gradient w.r.t. ``logits_CV`` (same dtype) given the upstream fp32 gradients (None means zero); ``softcap``
    as :func:`rows_fwd`'s (the gradient then flows through the cap)."""
    variant = compile_kernel(bwd_variant(grad_logprobs_C is not None, grad_entropy_C is not None, softcap > 0))
    tensors = (logits_CV, labels_C, lse_C, entropy_C, grad_logprobs_C, grad_entropy_C)
    return variant(*map(_plain, tensors), inv_temperature, ignore_index, float(softcap))


def _stats(logits_CV, labels_C, lse_C, inv_temperature, _softcap):
    return _stats_of(logits_CV.float() * inv_temperature, labels_C, lse_C)


def _stats_capped(logits_CV, labels_C, lse_C, inv_temperature, softcap):
    return _stats_of(_capped(logits_CV, softcap)[0] * inv_temperature, labels_C, lse_C)


def _stats_of(scaled_CV, labels_C, lse_C):
    # argmax returns the first maximal index, as TRL's top-1 accuracy (and the softmax of a tie) would pick.
    is_top1_C = scaled_CV.argmax(-1) == labels_C
    # log sum_v p_v^2 = logsumexp(2 s) - 2 lse; shifting by the row max keeps exp(2 s) finite at |s| = 1e4.
    max_C = scaled_CV.amax(-1)
    max_C = torch.where(torch.isfinite(max_C), max_C, torch.zeros_like(max_C))
    sum_sq_C = (2.0 * (scaled_CV - max_C.unsqueeze(-1))).exp().sum(-1)
    return is_top1_C, 2.0 * max_C + sum_sq_C.log() - 2.0 * lse_C


def rows_stats(
    logits_CV: torch.Tensor, labels_C: torch.Tensor, lse_C: torch.Tensor, inv_temperature: float,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The metrics of a tile that need the whole row: bool ``is_top1_C`` (argmax == label) and fp32
    ``log_sum_sq_probs_C = log sum_v p_v^2`` (WPO's statistic), given the tile's ``lse_C`` from :func:`rows_fwd`;
    of the capped logits with ``softcap`` > 0."""
    variant = compile_kernel(_stats_capped if softcap > 0 else _stats)
    return variant(_plain(logits_CV), _plain(labels_C), _plain(lse_C), inv_temperature, float(softcap))


# ---------------------------------------------------------------------------------------------------------------
# Entry points of the custom ops (their annotated signatures are the ops' schemas, see dispatch.define_op)


(
    token_logprobs_fwd,
    token_logprobs_bwd,
    linear_token_logprobs_fwd,
    linear_token_logprobs_bwd,
    linear_token_logprobs_stats_fwd,
) = fused.entry_points(lambda: fused.RowFunctions(rows_fwd, rows_bwd, rows_stats))
