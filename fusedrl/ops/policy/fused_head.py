"""The fused path of :func:`~fusedrl.ops.policy.linear_policy_loss` (``fused=True``): LM head and the clipped policy
loss of a batch of completions in one custom op, 3 head passes instead of 4 (``fusedrl/ops/logprobs/fused.py``
explains the passes and the memory budget).

Legend: B sequences, T completion positions, U loss units per row (T, or 1 when the row's log-probs are summed,
RLOO), K labelled tokens, H hidden, V vocabulary.

``fusedrl::linear_policy_loss_rows`` (``dispatch.define_op``, op ``linear_logprobs``): its ``compiled`` and ``triton``
implementations run the head's row functions of that backend; the loss runs on ``loss_backend``, the
``policy_loss`` op's backend (``compiled.policy_rows`` or ``triton.policy_rows``, the per-row functions of
``fusedrl::policy_loss_rows``). The caller folds the aggregation into per-row weights (``row_scale``, from the mask
and the normaliser, both known before the head runs), so each row's loss and ``d loss / d logp`` depend on that row
alone: chunks hold whole rows, and once a chunk's tiles exist its rows go through the per-row loss, whose gradient
(plus the sequence-level slope on every masked token) is each token's upstream gradient. The top-entropy mask
(a quantile over the whole batch) couples the rows: the caller takes the unfused path for it. Every loss type fits:
its objective and parameters go to the per-row loss, VESPO's weight and GSPO's ratio are per-row pre-passes, and so
is the off-policy sequence mask (``off_policy_threshold``: each row's mean gap to its old log-probs, known once the
row's log-probs are, handed to the rows as their ``keep``). The
entropy bonus (``entropy_coef``) is ``-c * sum of the labelled tokens' entropies / their count`` (count known before
the head runs, as the top-entropy mask, which would change it, takes the unfused path): each token's entropy
gradient is the constant ``-c / count``, handed to the head's backward beside the log-prob gradient.

Only ``loss`` is differentiable: the forward returns the ``[B, T, H]`` / ``[V, H]`` / ``[V]`` gradients and the
backward scales them by the incoming gradient. Log-probs, entropies and the per-row metrics are detached.
"""

from __future__ import annotations

import importlib

import torch

from fusedrl.ops import dispatch
from fusedrl.ops.logprobs import cap_argument
from fusedrl.ops.logprobs import fused as head
from fusedrl.ops.policy import compiled
from fusedrl.ops.policy.reference import AGGREGATIONS, OBJECTIVES, entropy_bonus, off_policy_keep


def row_scale(mask_BT: torch.Tensor, loss_type: str, max_completion_length, num_items_in_batch) -> torch.Tensor:
    """The aggregation as a per-row token weight (``compiled.py`` docstring): the ``row_scale`` of
    ``fusedrl::policy_loss_rows`` and of the fused op."""
    num_rows = mask_BT.shape[0]
    counts_B = mask_BT.sum(-1)
    loss_type = AGGREGATIONS[loss_type]
    if loss_type == "luspo":  # every token of a row counts fully, rows averaged
        return torch.full_like(counts_B, 1.0 / num_rows)
    if loss_type == "grpo":
        return 1.0 / (num_rows * counts_B.clamp(min=1.0))
    if loss_type == "dr_grpo":
        return torch.full_like(counts_B, 1.0 / (num_rows * max_completion_length))
    if loss_type == "dapo" and num_items_in_batch is not None:
        normaliser = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask_BT.device)
        return (1.0 / normaliser).expand(num_rows).contiguous()
    return (1.0 / counts_B.sum().clamp(min=1.0)).expand(num_rows).contiguous()  # bnpo; dapo on this call's tokens


