"""User-registered preference losses: a name becomes a DPO ``loss_type`` next to TRL's built-in ones.

Legend: B pairs. A registered loss is a per-pair function of the policy-minus-reference sequence log-ratios::

    def my_loss(chosen_logratios, rejected_logratios, *, beta, **inputs) -> losses  # [B] -> [B]

    fusedrl.register_preference_loss("sigmoid_margin", my_loss, needs=("chosen_lengths",))

``chosen_logratios = chosen_logps - ref_chosen_logps`` and ``rejected_logratios = rejected_logps -
ref_rejected_logps`` are fp32 ``[B]`` (the policy log-probs alone when ``reference_free``); ``beta`` is the config's.
``needs`` names the extra keyword inputs the function reads, out of :data:`LOSS_INPUTS`; only those are passed.
The function must be torch tensor math without Python side effects on tensor values: the ``compiled`` backend
traces it with ``torch.compile(fullgraph=True)``, and autograd differentiates it (no backward to write).

Once registered, the name is accepted wherever a DPO ``loss_type`` is: ``fusedrl.preference_loss`` and
``fusedrl.linear_preference_loss`` (``family="dpo"``), ``DPOConfig(loss_type=...)``, and MPO lists with
``loss_weights`` mixing built-in and registered names. As for the built-ins, the batch loss is ``losses.mean()``,
``pair_weights`` (WPO) multiply the term, and the logged rewards are ``beta * logratios`` (detached).
Backends: ``reference`` calls the function eagerly; ``compiled`` compiles it with the rest of the loss; ``triton``
has no kernel for Python code and runs the compiled path (logged once). ``f_divergence_type`` must stay
``reverse_kl``: the function sees log-ratios, not f-divergence scores.

The built-in names (``fusedrl.ops.preference.DPO_LOSS_TYPES``) cannot be registered or replaced: their formulas are the
ones verified against TRL.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence

import torch

from fusedrl.ops.preference.reference import DPO_LOSS_TYPES, DPOLossOutput
from fusedrl.ops.preference.reference import dpo as dpo_reference

# Extra inputs a registered loss may ask for with `needs`, and what it then receives.
LOSS_INPUTS: Mapping[str, str] = types.MappingProxyType({
    "chosen_lengths": "[B] fp32 completion token counts of the chosen rows",
    "rejected_lengths": "[B] fp32 completion token counts of the rejected rows",
    "chosen_nll": "fp32 scalar, token-mean NLL of the chosen completions (differentiable)",
    "label_smoothing": "float, the config's label_smoothing",
})

PreferenceLossFn = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class RegisteredPreferenceLoss:
    """One registry entry: ``fn(chosen_logratios, rejected_logratios, *, beta, **{n: ... for n in needs})``."""

    name: str
    fn: PreferenceLossFn
    needs: frozenset[str]
    description: str = ""


_REGISTERED: dict[str, RegisteredPreferenceLoss] = {}


def register_preference_loss(
    name: str, fn: PreferenceLossFn, *, needs: Sequence[str] = (), description: str = "", replace: bool = False
) -> RegisteredPreferenceLoss:
    """Make ``name`` a DPO ``loss_type`` computed by ``fn`` (signature in the module docstring).

    needs: extra keyword inputs of ``fn``, out of :data:`LOSS_INPUTS`. ``replace=True`` overwrites an earlier
    registration of ``name`` (re-running a script in one process); a built-in name always raises.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a preference loss name must be an identifier-like string, got {name!r}")
    if name in DPO_LOSS_TYPES:
        raise ValueError(f"{name!r} is a built-in DPO loss_type (verified against TRL) and cannot be registered; "
                         f"built-in names: {DPO_LOSS_TYPES}")
    if name in _REGISTERED and not replace:
        raise ValueError(f"preference loss {name!r} is already registered; pass replace=True to overwrite it")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    unknown = sorted(set(needs) - LOSS_INPUTS.keys())
    if unknown:
        raise ValueError(f"needs={unknown} are not loss inputs; choose from {sorted(LOSS_INPUTS)}")
    entry = RegisteredPreferenceLoss(name, fn, frozenset(needs), description)
    _REGISTERED[name] = entry
    return entry


def unregister_preference_loss(name: str) -> None:
    """Remove a registered loss (built-in names are not in the registry)."""
    if name not in _REGISTERED:
        raise ValueError(f"preference loss {name!r} is not registered; registered: {sorted(_REGISTERED)}")
    del _REGISTERED[name]


def registered_preference_losses() -> Mapping[str, RegisteredPreferenceLoss]:
    """A read-only view of the registry, name -> entry."""
    return types.MappingProxyType(_REGISTERED)


def dpo_loss_types() -> tuple[str, ...]:
    """Every valid DPO ``loss_type``: the built-ins, then the registered names in registration order."""
    return (*DPO_LOSS_TYPES, *_REGISTERED)


def is_registered(loss_types: Sequence[str]) -> bool:
    """Whether any of ``loss_types`` is a registered (not built-in) loss."""
    return any(name in _REGISTERED for name in loss_types)


