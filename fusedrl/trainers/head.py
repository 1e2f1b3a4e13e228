"""What a trainer's fused LM head works on: the per-token outputs (:class:`TokenOutputs`), what one model forward hands
the head (:class:`HeadInputs`), and TRL's detached side statistics of its head (mean logits, top-1, WPO's sum of
squared probabilities).

Legend: N sequences, T positions (``T - 1`` next-token positions), H hidden, V vocabulary, M labelled tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedrl.ops.logprobs import linear_token_logprobs

IGNORE_INDEX = -100
# Rows per no-grad statistics chunk: a [C, V] fp32 tile of about 32 MiB, the budget the fused op uses.
_STATS_TILE_BYTES = 32 * 2**20


class TokenOutputs(NamedTuple):
    """Per next-token position ``[N, T - 1]`` (``mean_logits``: ``[N, T]`` if asked for every position), zero where
    the label is ignored. ``logps`` is differentiable; the rest is detached. Fields not requested are None."""

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class HeadInputs(NamedTuple):
    """What a fused head needs from one model forward (:meth:`FusedTrainer.head_inputs`): ``hidden_NTH``
    ``[N, T - 1, H]`` (differentiable, in the head's dtype), the head's ``weight_VH`` / ``bias_V``, ``labels_NT``
    ``[N, T - 1]`` (-100 where not scored), the MoE ``aux_loss`` if asked for, and detached statistics
    (``mean_logits``, ``is_top1``, ``log_sum_sq_probs``) keyed as in :class:`TokenOutputs`."""

    hidden_NTH: torch.Tensor
    weight_VH: torch.Tensor
    bias_V: torch.Tensor | None
    labels_NT: torch.Tensor
    aux_loss: torch.Tensor | None
    stats: dict[str, torch.Tensor]


def head_logprobs(hidden_NTH, weight_VH, bias_V, labels_NT, with_entropy: bool):
    """The smallest loss region: the fused head alone (trainers with a loss tail compile head and tail together)."""
    return linear_token_logprobs(hidden_NTH, weight_VH, labels_NT, bias=bias_V, with_entropy=with_entropy)


@torch.no_grad()
def vocab_mean_logits(hidden_MH, weight_VH, bias_V) -> torch.Tensor:
    """``mean_v(h . w_v + b_v) = h . mean_v(w_v) + mean(b)`` per row of ``hidden_MH``, fp32 ``[M]``."""
    mean_bias = bias_V.mean(dtype=torch.float32) if bias_V is not None else 0.0
    return hidden_MH.float() @ weight_VH.mean(0, dtype=torch.float32) + mean_bias


@torch.no_grad()
def head_statistics(hidden_NTH, weight_VH, bias_V, labels_NT, statistics_mask_NT) -> dict[str, torch.Tensor]:
    """TRL's side outputs of its fused head, ``[N, T - 1]`` each, zero where not computed.

    ``mean_logits`` (every labelled position) is exact and almost free: ``mean_v(h . w_v + b_v) = h . mean_v(w_v) +
    mean(b)``. ``is_top1`` and ``log_sum_sq_probs`` (positions of ``statistics_mask_NT``) need the whole logits row:
    TRL gets them from its log-prob pass, here they cost one extra no-grad head matmul over those tokens, one
    ``[C, V]`` tile of about 32 MiB at a time.
    """
    labelled_NT = labels_NT != IGNORE_INDEX
    scored_NT = statistics_mask_NT & labelled_NT
    mean_logits_M = vocab_mean_logits(hidden_NTH[labelled_NT], weight_VH, bias_V)

    hidden_MH, labels_M = hidden_NTH[scored_NT], labels_NT[scored_NT]
    chunk = max(16, _STATS_TILE_BYTES // (4 * weight_VH.shape[0]))
    is_top1, log_sum_sq = [hidden_MH.new_zeros(0, dtype=torch.bool)], [hidden_MH.new_zeros(0, dtype=torch.float32)]
    for start in range(0, hidden_MH.shape[0], chunk):
        logits_CV = torch.nn.functional.linear(hidden_MH[start:start + chunk], weight_VH, bias_V).float()
        is_top1.append(logits_CV.argmax(-1) == labels_M[start:start + chunk])
        log_sum_sq.append(torch.logsumexp(2.0 * logits_CV, -1) - 2.0 * torch.logsumexp(logits_CV, -1))
    is_top1_M, log_sum_sq_M = torch.cat(is_top1), torch.cat(log_sum_sq)
    zeros_NT = labels_NT.new_zeros(labels_NT.shape, dtype=torch.float32)
    return {
        "mean_logits": zeros_NT.masked_scatter(labelled_NT, mean_logits_M),
        "is_top1": torch.zeros_like(scored_NT).masked_scatter(scored_NT, is_top1_M),
        "log_sum_sq_probs": zeros_NT.masked_scatter(scored_NT, log_sum_sq_M),
    }