@torch.no_grad()
def row_metrics(mask, kl_B, low_B, high_B, per_sequence: bool, has_ref: bool, entropy_BT):
    """``(kl, clip_ratio_low, clip_ratio_high, clip_ratio_region, entropy)`` from the per-row sums of the custom
    ops (``kl`` None without reference log-probs, ``entropy`` None without entropies)."""
    counts_B = mask.sum(-1)
    total = counts_B.sum().clamp(min=1.0)
    if per_sequence:  # one clip flag per sequence (count / length): share of sequences
        low, high = ((x / counts_B.clamp(min=1.0)).mean() for x in (low_B, high_B))
    else:
        low, high = low_B.sum() / total, high_B.sum() / total
    kl = kl_B.sum() / total if has_ref else None
    entropy = None if entropy_BT is None else (entropy_BT.detach().float() * mask).sum() / total
    # low and high are exclusive (they need A < 0 and A > 0), so the region share is their sum.
    return kl, low, high, low + high, entropy


@torch.no_grad()
def phi_mean(logps_BU, old_BU, mask_BU, advantages, params: list[float]) -> torch.Tensor:
    """VESPO's ``phi_mean`` metric (TRL's ``vespo/phi_seq_mean``) from detached fp32 log-probs ``[B, U]``: the mean
    of the rows' weights with ``[B]`` advantages (every row counts), the masked token mean with ``[B, U]``."""
    log_w_B1 = compiled.vespo_log_weight(logps_BU, old_BU, mask_BU).unsqueeze(1)
    adv = advantages.float().unsqueeze(1) if advantages.dim() == 1 else advantages.float()
    phi = compiled.vespo_phi(log_w_B1, adv, *params)
    if phi.shape[1] == 1:
        return phi.mean()
    return (phi * mask_BU).sum() / mask_BU.sum().clamp(min=1.0)


def ratio_kl_rows(logps, old, ref, mask, row_scale_b, beta: float, sequence: bool, estimator: str):
    """TRL's ratio-weighted KL term (``ratio_weighted_kl``) of some rows with its analytic gradient: ``(beta * sum
    w kl r, d / d logps [b, U], masked kl r summed per row [b])``, ``w`` the row weights on the mask, ``r`` the
    importance ratio (per token, or the row's at sequence level). d(w kl r)/d logp = w (dkl + kl) r per token; at
    sequence level r = exp(masked mean log-ratio), so each masked token also gets (sum_u w kl r) / n_b."""
    on = mask > 0
    weight = torch.where(on, row_scale_b.unsqueeze(1), 0.0)
    kl, dkl = compiled.kl_terms(logps - ref, estimator)
    if sequence:
        log_ratio_b, inv_count_b = compiled.sequence_log_ratio(logps, old, mask)
        ratio = torch.exp(log_ratio_b).unsqueeze(1).expand_as(logps)
    else:
        ratio = torch.exp(torch.where(on, logps - old, 0.0))
    per_token = torch.where(on, kl * ratio, 0.0)
    weighted = per_token * weight
    grad = weight * dkl * ratio
    if sequence:
        grad = grad + torch.where(on, (weighted.sum(-1) * inv_count_b).unsqueeze(1), 0.0)
    else:
        grad = grad + weighted
    return beta * weighted.sum(), beta * torch.where(on, grad, 0.0), per_token.sum(-1)


def _policy_rows_fn(loss_backend: str):
    """The per-row policy loss of the ``policy_loss`` backend, looked up in its module at each call."""
    if loss_backend != "triton":
        return compiled.policy_rows
    triton_rows = importlib.import_module("fusedrl.ops.policy.triton").policy_rows
    return lambda *args: dispatch.run_with_fallback("policy_loss", triton_rows, compiled.policy_rows, *args)


