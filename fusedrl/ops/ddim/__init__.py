"""Public DDIM step with log-prob (``fusedrl.ddim_step_logprob``) and its torch.library registration.

Legend: B samples, N latent elements per sample (the non-batch dims flattened).

Backends of the ``ddim_logprob`` op (``reference.py`` documents the formulas, TRL DDPO's ``scheduler_step``):
- ``reference``: ``reference.ddim_step_logprob_reference``, fp32 torch autograd;
- ``compiled``: the ``fusedrl::ddim_logprob`` custom op running ``compiled.ddim_step_fwd`` (``torch.compile``), with
  its backward ``fusedrl::ddim_logprob_backward``;
- ``triton``: the same custom ops running ``triton.py``: one launch per direction; a kernel that fails to build
  falls back to ``compiled`` (``dispatch.define_op``).
The public function reads the scheduler (alphas, prediction type, clipping, step size), gathers each sample's
cumulative alphas and draws the noise; below it the op sees tensors only. Both custom ops have fake
implementations, so a ``torch.compile(fullgraph=True)`` region captures a step as one node per direction.
Benchmarks: ``benchmarks/ops/ddim.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fusedrl.ops import dispatch
from fusedrl.ops.ddim.checks import check_step_request, checked_timesteps, scheduler_terms
from fusedrl.ops.ddim.reference import ddim_step_logprob_reference

dispatch.register_op("ddim_logprob", "one DDIM step and the Gaussian log-prob of its sample (DDPO, AlignProp)")

_COMPILED = "fusedrl.ops.ddim.compiled"
_TRITON = "fusedrl.ops.ddim.triton"


class DDIMStepOutput(NamedTuple):
    """``prev_sample``: ``[B, ...]`` in ``sample``'s dtype; the given tensor itself when one was passed, else the
    draw ``mean + std * noise`` (differentiable w.r.t. model_output and sample through ``mean``, as TRL's and
    diffusers' steps are; sampling under ``no_grad`` keeps no graph). ``log_prob``: fp32 ``[B]``, differentiable
    w.r.t. model_output and sample."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor


def _fake_step(model_output, sample, target, alphas, eta, clip_range, prediction_type, draw, write_grad):
    num_rows, num_cols = model_output.shape
    prev = sample.new_empty((num_rows, num_cols) if draw else (0,))
    grad = model_output.new_empty((num_rows, num_cols) if write_grad else (0,), dtype=torch.float32)
    return prev, model_output.new_empty(num_rows, dtype=torch.float32), grad


def _fake_step_backward(grad_prev, grad_log_prob, model_output, sample, prev, alphas, eta, clip_range,
                        prediction_type, sample_grad):
    grad_sample = model_output.new_empty(model_output.shape if sample_grad else (0,), dtype=torch.float32)
    return torch.empty_like(model_output, dtype=torch.float32), grad_sample


_step_backward_op = dispatch.define_op(
    "ddim_logprob_backward", op="ddim_logprob", compiled=f"{_COMPILED}:ddim_step_bwd",
    triton=f"{_TRITON}:ddim_step_bwd", fake=_fake_step_backward,
)


def _step_setup(ctx, inputs, output):
    model_output, sample, target, alphas, eta, clip_range, prediction_type, draw, write_grad = inputs
    prev, _, grad = output
    ctx.mark_non_differentiable(grad)
    # Unused outputs (a chain that never reads the log-prob) arrive as None instead of zero [B, N] tensors.
    ctx.set_materialize_grads(False)
    ctx.args = (eta, clip_range, prediction_type, draw, write_grad, model_output.dtype, sample.dtype)
    if write_grad:  # the forward formed d log_prob / d model_output: the backward is one multiply
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(model_output, sample, prev if draw else target, alphas)


def _step_backward(ctx, grad_prev, grad_log_prob, _grad_grad):
    eta, clip_range, prediction_type, draw, write_grad, model_dtype, sample_dtype = ctx.args
    if grad_log_prob is None and (grad_prev is None or not draw):
        return (None,) * 9
    if write_grad:
        (grad_BN,) = ctx.saved_tensors
        return ((grad_log_prob.unsqueeze(1) * grad_BN).to(model_dtype), *(None,) * 8)
    model_output, sample, prev, alphas = ctx.saved_tensors
    if grad_log_prob is None:
        grad_log_prob = alphas.new_zeros(alphas.shape[0])
    sample_grad = ctx.needs_input_grad[1]
    grad_model, grad_sample = _step_backward_op(
        grad_prev if draw else None, grad_log_prob, model_output, sample, prev, alphas, eta, clip_range,
        prediction_type, sample_grad, ctx.backend,
    )
    return (grad_model.to(model_dtype), grad_sample.to(sample_dtype) if sample_grad else None, *(None,) * 7)


_step_op = dispatch.define_op(
    "ddim_logprob", op="ddim_logprob", compiled=f"{_COMPILED}:ddim_step_fwd", triton=f"{_TRITON}:ddim_step_fwd",
    fake=_fake_step, backward=_step_backward, setup_context=_step_setup,
)


def draw_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise as diffusers' ``randn_tensor`` draws it for one generator: on the generator's device
    (a CPU generator gives the same numbers whatever the target device), then moved; the global RNG without one."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if generator.device.type not in (device.type, "cpu"):
        raise ValueError(f"generator is on {generator.device} but the latents are on {device}; pass a CPU "
                         f"generator or one on {device.type}")
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def ddim_step_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DDIMStepOutput:
    """One DDIM step from ``sample`` at ``timestep`` and the Gaussian log-prob of its result (TRL DDPO's
    ``scheduler_step``; formulas in ``fusedrl/ops/ddim/reference.py``).

    scheduler: a diffusers ``DDIMScheduler`` after ``set_timesteps`` (read: ``alphas_cumprod``,
    ``final_alpha_cumprod``, ``num_inference_steps`` and the config's ``num_train_timesteps``, ``prediction_type``
    epsilon / sample / v_prediction, ``clip_sample``, ``clip_sample_range``; ``thresholding`` is not supported).
    model_output, sample: ``[B, ...]`` fp32 / bf16 / fp16 (computed in fp32), the UNet's output and the current
    latents. timestep: a Python int, a 0-d tensor or an integer ``[B]`` tensor (one timestep per sample). The
    previous timestep is ``timestep - num_train_timesteps // num_inference_steps``; below 0 its cumulative alpha is
    ``final_alpha_cumprod`` (TRL clamps to 0 instead: the same number when ``set_alpha_to_one=False``, Stable
    Diffusion's setting). eta: DDIM's eta (> 0 to score a given ``prev_sample``); ``std = eta * sqrt(variance)``.
    prev_sample: ``[B, ...]`` to score (DDPO's training step), or None to draw ``mean + std * noise`` with standard
    normal noise in model_output's dtype from ``generator`` (as diffusers' ``randn_tensor``; no draw when eta is 0;
    torch.compile cannot trace a generator, so a compiled region draws from the global RNG).
    Returns :class:`DDIMStepOutput`. ``log_prob`` is the mean over the non-batch dims of the elementwise log
    density of ``prev_sample`` (a constant) under ``N(mean, std^2)``; NaN where std is 0 (eta 0). A drawn sample is
    scored after rounding to ``sample``'s dtype, so scoring the returned tensor again gives the same log-prob.
    Bad input raises ValueError naming the argument.
    """
    terms = scheduler_terms(scheduler)
    check_step_request(model_output, sample, eta=eta, prev_sample=prev_sample, generator=generator)
    timestep_B = checked_timesteps(timestep, sample.shape[0], sample.device, terms.num_train_timesteps)
    alphas_cumprod = terms.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    prev_timestep_B = timestep_B - terms.step
    alpha_t_B = alphas_cumprod[timestep_B]
    final = torch.as_tensor(terms.final_alpha_cumprod, dtype=torch.float32, device=sample.device)
    alpha_prev_B = torch.where(prev_timestep_B >= 0, alphas_cumprod[prev_timestep_B.clamp(min=0)], final)
    if prev_sample is not None and not torch.compiler.is_compiling() and bool((alpha_prev_B >= 1.0).any()):
        raise ValueError("timestep: this step ends at alpha_cumprod = 1 (the last step of a scheduler with "
                         "set_alpha_to_one=True), where std is 0 and a given prev_sample has no log-prob; score the "
                         "steps before it, or use set_alpha_to_one=False")
    noise = None
    if prev_sample is None:
        noise = (torch.zeros_like(model_output) if eta == 0
                 else draw_noise(model_output.shape, generator, sample.device, model_output.dtype))
    backend = dispatch.traced_backend("ddim_logprob", sample.device)
    if backend == "reference":
        prev, log_prob = ddim_step_logprob_reference(
            model_output, sample, alpha_t_B, alpha_prev_B, eta=float(eta), prediction_type=terms.prediction_type,
            clip_range=terms.clip_range, prev_sample=prev_sample, noise=noise,
        )
        return DDIMStepOutput(prev, log_prob)
    num_rows = sample.shape[0]
    draw = prev_sample is None
    target = noise if draw else prev_sample
    grad_model = torch.is_grad_enabled() and model_output.requires_grad
    grad_sample = torch.is_grad_enabled() and sample.requires_grad
    # DDPO's training step (scoring a stored sample, gradient to the model output only) gets d log_prob / d
    # model_output from the forward pass; any other gradient is formed by the backward op.
    write_grad = grad_model and not grad_sample and not draw
    prev_BN, log_prob_B, _ = _step_op(
        model_output.reshape(num_rows, -1).contiguous(), sample.reshape(num_rows, -1).contiguous(),
        target.detach().reshape(num_rows, -1).contiguous(), torch.stack([alpha_t_B, alpha_prev_B], 1),
        float(eta), math.inf if terms.clip_range is None else terms.clip_range, terms.prediction_type, draw,
        write_grad, backend,
    )
    return DDIMStepOutput(prev_BN.view(sample.shape) if draw else prev_sample, log_prob_B)
