"""From per-token log-probs to the sequence-level inputs of the preference losses.

Legend: B pairs, N sequences (``N = 2B`` for paired batches laid out ``[chosen; rejected]`` as TRL's collators do),
T next-token positions (the label-shifted completion mask), V vocabulary.

Every helper takes per-token log-probs that are already zero where the mask is zero (as the fused LM heads and
``token_logprobs_reference`` return them) and a 0/1 mask of the same shape. All results are fp32.
"""

from __future__ import annotations

import torch


def sequence_logps(token_logps_NT: torch.Tensor, mask_NT: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """``sum_t m_t logp_t`` per sequence ``[N]``, or that sum over ``sum_t m_t`` when ``average``.

    TRL sums for DPO/KTO and CPO's ``sigmoid``/``hinge``, and averages for ORPO and CPO's ``ipo``/``simpo``. An
    all-masked row averages to NaN (0/0), as in TRL's ``get_batch_logps``.
    """
    mask = mask_NT.float()
    total = (token_logps_NT.float() * mask).sum(-1)
    return total / mask.sum(-1) if average else total


def token_mean_nll(token_logps_NT: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """Scalar ``-sum(m * logp) / sum(m)``: the NLL averaged over every unmasked token of the batch.

    This is the ``chosen_nll`` of DPO's ``sft`` loss (completion tokens of the chosen rows), CPO's ``cpo_alpha`` term
    (the same tokens) and ORPO's NLL term (prompt and completion tokens of the chosen rows: TRL's ORPO masks with the
    attention mask). Note the average is over tokens of the whole batch, not a mean of per-sequence means.
    """
    mask = mask_NT.float()
    return -(token_logps_NT.float() * mask).sum() / mask.sum()


def ld_sequence_logps(token_logps_NT: torch.Tensor, mask_NT: torch.Tensor, *, ld_alpha: float) -> torch.Tensor:
    """LD-DPO sequence log-probs ``[N]`` for a ``[chosen; rejected]`` batch (N = 2B).

    With ``l = min(len_chosen, len_rejected)`` of each pair, the first ``l`` completion tokens count fully and the
    rest ("verbose" tail) is scaled by ``ld_alpha``::

        logp = sum_{k <= l} logp_k + ld_alpha * sum_{k > l} logp_k      (k counts completion tokens, from 1)

    ``ld_alpha=1`` is the plain sum; ``ld_alpha=0`` truncates both to the shorter completion. The same masks apply
    to the policy and the reference log-probs.
    """
    mask = mask_NT.float()
    position_NT = mask.cumsum(-1)
    length_N = mask.sum(-1)
    length_chosen_B, length_rejected_B = length_N.chunk(2)
    shared_B = torch.minimum(length_chosen_B, length_rejected_B)
    shared_N1 = torch.cat([shared_B, shared_B]).unsqueeze(-1)
    # Masking again (not only through the zeros of token_logps) keeps the split right for any padding value.
    shared_NT = (position_NT <= shared_N1).float() * mask
    tail_NT = (position_NT > shared_N1).float() * mask
    logps_NT = token_logps_NT.float()
    return (logps_NT * shared_NT).sum(-1) + ld_alpha * (logps_NT * tail_NT).sum(-1)


def sequence_weights(mask_NT: torch.Tensor, *, average: bool = False, ld_alpha: float | None = None) -> torch.Tensor:
    """fp32 ``[N, T]`` coefficients ``a`` with ``sequence log-prob = sum_t a_t logp_t``: the mask (sums), the mask
    over its count (``average``; an all-masked row gives NaN, as :func:`sequence_logps`), or LD-DPO's 1 on the first
    ``min(len_chosen, len_rejected)`` completion tokens and ``ld_alpha`` after them (:func:`ld_sequence_logps`;
    ``[chosen; rejected]`` rows). The fused head multiplies each token's gradient by its coefficient."""
    mask = mask_NT.float()
    if ld_alpha is not None:
        position_NT = mask.cumsum(-1)
        length_chosen_B, length_rejected_B = mask.sum(-1).chunk(2)
        shared_B = torch.minimum(length_chosen_B, length_rejected_B)
        shared_N1 = torch.cat([shared_B, shared_B]).unsqueeze(-1)
        return torch.where(position_NT <= shared_N1, 1.0, ld_alpha) * mask
    return mask / mask.sum(-1, keepdim=True) if average else mask


def log_sum_sq_probs(logits_NTV: torch.Tensor) -> torch.Tensor:
    """``log(sum_v p_v^2)`` per position ``[N, T]`` from logits ``[N, T, V]`` (``p = softmax``), detached.

    ``logsumexp(2 * log_softmax)`` keeps it finite for peaked distributions where ``sum p^2`` would round.
    """
    with torch.no_grad():
        return torch.logsumexp(2.0 * torch.log_softmax(logits_NTV.float(), dim=-1), dim=-1)


def wpo_pair_weights(
    token_logps_NT: torch.Tensor, log_sum_sq_probs_NT: torch.Tensor, mask_NT: torch.Tensor
) -> torch.Tensor:
    """WPO pair weights ``[B]`` for a ``[chosen; rejected]`` batch (N = 2B), detached.

    Each sequence gets ``w = exp(mean_t(logp_t - log sum_v p_v^2))`` over its completion tokens (lengths clamped at
    1), i.e. its length-normalised probability against the policy's own sampling; the pair weight is
    ``w_chosen * w_rejected``. Pass the result as ``pair_weights`` to ``dpo_losses``.
    """
    with torch.no_grad():
        mask = mask_NT.float()
        aligned_NT = (token_logps_NT.float() - log_sum_sq_probs_NT.float()) * mask
        weight_N = torch.exp(aligned_NT.sum(-1) / mask.sum(-1).clamp(min=1.0))
        weight_chosen_B, weight_rejected_B = weight_N.chunk(2)
        return weight_chosen_B * weight_rejected_B