def _run(rows: head.RowFunctions, hidden, weight, bias, labels, old, advantages, mask, scale_B, ref, beta,
         epsilon_low, epsilon_high, delta, sequence, kl_estimator, ratio_kl, sum_tokens, inv_temperature, softcap,
         with_entropy, needs_input_grad, loss_backend, objective, objective_params, entropy_coef,
         off_policy_threshold):
    num_rows, num_cols = labels.shape
    device = hidden.device
    labelled_BT = labels != -100
    # The entropy bonus: -c * (sum of the labelled tokens' entropies) / their count, so d / d entropy = -c / count.
    bonus_grad = None if entropy_coef is None else -entropy_coef.float() / labelled_BT.sum().clamp(min=1)
    rows_B = torch.arange(num_rows, device=device)
    # The whole batch as one group when its tiles fit: the tiles, and so the log-probs, are then exactly those of
    # linear_token_logprobs on the same labels (the old and reference log-probs' pass). Else row by row.
    whole = int(labelled_BT.sum()) * weight.shape[0] * hidden.element_size() <= head.keep_bytes(weight)
    layout = head.group_layout(labelled_BT, rows_B, num_rows if whole else 1)
    hidden_KH = hidden.reshape(num_rows * num_cols, -1).index_select(0, layout.index_K)
    labels_K = labels.reshape(-1).index_select(0, layout.index_K)
    token_logps_BT = torch.zeros(labels.shape, dtype=torch.float32, device=device)
    loss = torch.zeros((), dtype=torch.float32, device=device)
    kl_B, low_B, high_B = (torch.zeros(num_rows, dtype=torch.float32, device=device) for _ in range(3))
    policy_rows = _policy_rows_fn(loss_backend)

    def loss_fn(chunk: head.Chunk):
        index_C = layout.index_K[chunk.start:chunk.end]
        token_logps_BT.view(-1).index_copy_(0, index_C, chunk.logprobs)
        first, end = (0, num_rows) if whole else (chunk.first_group, chunk.end_group)

        def rows_of(t):
            # Row slices as fresh tensors: compiled.policy_rows' graph guards on views (their base and offset).
            return t if whole or t is None else t[first:end].clone()

        tokens_bT = rows_of(token_logps_BT)
        # RLOO: one unit per row, the sum of its token log-probs (the same expression as the unfused path's).
        logps_bU = (tokens_bT * rows_of(labelled_BT)).sum(-1, keepdim=True) if sum_tokens else tokens_bT
        # On-policy (no old log-probs): old = logps, ratio 1; a copy, as compiled.policy_rows makes for ref.
        old_bU = logps_bU.clone() if old is None else rows_of(old)
        ref_bU, mask_bU, scale_b, adv_b = rows_of(ref), rows_of(mask), rows_of(scale_B), rows_of(advantages)
        keep_bU = None
        if off_policy_threshold is not None:  # the rows' old log-probs are the sampling ones
            keep_bU = off_policy_keep(adv_b, logps_bU, old_bU, mask_bU, off_policy_threshold).expand_as(logps_bU)
            keep_bU = keep_bU.contiguous()
        loss_b, grad_bU, slope_b, kl_b, low_b, high_b = policy_rows(
            logps_bU, old_bU, adv_b, mask_bU, scale_b, keep_bU, None if ratio_kl else ref_bU,
            0.0 if ratio_kl else beta, epsilon_low, epsilon_high, delta, sequence, kl_estimator, objective,
            objective_params,
        )
        loss.add_(loss_b.sum())
        kl_B[first:end], low_B[first:end], high_B[first:end] = kl_b, low_b, high_b
        if sequence:  # the row's slope reaches each of its units through the mean log-ratio
            grad_bU = grad_bU + torch.where(mask_bU > 0, slope_b.unsqueeze(1), 0.0)
        if ratio_kl:
            loss_k, grad_k, kl_B[first:end] = ratio_kl_rows(logps_bU, old_bU, ref_bU, mask_bU, scale_b, beta,
                                                            sequence, kl_estimator)
            loss.add_(loss_k)
            grad_bU = grad_bU + grad_k
        grad_entropy_C = None
        if bonus_grad is not None:
            loss.add_(bonus_grad * chunk.entropy.sum())
            grad_entropy_C = bonus_grad.expand(chunk.entropy.shape)
        local_C = index_C - first * num_cols
        if sum_tokens:
            return (grad_bU[:, 0].index_select(0, torch.div(local_C, num_cols, rounding_mode="floor")),
                    grad_entropy_C)
        return grad_bU.reshape(-1).index_select(0, local_C), grad_entropy_C

    out = head.fused_head(hidden_KH, weight, bias, labels_K, layout.group_ends, loss_fn,
                          inv_temperature=inv_temperature, ignore_index=-100, with_entropy=with_entropy,
                          with_stats=False, needs_input_grad=needs_input_grad, rows=rows, softcap=softcap)
    grad_hidden = hidden.new_empty(0)
    if out.grad_hidden_KH is not None:
        grad_hidden = hidden.new_zeros(num_rows * num_cols, hidden.shape[-1]).index_copy_(
            0, layout.index_K, out.grad_hidden_KH).view(hidden.shape)
    return (
        loss, token_logps_BT, head.scatter_rows(out.entropy_K, layout.index_K, labels.shape), kl_B, low_B, high_B,
        grad_hidden, hidden.new_empty(0) if out.grad_weight_VH is None else out.grad_weight_VH.to(weight.dtype),
        hidden.new_empty(0) if out.grad_bias_V is None else out.grad_bias_V.to(bias.dtype),
    )


