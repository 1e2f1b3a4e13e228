"""The fused path of :func:`~fusedrl.ops.preference.linear_preference_loss` and ``linear_orpo_loss``
(``fused=True``): LM head, sequence log-probs and the per-pair losses of a ``[chosen; rejected]`` batch in one custom
op, 3 head passes instead of 4 (``fusedrl/ops/logprobs/fused.py`` explains the passes and the memory budget).

Legend: B pairs, N = 2B rows ``[chosen; rejected]``, T positions, K labelled tokens, H hidden, V vocabulary.

``fusedrl::linear_pair_preference_losses`` (``dispatch.define_op``, op ``linear_logprobs``): its ``compiled`` and
``triton`` implementations run the head's row functions of that backend; the losses run on ``loss_backend``, the
``preference`` op's backend (``compiled.pair_preference_losses``, or ``triton.pair_preference_losses`` with the
usual run-time fallback). Chunks hold whole pairs, so once a chunk's tiles exist its pairs' sequence log-probs
``logp_n = sum_t a_nt logp_nt`` are known (``a``: 1 on the completion, ``1 / length`` with ``average_log_prob``,
LD-DPO's ``ld_alpha`` on the verbose tail; ORPO's on a subset of the labelled tokens), the pair formulas give
``d loss / d logp_n``, and each token gets ``a_nt d loss / d logp_n`` (plus ``-nll_weight / num_chosen_tokens`` on
chosen tokens for DPO ``sft`` / CPO's ``cpo_alpha`` / ORPO's NLL term, whose token count is known from the labels).
WPO weights (``use_weighting``) come from the same tiles: each sequence's ``exp(mean_t(logp_t - log sum_v p_v^2))``.

Only ``loss`` is differentiable: the forward returns the ``[N, T, H]`` / ``[V, H]`` / ``[V]`` gradients of the loss
and the backward scales them by the incoming gradient. Per-token outputs and metrics are detached.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fusedrl.ops import dispatch
from fusedrl.ops.logprobs import cap_argument
from fusedrl.ops.logprobs import fused as head
from fusedrl.ops.preference import compiled
from fusedrl.ops.preference.losses import PairRequest
from fusedrl.ops.preference.sequence import ld_sequence_logps, sequence_logps, sequence_weights, wpo_pair_weights

# PairRequest fields after ``formula`` and ``score`` that travel in the op's ``params`` list, per loss type.
_NUM_PARAMS = 6


class FusedPairOutputs(NamedTuple):
    """``loss`` fp32 scalar (the only differentiable output); ``losses``, rewards ``[B]``; ``logps_N`` ``[N]``
    sequence log-probs; ``chosen_nll`` scalar; per-token fp32 ``logprobs`` / ``entropy`` and bool ``is_top1``
    ``[N, T]`` (0 where not labelled; entropy and is_top1 all 0 unless asked)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    logps_N: torch.Tensor
    chosen_nll: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor


def _pair_loss_fn(loss_backend: str):
    """The per-pair losses of the ``preference`` backend, looked up in their modules at each call."""
    if loss_backend != "triton":
        return compiled.pair_preference_losses
    triton_losses = importlib.import_module("fusedrl.ops.preference.triton").pair_preference_losses
    return lambda *args: dispatch.run_with_fallback("preference", triton_losses, compiled.pair_preference_losses,
                                                    *args)


def _layout(mask_NT: torch.Tensor, weight_VH: torch.Tensor, element_size: int) -> tuple[head.GroupLayout, bool]:
    """The batch as one group in row order when its tiles fit the budget: then the tiles are exactly those of
    ``linear_token_logprobs`` on the same labels (the reference's pass), so a policy equal to its reference gives
    bitwise equal log-probs and exactly zero rewards, as TRL's. Else pair by pair (chosen row, rejected row).
    Returns the layout and whether it is the single group."""
    num_rows = mask_NT.shape[0]
    rows_N = torch.arange(num_rows, device=mask_NT.device)
    if int(mask_NT.sum()) * weight_VH.shape[0] * element_size <= head.keep_bytes(weight_VH):
        return head.group_layout(mask_NT, rows_N, num_rows), True
    half = num_rows // 2
    return head.group_layout(mask_NT, torch.stack([rows_N[:half], rows_N[half:]], 1).flatten(), 2), False


