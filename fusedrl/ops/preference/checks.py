"""Input checks of the preference ops: every error names the argument and says what would be accepted.

Only shapes, dtypes and static options are checked (nothing data-dependent), so the checks trace under
torch.compile without a graph break. The messages follow ``reference/dpo.py``, whose reference raises the same
errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fusedrl.ops import checks
from fusedrl.ops.preference import registry as preference_registry
from fusedrl.ops.preference.reference import (
    CPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    KTO_LOSS_TYPES,
)

FAMILIES = ("dpo", "cpo")
_COMPUTED_BY_LINEAR = ("chosen_nll",)


def _check_pair_tensor(name: str, tensor: torch.Tensor | None, like: torch.Tensor) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or tensor.shape != like.shape or tensor.device != like.device:
        got = (tuple(tensor.shape), tensor.device) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a [B] = {tuple(like.shape)} tensor on {like.device} like chosen_logps, "
                         f"got {got}")


def _check_loss_types(family: str, loss_types: list[str], loss_weights: Sequence[float] | None) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} (DPOTrainer or CPOTrainer losses), got {family!r}")
    if not loss_types:
        raise ValueError("loss_type is empty")
    if family == "cpo":
        if len(loss_types) != 1 or loss_types[0] not in CPO_LOSS_TYPES:
            raise ValueError(f"family='cpo' takes one loss_type out of {CPO_LOSS_TYPES}, got {loss_types}")
        if loss_weights is not None:
            raise ValueError("loss_weights (MPO) apply to family='dpo' only")
        return
    preference_registry.check_dpo_loss_types(loss_types)
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise ValueError(f"{len(loss_weights)} loss_weights for {len(loss_types)} loss types")


def check_preference_request(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None, *, family: str, loss_types: list[str], loss_weights: Sequence[float] | None,
    label_smoothing: float, f_divergence_type: str, chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None, chosen_nll: torch.Tensor | None, pair_weights: torch.Tensor | None,
    reference_free: bool, cpo_alpha: float,
) -> None:
    checks.check_float("chosen_logps", chosen)
    if chosen.dim() != 1:
        raise ValueError(f"chosen_logps must be [B] sequence log-probs, got shape {tuple(chosen.shape)}")
    checks.check_float("rejected_logps", rejected)
    _check_pair_tensor("rejected_logps", rejected, chosen)
    _check_loss_types(family, loss_types, loss_weights)
    if family == "cpo" and (ref_chosen is not None or ref_rejected is not None):
        raise ValueError("family='cpo' has no reference model: pass no ref_chosen_logps / ref_rejected_logps")
    if family == "dpo" and not reference_free and (ref_chosen is None or ref_rejected is None):
        raise ValueError("ref_chosen_logps / ref_rejected_logps are None; pass them or set reference_free=True")
    for name, tensor in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
        if tensor is not None:
            checks.check_float(name, tensor)
        _check_pair_tensor(name, tensor, chosen)
    for name, tensor in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths),
                         ("pair_weights", pair_weights)):
        _check_pair_tensor(name, tensor, chosen)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}")
    if family == "dpo":
        preference_registry.check_registered_request(
            loss_types, f_divergence_type=f_divergence_type,
            has_lengths=chosen_lengths is not None and rejected_lengths is not None, has_nll=chosen_nll is not None)
    if f_divergence_type != "reverse_kl" and (family == "cpo" or not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES):
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} only applies to DPO {sorted(F_DIVERGENCE_LOSS_TYPES)}: the "
            f"other losses have no f-divergence form (got {family} {loss_types})"
        )
    if family == "dpo" and "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"'exo_pair' needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {label_smoothing}")
    if family == "dpo" and {"ipo", "sigmoid_norm"} & set(loss_types) and (
        chosen_lengths is None or rejected_lengths is None
    ):
        raise ValueError("'ipo' and 'sigmoid_norm' average over completion tokens: pass chosen/rejected_lengths")
    if pair_weights is not None and {"aot", "aot_unpaired"} & set(loss_types):
        raise ValueError("pair_weights (WPO) cannot apply to 'aot'/'aot_unpaired': sorting misaligns pairs and weights")
    needs_nll = "sft" in loss_types if family == "dpo" else cpo_alpha != 0.0
    if needs_nll and chosen_nll is None:
        raise ValueError("'sft' (DPO) and cpo_alpha != 0 (CPO) need chosen_nll: the token-mean NLL of the chosen "
                         "completions (fusedrl.ops.preference.token_mean_nll); or set cpo_alpha=0")
    if chosen_nll is not None and chosen_nll.numel() != 1:
        raise ValueError(f"chosen_nll must be a scalar, got shape {tuple(chosen_nll.shape)}")


def check_linear_request(
    hidden: torch.Tensor, labels: torch.Tensor, ref_hidden: torch.Tensor | None,
    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None, loss_options: Mapping[str, object],
) -> int:
    """Checks the row layout and the reference inputs; returns B. The LM-head checks are linear_token_logprobs'."""
    checks.check_float("hidden", hidden)
    if hidden.dim() != 3 or hidden.shape[0] % 2 or hidden.shape[0] == 0:
        raise ValueError(f"hidden must be [2B, T, H] (B chosen rows, then B rejected rows), got {tuple(hidden.shape)}")
    checks.check_labels(labels, hidden.shape[:-1], hidden.device, against="hidden.shape")
    if ref_hidden is not None:
        if ref_chosen is not None or ref_rejected is not None:
            raise ValueError("pass either ref_hidden (computed here) or ref_chosen/rejected_logps, not both")
        if ref_hidden.shape != hidden.shape or ref_hidden.device != hidden.device:
            raise ValueError(f"ref_hidden must match hidden {tuple(hidden.shape)} on {hidden.device}, got "
                             f"{tuple(ref_hidden.shape)} on {ref_hidden.device}")
    passed = sorted(set(_COMPUTED_BY_LINEAR) & set(loss_options))
    if passed:
        raise ValueError(f"{passed} are computed from the labels here; do not pass them")
    return hidden.shape[0] // 2


