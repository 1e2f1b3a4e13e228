"""What a trainer's fused LM head works on: the per-token outputs (:class:`TokenOutputs`), what one model forward hands
the head (:class:`HeadInputs`), and TRL's detached side statistics of its head (mean logits, top-1, WPO's sum of
squared probabilities) for the paths that do not get them from a fused head+loss op. A soft-capped head (Gemma 2's
``final_logit_softcapping``) passes its cap to every op and statistic here: they are those of the capped logits.

Legend: N sequences, T positions (``T - 1`` next-token positions), H hidden, V vocabulary, M labelled tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedrl.ops.logprobs import linear_token_logprobs, soft_cap

IGNORE_INDEX = -100
# Logits elements per chunk of the capped vocabulary mean (no shortcut through mean_v(w) there): an fp32 [C, V] tile
# of 32 MiB, 32 rows at Gemma 2's V = 256000.
_MEAN_TILE_ELEMENTS = 8 * 2**20


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
    ``[N, T - 1]`` (-100 where not scored), the MoE ``aux_loss`` if asked for, detached statistics
    (``mean_logits``, ``is_top1``, ``log_sum_sq_probs``) keyed as in :class:`TokenOutputs`, and the head's soft cap
    (``softcap``, None for none), which every op call on this head passes on."""

    hidden_NTH: torch.Tensor
    weight_VH: torch.Tensor
    bias_V: torch.Tensor | None
    labels_NT: torch.Tensor
    aux_loss: torch.Tensor | None
    stats: dict[str, torch.Tensor]
    softcap: float | None = None


def head_logprobs(hidden_NTH, weight_VH, bias_V, labels_NT, with_entropy: bool, with_stats: bool = False,
                  softcap: float | None = None):
    """The smallest loss region: the fused head alone (trainers with a loss tail compile head and tail together);
    ``with_stats`` adds the top-1 flags and WPO's statistic of the same tiles; ``softcap``: the head's soft cap."""
    return linear_token_logprobs(hidden_NTH, weight_VH, labels_NT, bias=bias_V, with_entropy=with_entropy,
                                 with_stats=with_stats, softcap=softcap)


@torch.no_grad()
def vocab_mean_logits(hidden_MH, weight_VH, bias_V, softcap: float | None = None) -> torch.Tensor:
    """The vocabulary mean of the logits per row of ``hidden_MH`` (any leading dims), fp32: without a cap
    ``mean_v(h . w_v + b_v) = h . mean_v(w_v) + mean(b)``, one [H] vector and no logits. With ``softcap`` the mean
    of the capped logits (what TRL averages: the model's own logits), which is not linear in h: the logits are formed
    ``_MEAN_TILE_ELEMENTS / V`` rows at a time in the head's dtype, as the model's forward forms them, and capped
    and averaged in fp32."""
    if not softcap:
        mean_bias = bias_V.mean(dtype=torch.float32) if bias_V is not None else 0.0
        return hidden_MH.float() @ weight_VH.mean(0, dtype=torch.float32) + mean_bias
    hidden_RH = hidden_MH.reshape(-1, hidden_MH.shape[-1])
    mean_R = hidden_RH.new_empty(hidden_RH.shape[0], dtype=torch.float32)
    rows = max(1, _MEAN_TILE_ELEMENTS // weight_VH.shape[0])
    for start in range(0, hidden_RH.shape[0], rows):
        logits_CV = torch.nn.functional.linear(hidden_RH[start:start + rows].to(weight_VH.dtype), weight_VH, bias_V)
        mean_R[start:start + rows] = soft_cap(logits_CV, softcap).mean(-1)
    return mean_R.view(hidden_MH.shape[:-1])


@torch.no_grad()
def labelled_mean_logits(hidden_NTH, weight_VH, bias_V, labels_NT, softcap: float | None = None) -> torch.Tensor:
    """:func:`vocab_mean_logits` at the labelled positions, fp32 ``[N, T - 1]``, 0 elsewhere: exact and almost free
    (with a soft cap, one no-grad head pass over those positions), so every trainer takes TRL's ``logits/*`` metrics
    from it rather than from logits tiles."""
    labelled_NT = labels_NT != IGNORE_INDEX
    mean_logits_M = vocab_mean_logits(hidden_NTH[labelled_NT], weight_VH, bias_V, softcap)
    return labels_NT.new_zeros(labels_NT.shape, dtype=torch.float32).masked_scatter(labelled_NT, mean_logits_M)


@torch.no_grad()
def head_statistics(hidden_NTH, weight_VH, bias_V, labels_NT, statistics_mask_NT,
                    softcap: float | None = None) -> dict[str, torch.Tensor]:
    """TRL's side outputs of its fused head, ``[N, T - 1]`` each, zero where not computed: ``mean_logits`` (every
    labelled position, :func:`labelled_mean_logits`) and, at the positions of ``statistics_mask_NT``, ``is_top1`` and
    ``log_sum_sq_probs``. Those two need whole logits rows: here they cost a no-grad head pass of their own over
    those tokens; a trainer's log-prob or loss op returns them from its own tiles instead
    (``FusedTrainer.token_logprobs(statistics_mask=...)``, the fused head+loss ops). ``softcap``: the head's soft
    cap (the statistics are the capped logits')."""
    scored_NT = statistics_mask_NT & (labels_NT != IGNORE_INDEX)
    out = linear_token_logprobs(hidden_NTH, weight_VH, labels_NT.masked_fill(~scored_NT, IGNORE_INDEX), bias=bias_V,
                                ignore_index=IGNORE_INDEX, with_stats=True, softcap=softcap)
    return {"mean_logits": labelled_mean_logits(hidden_NTH, weight_VH, bias_V, labels_NT, softcap),
            "is_top1": out.is_top1, "log_sum_sq_probs": out.log_sum_sq_probs}