def _run(
    rows: head.RowFunctions, hidden, weight, bias, labels, seq_mask, average, ld_alpha, ref_chosen, ref_rejected,
    chosen_scale, rejected_scale, pair_weight, formulas, scores, params, scaled, beta, nll_weight, nll_in_losses, wpo,
    inv_temperature, softcap, ignore_index, with_entropy, with_stats, needs_input_grad, loss_backend,
):
    num_rows, num_cols = labels.shape
    num_pairs = num_rows // 2
    device = hidden.device
    mask_NT = labels != ignore_index
    layout, whole_batch = _layout(mask_NT, weight, hidden.element_size())
    hidden_KH = hidden.reshape(num_rows * num_cols, -1).index_select(0, layout.index_K)
    labels_K = labels.reshape(-1).index_select(0, layout.index_K)
    # The tokens of the sequence log-probs: the labelled ones, or a subset (ORPO: the completion, while its NLL
    # also covers the chosen prompt).
    seq_mask_NT = mask_NT if seq_mask is None else seq_mask.bool() & mask_NT
    coef_K = sequence_weights(seq_mask_NT, average=average, ld_alpha=ld_alpha).reshape(-1).index_select(
        0, layout.index_K)
    chosen_K = layout.row_K < num_pairs
    # The NLL term's normaliser is known from the labels, so its per-token gradient is too.
    num_chosen = mask_NT[:num_pairs].sum().float().clamp(min=1.0)
    nll_grad = -nll_weight / num_chosen

    # Token statistics in [N, T] as the chunks fill them: each pair's sequence log-probs, NLL and WPO weights come
    # from the same functions, on the same rows, as in the unfused path.
    token_logps_NT = torch.zeros(labels.shape, dtype=torch.float32, device=device)
    log_sum_sq_NT = torch.zeros_like(token_logps_NT) if wpo else None
    logps_N = torch.zeros(num_rows, dtype=torch.float32, device=device)
    losses_B = torch.zeros(num_pairs, dtype=torch.float32, device=device)
    chosen_rewards_B, rejected_rewards_B = torch.zeros_like(losses_B), torch.zeros_like(losses_B)
    nll_sum = torch.zeros((), dtype=torch.float32, device=device)
    pair_losses = _pair_loss_fn(loss_backend)
    formula_list, score_list = formulas.split(",") if formulas else [], scores.split(",") if scores else []

    def loss_fn(chunk: head.Chunk):
        index_C = layout.index_K[chunk.start:chunk.end]
        token_logps_NT.view(-1).index_copy_(0, index_C, chunk.logprobs)
        first, end = (0, num_pairs) if whole_batch else (chunk.first_group, chunk.end_group)
        pairs = torch.arange(first, end, device=device)
        rows_b = torch.cat([pairs, pairs + num_pairs])  # [chosen; rejected] rows of the chunk's pairs
        tokens_bT, mask_bT = token_logps_NT.index_select(0, rows_b), mask_NT.index_select(0, rows_b)
        seq_mask_bT = mask_bT if seq_mask is None else seq_mask_NT.index_select(0, rows_b)
        if ld_alpha is not None:
            seq_b = ld_sequence_logps(tokens_bT, seq_mask_bT, ld_alpha=ld_alpha)
        else:
            seq_b = sequence_logps(tokens_bT, seq_mask_bT, average=average)
        logps_N.index_copy_(0, rows_b, seq_b)
        chosen_b, rejected_b = seq_b.chunk(2)

        def pairs_of(t):
            # The whole batch passes the views the unfused path passes; a chunk's pairs are fresh tensors, since
            # the compiled formulas' graphs guard on views (base and offset).
            return t if whole_batch or t is None else t[first:end].clone()

        if not whole_batch:
            chosen_b, rejected_b = chosen_b.clone(), rejected_b.clone()
        weight_b = pairs_of(pair_weight)
        if wpo:
            log_sum_sq_NT.view(-1).index_copy_(0, index_C, chunk.log_sum_sq_probs)
            wpo_b = wpo_pair_weights(tokens_bT, log_sum_sq_NT.index_select(0, rows_b), seq_mask_bT)
            weight_b = wpo_b if weight_b is None else weight_b * wpo_b
        grad_N = torch.zeros_like(logps_N)
        if not formula_list:  # DPO "sft" alone: the rewards are still beta * (logp - ref), as TRL logs them
            chosen_rewards_B[first:end] = beta * (chosen_b - (0.0 if ref_chosen is None else ref_chosen[first:end]))
            rejected_rewards_B[first:end] = beta * (rejected_b - (0.0 if ref_rejected is None
                                                                  else ref_rejected[first:end]))
        for index, (formula, score) in enumerate(zip(formula_list, score_list, strict=True)):
            type_beta, smoothing, tau, margin, score_alpha, loss_weight = params[index * _NUM_PARAMS:
                                                                                   (index + 1) * _NUM_PARAMS]
            out = pair_losses(
                chosen_b, rejected_b, pairs_of(ref_chosen), pairs_of(ref_rejected),
                pairs_of(chosen_scale) if scaled[index] else None, pairs_of(rejected_scale) if scaled[index] else None,
                weight_b, formula, score, type_beta, smoothing, tau, margin, score_alpha, loss_weight,
            )
            losses_B[first:end] += out[0]
            chosen_rewards_B[first:end], rejected_rewards_B[first:end] = out[1], out[2]
            grad_N[first:end] += out[3] / num_pairs  # loss = losses.mean()
            grad_N[num_pairs + first:num_pairs + end] += out[4] / num_pairs
        nll_sum.sub_((tokens_bT[:end - first].float() * mask_bT[:end - first]).sum())
        grad_C = grad_N[layout.row_K[chunk.start:chunk.end]] * coef_K[chunk.start:chunk.end]
        grad_C = torch.where(chosen_K[chunk.start:chunk.end], grad_C + nll_grad, grad_C)
        return grad_C, None

    out = head.fused_head(hidden_KH, weight, bias, labels_K, layout.group_ends, loss_fn,
                          inv_temperature=inv_temperature, ignore_index=ignore_index, with_entropy=with_entropy,
                          with_stats=with_stats or wpo, needs_input_grad=needs_input_grad, rows=rows, softcap=softcap)
    chosen_nll = nll_sum / num_chosen
    if nll_in_losses:
        losses_B += nll_weight * chosen_nll
    loss = losses_B.sum() / num_pairs + (0.0 if nll_in_losses else nll_weight) * chosen_nll
    shape = labels.shape
    is_top1 = head.scatter_rows(out.is_top1_K, layout.index_K, shape)
    grad_hidden = hidden.new_empty(0)
    if out.grad_hidden_KH is not None:
        grad_hidden = hidden.new_zeros(num_rows * num_cols, hidden.shape[-1]).index_copy_(
            0, layout.index_K, out.grad_hidden_KH).view(hidden.shape)
    return (
        loss, losses_B, chosen_rewards_B, rejected_rewards_B, logps_N, chosen_nll,
        head.scatter_rows(out.logprobs_K, layout.index_K, shape), head.scatter_rows(out.entropy_K, layout.index_K,
                                                                                     shape),
        torch.zeros(shape, dtype=torch.bool, device=device) if is_top1 is None else is_top1,
        grad_hidden,
        hidden.new_empty(0) if out.grad_weight_VH is None else out.grad_weight_VH.to(weight.dtype),
        hidden.new_empty(0) if out.grad_bias_V is None else out.grad_bias_V.to(bias.dtype),
    )


