"""The one comparison helper of the suite, with tolerances keyed by dtype."""

from __future__ import annotations

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
