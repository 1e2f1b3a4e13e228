"""Public RL loss ops: the GRPO/PPO clipped policy loss on per-token log-probs or on hidden states + LM head, the
KL penalty, GRPO's ratio-weighted KL term and PPO's clipped value loss.

Legend: B sequences (completions), T completion positions, H hidden, V vocabulary.

Backends of the ``policy_loss`` op (``reference.py`` documents every formula, TRL 1.16's):
- ``reference``: ``reference.policy_loss_reference``, fp32 torch autograd;
- ``compiled``: the ``fusedrl::policy_loss_rows`` custom op running ``compiled.policy_rows`` (``torch.compile``);
- ``triton``: the same custom op running ``triton.policy_rows``, one launch with a program per sequence; a kernel
  that fails to build falls back to ``compiled`` (``dispatch.define_op``).
Both custom-op backends compute ``d loss / d logps`` in the forward pass (``[B, T]`` floats, the loss is elementwise
given per-row quantities), so the backward is one multiply. The aggregation (``loss_type``) is folded into a
per-row weight and the top-entropy mask (a quantile over the whole batch) is computed in torch before the launch
(``compiled.high_entropy_keep``: a sort, no data-dependent shapes); the off-policy sequence mask
(``off_policy_mask_threshold``, ``reference.off_policy_keep``) is a per-row pre-pass multiplied into the same ``keep``
(both scale the policy term only). Every ``loss_type`` runs on every backend: the
custom op takes the loss type's objective (``compiled.OBJECTIVES``: clip, cispo, sapo, vespo) and its parameters;
the sequence-level pieces (GSPO's mean log-ratio, VESPO's clamped log-ratio sum) are per-row pre-passes, so no loss
type leaves the per-row weight scheme. The entropy bonus (``entropy_coef``) is a masked mean of ``entropy_BT``: plain
torch beside the custom op on ``compiled`` / ``triton`` (its gradient goes to the entropies, not the log-probs), and
folded into the fused head's entropy gradient on the fused path (``fused_head.py``). The custom op captures as one
opaque node under ``torch.compile(fullgraph=True)``. Old and reference log-probs and advantages are constants: no
gradient.
Why a custom op rather than ``torch.compile`` of the reference with compiled autograd: it is the same autograd
node as the Triton backend, and it saves one ``[B, T]`` gradient instead of the intermediates of an autograd graph.
Its cost is not the point either way: measured on the 2-core CPU (1 thread, B=16, T=1024, grpo + k3 KL, loaded
machine) one forward+backward took 0.66 ms vs 0.41 ms for the compiled reference and 1.02 ms eager, against
seconds for the LM head that produces the log-probs at V=32000.
``ratio_weighted_kl`` aggregates on the selected backend's aggregation (``reference.aggregate`` or the per-row
weights of the custom op), so the term matches the loss it is added to. ``value_loss`` and ``kl_penalty`` are a
few elementwise ops with one implementation on every backend: plain torch, traced by any caller's compile.
Benchmarks: ``benchmarks/ops/policy.py``.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from fusedrl.ops import dispatch
from fusedrl.ops.logprobs import checked_head, linear_token_logprobs
from fusedrl.ops.policy import compiled, fused_head, reference
from fusedrl.ops.policy.checks import (
    check_entropy_coef,
    check_policy_request,
    check_ratio_kl_request,
    check_value_request,
)
from fusedrl.ops.policy.fused_head import row_metrics as _row_metrics
from fusedrl.ops.policy.fused_head import row_scale as _row_scale

dispatch.register_op("policy_loss", "GRPO/PPO clipped policy loss (+ KL) on per-token log-probs")

# Public for trainers: the objective each loss_type's per-token term uses (its metrics follow it), TRL's off-policy
# sequence mask (GRPOTrainer.get_off_policy_mask), which the ops apply themselves, and the top-entropy threshold over
# gathered entropies (a trainer on several processes hands it back as entropy_threshold).
LOSS_TYPE_OBJECTIVES = reference.OBJECTIVES
off_policy_keep = reference.off_policy_keep
entropy_quantile = reference.entropy_quantile


class PolicyLoss(NamedTuple):
    """``loss``: fp32 scalar, differentiable w.r.t. ``logps_BT`` (and ``entropy_BT`` with an entropy bonus). Metrics
    (TRL's logged names without the ``clip_ratio/`` prefix), detached fp32 scalars: ``kl`` (None without
    ``ref_logps_BT``), the clip ratios (``cispo``: its one clip share as ``clip_ratio_high``; ``sapo``, ``vespo``:
    0), ``entropy`` (masked token mean, None without ``entropy_BT``), ``phi_mean`` (``vespo`` only: TRL's
    ``vespo/phi_seq_mean``), and ``bonus_entropy_sum`` / ``bonus_tokens`` (None without ``entropy_BT``): the entropy
    summed over the tokens the bonus acts on and their count (TRL's adaptive entropy controller's window sums)."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor
    entropy: torch.Tensor | None
    phi_mean: torch.Tensor | None = None
    bonus_entropy_sum: torch.Tensor | None = None
    bonus_tokens: torch.Tensor | None = None


