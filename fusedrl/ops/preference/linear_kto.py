"""KTO straight from hidden states and the LM head (:func:`linear_kto_loss`), with a fused mode: LM head, summed
completion log-probs and KTO's per-example losses in one custom op, 3 head passes instead of 4
(``fusedrl/ops/logprobs/fused.py`` explains the passes and the memory budget).

Legend: N examples (rows), T positions, K labelled tokens, H hidden, V vocabulary.

``fusedrl::linear_unpaired_preference_losses`` (``dispatch.define_op``, op ``linear_logprobs``): the head's row
functions of that backend, the losses on ``loss_backend`` (the ``preference`` op's: ``compiled.
unpaired_preference_losses`` or ``triton.unpaired_preference_losses``). Given the clamped KL estimate (a detached
batch mean from the mismatched pairs' own passes, computed before), each example's loss depends on its own row, so
chunks hold whole rows. The reduction is TRL's ``nanmean``, whose count of finite losses is known only after the last
chunk: the per-example gradients are formed with weight 1 (0 for a NaN loss, which nanmean drops), and the three
gradients are divided by the count at the end (they are linear in the upstream gradient).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch

from fusedrl.ops import dispatch
from fusedrl.ops.logprobs import cap_argument, checked_head, linear_token_logprobs
from fusedrl.ops.logprobs import fused as head
from fusedrl.ops.preference import compiled
from fusedrl.ops.preference.checks import check_kto_request
from fusedrl.ops.preference.losses import kto_loss
from fusedrl.ops.preference.sequence import sequence_logps


class LinearKTOLoss(NamedTuple):
    """``loss`` (TRL's nanmean), ``losses`` / ``rewards`` / ``logps`` ``[N]`` and ``kl`` as :class:`KTOLoss`,
    plus the per-token fp32 ``token_logps`` and ``entropy`` (zeros unless ``with_entropy``) ``[N, T]``.
    Differentiable as :class:`LinearPreferenceLoss`'s fields: on the fused path only ``loss``."""

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    logps: torch.Tensor
    token_logps: torch.Tensor
    entropy: torch.Tensor


def _unpaired_loss_fn(loss_backend: str):
    if loss_backend != "triton":
        return compiled.unpaired_preference_losses
    triton_losses = importlib.import_module("fusedrl.ops.preference.triton").unpaired_preference_losses
    return lambda *args: dispatch.run_with_fallback("preference", triton_losses,
                                                    compiled.unpaired_preference_losses, *args)


def _run(rows: head.RowFunctions, hidden, weight, bias, labels, ref_logps, desirable, kl, beta, desirable_weight,
         undesirable_weight, softcap, ignore_index, with_entropy, needs_input_grad, loss_backend):
    num_rows, num_cols = labels.shape
    device = hidden.device
    mask_NT = labels != ignore_index
    rows_N = torch.arange(num_rows, device=device)
    # One group in row order when the tiles fit: then the log-probs are exactly linear_token_logprobs' (the
    # reference's pass). Else row by row.
    whole = int(mask_NT.sum()) * weight.shape[0] * hidden.element_size() <= head.keep_bytes(weight)
    layout = head.group_layout(mask_NT, rows_N, num_rows if whole else 1)
    hidden_KH = hidden.reshape(num_rows * num_cols, -1).index_select(0, layout.index_K)
    labels_K = labels.reshape(-1).index_select(0, layout.index_K)
    token_logps_NT = torch.zeros(labels.shape, dtype=torch.float32, device=device)
    logps_N, losses_N, rewards_N = (torch.zeros(num_rows, dtype=torch.float32, device=device) for _ in range(3))
    unpaired_losses = _unpaired_loss_fn(loss_backend)

    def loss_fn(chunk: head.Chunk):
        index_C = layout.index_K[chunk.start:chunk.end]
        token_logps_NT.view(-1).index_copy_(0, index_C, chunk.logprobs)
        first, end = (0, num_rows) if whole else (chunk.first_group, chunk.end_group)

        def rows_of(t):  # fresh tensors for a chunk's rows: the compiled loss's graph guards on views
            return t if whole else t[first:end].clone()

        seq_b = sequence_logps(rows_of(token_logps_NT), rows_of(mask_NT))
        logps_N[first:end] = seq_b
        loss_b, reward_b, grad_b = unpaired_losses(seq_b, rows_of(ref_logps), rows_of(desirable), kl, beta,
                                                   desirable_weight, undesirable_weight)
        losses_N[first:end], rewards_N[first:end] = loss_b, reward_b
        grad_b = torch.where(torch.isnan(loss_b), 0.0, grad_b)  # nanmean leaves NaN losses out
        return grad_b.index_select(0, layout.row_K[chunk.start:chunk.end] - first), None

    out = head.fused_head(hidden_KH, weight, bias, labels_K, layout.group_ends, loss_fn, inv_temperature=1.0,
                          ignore_index=ignore_index, with_entropy=with_entropy, with_stats=False,
                          needs_input_grad=needs_input_grad, rows=rows, softcap=softcap)
    count = (~torch.isnan(losses_N)).sum().float()
    grad_hidden = hidden.new_empty(0)
    if out.grad_hidden_KH is not None:
        grad_hidden = hidden.new_zeros(num_rows * num_cols, hidden.shape[-1]).index_copy_(
            0, layout.index_K, (out.grad_hidden_KH / count).to(hidden.dtype)).view(hidden.shape)
    return (
        losses_N.nanmean(), losses_N, rewards_N, logps_N, token_logps_NT,
        head.scatter_rows(out.entropy_K, layout.index_K, labels.shape), grad_hidden,
        hidden.new_empty(0) if out.grad_weight_VH is None else (out.grad_weight_VH / count).to(weight.dtype),
        hidden.new_empty(0) if out.grad_bias_V is None else (out.grad_bias_V / count).to(bias.dtype),
    )


def linear_unpaired_losses_compiled(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float, desirable_weight: float,
    undesirable_weight: float, softcap: float, ignore_index: int, with_entropy: bool, needs_input_grad: list[bool],
    loss_backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """The compiled backend of ``fusedrl::linear_unpaired_preference_losses`` (its signature is the schema):
    ``(loss, losses_N, rewards_N, logps_N, token_logps_NT, entropy_NT)`` then the gradients of hidden, weight and
    bias (empty where not asked). hidden ``[N, T, H]``; labels ``[N, T]``; ref_logps fp32 / desirable bool ``[N]``;
    kl: the clamped fp32 scalar estimate (0 for ``apo_zero_unpaired``); ``softcap``: the head's soft cap, 0 for
    none."""
    from fusedrl.ops.logprobs import compiled as rows

    return _run(head.RowFunctions(rows.rows_fwd, rows.rows_bwd, rows.rows_stats), hidden, weight, bias, labels,
                ref_logps, desirable, kl, beta, desirable_weight, undesirable_weight, softcap, ignore_index,
                with_entropy, needs_input_grad, loss_backend)


def linear_unpaired_losses_triton(*args):
    """The Triton backend: :func:`linear_unpaired_losses_compiled` on the Triton row kernels."""
    rows = importlib.import_module("fusedrl.ops.logprobs.triton")
    return _run(head.RowFunctions(rows.rows_fwd, rows.rows_bwd, rows.rows_stats), *args)


def _fake(hidden, weight, bias, labels, ref_logps, desirable, kl, beta, desirable_weight, undesirable_weight,
          softcap, ignore_index, with_entropy, needs_input_grad, loss_backend):
    per_row = hidden.new_empty(labels.shape[:1], dtype=torch.float32)
    tokens = hidden.new_empty(labels.shape, dtype=torch.float32)

    def grad_like(needed, tensor):
        return torch.empty_like(tensor) if needed and tensor is not None else hidden.new_empty(0)

    return (hidden.new_empty((), dtype=torch.float32), per_row, torch.empty_like(per_row), torch.empty_like(per_row),
            tokens, torch.empty_like(tokens), grad_like(needs_input_grad[0], hidden),
            grad_like(needs_input_grad[1], weight), grad_like(needs_input_grad[2], bias))


def _backward(ctx, grad_loss, *_unused):
    return head.scaled_head_gradients(ctx, grad_loss, num_inputs=15)  # only hidden, weight and bias have gradients


linear_unpaired_losses_op = dispatch.define_op(
    "linear_unpaired_preference_losses", op="linear_logprobs", compiled=linear_unpaired_losses_compiled,
    triton="fusedrl.ops.preference.linear_kto:linear_unpaired_losses_triton", fake=_fake, backward=_backward,
    setup_context=head.save_head_gradients,
)


def linear_kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    fused: bool = False,
    softcap: float | None = None,
) -> LinearKTOLoss:
    """TRL 1.16's KTO loss (:func:`kto_loss`) from the last hidden states ``[N, T, H]`` and the LM head.

    labels: ``[N, T]`` int64, shifted, labelled on the completions (summed log-probs); ref_logps ``[N]``; desirable
    ``[N]`` bool; kl: the unclamped KL estimate (``kto_kl`` of the mismatched pairs, averaged over ranks; ignored by
    ``apo_zero_unpaired``). ``softcap``: the head's soft cap (``c * tanh(z / c)`` of its output; None or 0: none).
    ``fused=True``: 3 head passes, only ``loss`` differentiable; it runs when the
    ``linear_logprobs`` and ``preference`` backends are ``compiled`` / ``triton``, else the unfused path below.
    """
    check_kto_request(hidden.new_zeros(labels.shape[0]), ref_logps, desirable, loss_type=loss_type, kl=kl,
                      kl_logps=None, ref_kl_logps=None)
    if fused and "reference" not in (head_backend := dispatch.traced_backend("linear_logprobs", hidden.device),
                                     loss_backend := dispatch.traced_backend("preference", hidden.device)):
        hidden, weight, bias = checked_head(hidden, weight, bias, labels, temperature=1.0, ignore_index=ignore_index,
                                            softcap=softcap)
        kl_value = (kl.detach().float().reshape(()).clamp(min=0) if loss_type == "kto"
                    else hidden.new_zeros((), dtype=torch.float32))
        out = linear_unpaired_losses_op(
            hidden, weight, bias, labels.long(), ref_logps.detach().float().contiguous(),
            desirable.to(device=hidden.device, dtype=torch.bool), kl_value, float(beta), float(desirable_weight),
            float(undesirable_weight), cap_argument(softcap), int(ignore_index), bool(with_entropy),
            head.needs_gradients(hidden, weight, bias), loss_backend, head_backend,
        )
        return LinearKTOLoss(out[0], out[1], out[2], kl_value, out[3], out[4], out[5])
    result = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                   with_entropy=with_entropy, softcap=softcap)
    token_logps_NT = result.logprobs if with_entropy else result
    logps = sequence_logps(token_logps_NT, labels != ignore_index)
    out = kto_loss(logps, ref_logps, desirable, loss_type=loss_type, beta=beta, desirable_weight=desirable_weight,
                   undesirable_weight=undesirable_weight, kl=kl)
    entropy = result.entropy.detach() if with_entropy else torch.zeros_like(token_logps_NT.detach())
    return LinearKTOLoss(*out, logps, token_logps_NT, entropy)
