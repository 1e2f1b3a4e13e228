"""Readable fp32 DDIM step with the log-prob of its sample: the truth the compiled and Triton backends are tested
against. The formulas are TRL DDPO's ``scheduler_step`` (``trl/models/modeling_sd_base.py``, TRL <= 0.23), which
are those of DDIM (Song et al. 2021, eqs. 12 and 16) with the step's Gaussian made explicit.

Legend: B samples; ``...`` the latent dims (C, h, w for Stable Diffusion). Per sample, with the scheduler's
cumulative alphas ``a_t`` at the timestep and ``a_p`` at the previous one (``final_alpha_cumprod`` past the start):

    x0   = (x - sqrt(1 - a_t) m) / sqrt(a_t),  eps = m                      prediction "epsilon"
    x0   = m,                                  eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)   "sample"
    x0   = sqrt(a_t) x - sqrt(1 - a_t) m,      eps = sqrt(a_t) m + sqrt(1 - a_t) x        "v_prediction"
    x0   <- clamp(x0, -R, R)                   when the scheduler clips (eps keeps the unclipped x0, as TRL)
    var  = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p),       std = eta * sqrt(var)
    mean = sqrt(a_p) x0 + sqrt(1 - a_p - std^2) eps
    prev = mean + std * noise                  (or the given prev_sample)
    log_prob = mean over the latent dims of  -(prev - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi))

with m the model output and x the current sample. The log-prob treats ``prev`` as a constant (TRL's
``prev_sample.detach()``); it is differentiable w.r.t. the model output and the sample through ``mean``, and a drawn
``prev`` is differentiable through ``mean`` too (AlignProp backpropagates through the chain).
"""

from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def ddim_std(alpha_t_B: torch.Tensor, alpha_prev_B: torch.Tensor, eta: float) -> torch.Tensor:
    """``eta * sqrt(var)`` fp32 ``[B]``, DDIM's sigma_t (eq. 16). 0 where ``a_p = 1`` (the last step of a scheduler
    with ``set_alpha_to_one=True``) or ``eta = 0``: the step is deterministic there."""
    variance_B = (1.0 - alpha_prev_B) / (1.0 - alpha_t_B) * (1.0 - alpha_t_B / alpha_prev_B)
    return eta * variance_B.sqrt()


def predicted_original_and_noise(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` of the table in the module docstring (before clipping); alpha_t broadcasts against both."""
    beta_t = 1.0 - alpha_t
    if prediction_type == "epsilon":
        x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        return x0, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_t.sqrt() * model_output) / beta_t.sqrt()
    if prediction_type == "v_prediction":
        x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        return x0, alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def ddim_step_logprob_reference(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t_B: torch.Tensor,
    alpha_prev_B: torch.Tensor,
    *,
    eta: float,
    prediction_type: str,
    clip_range: float | None,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prev_sample, log_prob)`` of one DDIM step, by the formulas of the module docstring, in fp32 autograd.

    model_output, sample: ``[B, ...]`` any float dtype; alpha_t_B, alpha_prev_B: fp32 ``[B]``; clip_range: R, or
    None for no clipping. Exactly one of ``prev_sample`` (``[B, ...]``, scored as given) and ``noise`` (``[B, ...]``,
    standard normal: ``prev = mean + std * noise``) is given. A drawn ``prev_sample`` is returned in ``sample``'s
    dtype and its log-prob is that of the returned (rounded) value, so scoring it again gives the same number; the
    given one is returned as is. log_prob: fp32 ``[B]``, NaN where ``std = 0`` (the density is not defined there).
    """
    shape = (-1,) + (1,) * (sample.dim() - 1)
    alpha_t, alpha_prev = alpha_t_B.float().view(shape), alpha_prev_B.float().view(shape)
    x0, eps = predicted_original_and_noise(model_output.float(), sample.float(), alpha_t, prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    std = ddim_std(alpha_t, alpha_prev, eta)
    direction = (1.0 - alpha_prev - std**2).sqrt()
    mean = alpha_prev.sqrt() * x0 + direction * eps
    if prev_sample is None:
        prev_sample = (mean + std * noise.float()).to(sample.dtype)
    log_density = -((prev_sample.detach().float() - mean) ** 2) / (2.0 * std**2) - std.log() - LOG_SQRT_2PI
    return prev_sample, log_density.mean(dim=tuple(range(1, log_density.dim())))
