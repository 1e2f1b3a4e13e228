"""The ``preference`` op from hidden states and the LM head, never holding ``[2B, T, V]`` logits: sequence log-probs on
the ``linear_logprobs`` op, then :func:`preference_loss` on the ``preference`` op; or, with ``fused=True`` and a
request that is separable per pair, both in one custom op at 3 head passes (``fused_head.py``).

Legend: B pairs, N = 2B rows laid out ``[chosen; rejected]``, T next-token positions, H hidden, V vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fusedrl.ops import dispatch
from fusedrl.ops.logprobs import checked_head, linear_token_logprobs
from fusedrl.ops.preference import fused_head
from fusedrl.ops.preference.checks import check_linear_request, check_preference_request
from fusedrl.ops.preference.losses import PairRequest, orpo_loss, pair_request, preference_loss
from fusedrl.ops.preference.sequence import (
    ld_sequence_logps,
    sequence_logps,
    token_mean_nll,
    wpo_pair_weights,
)

# preference_loss's keyword defaults but those this function passes itself.
_LOSS_DEFAULTS = {name: p.default for name, p in inspect.signature(preference_loss).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("loss_type", "beta", "family",
                                                                                 "chosen_nll")}


class LinearPreferenceLoss(NamedTuple):
    """:class:`PreferenceLoss` plus the policy's ``chosen_logps`` / ``rejected_logps`` ``[B]`` (sums, or means with
    ``average_log_prob``) and ``chosen_nll``, the token-mean NLL of the chosen completions (scalar). All fp32 and
    differentiable (detach them for logging), except on the fused path, where only ``loss`` is. ``token_logps``:
    the per-token fp32 log-probs ``[2B, T]``, 0 where not labelled. With ``with_metrics``: fp32 ``entropy`` and bool
    ``is_top1`` (the label is the argmax) ``[2B, T]``, detached, 0 where not labelled; else None."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_nll: torch.Tensor
    token_logps: torch.Tensor | None = None  # a default only so that 7-field tuples still build the type
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def _fused_requests(loss_types: list[str], family: str, options: dict, use_weighting: bool):
    """``(requests, nll_weight)`` of a request the fused op serves, or None with the reason it cannot."""
    weights = options["loss_weights"] or [1.0] * len(loss_types)
    requests, nll_weight = [], 0.0
    for loss_type, weight in zip(loss_types, weights, strict=True):
        if family == "dpo" and loss_type == "sft":
            if use_weighting or options["pair_weights"] is not None:
                return None, "'sft' with pair weights scales the NLL by the batch mean of the weights"
            nll_weight += float(weight)
            continue
        request = pair_request(loss_type, family, loss_weight=weight, **{
            key: options[key] for key in ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef",
                                          "discopop_tau", "simpo_gamma", "alpha")})
        if request is None:
            return None, f"loss_type {loss_type!r} couples the pairs of a batch or is a registered Python loss"
        requests.append(request)
    if family == "cpo":
        nll_weight = float(options["cpo_alpha"])
    return (requests, nll_weight), None


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
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    ignore_index: int = -100,
    family: str = "dpo",
    with_metrics: bool = False,
    fused: bool = False,
    softcap: float | None = None,
    **loss_options,
) -> LinearPreferenceLoss:
    """Preference loss straight from the last hidden states and the LM head, never holding ``[2B, T, V]`` logits.

    hidden: ``[2B, T, H]``, the B chosen rows then the B rejected rows; weight: ``[V, H]``; bias: ``[V]`` or None;
    labels: ``[2B, T]`` int64, already shifted, ``ignore_index`` on prompt and padding positions.
    Reference log-probs: ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]`` if precomputed, else from
    ``ref_hidden`` ``[2B, T, H]`` and ``ref_weight`` / ``ref_bias`` (default: ``weight`` / ``bias``, e.g. LoRA with a
    shared head) under ``no_grad``, one head pass; none for CPO or ``reference_free``.
    Sequence log-probs are token sums over the labelled positions, or means with ``average_log_prob`` (TRL: CPO
    ``ipo``/``simpo``; a fully ignored row then gives NaN, 0/0, as in TRL), or LD-DPO sums with ``ld_alpha``.
    ``use_weighting``: WPO pair weights from the policy's own tokens (``sequence.wpo_pair_weights``), multiplied
    with any ``pair_weights``. ``chosen_lengths`` / ``rejected_lengths`` default to the labelled counts;
    ``chosen_nll`` comes from the labels; every other keyword is :func:`preference_loss`'s.
    ``softcap``: the head's soft cap (``c * tanh(z / c)`` of its output z, Gemma 2's ``final_logit_softcapping``;
    None or 0: none), on the policy's head and on the reference's from ``ref_hidden`` (the same architecture).

    ``fused=True``: the loss's gradient is formed in the forward (3 head passes instead of 4, see
    ``fusedrl/ops/logprobs/fused.py`` for the memory it costs) and only ``loss`` is differentiable. It runs when the
    ``linear_logprobs`` and ``preference`` backends are ``compiled`` / ``triton`` and every loss type is separable
    per pair (DPO types but ``aot`` / ``aot_unpaired`` / registered ones, ``sft`` without pair weights; every CPO
    type); otherwise this computes the unfused path below, whose outputs are all differentiable. Unfused: the token
    log-probs run on the ``linear_logprobs`` backend (4 passes; the metrics and WPO's statistic from the forward's
    tiles), the loss on ``preference``.
    """
    options = {**_LOSS_DEFAULTS, **loss_options}
    num_pairs = check_linear_request(hidden, labels, ref_hidden, ref_chosen_logps, ref_rejected_logps,
                                     loss_options)
    mask_NT = labels != ignore_index
    lengths_N = mask_NT.sum(-1)
    if options["chosen_lengths"] is None:
        options["chosen_lengths"], options["rejected_lengths"] = lengths_N[:num_pairs], lengths_N[num_pairs:]

    def sequence(token_logps_NT):
        if ld_alpha is not None:
            return ld_sequence_logps(token_logps_NT, mask_NT, ld_alpha=ld_alpha)
        return sequence_logps(token_logps_NT, mask_NT, average=average_log_prob)

    if ref_hidden is not None:
        head, head_bias = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        with torch.no_grad():
            ref_logps_N = sequence(linear_token_logprobs(
                ref_hidden, head.detach(), labels, bias=None if head_bias is None else head_bias.detach(),
                ignore_index=ignore_index, softcap=softcap,
            ))
        ref_chosen_logps, ref_rejected_logps = ref_logps_N[:num_pairs], ref_logps_N[num_pairs:]
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if options["reference_free"]:
        ref_chosen_logps = ref_rejected_logps = None
    if fused:
        fused_request, _reason = _fused_requests(loss_types, family, {**options, "beta": beta}, use_weighting)
        head_backend = dispatch.traced_backend("linear_logprobs", hidden.device)
        loss_backend = dispatch.traced_backend("preference", hidden.device)
        if fused_request is not None and "reference" not in (head_backend, loss_backend):
            requests, nll_weight = fused_request
            # The checks (and error messages) of the unfused path, on [B] placeholders of the sequence log-probs.
            placeholder = hidden.new_zeros(num_pairs, dtype=torch.float32)
            check_preference_request(
                placeholder, placeholder, ref_chosen_logps, ref_rejected_logps, family=family, loss_types=loss_types,
                chosen_nll=placeholder.sum(), **{key: options[key] for key in (
                    "loss_weights", "label_smoothing", "f_divergence_type", "chosen_lengths", "rejected_lengths",
                    "pair_weights", "reference_free", "cpo_alpha")})
            hidden, weight, bias = checked_head(hidden, weight, bias, labels, temperature=1.0,
                                                ignore_index=ignore_index, softcap=softcap)
            out = fused_head.fused_pair_losses(
                hidden, weight, bias, labels, average=average_log_prob, ld_alpha=ld_alpha,
                ref_chosen=ref_chosen_logps, ref_rejected=ref_rejected_logps,
                chosen_lengths=options["chosen_lengths"], rejected_lengths=options["rejected_lengths"],
                pair_weights=options["pair_weights"], requests=requests, beta=beta, nll_weight=nll_weight,
                nll_in_losses=family == "dpo", wpo=use_weighting, temperature=1.0, ignore_index=ignore_index,
                with_metrics=with_metrics, head_backend=head_backend, loss_backend=loss_backend, softcap=softcap,
            )
            metrics = (out.entropy, out.is_top1) if with_metrics else (None, None)
            return LinearPreferenceLoss(out.loss, out.losses, out.chosen_rewards, out.rejected_rewards,
                                        out.logps_N[:num_pairs], out.logps_N[num_pairs:], out.chosen_nll,
                                        out.logprobs, *metrics)

    # The metrics and WPO's statistic come from the log-probs' own tiles (one head pass for the forward).
    with_stats = with_metrics or use_weighting
    result = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                   with_entropy=with_metrics, with_stats=with_stats, softcap=softcap)
    token_logps_NT = result.logprobs if with_stats else result
    logps_N = sequence(token_logps_NT)
    chosen_nll = token_mean_nll(token_logps_NT[:num_pairs], mask_NT[:num_pairs])
    if use_weighting:
        wpo = wpo_pair_weights(token_logps_NT, result.log_sum_sq_probs, mask_NT)
        options["pair_weights"] = wpo if options["pair_weights"] is None else options["pair_weights"] * wpo
    out = preference_loss(
        logps_N[:num_pairs], logps_N[num_pairs:], ref_chosen_logps, ref_rejected_logps, loss_type=loss_type,
        beta=beta, family=family, chosen_nll=chosen_nll, **options,
    )
    metrics = (result.entropy.detach(), result.is_top1) if with_metrics else (None, None)
    return LinearPreferenceLoss(*out, logps_N[:num_pairs], logps_N[num_pairs:], chosen_nll, token_logps_NT, *metrics)