def check_orpo_request(chosen: torch.Tensor, rejected: torch.Tensor, chosen_nll: torch.Tensor) -> None:
    checks.check_float("chosen_logps", chosen)
    if chosen.dim() != 1:
        raise ValueError(f"chosen_logps must be [B] mean log-probs, got shape {tuple(chosen.shape)}")
    checks.check_float("rejected_logps", rejected)
    _check_pair_tensor("rejected_logps", rejected, chosen)
    if not isinstance(chosen_nll, torch.Tensor) or chosen_nll.numel() != 1:
        got = tuple(chosen_nll.shape) if isinstance(chosen_nll, torch.Tensor) else type(chosen_nll).__name__
        raise ValueError(f"chosen_nll must be a scalar tensor (the token-mean NLL of the chosen rows), got {got}")


def check_kto_request(
    logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, *, loss_type: str,
    kl: torch.Tensor | None, kl_logps: torch.Tensor | None, ref_kl_logps: torch.Tensor | None,
) -> None:
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    checks.check_float("logps", logps)
    if logps.dim() != 1:
        raise ValueError(f"logps must be [N] sequence log-probs, got shape {tuple(logps.shape)}")
    checks.check_float("ref_logps", ref_logps)
    if ref_logps.shape != logps.shape:
        raise ValueError(f"ref_logps must match logps {tuple(logps.shape)}, got {tuple(ref_logps.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != logps.shape:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an [N] = {tuple(logps.shape)} bool tensor (True = desirable), got {got}")
    if loss_type != "kto":
        return
    if kl is None and (kl_logps is None or ref_kl_logps is None):
        raise ValueError("loss_type='kto' needs kl, or kl_logps and ref_kl_logps of mismatched pairs")
    if kl is not None and kl.numel() != 1:
        raise ValueError(f"kl must be a scalar estimate, got shape {tuple(kl.shape)}")


def check_kl_request(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> None:
    checks.check_float("kl_logps", kl_logps)
    checks.check_float("ref_kl_logps", ref_kl_logps)
    if kl_logps.dim() != 1 or ref_kl_logps.shape != kl_logps.shape:
        raise ValueError(f"kl_logps and ref_kl_logps must be [M] log-probs of the same shape, got "
                         f"{tuple(kl_logps.shape)} and {tuple(ref_kl_logps.shape)}")
