"""DPO-family losses on sequence log-probs: the fp32 reference of TRL 1.16's ``DPOTrainer._compute_loss``.

Legend: B pairs. Inputs are ``[B]`` sequence log-probs (token sums over the completion, see ``sequence.py``;
LD-DPO changes how they are summed, not the losses). Everything is computed in fp32 and returned in fp32.

With log-ratios ``c = logp_chosen - ref_chosen`` and ``r = logp_rejected - ref_rejected``, ``f`` the f-divergence
score map (identity for reverse KL) and ``d = f(c) - f(r)``:

    sigmoid        -logsig(beta d)                  hinge       relu(1 - beta d)
    ipo            (f(c)/len_c - f(r)/len_r - 1/(2 beta))^2       (token-averaged, lengths clamped at 1)
    sigmoid_norm   -logsig(beta (f(c)/len_c - f(r)/len_r))
    exo_pair       q log(q / (1-eps)) + (1-q) log((1-q) / eps),  q = sig(beta d), eps = label_smoothing
    robust         (-(1-eps) logsig(beta d) + eps logsig(-beta d)) / (1 - 2 eps)
    discopop       -logsig(beta d) (1 - m) + exp(-beta d) m,     m = sig(beta d / tau)
    nca_pair       -logsig(beta c) - logsig(-beta c)/2 - logsig(-beta r)/2
    bco_pair       -logsig(beta c) - logsig(-beta r)
    sppo_hard      (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2
    apo_zero       1 - sig(beta c) + sig(beta r)    apo_down   sig(beta c) + 1 - sig(beta (c - r))
    aot            -(1-eps) logsig(beta x) - eps logsig(-beta x),  x = sort(pi_c - pi_r) - sort(ref_c - ref_r)
    aot_unpaired   the same with x = sort(c) - sort(r)
    sft            chosen_nll (a batch scalar, repeated B times)

Batch coupling: ``aot``/``aot_unpaired`` sort over the batch, so ``losses[i]`` belongs to the i-th order statistic,
not to pair i (under data parallelism each rank sorts its own micro-batch, as TRL does); ``sft`` is one token mean
over the batch. All other types are per pair. None keeps running state: TRL 1.16's ``bco_pair`` is the stateless
pairwise form (the running reward mean belonged to the unpaired ``BCOTrainer``, which 1.16 no longer ships).

Reduction, as TRL: ``loss = sum_k loss_weights[k] * mean_B(term_k)`` == ``losses.mean()`` here (plus the router aux
loss, which is not a preference term). Rewards are ``beta * (policy - ref)``, detached, for every loss type and
f-divergence (TRL logs them from the log-ratios, never from the f-scores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation leaves a beta * log Z(x) term that only cancels in the chosen - rejected difference,
# so only the losses built on that difference accept another divergence (TRL raises for the others; so do we).
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
LENGTH_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})

# exp(80) = 5.5e34 stays representable in fp32 (max 3.4e38) after the (alpha - 1) scaling; TRL uses the same bound
# for fp32 and bf16 inputs (11 for fp16, which this fp32 reference never sees).
_ALPHA_DIVERGENCE_CLAMP = 80.0


class DPOLossOutput(NamedTuple):
    """``losses`` ``[B]``: weighted sum over loss types (``loss = losses.mean()``); ``chosen_rewards`` /
    ``rejected_rewards`` ``[B]``: ``beta * (policy - ref)``, detached; ``components``: one ``[B]`` term per entry of
    ``loss_type``, unweighted by ``loss_weights`` (but WPO-weighted when ``pair_weights`` is given)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    components: tuple[torch.Tensor, ...]


