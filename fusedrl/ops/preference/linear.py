"""The ``preference`` op from hidden states and the LM head: sequence log-probs on the ``linear_logprobs`` op, then
:func:`preference_loss` on the ``preference`` op, never holding ``[2B, T, V]`` logits.

Legend: B pairs, N = 2B rows laid out ``[chosen; rejected]``, T next-token positions, H hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.ops.preference.checks import check_linear_request
from fusedrl.ops.preference.losses import preference_loss
from fusedrl.ops.preference.sequence import sequence_logps, token_mean_nll


class LinearPreferenceLoss(NamedTuple):
    """:class:`PreferenceLoss` plus the policy's ``chosen_logps`` / ``rejected_logps`` ``[B]`` (sums, or means with
    ``average_log_prob``) and ``chosen_nll``, the token-mean NLL of the chosen completions (scalar). All fp32 and
    differentiable (detach them for logging)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_nll: torch.Tensor


def linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    family: str = "dpo",
    **loss_options,
) -> LinearPreferenceLoss:
    """Preference loss straight from the last hidden states and the LM head, never holding ``[2B, T, V]`` logits.

    hidden: ``[2B, T, H]``, the B chosen rows then the B rejected rows; weight: ``[V, H]``; bias: ``[V]`` or None;
    labels: ``[2B, T]`` int64, already shifted, ``ignore_index`` on prompt and padding positions.
    Reference log-probs: ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]`` if precomputed, else from
    ``ref_hidden`` ``[2B, T, H]`` and ``ref_weight`` / ``ref_bias`` (default: ``weight`` / ``bias``, e.g. LoRA with a
    shared head) under ``no_grad``; none for CPO or ``reference_free``.
    Sequence log-probs are token sums over the labelled positions, or means with ``average_log_prob`` (TRL: CPO
    ``ipo``/``simpo``); a fully ignored row then gives NaN (0/0), as in TRL. ``chosen_lengths``,
    ``rejected_lengths`` and ``chosen_nll`` come from the labels; every other keyword is passed to
    :func:`preference_loss`. The token log-probs run on the ``linear_logprobs`` backend, the loss on ``preference``.
    Gradients flow to hidden, weight and bias.
    """
    num_pairs = check_linear_request(hidden, labels, ref_hidden, ref_chosen_logps, ref_rejected_logps,
                                     loss_options)
    mask_NT = labels != ignore_index
    token_logps_NT = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
    logps_N = sequence_logps(token_logps_NT, mask_NT, average=average_log_prob)
    if ref_hidden is not None:
        head, head_bias = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        with torch.no_grad():
            ref_token_logps_NT = linear_token_logprobs(
                ref_hidden, head.detach(), labels, bias=None if head_bias is None else head_bias.detach(),
                ignore_index=ignore_index,
            )
            ref_logps_N = sequence_logps(ref_token_logps_NT, mask_NT, average=average_log_prob)
        ref_chosen_logps, ref_rejected_logps = ref_logps_N[:num_pairs], ref_logps_N[num_pairs:]
    lengths_N = mask_NT.sum(-1)
    chosen_nll = token_mean_nll(token_logps_NT[:num_pairs], mask_NT[:num_pairs])
    out = preference_loss(
        logps_N[:num_pairs], logps_N[num_pairs:], ref_chosen_logps, ref_rejected_logps, loss_type=loss_type,
        beta=beta, family=family, chosen_lengths=lengths_N[:num_pairs], rejected_lengths=lengths_N[num_pairs:],
        chosen_nll=chosen_nll, **loss_options,
    )
    return LinearPreferenceLoss(*out, logps_N[:num_pairs], logps_N[num_pairs:], chosen_nll)
