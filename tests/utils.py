"""The one comparison helper of the suite, with tolerances keyed by dtype."""

from __future__ import annotations

import torch

# fp32: element-wise (rtol, atol). Half types: RMS error relative to the RMS of the expected tensor, because a
# half-precision matmul or reduction rounds every partial sum (bf16 keeps 8 mantissa bits, relative step
# 3.9e-3; fp16 keeps 11, 4.9e-4) and the Triton interpreter truncates fp32->bf16 stores instead of rounding:
# element-wise bounds then flag harmless rounding on near-zero entries.
FP32_TOL = (1e-5, 1e-5)
RMS_TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype = torch.float32, name: str = "",
    fp32_rtol: float = FP32_TOL[0],
):
    """Compare in fp32: element-wise for fp32 inputs, by relative RMS error for fp16/bf16 inputs (see above)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().float(), expected.detach().float()
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{name}: finiteness differs"
    if dtype in RMS_TOL:
        err = (actual - expected).pow(2).mean().sqrt()
        scale = expected.pow(2).mean().sqrt().clamp_min(1e-6)
        tol = RMS_TOL[dtype]
        assert err / scale <= tol, f"{name}: RMS relative error {float(err / scale):.3e} > {tol}"
    else:
        torch.testing.assert_close(actual, expected, rtol=fp32_rtol, atol=FP32_TOL[1], msg=lambda m: f"{name}: {m}")
