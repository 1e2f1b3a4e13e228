"""Public preference-loss ops (DPO family, CPO family) on sequence log-probs or on hidden states + LM head.

Legend: B pairs, T next-token positions, H hidden, V vocabulary; ``2B`` rows are laid out ``[chosen; rejected]``.

Backends of the ``preference`` op, for every loss type that is separable per pair (each pair's loss depends on that
pair only: DPO ``sigmoid hinge ipo exo_pair robust discopop nca_pair bco_pair sppo_hard apo_zero apo_down
sigmoid_norm``, any f-divergence they allow, and CPO ``sigmoid hinge ipo simpo``, AlphaPO included):
- ``reference``: ``kernels.preference.dpo_losses`` / ``cpo_losses``, plain torch autograd;
- ``compiled``: the ``fusedrl::pair_preference_losses`` custom op running ``torch.compile`` of ``pairwise.py``;
- ``triton``: the same custom op running ``triton_loss.py``: loss, rewards and gradient in one launch.
Both custom-op backends compute the gradient in the forward pass (it is ``[B]`` floats), so the backward is a
multiply. The batch-coupled types (``aot``, ``aot_unpaired`` sort over the batch; ``sft`` is one batch mean) and
multi-type lists (MPO) run ``torch.compile`` of ``dpo_losses`` with compiled autograd; a ``triton`` request for
them takes that path and logs it once. So do losses registered with ``fusedrl.register_preference_loss``
(``ops/preference/registry.py``): Python functions have no Triton kernel; ``compiled`` traces them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fusedrl.ops import dispatch as registry
from fusedrl.ops.compiler import compile_kernel
from fusedrl.ops.logprobs import linear_token_logprobs
from fusedrl.ops.preference import registry as preference_registry
from fusedrl.ops.preference.checks import check_linear_request, check_preference_request
from fusedrl.ops.preference.compiled import PairInputs, PairParams, pair_losses
from fusedrl.ops.preference.reference import cpo_losses, dpo_losses, sequence_logps, token_mean_nll

logger = logging.getLogger("fusedrl")

registry.register_op("preference", "per-pair preference loss (DPO/CPO families) on sequence log-probs")

# loss_type -> pairwise formula, per family; types absent here are batch-coupled.
_PAIR_FORMULAS = {
    "dpo": {"sigmoid": "logistic", "sigmoid_norm": "logistic", "hinge": "hinge", "ipo": "square",
            **{name: name for name in ("exo_pair", "robust", "discopop", "nca_pair", "bco_pair", "sppo_hard",
                                       "apo_zero", "apo_down")}},
    "cpo": {"sigmoid": "logistic", "simpo": "logistic", "hinge": "hinge", "ipo": "square"},
}
_LENGTH_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})
_logged_routes: set[str] = set()


class PreferenceLoss(NamedTuple):
    """``loss``: fp32 scalar to backpropagate (TRL's loss); ``losses``: fp32 ``[B]`` per pair (weighted sum over
    loss types, ``loss = losses.mean()`` plus CPO's ``cpo_alpha * chosen_nll``); rewards: fp32 ``[B]``, detached."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


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


@torch.compiler.assume_constant_result
def _resolve(device: torch.device, request: str) -> str:
    # Constant while tracing (the selection reads context variables and the environment); the log call stays out
    # of the traced code. `request` is the loss-type list for a batch-coupled request, "" for a separable one.
    backend = registry.resolve("preference", device)
    if backend == "triton" and request:
        if request not in _logged_routes:
            _logged_routes.add(request)
            if preference_registry.is_registered(request.split(",")):
                logger.warning("fusedrl: preference loss_type=%s includes registered Python losses, which have no "
                               "Triton kernel; it runs on the compiled backend", request)
            else:
                logger.warning(
                    "fusedrl: preference loss_type=%s couples the pairs of a batch (sorting, batch means or several "
                    "types), which the per-pair Triton kernel cannot fuse; it runs on the compiled backend", request)
        return "compiled"
    return backend


# ---------------------------------------------------------------------------------------------------------------
# The per-pair custom op (compiled and triton backends)


@torch.library.custom_op("fusedrl::pair_preference_losses", mutates_args=())
def _pair_losses_op(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
    chosen_scale: torch.Tensor | None, rejected_scale: torch.Tensor | None, pair_weights: torch.Tensor | None,
    formula: str, score: str, beta: float, label_smoothing: float, discopop_tau: float, margin: float,
    score_alpha: float, loss_weight: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = PairInputs(chosen, rejected, ref_chosen, ref_rejected, chosen_scale, rejected_scale, pair_weights)
    p = PairParams(score, beta, label_smoothing, discopop_tau, margin, score_alpha, loss_weight)
    if backend == "compiled":
        return _compiled_pair_losses(x, p, formula)
    if backend == "triton":
        # Imported on first use: triton.jit reads TRITON_INTERPRET when the module is imported.
        from fusedrl.ops.preference import triton as triton_loss

        # A kernel that fails to build at run time falls back to the compiled stages (registry.run_with_fallback).
        return tuple(registry.run_with_fallback("preference", triton_loss.pair_losses, _compiled_pair_losses,
                                                x, p, formula))
    raise ValueError(f"backend {backend!r} has no pair kernels; choose compiled or triton")


def _compiled_pair_losses(x: PairInputs, p: PairParams, formula: str) -> tuple[torch.Tensor, ...]:
    # The gradient is analytic, so the stages need no autograd: detached inputs under no_grad give them one grad
    # mode and one requires_grad pattern, both of which Dynamo guards on (each variant would compile again).
    with torch.no_grad():
        x = PairInputs(*(None if t is None else t.detach() for t in x))
        return tuple(pair_losses(x, p, formula, compile_fn=compile_kernel))


@_pair_losses_op.register_fake
def _(chosen, rejected, ref_chosen, ref_rejected, chosen_scale, rejected_scale, pair_weights, *args):
    return tuple(torch.empty_like(chosen) for _ in range(5))


def _pair_setup(ctx, inputs, output):
    _, chosen_rewards, rejected_rewards, grad_chosen, grad_rejected = output
    ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, grad_chosen, grad_rejected)
    ctx.save_for_backward(grad_chosen, grad_rejected)


def _pair_backward(ctx, grad_losses, *_unused):
    grad_chosen, grad_rejected = ctx.saved_tensors
    g_chosen, g_rejected = grad_losses * grad_chosen, grad_losses * grad_rejected
    needs = ctx.needs_input_grad
    # The reference log-probs enter only as chosen - ref_chosen: their gradient is the negative.
    return (g_chosen, g_rejected, -g_chosen if needs[2] else None, -g_rejected if needs[3] else None,
            *([None] * 12))


_pair_losses_op.register_autograd(_pair_backward, setup_context=_pair_setup)


# ---------------------------------------------------------------------------------------------------------------
# sequence log-probs -> loss


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _pair_call(formula, loss_types, family, backend, chosen, rejected, ref_chosen, ref_rejected, *, beta,
               label_smoothing, loss_weights, f_divergence_type, f_alpha_divergence_coef, discopop_tau,
               chosen_lengths, rejected_lengths, pair_weights, simpo_gamma, alpha):
    (loss_type,) = loss_types
    if family == "cpo":
        score, score_alpha = ("alphapo", alpha) if alpha != 0.0 else ("reverse_kl", 0.0)
    elif f_divergence_type == "alpha_divergence" and abs(f_alpha_divergence_coef - 1.0) < 1e-6:
        score, score_alpha = "reverse_kl", 0.0  # the a -> 1 limit, as dpo.f_divergence_scores
    else:
        score, score_alpha = f_divergence_type, f_alpha_divergence_coef
    scaled = family == "dpo" and loss_type in _LENGTH_LOSS_TYPES
    return _pair_losses_op(
        chosen.float(), rejected.float(), _float(ref_chosen), _float(ref_rejected),
        1.0 / chosen_lengths.float().clamp(min=1.0) if scaled else None,
        1.0 / rejected_lengths.float().clamp(min=1.0) if scaled else None,
        None if pair_weights is None else pair_weights.detach().float(),
        formula, score, float(beta),
        # TRL's DPO "sigmoid" / "sigmoid_norm" take no label smoothing (its cDPO is "robust").
        0.0 if family == "dpo" and formula == "logistic" else float(label_smoothing),
        float(discopop_tau), float(simpo_gamma) if loss_type == "simpo" else 0.0, float(score_alpha),
        1.0 if loss_weights is None else float(loss_weights[0]), backend,
    )[:3]


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    family: str = "dpo",
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    reference_free: bool = False,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
) -> PreferenceLoss:
    """TRL 1.16's DPO (``family="dpo"``) or CPO/SimPO/AlphaPO (``family="cpo"``) loss on sequence log-probs.

    chosen_logps, rejected_logps: ``[B]`` policy log-probs (fp32/bf16/fp16, differentiable).
    ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs; required for DPO unless ``reference_free``,
        not accepted for CPO (it has no reference model). Gradients flow to them too if they require it.
    Keywords carry ``DPOConfig`` / ``CPOConfig`` names and defaults (``ops/preference/reference/dpo.py`` and ``cpo.py``
    document each): ``loss_type`` (a list with ``loss_weights`` for MPO, DPO only), ``chosen_lengths`` /
    ``rejected_lengths`` ``[B]`` for ``ipo`` / ``sigmoid_norm``, ``chosen_nll`` (scalar) for DPO ``sft`` and CPO's
    ``cpo_alpha`` term, ``pair_weights`` ``[B]`` WPO weights (detached). DPO ``loss_type`` also takes names
    registered with :func:`fusedrl.register_preference_loss`. Returns :class:`PreferenceLoss`.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    check_preference_request(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, family=family, loss_types=loss_types,
        loss_weights=loss_weights, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, chosen_nll=chosen_nll,
        pair_weights=pair_weights, reference_free=reference_free, cpo_alpha=cpo_alpha,
    )
    if reference_free:
        ref_chosen_logps = ref_rejected_logps = None
    formula = _PAIR_FORMULAS[family].get(loss_types[0]) if len(loss_types) == 1 else None
    backend = _resolve(chosen_logps.device, "" if formula else ",".join(loss_types))
    if backend == "reference" and family == "cpo":
        out = cpo_losses(chosen_logps, rejected_logps, loss_type=loss_types[0], beta=beta,
                         label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, alpha=alpha, cpo_alpha=0.0)
        losses, chosen_rewards, rejected_rewards = out.losses, out.chosen_rewards, out.rejected_rewards
    elif backend == "reference" or formula is None:
        # Inside a caller's torch.compile region the reference is traced into that graph: compiling it again there
        # would only nest a second compile.
        plain = backend == "reference" or torch.compiler.is_compiling()
        fn = (preference_registry.dpo_losses_with_registered if preference_registry.is_registered(loss_types)
              else dpo_losses)
        dpo = fn if plain else compile_kernel(fn)
        out = dpo(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type=loss_types, beta=beta,
            loss_weights=loss_weights, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, chosen_nll=chosen_nll, pair_weights=pair_weights,
            reference_free=reference_free,
        )
        losses, chosen_rewards, rejected_rewards = out.losses, out.chosen_rewards, out.rejected_rewards
    else:
        losses, chosen_rewards, rejected_rewards = _pair_call(
            formula, loss_types, family, backend, chosen_logps, rejected_logps, ref_chosen_logps,
            ref_rejected_logps, beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            pair_weights=pair_weights, simpo_gamma=simpo_gamma, alpha=alpha,
        )
    loss = losses.mean()
    if family == "cpo" and cpo_alpha != 0.0:
        loss = loss + cpo_alpha * chosen_nll.float().reshape(())
    return PreferenceLoss(loss, losses, chosen_rewards.detach(), rejected_rewards.detach())


# ---------------------------------------------------------------------------------------------------------------
# hidden states + LM head -> loss


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