class LinearPolicyLoss(NamedTuple):
    """:class:`PolicyLoss` from hidden states, plus the per-token ``logps`` ``[B, T]`` (differentiable; detach for
    logging or as the next iteration's old log-probs) and ``entropy`` ``[B, T]`` (detached; zeros with
    ``compute_entropy=False``); ``mean_entropy`` is the masked token mean (PolicyLoss's ``entropy`` metric)."""

    loss: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor | None
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor
    mean_entropy: torch.Tensor | None
    phi_mean: torch.Tensor | None = None
    bonus_entropy_sum: torch.Tensor | None = None
    bonus_tokens: torch.Tensor | None = None


class RatioWeightedKL(NamedTuple):
    """``loss``: fp32 scalar, the aggregated ratio-weighted KL (differentiable w.r.t. ``logps_BT``; the caller
    multiplies it by beta); ``kl``: its detached masked token mean (the metric TRL logs as ``kl``)."""

    loss: torch.Tensor
    kl: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# The per-row custom op (compiled and triton backends)


def _fake_rows(logps, old, advantages, mask, row_scale, *options):
    rows = logps.new_empty(logps.shape[:1])
    return rows, torch.empty_like(logps), *(torch.empty_like(rows) for _ in range(4))


def _rows_setup(ctx, inputs, output):
    _, grad_BT, slope_B, kl_B, low_B, high_B = output
    ctx.mark_non_differentiable(grad_BT, slope_B, kl_B, low_B, high_B)
    ctx.sequence = inputs[11]
    ctx.save_for_backward(grad_BT, slope_B, inputs[3])


def _rows_backward(ctx, grad_loss_B, *_unused):
    grad_BT, slope_B, mask = ctx.saved_tensors
    # Each row's loss depends on that row's log-probs only, so the backward is elementwise: the saved per-token
    # gradient, plus at sequence level the row's slope on each of its tokens (through the mean log-ratio).
    grad = grad_loss_B.unsqueeze(1) * grad_BT
    if ctx.sequence:
        grad = grad + torch.where(mask > 0, (grad_loss_B * slope_B).unsqueeze(1), 0.0)
    return (grad, *([None] * 14))  # only logps (the first of compiled.policy_rows' 15 inputs) has a gradient


# Both implementations are named, not bound: looked up per call, so a patched module attribute is what runs.
_policy_rows_op = dispatch.define_op(
    "policy_loss_rows", op="policy_loss", compiled="fusedrl.ops.policy.compiled:policy_rows",
    triton="fusedrl.ops.policy.triton:policy_rows", fake=_fake_rows, backward=_rows_backward,
    setup_context=_rows_setup,
)


