"""The one comparison helper of the suite, with tolerances keyed by dtype, and the spies that say which backend of
an op ran. Only torch is imported here, so the op tests stay free of transformers and TRL; the trainer-side helpers
(tiny model, preference data, TRL parity, shared runs) are in tests/helpers/."""

from __future__ import annotations

import importlib

import torch

# Element-wise (rtol, atol) for full-precision results.
ELEMENTWISE_TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}
# Half types: RMS error relative to the RMS of the expected tensor, because a half-precision matmul or reduction
# rounds every partial sum (bf16 keeps 8 mantissa bits, relative step 3.9e-3; fp16 keeps 11, 4.9e-4) and the
# Triton interpreter truncates fp32->bf16 stores instead of rounding: element-wise bounds then flag harmless
# rounding on near-zero entries.
RMS_TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor | float,
    *,
    dtype: torch.dtype | None = None,
    name: str = "",
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Compare ``actual`` with ``expected`` under the tolerance of ``dtype`` (the inputs' dtype; default: the
    dtype of ``actual``). Half inputs compare by relative RMS error; others element-wise, where ``rtol``/``atol``
    may override the table for a case whose docstring or comment says why."""
    dtype = dtype or actual.dtype
    expected = torch.as_tensor(expected, device=actual.device)
    assert actual.shape == expected.shape or expected.dim() == 0, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    compute = torch.float64 if torch.float64 in (actual.dtype, expected.dtype) else torch.float32
    actual, expected = actual.detach().to(compute), expected.detach().to(compute).expand_as(actual)
    assert torch.equal(torch.isfinite(actual), torch.isfinite(expected)), f"{name}: finiteness differs"
    if dtype in RMS_TOL:
        err = (actual - expected).pow(2).mean().sqrt()
        scale = expected.pow(2).mean().sqrt().clamp_min(1e-6)
        tol = RMS_TOL[dtype]
        assert err / scale <= tol, f"{name}: RMS relative error {float(err / scale):.3e} > {tol}"
    else:
        default_rtol, default_atol = ELEMENTWISE_TOL[dtype]
        torch.testing.assert_close(
            actual, expected, rtol=default_rtol if rtol is None else rtol, atol=default_atol if atol is None else atol,
            equal_nan=True, msg=lambda m: f"{name}: {m}",
        )


def spy_policy_backends(monkeypatch) -> dict:
    """The implementation of each backend of the ``policy_loss`` op (``reference.policy_loss_reference``,
    ``compiled.policy_rows``, ``triton.policy_rows``) replaced in its module by a ``Mock`` that calls it:
    ``{backend: mock}``, whose ``call_count`` says what ran, whatever the logs say."""
    from unittest import mock

    from fusedrl.ops.policy import compiled, reference, triton

    targets = {"reference": (reference, "policy_loss_reference"), "compiled": (compiled, "policy_rows"),
               "triton": (triton, "policy_rows")}
    spies = {}
    for backend, (module, name) in targets.items():
        spies[backend] = mock.Mock(wraps=getattr(module, name))
        monkeypatch.setattr(module, name, spies[backend])
    return spies


def count_calls(monkeypatch, targets: dict[str, str]) -> dict[str, int]:
    """Replace each ``"module:function"`` of ``targets`` (name -> target) by a wrapper that counts its eager calls
    and runs the original; returns the live counts by name. Calls traced by ``torch.compile`` (the compiled backend
    tracing a reference formula) are not counted: they run as part of the compiled graph."""
    counts = dict.fromkeys(targets, 0)
    for name, target in targets.items():
        module_name, _, attribute = target.partition(":")
        module = importlib.import_module(module_name)
        original = getattr(module, attribute)

        def spy(*args, _name=name, _original=original, **kwargs):
            if not torch.compiler.is_compiling():
                counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, spy)
    return counts


# What each backend of the `preference` op runs for a per-pair loss type: the reference formula, the compiled stages,
# the Triton entry point (each looked up in its module at every call, so a spy there sees every call).
PAIR_ENTRY_POINTS = {"reference": "fusedrl.ops.preference.reference.dpo:dpo_losses",
                     "compiled": "fusedrl.ops.preference.compiled:pair_losses",
                     "triton": "fusedrl.ops.preference.triton:pair_preference_losses"}