def linear_pair_losses_compiled(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    seq_mask: torch.Tensor | None, average: bool, ld_alpha: float | None, ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_scale: torch.Tensor | None, rejected_scale: torch.Tensor | None, pair_weight: torch.Tensor | None,
    formulas: str, scores: str, params: list[float], scaled: list[bool], beta: float, nll_weight: float,
    nll_in_losses: bool, wpo: bool, inv_temperature: float, softcap: float, ignore_index: int, with_entropy: bool,
    with_stats: bool, needs_input_grad: list[bool], loss_backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled backend of ``fusedrl::linear_pair_preference_losses`` (its signature is the schema):
    :class:`FusedPairOutputs` then the gradients of hidden, weight and bias (empty where not asked).
    hidden ``[N, T, H]``, labels ``[N, T]``; sequence log-probs are sums, means (``average``) or LD-DPO sums
    (``ld_alpha``) over the labelled tokens, or over those of ``seq_mask`` ``[N, T]`` (the NLL term stays over the
    labelled tokens of the chosen rows); the ``[B]`` tensors may be None; per loss type
    ``formulas`` / ``scores`` (comma-separated: a custom-op schema has no list of strings), ``scaled`` and
    :data:`_NUM_PARAMS` entries of ``params``; ``softcap``: the head's soft cap, 0 for none."""
    from fusedrl.ops.logprobs import compiled as rows

    return _run(head.RowFunctions(rows.rows_fwd, rows.rows_bwd, rows.rows_stats), hidden, weight, bias, labels,
                seq_mask, average, ld_alpha, ref_chosen, ref_rejected, chosen_scale, rejected_scale, pair_weight,
                formulas, scores, params, scaled, beta, nll_weight, nll_in_losses, wpo, inv_temperature, softcap,
                ignore_index, with_entropy, with_stats, needs_input_grad, loss_backend)


def linear_pair_losses_triton(*args):
    """The Triton backend: :func:`linear_pair_losses_compiled` on the Triton row kernels."""
    rows = importlib.import_module("fusedrl.ops.logprobs.triton")
    return _run(head.RowFunctions(rows.rows_fwd, rows.rows_bwd, rows.rows_stats), *args)


def _fake(hidden, weight, bias, labels, seq_mask, average, ld_alpha, ref_chosen, ref_rejected, chosen_scale,
          rejected_scale, pair_weight, formulas, scores, params, scaled, beta, nll_weight, nll_in_losses, wpo,
          inv_temperature, softcap, ignore_index, with_entropy, with_stats, needs_input_grad, loss_backend):
    num_rows = labels.shape[0]
    scalar = hidden.new_empty((), dtype=torch.float32)
    pair = hidden.new_empty(num_rows // 2, dtype=torch.float32)
    tokens = hidden.new_empty(labels.shape, dtype=torch.float32)

    def grad_like(needed, tensor):
        return torch.empty_like(tensor) if needed and tensor is not None else hidden.new_empty(0)

    return (scalar, pair, torch.empty_like(pair), torch.empty_like(pair),
            hidden.new_empty(num_rows, dtype=torch.float32), torch.empty_like(scalar), tokens,
            torch.empty_like(tokens), hidden.new_empty(labels.shape, dtype=torch.bool),
            grad_like(needs_input_grad[0], hidden), grad_like(needs_input_grad[1], weight),
            grad_like(needs_input_grad[2], bias))


def _backward(ctx, grad_loss, *_unused):
    return head.scaled_head_gradients(ctx, grad_loss, num_inputs=27)  # only hidden, weight and bias have gradients


linear_pair_losses_op = dispatch.define_op(
    "linear_pair_preference_losses", op="linear_logprobs", compiled=linear_pair_losses_compiled,
    triton="fusedrl.ops.preference.fused_head:linear_pair_losses_triton", fake=_fake, backward=_backward,
    setup_context=head.save_head_gradients,
)


def fused_pair_losses(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, *,
    average: bool, ld_alpha: float | None, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
    seq_mask: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, pair_weights: torch.Tensor | None,
    requests: Sequence[PairRequest], beta: float, nll_weight: float, nll_in_losses: bool, wpo: bool,
    temperature: float, ignore_index: int, with_metrics: bool, head_backend: str, loss_backend: str,
    softcap: float | None,
) -> FusedPairOutputs:
    """Run the custom op on ``head_backend`` (``compiled`` / ``triton``) with the losses on ``loss_backend`` and the
    head's soft cap ``softcap`` (None: none); ``requests``: one :class:`PairRequest` per loss type (weights
    included); gradients only for the inputs that require them (none under ``no_grad``)."""
    needs = head.needs_gradients(hidden, weight, bias)
    params = [float(value) for request in requests for value in request[2:2 + _NUM_PARAMS]]

    def detached(t):
        return None if t is None else t.detach().float().contiguous()

    out = linear_pair_losses_op(
        hidden, weight, bias, labels.long(), None if seq_mask is None else seq_mask.detach().bool(), bool(average),
        None if ld_alpha is None else float(ld_alpha),
        detached(ref_chosen), detached(ref_rejected),
        1.0 / chosen_lengths.detach().float().clamp(min=1.0), 1.0 / rejected_lengths.detach().float().clamp(min=1.0),
        detached(pair_weights), ",".join(r.formula for r in requests), ",".join(r.score for r in requests), params,
        [r.length_scaled for r in requests], float(beta), float(nll_weight), bool(nll_in_losses), bool(wpo),
        1.0 / temperature, cap_argument(softcap), int(ignore_index), bool(with_metrics), bool(with_metrics), needs,
        loss_backend, head_backend,
    )
    return FusedPairOutputs(*out[:9])