# ---------------------------------------------------------------------------------------------------------------
# per-token log-probs -> loss


def policy_loss(
    logps_BT: torch.Tensor,
    old_logps_BT: torch.Tensor | None,
    advantages: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    ref_logps_BT: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    entropy_BT: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    entropy_threshold: torch.Tensor | float | None = None,
    entropy_coef: float | torch.Tensor = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    off_policy_mask_threshold: float | None = None,
) -> PolicyLoss:
    """TRL 1.16's GRPO loss (``GRPOTrainer._compute_loss``, every ``loss_type``: grpo / bnpo / dr_grpo / dapo /
    cispo / sapo / luspo / vespo; ``reference.py`` gives each formula).

    logps_BT: ``[B, T]`` policy log-probs of the completion tokens (fp32/bf16/fp16, differentiable).
    old_logps_BT: ``[B, T]``, or None for on-policy (``logps.detach()``: ratio 1, TRL with ``num_iterations=1``).
    advantages: ``[B]`` or ``[B, T]``. mask_BT: ``[B, T]`` completion mask (bool/int/float).
    ref_logps_BT: ``[B, T]``, needed when ``beta != 0``; with ``beta = 0`` it only feeds the ``kl`` metric.
    ``epsilon_low``/``epsilon_high``: TRL's ``epsilon``/``epsilon_high`` (``cispo``: ``epsilon_high`` caps the ratio
    itself); ``delta``: dual clip (upper cap of the ratio); ``importance_sampling_level``: "token" or "sequence"
    (GSPO); ``kl_estimator``: "k1"/"k2"/"k3" (TRL: k3); ``max_completion_length``: required for ``dr_grpo``;
    ``num_items_in_batch``: the normaliser of ``dapo``, ``cispo`` and ``vespo`` (the generation batch's token count
    per process and accumulation window; default: this call's tokens); ``entropy_BT`` + ``top_entropy_quantile``
    < 1: keep the policy term of the top-entropy tokens only (``entropy_threshold``: the quantile computed by the
    caller over every process's tokens, as TRL does, instead of over this call's: ``reference.entropy_quantile``); ``entropy_coef`` (float or 0-d tensor): subtract
    ``entropy_coef`` times the mean of ``entropy_BT`` over the tokens the policy term acts on (gradient into
    ``entropy_BT``; needs it); ``sapo_temperature_*`` and ``vespo_*``: TRL's parameters of those loss types;
    ``off_policy_mask_threshold``: drop the policy term of each negative-advantage sequence whose mean
    ``old - logps`` exceeds it (TRL's off-policy sequence mask; ``reference.off_policy_keep``).
    Returns :class:`PolicyLoss`; the loss runs on the ``policy_loss`` backend.
    """
    check_policy_request(
        logps_BT, old_logps_BT, advantages, mask_BT, ref_logps_BT=ref_logps_BT, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, delta=delta, importance_sampling_level=importance_sampling_level,
        kl_estimator=kl_estimator, loss_type=loss_type, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, entropy_BT=entropy_BT, top_entropy_quantile=top_entropy_quantile,
        entropy_coef=entropy_coef, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, off_policy_mask_threshold=off_policy_mask_threshold,
        entropy_threshold=entropy_threshold,
    )
    type_params = {"sapo_temperature_pos": sapo_temperature_pos, "sapo_temperature_neg": sapo_temperature_neg,
                   "vespo_k_pos": vespo_k_pos, "vespo_lambda_pos": vespo_lambda_pos, "vespo_k_neg": vespo_k_neg,
                   "vespo_lambda_neg": vespo_lambda_neg}
    backend = dispatch.traced_backend("policy_loss", logps_BT.device)
    if backend == "reference":
        out = reference.policy_loss_reference(
            logps_BT, old_logps_BT, advantages, mask_BT, ref_logps_BT=ref_logps_BT, beta=beta,
            epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
            importance_sampling_level=importance_sampling_level, kl_estimator=kl_estimator, loss_type=loss_type,
            max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
            entropy_BT=entropy_BT, top_entropy_quantile=top_entropy_quantile, entropy_threshold=entropy_threshold,
            entropy_coef=entropy_coef, off_policy_mask_threshold=off_policy_mask_threshold, **type_params,
        )
        return PolicyLoss(out.loss, out.kl, out.clip_ratio_low, out.clip_ratio_high, out.clip_ratio_region,
                          out.entropy, out.phi_mean, out.bonus_entropy_sum, out.bonus_tokens)
    logps = logps_BT.float()
    mask = mask_BT.float()
    sequence = importance_sampling_level == "sequence"
    objective = reference.OBJECTIVES[loss_type]
    params = compiled.objective_params(objective, epsilon_high=epsilon_high, **type_params)
    entropy_keep = None
    if entropy_BT is not None and top_entropy_quantile < 1.0:
        entropy_keep = compiled.high_entropy_keep(entropy_BT.detach().float(), mask, top_entropy_quantile,
                                                  entropy_threshold)
    old = logps.detach() if old_logps_BT is None else old_logps_BT.detach().float()
    ref = None if ref_logps_BT is None else ref_logps_BT.detach().float()
    adv = advantages.detach().float().contiguous()
    keep = entropy_keep
    if off_policy_mask_threshold is not None:  # the bonus's tokens stay the entropy mask's, as TRL's
        off_policy = reference.off_policy_keep(adv, logps, old, mask, off_policy_mask_threshold).expand_as(logps)
        keep = (off_policy if keep is None else keep * off_policy).contiguous()
    loss_B, _, _, kl_B, low_B, high_B = _policy_rows_op(
        logps, old.contiguous(), adv, mask.contiguous(),
        _row_scale(mask, loss_type, max_completion_length, num_items_in_batch), keep,
        None if ref is None else ref.contiguous(), float(beta), float(epsilon_low), float(epsilon_high),
        float("inf") if delta is None else float(delta), sequence, kl_estimator, objective, params, backend,
    )
    loss = loss_B.sum()
    bonus_sum = bonus_tokens = None
    if entropy_BT is not None:
        bonus, bonus_sum, bonus_tokens = reference.entropy_bonus(entropy_BT, mask, entropy_keep)
        if _bonus_on(entropy_coef):
            loss = loss - entropy_coef * bonus
    phi_mean = fused_head.phi_mean(logps.detach(), old, mask, adv, params) if objective == "vespo" else None
    return PolicyLoss(loss, *_row_metrics(mask, kl_B, low_B, high_B, sequence and advantages.dim() == 1,
                                          ref is not None, entropy_BT), phi_mean, bonus_sum, bonus_tokens)


