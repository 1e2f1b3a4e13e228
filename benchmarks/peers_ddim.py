"""DDIM step benchmark inputs and paths, registered into ``peers.INPUTS`` / ``peers.PATHS`` under "ddim".

Legend: B latents of C x H x W (Stable Diffusion: 4 x 64 x 64 for 512-pixel images).

Two calls of a DDPO run, each path on the same inputs: ``score=True`` scores stored latents and backpropagates the
log-prob to the model output (the training step, run once per sampled timestep and inner epoch), ``score=False``
draws the next latents under no_grad (sampling, once per denoising step). Timesteps differ per sample, as in DDPO's
shuffled training batches. The peer is TRL 0.23 DDPO's ``scheduler_step`` (``trl/models/modeling_sd_base.py``),
written out below in eager torch: TRL removed the DDPO code in #4068, so no installed TRL has it to import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from benchmarks import peers

NUM_STEPS = 50  # DDPOConfig.sample_num_steps
ETA = 1.0  # DDPOConfig.sample_eta


@dataclass
class DDIMInputs:
    scheduler: object  # a diffusers DDIMScheduler configured as Stable Diffusion's, after set_timesteps(50)
    model_output: torch.Tensor  # [B, C, H, W], requires grad
    sample: torch.Tensor  # [B, C, H, W]
    prev_sample: torch.Tensor  # [B, C, H, W], the stored next latents a training step scores
    timestep_B: torch.Tensor  # int64 [B]
    grad_log_prob_B: torch.Tensor  # fixed upstream gradient of the log-prob

    def zero_grad(self) -> None:
        self.model_output.grad = None


def ddim_inputs(shape: Mapping[str, int], dtype: torch.dtype) -> DDIMInputs:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(NUM_STEPS)
    size = (shape["B"], shape["C"], shape["H"], shape["W"])
    gen = torch.Generator().manual_seed(0)
    return DDIMInputs(
        scheduler=scheduler,
        model_output=torch.randn(size, generator=gen).to(dtype).requires_grad_(),
        sample=torch.randn(size, generator=gen).to(dtype),
        prev_sample=torch.randn(size, generator=gen).to(dtype),
        timestep_B=scheduler.timesteps[torch.randint(0, NUM_STEPS, (shape["B"],), generator=gen)],
        grad_log_prob_B=torch.randn(shape["B"], generator=gen),
    )


def _finish(x: DDIMInputs, log_prob_B: torch.Tensor, score: bool) -> None:
    if score:
        log_prob_B.backward(x.grad_log_prob_B)


def _run_fusedrl(x: DDIMInputs, score: bool, backend: str) -> None:
    import fusedrl

    with fusedrl.use_kernels(ddim_logprob=backend), torch.set_grad_enabled(score):
        out = fusedrl.ddim_step_logprob(x.scheduler, x.model_output, x.timestep_B, x.sample, eta=ETA,
                                        prev_sample=x.prev_sample if score else None,
                                        generator=None if score else torch.Generator().manual_seed(1))
        _finish(x, out.log_prob, score)


def fusedrl_ddim(x: DDIMInputs, score: bool) -> None:
    """``fusedrl.ddim_step_logprob``, compiled backend (explicit request: raises rather than falling back)."""
    _run_fusedrl(x, score, "compiled")


def reference_ddim(x: DDIMInputs, score: bool) -> None:
    """fusedrl's fp32 reference (the formulas as TRL writes them, autograd)."""
    _run_fusedrl(x, score, "reference")


def trl_scheduler_step(scheduler, model_output, timestep, sample, eta, prev_sample=None, generator=None):
    """TRL 0.23 DDPO's ``scheduler_step`` for epsilon prediction without clipping (Stable Diffusion's scheduler):
    ``(prev_sample, log_prob [B])``, eager torch."""
    def left_broadcast(t, shape):
        return t.reshape(t.shape + (1,) * (len(shape) - t.ndim)).broadcast_to(shape)

    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, scheduler.config.num_train_timesteps - 1)
    alpha_prod_t = scheduler.alphas_cumprod.gather(0, timestep.cpu())
    alpha_prod_t_prev = torch.where(prev_timestep.cpu() >= 0, scheduler.alphas_cumprod.gather(0, prev_timestep.cpu()),
                                    scheduler.final_alpha_cumprod)
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    alpha_prod_t = left_broadcast(alpha_prod_t, sample.shape).to(sample.device)
    alpha_prod_t_prev = left_broadcast(alpha_prod_t_prev, sample.shape).to(sample.device)
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    std_dev_t = left_broadcast(eta * variance**0.5, sample.shape).to(sample.device)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * model_output
    prev_sample_mean = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
    if prev_sample is None:
        noise = torch.randn(model_output.shape, generator=generator, dtype=model_output.dtype)
        prev_sample = prev_sample_mean + std_dev_t * noise
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t**2) - torch.log(std_dev_t)
                - torch.log(torch.sqrt(2 * torch.as_tensor(torch.pi))))
    return prev_sample.type(sample.dtype), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def trl_ddim(x: DDIMInputs, score: bool) -> None:
    """TRL 0.23's DDPO ``scheduler_step`` written out (eager torch autograd)."""
    with torch.set_grad_enabled(score):
        _, log_prob = trl_scheduler_step(x.scheduler, x.model_output, x.timestep_B, x.sample, ETA,
                                         prev_sample=x.prev_sample if score else None,
                                         generator=None if score else torch.Generator().manual_seed(1))
        _finish(x, log_prob, score)


peers.INPUTS["ddim"] = ddim_inputs
peers.PATHS["ddim"] = {
    "fusedrl": peers.PathSpec(fusedrl_ddim, "fusedrl compiled"),
    "reference": peers.PathSpec(reference_ddim, "fusedrl reference"),
    "trl": peers.PathSpec(trl_ddim, "TRL 0.23 DDPO scheduler_step (written out, eager)"),
}