def f_divergence_scores(
    logratios: torch.Tensor, *, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """``f'(t)`` at ``t = pi / ref = exp(logratios)``, the score each f-DPO variant compares (shape preserved).

    reverse_kl: ``log t``; forward_kl: ``1 - 1/t``; js_divergence: ``log 2 + logsig(log t)``;
    alpha_divergence: ``(t^(a-1) - 1) / (a-1)``, with ``(a-1) log t`` clamped at 80 and ``a -> 1`` (within 1e-6)
    falling back to ``log t``.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            return logratios
        scaled = torch.clamp((f_alpha_divergence_coef - 1.0) * logratios, max=_ALPHA_DIVERGENCE_CLAMP)
        return (torch.exp(scaled) - 1.0) * (1.0 / (f_alpha_divergence_coef - 1.0))
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}")


class _Terms(NamedTuple):
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    chosen_nll: torch.Tensor | None


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def _dpo_term(loss_type: str, t: _Terms, *, beta: float, label_smoothing: float, discopop_tau: float) -> torch.Tensor:
    """The ``[B]`` loss of one type (formulas in the module docstring)."""
    delta = t.chosen_scores - t.rejected_scores
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type in LENGTH_LOSS_TYPES:
        avg_delta = t.chosen_scores / t.chosen_lengths.clamp(min=1.0) - t.rejected_scores / t.rejected_lengths.clamp(
            min=1.0
        )
        if loss_type == "ipo":
            return (avg_delta - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * avg_delta)
    if loss_type == "exo_pair":
        # Both KL terms in logsigmoid form: q * log q stays 0 (not 0 * -inf) when beta * d = -+1e4.
        z = beta * delta
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(label_smoothing)
        )
    if loss_type == "robust":
        z = beta * delta
        clean = -(1 - label_smoothing) * F.logsigmoid(z)
        flipped = -label_smoothing * F.logsigmoid(-z)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "discopop":
        z = beta * delta
        # TRL writes exp(-z) * sig(z / tau), which is inf * 0 = NaN for z <~ -88; exp(logsig(z / tau) - z) is the
        # same number (the product's limit is 0 there for tau < 1).
        return -F.logsigmoid(z) * torch.sigmoid(-z / discopop_tau) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    chosen_rewards = beta * t.chosen_logratios
    rejected_rewards = beta * t.rejected_logratios
    if loss_type == "nca_pair":
        return (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    if loss_type == "bco_pair":
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    if loss_type == "sppo_hard":
        return (t.chosen_logratios - 0.5 / beta) ** 2 + (t.rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "aot":
        policy_sorted, _ = torch.sort(t.policy_chosen - t.policy_rejected, dim=0)
        ref_sorted, _ = torch.sort(t.ref_chosen - t.ref_rejected, dim=0)
        return _smoothed_logistic(beta * (policy_sorted - ref_sorted), label_smoothing)
    if loss_type == "aot_unpaired":
        chosen_sorted, _ = torch.sort(t.chosen_logratios, dim=0)
        rejected_sorted, _ = torch.sort(t.rejected_logratios, dim=0)
        return _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    if loss_type == "apo_zero":
        # 1 - sig(x) written as sig(-x): no cancellation to 0 for x > 17 in fp32.
        return torch.sigmoid(-chosen_rewards) + torch.sigmoid(rejected_rewards)
    if loss_type == "apo_down":
        return torch.sigmoid(chosen_rewards) + torch.sigmoid(-beta * (t.chosen_logratios - t.rejected_logratios))
    if loss_type == "sft":
        return t.chosen_nll.expand(t.chosen_logratios.shape[0])
    raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")


def _check_dpo_request(
    loss_types, loss_weights, *, f_divergence_type, label_smoothing, has_pair_weights, has_lengths, has_nll
) -> None:
    if not loss_types:
        raise ValueError("loss_type is empty")
    unknown = [name for name in loss_types if name not in DPO_LOSS_TYPES]
    if unknown:
        raise ValueError(f"Unknown DPO loss_type {unknown}; expected names from {DPO_LOSS_TYPES}")
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise ValueError(f"{len(loss_weights)} loss_weights for {len(loss_types)} loss types")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}")
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} only applies to {sorted(F_DIVERGENCE_LOSS_TYPES)}: the other "
            f"losses have no f-divergence form (got {list(loss_types)})"
        )
    if has_pair_weights and SORTING_LOSS_TYPES & set(loss_types):
        raise ValueError("pair_weights (WPO) cannot apply to 'aot'/'aot_unpaired': sorting misaligns pairs and weights")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"'exo_pair' needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {label_smoothing}")
    if LENGTH_LOSS_TYPES & set(loss_types) and not has_lengths:
        raise ValueError("'ipo' and 'sigmoid_norm' average over completion tokens: pass chosen/rejected_lengths")
    if "sft" in loss_types and not has_nll:
        raise ValueError("'sft' needs chosen_nll (e.g. sequence.token_mean_nll over the chosen completion tokens)")


def dpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    reference_free: bool = False,
) -> DPOLossOutput:
    """Per-pair DPO-family losses ``[B]`` and rewards, as TRL 1.16's ``DPOTrainer`` (names and defaults of
    ``DPOConfig``).

    chosen_logps, rejected_logps: ``[B]`` policy sequence log-probs (any float dtype, differentiable).
    ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs (no gradient expected); ignored (may be
        None) when ``reference_free``, which treats them as 0. TRL 1.16 dropped ``reference_free``; it is kept here
        for SimPO-like setups and is the only option without a TRL 1.16 counterpart.
    loss_type: one name or a list (MPO); ``loss_weights`` default to 1.0 each.
    chosen_lengths, rejected_lengths: ``[B]`` completion token counts, needed by ``ipo`` and ``sigmoid_norm``.
    chosen_nll: scalar token-mean NLL of the chosen completions, needed by ``sft``.
    pair_weights: ``[B]`` detached WPO weights (``sequence.wpo_pair_weights``), TRL's ``use_weighting=True``;
        they multiply every term, ``sft`` included, as TRL's code intends (TRL 1.16 itself raises a RuntimeError on
        ``sft`` with ``use_weighting``: it multiplies the expanded sft scalar in place).
    Returns ``DPOLossOutput`` (fp32); ``losses.mean()`` is TRL's loss.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    _check_dpo_request(
        loss_types,
        loss_weights,
        f_divergence_type=f_divergence_type,
        label_smoothing=label_smoothing,
        has_pair_weights=pair_weights is not None,
        has_lengths=chosen_lengths is not None and rejected_lengths is not None,
        has_nll=chosen_nll is not None,
    )
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)

    policy_chosen, policy_rejected = chosen_logps.float(), rejected_logps.float()
    if reference_free:
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected)
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("ref_chosen_logps / ref_rejected_logps are None; pass them or set reference_free=True")
    else:
        ref_chosen, ref_rejected = ref_chosen_logps.float(), ref_rejected_logps.float()
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    terms = _Terms(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=f_divergence_scores(
            chosen_logratios, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef
        ),
        rejected_scores=f_divergence_scores(
            rejected_logratios, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef
        ),
        chosen_lengths=None if chosen_lengths is None else chosen_lengths.float(),
        rejected_lengths=None if rejected_lengths is None else rejected_lengths.float(),
        chosen_nll=None if chosen_nll is None else chosen_nll.float().reshape(()),
    )

    components = []
    for name in loss_types:
        term = _dpo_term(name, terms, beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau)
        if pair_weights is not None:
            term = term * pair_weights.detach().float()
        components.append(term)
    losses = sum(weight * term for weight, term in zip(weights, components, strict=True))
    return DPOLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
        components=tuple(components),
    )