def _bonus_on(entropy_coef) -> bool:
    """Whether the entropy bonus is added: a tensor coefficient always (its value may change between calls of one
    compiled graph), a number when non-zero (so the loss of ``entropy_coef=0`` is bitwise the plain one)."""
    return isinstance(entropy_coef, torch.Tensor) or entropy_coef != 0.0


# ---------------------------------------------------------------------------------------------------------------
# hidden states + LM head -> loss

_POLICY_DEFAULTS = {name: p.default for name, p in inspect.signature(policy_loss).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}


def linear_policy_loss(
    hidden_BTH: torch.Tensor,
    weight_VH: torch.Tensor,
    completion_ids_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    old_logps_BT: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    compute_entropy: bool = True,
    sum_log_probs: bool = False,
    ratio_weighted: bool = False,
    fused: bool = False,
    softcap: float | None = None,
    **loss_options,
) -> LinearPolicyLoss:
    """:func:`policy_loss` straight from the completion positions' last hidden states, never holding
    ``[B, T, V]`` logits: log-probs (and entropies) come from ``linear_token_logprobs(..., with_entropy=True)``.

    hidden_BTH: ``[B, T, H]`` (the states that predict each completion token, already shifted); weight_VH: ``[V, H]``;
    bias: ``[V]`` or None; completion_ids_BT: ``[B, T]`` int64; mask_BT: ``[B, T]``; masked positions get label -100
    and cost no head compute. ``temperature`` divides the logits, as TRL's sampling temperature does; ``softcap``
    caps them before it (``c * tanh(z / c)``, Gemma 2's ``final_logit_softcapping``; None or 0: no cap).
    ``compute_entropy=False`` skips the entropy (then the ``entropy`` metric is None; top-entropy masking and a
    non-zero ``entropy_coef`` compute it anyway). With ``entropy_coef`` the entropy bonus's gradient reaches hidden,
    weight and bias through the entropies (the returned ``entropy`` stays detached).
    ``sum_log_probs``: the loss sees one log-prob per row, the sum over its masked tokens (RLOO's sequence ratio);
    ``old_logps_BT`` is then ``[B, 1]`` (summed likewise) and the loss's mask is ones ``[B, 1]``.
    ``off_policy_mask_threshold`` (a :func:`policy_loss` keyword) needs per-token log-probs (not ``sum_log_probs``).
    ``ratio_weighted``: the ``beta`` KL term is TRL's ratio-weighted one (:func:`ratio_weighted_kl`, GRPO's
    ``use_bias_correction_kl``), and the ``kl`` metric its masked mean; needs ``ref_logps_BT``.
    Every other keyword is :func:`policy_loss`'s (``ref_logps_BT``, ``beta``, ``loss_type``, ...).
    Gradients flow to hidden, weight and bias.

    ``fused=True``: the loss's gradient is formed in the forward (3 head passes instead of 4; ``fused_head.py``, and
    ``fusedrl/ops/logprobs/fused.py`` for the memory it costs) and only ``loss`` is differentiable (``logps`` and
    ``entropy`` come back detached). It runs when the ``linear_logprobs`` and ``policy_loss`` backends are
    ``compiled`` / ``triton`` and ``top_entropy_quantile`` is 1 (the top-entropy mask is a quantile over the whole
    batch); otherwise this computes the unfused path, whose ``loss`` and ``logps`` are differentiable.
    """
    if not isinstance(mask_BT, torch.Tensor) or mask_BT.shape != completion_ids_BT.shape:
        got = tuple(mask_BT.shape) if isinstance(mask_BT, torch.Tensor) else type(mask_BT).__name__
        raise ValueError(f"mask_BT must be a tensor shaped like completion_ids_BT "
                         f"{tuple(getattr(completion_ids_BT, 'shape', ()))}, got {got}")
    entropy_coef = loss_options.get("entropy_coef", 0.0)
    bonus_on = _bonus_on(entropy_coef)
    with_entropy = compute_entropy or loss_options.get("top_entropy_quantile", 1.0) < 1.0 or bonus_on
    ratio_weighted = ratio_weighted and loss_options.get("beta", 0.0) != 0.0
    if ratio_weighted and (sum_log_probs or loss_options.get("ref_logps_BT") is None):
        raise ValueError("ratio_weighted=True weights a per-token KL term: it needs ref_logps_BT and per-token "
                         "log-probs (sum_log_probs=False)")
    if sum_log_probs and loss_options.get("off_policy_mask_threshold") is not None:
        raise ValueError("off_policy_mask_threshold masks sequences by the mean gap of their per-token log-probs: it "
                         "needs sum_log_probs=False (TRL's RLOO has no off-policy mask)")
    labels_BT = completion_ids_BT.masked_fill(~mask_BT.bool(), -100)
    if fused and loss_options.get("top_entropy_quantile", 1.0) >= 1.0:
        head_backend = dispatch.traced_backend("linear_logprobs", hidden_BTH.device)
        loss_backend = dispatch.traced_backend("policy_loss", hidden_BTH.device)
        if "reference" not in (head_backend, loss_backend):
            hidden_BTH, weight_VH, bias = checked_head(hidden_BTH, weight_VH, bias, labels_BT,
                                                       temperature=temperature, ignore_index=-100, softcap=softcap)
            # policy_loss's checks (and error messages) on a placeholder of the log-probs the head would give.
            placeholder = hidden_BTH.new_zeros(labels_BT.shape[0], 1 if sum_log_probs else labels_BT.shape[1],
                                               dtype=torch.float32)
            # The entropies are the head's (per token, also when the loss sees summed log-probs): the coefficient is
            # checked on its own.
            check_entropy_coef(entropy_coef)
            check_policy_request(placeholder, old_logps_BT, advantages,
                                 torch.ones_like(placeholder) if sum_log_probs else mask_BT,
                                 **{**_POLICY_DEFAULTS, **loss_options, "entropy_BT": None, "entropy_coef": 0.0})
            return LinearPolicyLoss(*fused_head.fused_policy_loss(
                hidden_BTH, weight_VH, bias, labels_BT, mask_BT, old_logps_BT, advantages, temperature=temperature,
                softcap=softcap, with_entropy=with_entropy, sum_tokens=sum_log_probs, ratio_kl=ratio_weighted,
                head_backend=head_backend, loss_backend=loss_backend, options={**_POLICY_DEFAULTS, **loss_options}))
    out = linear_token_logprobs(hidden_BTH, weight_VH, labels_BT, bias=bias, temperature=temperature,
                                with_entropy=with_entropy, softcap=softcap)
    # Without a bonus the entropy only selects tokens and feeds a metric: no gradient flows through it.
    logps_BT, entropy_BT = (out.logprobs, out.entropy if bonus_on else out.entropy.detach()) if with_entropy \
        else (out, None)
    if sum_log_probs:
        logps_B1 = (logps_BT * mask_BT).sum(-1, keepdim=True)
        out = policy_loss(logps_B1, old_logps_BT, advantages, torch.ones_like(logps_B1),
                          **{**loss_options, "entropy_coef": 0.0})
        if entropy_BT is not None:  # the token mean over the mask, as policy_loss's entropy metric
            check_entropy_coef(entropy_coef)
            bonus, bonus_sum, bonus_tokens = reference.entropy_bonus(entropy_BT, mask_BT, None)
            out = out._replace(entropy=bonus.detach(), bonus_entropy_sum=bonus_sum, bonus_tokens=bonus_tokens)
            if bonus_on:
                out = out._replace(loss=out.loss - entropy_coef * bonus)
    elif ratio_weighted:
        beta = loss_options.get("beta", 0.0)
        out = policy_loss(logps_BT, old_logps_BT, advantages, mask_BT, entropy_BT=entropy_BT,
                          **{**loss_options, "beta": 0.0})
        kl = ratio_weighted_kl(logps_BT, old_logps_BT, loss_options["ref_logps_BT"], mask_BT, **{
            key: loss_options[key] for key in ("importance_sampling_level", "kl_estimator", "loss_type",
                                               "max_completion_length", "num_items_in_batch") if key in loss_options})
        out = out._replace(loss=out.loss + beta * kl.loss, kl=kl.kl)  # TRL logs the ratio-weighted KL as `kl`
    else:
        out = policy_loss(logps_BT, old_logps_BT, advantages, mask_BT, entropy_BT=entropy_BT, **loss_options)
    entropy = torch.zeros_like(logps_BT.detach()) if entropy_BT is None else entropy_BT.detach()
    return LinearPolicyLoss(out.loss, logps_BT, entropy, out.kl, out.clip_ratio_low, out.clip_ratio_high,
                            out.clip_ratio_region, out.entropy, out.phi_mean, out.bonus_entropy_sum,
                            out.bonus_tokens)