def linear_policy_rows_compiled(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    old: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor, scale_B: torch.Tensor,
    ref: torch.Tensor | None, beta: float, epsilon_low: float, epsilon_high: float, delta: float, sequence: bool,
    kl_estimator: str, ratio_kl: bool, sum_tokens: bool, inv_temperature: float, softcap: float, with_entropy: bool,
    needs_input_grad: list[bool], loss_backend: str, objective: str, objective_params: list[float],
    entropy_coef: torch.Tensor | None, off_policy_threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """The compiled backend of ``fusedrl::linear_policy_loss_rows`` (its signature is the schema): ``(loss,
    logprobs [B, T], entropy [B, T], kl_B, low_B, high_B)`` as ``compiled.policy_rows`` names them, then the
    gradients of hidden, weight and bias (empty where not asked). hidden ``[B, T, H]``; labels ``[B, T]`` (-100 off
    the completion); old, mask, ref ``[B, U]`` (old None: on-policy, ratio 1); advantages ``[B]`` or ``[B, U]``;
    scale_B ``[B]`` (:func:`row_scale`); all fp32. ``ratio_kl``: the KL term is TRL's ratio-weighted one
    (:func:`ratio_kl_rows`) and ``kl_B`` its sums. ``objective`` / ``objective_params``: as
    ``compiled.policy_rows``. ``softcap``: the head's soft cap, 0 for none. ``entropy_coef``: a 0-d tensor adds the
    entropy bonus (needs ``with_entropy``), None none. ``off_policy_threshold``: TRL's off-policy sequence mask
    (``reference.off_policy_keep``), None none."""
    from fusedrl.ops.logprobs import compiled as rows

    return _run(head.RowFunctions(rows.rows_fwd, rows.rows_bwd, rows.rows_stats), hidden, weight, bias, labels, old,
                advantages, mask, scale_B, ref, beta, epsilon_low, epsilon_high, delta, sequence, kl_estimator,
                ratio_kl, sum_tokens, inv_temperature, softcap, with_entropy, needs_input_grad, loss_backend,
                objective, objective_params, entropy_coef, off_policy_threshold)


def linear_policy_rows_triton(*args):
    """The Triton backend: :func:`linear_policy_rows_compiled` on the Triton row kernels."""
    rows = importlib.import_module("fusedrl.ops.logprobs.triton")
    return _run(head.RowFunctions(rows.rows_fwd, rows.rows_bwd, rows.rows_stats), *args)


def _fake(hidden, weight, bias, labels, old, advantages, mask, scale_B, ref, beta, epsilon_low, epsilon_high,
          delta, sequence, kl_estimator, ratio_kl, sum_tokens, inv_temperature, softcap, with_entropy,
          needs_input_grad, loss_backend, objective, objective_params, entropy_coef, off_policy_threshold):
    tokens = hidden.new_empty(labels.shape, dtype=torch.float32)
    per_row = hidden.new_empty(labels.shape[:1], dtype=torch.float32)

    def grad_like(needed, tensor):
        return torch.empty_like(tensor) if needed and tensor is not None else hidden.new_empty(0)

    return (hidden.new_empty((), dtype=torch.float32), tokens, torch.empty_like(tokens), per_row,
            torch.empty_like(per_row), torch.empty_like(per_row), grad_like(needs_input_grad[0], hidden),
            grad_like(needs_input_grad[1], weight), grad_like(needs_input_grad[2], bias))


def _backward(ctx, grad_loss, *_unused):
    return head.scaled_head_gradients(ctx, grad_loss, num_inputs=26)  # only hidden, weight and bias have gradients


linear_policy_rows_op = dispatch.define_op(
    "linear_policy_loss_rows", op="linear_logprobs", compiled=linear_policy_rows_compiled,
    triton="fusedrl.ops.policy.fused_head:linear_policy_rows_triton", fake=_fake, backward=_backward,
    setup_context=head.save_head_gradients,
)


def fused_policy_loss(hidden_BTH, weight_VH, bias, labels_BT, mask_BT, old_logps, advantages, *, temperature,
                      softcap, with_entropy, sum_tokens, ratio_kl, head_backend, loss_backend, options) -> tuple:
    """Run the custom op on ``head_backend`` with the loss on ``loss_backend`` (``softcap``: the head's soft cap,
    None for none); ``options``: every keyword of
    ``policy_loss``, defaults filled in. Returns ``LinearPolicyLoss``'s fields in order (``loss, logps_BT,
    entropy_BT, kl, clip_ratio_low, clip_ratio_high, clip_ratio_region, mean_entropy, phi_mean, bonus_entropy_sum,
    bonus_tokens``)."""
    token_mask = mask_BT.float()
    unit_mask = torch.ones_like(token_mask[:, :1]) if sum_tokens else token_mask
    ref, delta = options["ref_logps_BT"], options["delta"]
    sequence = options["importance_sampling_level"] == "sequence"
    objective = OBJECTIVES[options["loss_type"]]
    params = compiled.objective_params(objective, **options)
    coef = options["entropy_coef"]
    bonus_on = isinstance(coef, torch.Tensor) or coef != 0.0

    def detached(t):
        return None if t is None else t.detach().float().contiguous()

    out = linear_policy_rows_op(
        hidden_BTH, weight_VH, bias, labels_BT.long(), detached(old_logps), detached(advantages),
        unit_mask.contiguous(), row_scale(unit_mask, options["loss_type"], options["max_completion_length"],
                                          options["num_items_in_batch"]),
        detached(ref), float(options["beta"]), float(options["epsilon_low"]), float(options["epsilon_high"]),
        float("inf") if delta is None else float(delta), sequence, options["kl_estimator"], ratio_kl, sum_tokens,
        1.0 / temperature, cap_argument(softcap), with_entropy,
        head.needs_gradients(hidden_BTH, weight_VH, bias), loss_backend, objective,
        params, torch.as_tensor(coef, dtype=torch.float32, device=hidden_BTH.device).reshape(()) if bonus_on else None,
        None if options["off_policy_mask_threshold"] is None else float(options["off_policy_mask_threshold"]),
        head_backend,
    )
    loss, logps_BT, entropy_BT, kl_B, low_B, high_B = out[:6]
    kl, low, high, region, _ = row_metrics(unit_mask, kl_B, low_B, high_B, sequence and advantages.dim() == 1,
                                           ref is not None, None)
    mean_entropy = bonus_sum = bonus_tokens = phi = None
    if with_entropy:
        mean_entropy = row_metrics(token_mask, kl_B, low_B, high_B, False, False, entropy_BT)[4]
        _, bonus_sum, bonus_tokens = entropy_bonus(entropy_BT, token_mask, None)
    if objective == "vespo":  # from the units the loss saw: the summed log-probs with sum_tokens (RLOO)
        logps_BU = (logps_BT * token_mask).sum(-1, keepdim=True) if sum_tokens else logps_BT
        phi = phi_mean(logps_BU, logps_BU if old_logps is None else detached(old_logps), unit_mask, advantages,
                       params)
    return loss, logps_BT, entropy_BT, kl, low, high, region, mean_entropy, phi, bonus_sum, bonus_tokens