def needed_inputs(loss_types: Sequence[str]) -> frozenset[str]:
    """The union of the ``needs`` of the registered losses among ``loss_types``."""
    return frozenset().union(*(_REGISTERED[name].needs for name in loss_types if name in _REGISTERED))


def check_dpo_loss_types(loss_types: Sequence[str], *, what: str = "DPO loss_type") -> None:
    """Raise ``ValueError`` for names that are neither built-in nor registered, listing every valid one."""
    unknown = [name for name in loss_types if name not in DPO_LOSS_TYPES and name not in _REGISTERED]
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; expected names from {DPO_LOSS_TYPES} or the registered "
                         f"{tuple(_REGISTERED)} (fusedrl.register_preference_loss)")


def check_registered_request(
    loss_types: Sequence[str], *, f_divergence_type: str, has_lengths: bool, has_nll: bool
) -> None:
    """The static requirements of the registered losses among ``loss_types`` (no-op when there are none)."""
    if not is_registered(loss_types):
        return
    registered = [name for name in loss_types if name in _REGISTERED]
    if f_divergence_type != "reverse_kl":
        raise ValueError(f"registered losses {registered} read log-ratios, so f_divergence_type only applies to "
                         f"built-in types; got f_divergence_type={f_divergence_type!r}")
    needs = needed_inputs(loss_types)
    if {"chosen_lengths", "rejected_lengths"} & needs and not has_lengths:
        raise ValueError(f"registered losses {registered} need chosen/rejected_lengths: pass them")
    if "chosen_nll" in needs and not has_nll:
        raise ValueError(f"registered losses {registered} need chosen_nll: the token-mean NLL of the chosen "
                         "completions (fusedrl.ops.preference.token_mean_nll)")


def _registered_term(entry: RegisteredPreferenceLoss, chosen_logratios, rejected_logratios, *, beta: float,
                     available: Mapping[str, object]) -> torch.Tensor:
    term = entry.fn(chosen_logratios, rejected_logratios, beta=beta,
                    **{name: available[name] for name in sorted(entry.needs)})
    if not isinstance(term, torch.Tensor) or term.shape != chosen_logratios.shape:
        got = tuple(term.shape) if isinstance(term, torch.Tensor) else type(term).__name__
        raise ValueError(f"registered preference loss {entry.name!r} must return per-pair losses of shape "
                         f"{tuple(chosen_logratios.shape)} ([B]), got {got}")
    return term.float()


def dpo_losses_with_registered(
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
    """``reference.dpo.dpo_losses`` (same arguments, same ``DPOLossOutput``) that also accepts registered names.

    A request of built-in names only is ``dpo_losses`` itself, bit for bit. Otherwise the built-in names go to
    ``dpo_losses`` together and each registered one is called on the fp32 log-ratios; the terms are summed with
    ``loss_weights`` in ``loss_type`` order.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    options = {"beta": beta, "label_smoothing": label_smoothing, "f_divergence_type": f_divergence_type,
               "f_alpha_divergence_coef": f_alpha_divergence_coef, "discopop_tau": discopop_tau,
               "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths, "chosen_nll": chosen_nll,
               "pair_weights": pair_weights, "reference_free": reference_free}
    # dpo_losses is looked up in its module at each call (not bound here), as the preference op does.
    if not is_registered(loss_types):
        return dpo_reference.dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                        loss_type=loss_types, loss_weights=loss_weights, **options)
    check_dpo_loss_types(loss_types)
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise ValueError(f"{len(loss_weights)} loss_weights for {len(loss_types)} loss types")
    check_registered_request(loss_types, f_divergence_type=f_divergence_type,
                             has_lengths=chosen_lengths is not None and rejected_lengths is not None,
                             has_nll=chosen_nll is not None)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)

    builtin = [name for name in loss_types if name in DPO_LOSS_TYPES]
    builtin_terms = iter(())
    if builtin:
        builtin_out = dpo_reference.dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                               loss_type=builtin, **options)
        builtin_terms = iter(builtin_out.components)

    policy_chosen, policy_rejected = chosen_logps.float(), rejected_logps.float()
    if reference_free:
        chosen_logratios, rejected_logratios = policy_chosen, policy_rejected
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("ref_chosen_logps / ref_rejected_logps are None; pass them or set reference_free=True")
    else:
        chosen_logratios = policy_chosen - ref_chosen_logps.float()
        rejected_logratios = policy_rejected - ref_rejected_logps.float()
    available = {
        "chosen_lengths": None if chosen_lengths is None else chosen_lengths.float(),
        "rejected_lengths": None if rejected_lengths is None else rejected_lengths.float(),
        "chosen_nll": None if chosen_nll is None else chosen_nll.float().reshape(()),
        "label_smoothing": label_smoothing,
    }
    components = []
    for name in loss_types:
        if name in DPO_LOSS_TYPES:
            components.append(next(builtin_terms))  # already WPO-weighted by dpo_losses
            continue
        term = _registered_term(_REGISTERED[name], chosen_logratios, rejected_logratios, beta=beta,
                                available=available)
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