# ---------------------------------------------------------------------------------------------------------------
# KL terms and value loss


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate of ``pi || pi_ref`` from the sampled tokens' log-probs (any equal shapes; fp32 out):
    ``k1 = d``, ``k2 = d^2 / 2``, ``k3 = exp(-d) + d - 1`` with ``d = logps - ref_logps``. Differentiable."""
    if estimator not in reference.KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(reference.KL_ESTIMATORS)}, got {estimator!r}")
    for name, tensor in (("logps", logps), ("ref_logps", ref_logps)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if logps.shape != ref_logps.shape:
        raise ValueError(f"ref_logps must have the shape of logps {tuple(logps.shape)}, got {tuple(ref_logps.shape)}")
    return reference.kl_penalty_reference(logps, ref_logps, estimator)


def ratio_weighted_kl(
    logps_BT: torch.Tensor,
    old_logps_BT: torch.Tensor | None,
    ref_logps_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> RatioWeightedKL:
    """TRL 1.16's KL term with ``use_bias_correction_kl=True`` (DeepSeek-V3.2's unbiased reverse-KL gradient): the
    per-token KL estimate times the importance ratio ``r``, aggregated as ``loss_type``. GRPO adds ``beta * loss``
    to a :func:`policy_loss` run with ``beta=0`` (whose own ``kl`` metric is then replaced by this one's).

    logps_BT, ref_logps_BT: ``[B, T]``; old_logps_BT: ``[B, T]`` or None (on-policy: ``r = 1``, its gradient still
    flows); mask_BT: ``[B, T]`` completion mask. ``r = exp(logps - old)`` per token, or at
    ``importance_sampling_level="sequence"`` the exponential of the row's masked mean log-ratio. Differentiable
    through ``logps_BT`` in both factors. The other options are :func:`policy_loss`'s. The aggregation is the
    ``policy_loss`` backend's: ``reference.aggregate`` on ``reference``, the custom op's per-row weights on
    ``compiled`` / ``triton`` (padding then contributes exactly 0, as in the kernels).
    Example (one row, mask [1, 1], old = ref = 0, logps = [ln 2, 0], dapo): k3 terms ``[ln 2 - 0.5, 0]``, ratios
    ``[2, 1]`` -> loss ``(2 ln 2 - 1) / 2 = 0.1931``, kl metric the same.
    """
    check_ratio_kl_request(
        logps_BT, old_logps_BT, ref_logps_BT, mask_BT, importance_sampling_level=importance_sampling_level,
        kl_estimator=kl_estimator, loss_type=loss_type, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    mask = mask_BT.float()
    log_ratio = logps_BT - (logps_BT.detach() if old_logps_BT is None else old_logps_BT)
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    per_token_kl = kl_penalty(logps_BT, ref_logps_BT, kl_estimator) * log_ratio.exp()
    if dispatch.traced_backend("policy_loss", logps_BT.device) == "reference":
        loss = reference.aggregate(per_token_kl, mask, loss_type, max_completion_length=max_completion_length,
                                   num_items_in_batch=num_items_in_batch)
    else:
        row_scale_B = _row_scale(mask, loss_type, max_completion_length, num_items_in_batch)
        loss = torch.where(mask > 0, per_token_kl * row_scale_B.unsqueeze(1), 0.0).sum()
    kl = (per_token_kl.detach() * mask_BT).sum() / mask_BT.sum().clamp(min=1)
    return RatioWeightedKL(loss, kl)


def value_loss(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
               mask_BT: torch.Tensor, *, clip_range_value: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss as TRL's ``PPOTrainer`` (``cliprange_value``): fp32 scalar
    ``0.5 * masked mean of max((v - R)^2, (v_clip - R)^2)``, ``v_clip = old + clamp(v - old, +-clip_range_value)``.
    All inputs ``[B, T]``; differentiable w.r.t. ``values_BT``."""
    check_value_request(values_BT, old_values_BT, returns_BT, mask_BT, clip_range_value)
    return reference.value_loss_reference(values_BT, old_values_BT, returns_BT, mask_BT, clip_range_value=clip_range_value)
