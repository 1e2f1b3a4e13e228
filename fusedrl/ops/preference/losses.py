"""The public functions of the ``preference`` op on sequence log-probs: DPO / CPO (``preference_loss``), ORPO
(``orpo_loss``) and KTO (``kto_loss``, ``kto_kl``).

Legend: B pairs, N unpaired examples, M mismatched (KL) examples.

Each resolves the ``preference`` backend (``dispatch.traced_backend``) and runs:
- ``reference``: the fp32 reference of ``reference/`` (plain torch autograd);
- ``compiled`` / ``triton``: a custom op of ``fused.py`` for the requests that are separable per pair or per example;
  the others (DPO ``aot``, ``aot_unpaired``, ``sft``, MPO lists, registered losses; KTO's KL estimate) run
  ``compiled.traced_reference`` (``torch.compile`` of the reference) on both, and a ``triton`` selection logs why.
The references and the compiled / Triton entry points are looked up in their modules at each call, never bound at
import, so what runs is what the module holds (the trainers' tests count the calls of each backend that way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fusedrl.ops import dispatch
from fusedrl.ops.preference import compiled, fused, registry
from fusedrl.ops.preference.checks import (
    check_kl_request,
    check_kto_request,
    check_orpo_request,
    check_preference_request,
)
from fusedrl.ops.preference.reference import cpo as cpo_reference
from fusedrl.ops.preference.reference import dpo as dpo_reference
from fusedrl.ops.preference.reference import kto as kto_reference
from fusedrl.ops.preference.reference import orpo as orpo_reference

# loss_type -> pairwise formula of compiled.FORMULAS, per family; types absent here couple the batch.
_PAIR_FORMULAS = {
    "dpo": {"sigmoid": "logistic", "sigmoid_norm": "logistic", "hinge": "hinge", "ipo": "square",
            **{name: name for name in ("exo_pair", "robust", "discopop", "nca_pair", "bco_pair", "sppo_hard",
                                       "apo_zero", "apo_down")}},
    "cpo": {"sigmoid": "logistic", "simpo": "logistic", "hinge": "hinge", "ipo": "square"},
}
_LENGTH_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})
_KL_NOT_FUSED = "KTO's KL estimate is a batch mean, which the per-example Triton kernel cannot fuse"


class PreferenceLoss(NamedTuple):
    """``loss``: fp32 scalar to backpropagate (TRL's loss); ``losses``: fp32 ``[B]`` per pair (weighted sum over
    loss types, ``loss = losses.mean()`` plus CPO's ``cpo_alpha * chosen_nll``); rewards: fp32 ``[B]``, detached."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class ORPOLoss(NamedTuple):
    """``loss``: fp32 scalar, ``chosen_nll + losses.mean()``; ``losses``: fp32 ``[B]`` odds-ratio terms
    ``-beta * logsig(log_odds)``; rewards ``[B]``: ``beta * mean logp``; ``log_odds_ratio`` ``[B]``:
    ``logsig(log_odds)``; ``log_odds_chosen`` ``[B]``: ``log_odds`` (TRL's metric names for their batch means).
    All but ``loss`` and ``losses`` are detached."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    log_odds_ratio: torch.Tensor
    log_odds_chosen: torch.Tensor


class KTOLoss(NamedTuple):
    """``loss``: fp32 scalar, ``losses.nanmean()`` (TRL's reduction: a NaN example does not poison the batch);
    ``losses`` ``[N]`` weighted, in input order; ``rewards`` ``[N]``: ``beta * (logp - ref)``, detached; ``kl``: the
    detached clamped scalar estimate that entered the loss (0 for ``apo_zero_unpaired``)."""

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _coupled_reason(loss_types: list[str]) -> str:
    request = ",".join(loss_types)
    if registry.is_registered(loss_types):
        return f"loss_type={request} includes registered Python losses, which have no Triton kernel"
    return (f"loss_type={request} couples the pairs of a batch (sorting, batch means or several types), which the "
            "per-pair Triton kernel cannot fuse")


class PairRequest(NamedTuple):
    """One per-pair loss type as the arguments of the ``fusedrl::pair_preference_losses`` custom op
    (``compiled.pair_preference_losses`` after its tensors); ``length_scaled``: the scores are divided by the
    completion lengths (DPO ``ipo`` / ``sigmoid_norm``)."""

    formula: str
    score: str
    beta: float
    label_smoothing: float
    discopop_tau: float
    margin: float
    score_alpha: float
    loss_weight: float
    length_scaled: bool


def pair_request(loss_type: str, family: str, *, beta: float, label_smoothing: float, loss_weight: float,
                 f_divergence_type: str, f_alpha_divergence_coef: float, discopop_tau: float, simpo_gamma: float,
                 alpha: float) -> PairRequest | None:
    """The per-pair custom op's arguments for ``loss_type`` of ``family`` ("dpo" / "cpo"), or None when that type
    is not separable per pair (``aot``, ``sft``, registered losses)."""
    formula = _PAIR_FORMULAS[family].get(loss_type)
    if formula is None:
        return None
    if family == "cpo":
        score, score_alpha = ("alphapo", alpha) if alpha != 0.0 else ("reverse_kl", 0.0)
    elif f_divergence_type == "alpha_divergence" and abs(f_alpha_divergence_coef - 1.0) < 1e-6:
        score, score_alpha = "reverse_kl", 0.0  # the a -> 1 limit, as reference.dpo.f_divergence_scores
    else:
        score, score_alpha = f_divergence_type, f_alpha_divergence_coef
    return PairRequest(
        formula, score, float(beta),
        # TRL's DPO "sigmoid" / "sigmoid_norm" take no label smoothing (its cDPO is "robust").
        0.0 if family == "dpo" and formula == "logistic" else float(label_smoothing),
        float(discopop_tau), float(simpo_gamma) if loss_type == "simpo" else 0.0, float(score_alpha),
        float(loss_weight), family == "dpo" and loss_type in _LENGTH_LOSS_TYPES,
    )


def _pair_call(loss_types, family, backend, chosen, rejected, ref_chosen, ref_rejected, *, beta,
               label_smoothing, loss_weights, f_divergence_type, f_alpha_divergence_coef, discopop_tau,
               chosen_lengths, rejected_lengths, pair_weights, simpo_gamma, alpha):
    (loss_type,) = loss_types
    request = pair_request(loss_type, family, beta=beta, label_smoothing=label_smoothing,
                           loss_weight=1.0 if loss_weights is None else loss_weights[0],
                           f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                           discopop_tau=discopop_tau, simpo_gamma=simpo_gamma, alpha=alpha)
    scaled = request.length_scaled
    return fused.pair_losses_op(
        chosen.float(), rejected.float(), _float(ref_chosen), _float(ref_rejected),
        1.0 / chosen_lengths.float().clamp(min=1.0) if scaled else None,
        1.0 / rejected_lengths.float().clamp(min=1.0) if scaled else None,
        None if pair_weights is None else pair_weights.detach().float(),
        *request[:-1], backend,
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
    Keywords carry ``DPOConfig`` / ``CPOConfig`` names and defaults (``reference/dpo.py`` and ``reference/cpo.py``
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
    backend = dispatch.traced_backend("preference", chosen_logps.device,
                                      triton_unsupported=None if formula else _coupled_reason(loss_types))
    if formula is not None and backend != "reference":
        losses, chosen_rewards, rejected_rewards = _pair_call(
            loss_types, family, backend, chosen_logps, rejected_logps, ref_chosen_logps,
            ref_rejected_logps, beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            pair_weights=pair_weights, simpo_gamma=simpo_gamma, alpha=alpha,
        )
    elif family == "cpo":  # every CPO type is per pair, so this is the reference backend
        out = cpo_reference.cpo_losses(chosen_logps, rejected_logps, loss_type=loss_types[0], beta=beta,
                                       label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, alpha=alpha,
                                       cpo_alpha=0.0)
        losses, chosen_rewards, rejected_rewards = out.losses, out.chosen_rewards, out.rejected_rewards
    else:
        fn = (registry.dpo_losses_with_registered if registry.is_registered(loss_types)
              else dpo_reference.dpo_losses)
        args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        options = {
            "loss_type": loss_types, "beta": beta, "loss_weights": loss_weights, "label_smoothing": label_smoothing,
            "f_divergence_type": f_divergence_type, "f_alpha_divergence_coef": f_alpha_divergence_coef,
            "discopop_tau": discopop_tau, "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths,
            "chosen_nll": chosen_nll, "pair_weights": pair_weights, "reference_free": reference_free,
        }
        out = fn(*args, **options) if backend == "reference" else compiled.traced_reference(fn, *args, **options)
        losses, chosen_rewards, rejected_rewards = out.losses, out.chosen_rewards, out.rejected_rewards
    loss = losses.mean()
    if family == "cpo" and cpo_alpha != 0.0:
        loss = loss + cpo_alpha * chosen_nll.float().reshape(())
    return PreferenceLoss(loss, losses, chosen_rewards.detach(), rejected_rewards.detach())


def orpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, chosen_nll: torch.Tensor, beta: float = 0.1
) -> ORPOLoss:
    """TRL 1.16's ORPO loss ``chosen_nll + mean(-beta * logsig(log_odds))``; ``reference/orpo.py`` has the formula.

    chosen_logps, rejected_logps: ``[B]`` mean completion log-probs (``sequence_logps(..., average=True)``),
    differentiable; chosen_nll: scalar token-mean NLL of the chosen rows over prompt and completion, differentiable;
    beta: ``ORPOConfig.beta``. The odds-ratio term is ``logistic`` on the log-odds score in the per-pair custom op
    (``compiled`` / ``triton``). Returns :class:`ORPOLoss`.
    """
    check_orpo_request(chosen_logps, rejected_logps, chosen_nll)
    backend = dispatch.traced_backend("preference", chosen_logps.device)
    if backend == "reference":
        out = orpo_reference.orpo_loss(chosen_logps, rejected_logps, chosen_nll=chosen_nll, beta=beta)
        return ORPOLoss(out.loss, out.odds_ratio_losses, out.chosen_rewards, out.rejected_rewards,
                        out.log_odds_ratio.detach(), out.log_odds_chosen.detach())
    nll = chosen_nll.float().reshape(())
    chosen, rejected = chosen_logps.float(), rejected_logps.float()
    # beta 1 inside (z = log_odds), ORPO's beta as the loss weight; the "rewards" are then the scores themselves.
    losses, chosen_odds, rejected_odds = fused.pair_losses_op(
        chosen, rejected, None, None, None, None, None, "logistic", "log_odds", 1.0, 0.0, 0.0, 0.0, 0.0,
        float(beta), backend,
    )[:3]
    log_odds = chosen_odds - rejected_odds
    return ORPOLoss(nll + losses.mean(), losses, (beta * chosen).detach(), (beta * rejected).detach(),
                    F.logsigmoid(log_odds), log_odds)


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's unclamped local KL estimate ``mean_M(kl_logps - ref_kl_logps)``, a detached fp32 scalar.

    kl_logps, ref_kl_logps: ``[M]`` policy / reference log-probs of the mismatched (prompt, completion) pairs.
    Average it over ranks (if any) and pass it as ``kl`` to :func:`kto_loss`, which clamps it at 0.
    """
    check_kl_request(kl_logps, ref_kl_logps)
    fn = kto_reference.kto_kl_estimate
    if dispatch.traced_backend("preference", kl_logps.device, triton_unsupported=_KL_NOT_FUSED) == "reference":
        return fn(kl_logps, ref_kl_logps)
    return compiled.traced_reference(fn, kl_logps, ref_kl_logps)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: torch.Tensor | None = None,
    kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
) -> KTOLoss:
    """TRL 1.16's KTO losses (``loss_type`` ``kto`` or ``apo_zero_unpaired``; ``reference/kto.py`` has the formulas).

    logps, ref_logps: ``[N]`` policy (differentiable) / reference sequence log-probs; labels: ``[N]`` bool, True for
    desirable. ``kto`` needs ``kl`` (the unclamped estimate, e.g. :func:`kto_kl` averaged over ranks) or
    ``kl_logps`` / ``ref_kl_logps`` ``[M]`` (then :func:`kto_kl` runs here); ``apo_zero_unpaired`` ignores them.
    Returns :class:`KTOLoss`.
    """
    check_kto_request(logps, ref_logps, labels, loss_type=loss_type, kl=kl, kl_logps=kl_logps,
                      ref_kl_logps=ref_kl_logps)
    if loss_type == "kto" and kl is None:
        kl = kto_kl(kl_logps, ref_kl_logps)
    backend = dispatch.traced_backend("preference", logps.device)
    if backend == "reference":
        out = kto_reference.kto_losses(logps, ref_logps, labels, loss_type=loss_type, beta=beta,
                                       desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                       kl=kl)
        losses, rewards, kl_value = out.losses, out.rewards, out.kl
    else:
        logps_N = logps.float()
        if loss_type == "kto":
            kl_value = kl.detach().float().reshape(()).clamp(min=0)
        else:
            kl_value = torch.zeros((), dtype=torch.float32, device=logps.device)
        labels_N = labels.to(device=logps.device, dtype=torch.bool)
        losses, rewards = fused.unpaired_losses_op(
            logps_N, ref_logps.float(), labels_N, kl_value, float(beta), float(desirable_weight),
            float(undesirable_weight), backend,
        )[:2]
    return KTOLoss(losses.nanmean(), losses, rewards.detach(), kl_value)