class LinearORPOLoss(NamedTuple):
    """:class:`ORPOLoss` plus the policy's mean completion log-probs ``chosen_logps`` / ``rejected_logps`` ``[B]``
    and ``chosen_nll`` (scalar). Differentiable as :class:`LinearPreferenceLoss`'s fields are."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    log_odds_ratio: torch.Tensor
    log_odds_chosen: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_nll: torch.Tensor


def linear_orpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    completion_mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    ignore_index: int = -100,
    fused: bool = False,
    softcap: float | None = None,
) -> LinearORPOLoss:
    """TRL 1.16's ORPO loss (:func:`orpo_loss`) straight from the last hidden states and the LM head.

    hidden: ``[2B, T, H]`` (B chosen rows, then B rejected rows); labels: ``[2B, T]`` int64, already shifted, labelled
    where the NLL reads the chosen rows (TRL: prompt and completion) and at least on the completions;
    completion_mask: ``[2B, T]`` (shifted like labels), the tokens of the mean log-probs of the odds ratio. The NLL is
    the token mean over the chosen rows' labelled tokens. ``fused=True`` as :func:`linear_preference_loss`'s (the
    odds-ratio term is per pair): 3 head passes, only ``loss`` differentiable. ``softcap``: the head's soft cap, as
    :func:`linear_preference_loss`'s.
    """
    num_pairs = check_linear_request(hidden, labels, None, None, None, {})
    if fused and "reference" not in (head_backend := dispatch.traced_backend("linear_logprobs", hidden.device),
                                     loss_backend := dispatch.traced_backend("preference", hidden.device)):
        hidden, weight, bias = checked_head(hidden, weight, bias, labels, temperature=1.0, ignore_index=ignore_index,
                                            softcap=softcap)
        # beta 1 inside (the "rewards" are the log-odds scores), ORPO's beta as the loss weight: as orpo_loss.
        request = PairRequest("logistic", "log_odds", 1.0, 0.0, 0.0, 0.0, 0.0, float(beta), False)
        ones = labels.new_ones(num_pairs)
        out = fused_head.fused_pair_losses(
            hidden, weight, bias, labels, average=True, ld_alpha=None, ref_chosen=None, ref_rejected=None,
            seq_mask=completion_mask, chosen_lengths=ones, rejected_lengths=ones, pair_weights=None,
            requests=[request], beta=1.0, nll_weight=1.0, nll_in_losses=False, wpo=False, temperature=1.0,
            ignore_index=ignore_index, with_metrics=False, head_backend=head_backend, loss_backend=loss_backend,
            softcap=softcap,
        )
        chosen, rejected = out.logps_N[:num_pairs], out.logps_N[num_pairs:]
        log_odds = out.chosen_rewards - out.rejected_rewards
        return LinearORPOLoss(out.loss, out.losses, beta * chosen, beta * rejected, F.logsigmoid(log_odds), log_odds,
                              chosen, rejected, out.chosen_nll)
    token_logps_NT = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                           softcap=softcap)
    chosen, rejected = sequence_logps(token_logps_NT, completion_mask, average=True).chunk(2)
    nll = token_mean_nll(token_logps_NT[:num_pairs], labels[:num_pairs] != ignore_index)
    out = orpo_loss(chosen, rejected, chosen_nll=nll, beta=beta)
    return LinearORPOLoss(*out, chosen, rejected, nll)
