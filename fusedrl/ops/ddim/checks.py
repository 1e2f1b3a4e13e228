"""Input checks of ``fusedrl.ddim_step_logprob`` and what it reads from the scheduler: every error names the
argument and says what would be accepted."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from fusedrl.ops import checks
from fusedrl.ops.ddim.reference import PREDICTION_TYPES


class SchedulerTerms(NamedTuple):
    """What a step reads from a diffusers ``DDIMScheduler`` (the op below the public function sees tensors only)."""

    alphas_cumprod: torch.Tensor  # [num_train_timesteps]
    final_alpha_cumprod: torch.Tensor | float  # the "previous" cumulative alpha of the last step
    num_train_timesteps: int
    step: int  # num_train_timesteps // num_inference_steps: timestep minus this is the previous timestep
    prediction_type: str
    clip_range: float | None  # None: no clipping of the predicted x0


def scheduler_terms(scheduler) -> SchedulerTerms:
    config = getattr(scheduler, "config", None)
    missing = [name for name in ("alphas_cumprod", "final_alpha_cumprod", "num_inference_steps")
               if not hasattr(scheduler, name)]
    missing += [f"config.{name}" for name in ("num_train_timesteps", "prediction_type", "clip_sample")
                if not hasattr(config, name)]
    if missing:
        raise ValueError(f"scheduler must be a diffusers DDIMScheduler (or expose its attributes); "
                         f"{type(scheduler).__name__} has no {', '.join(missing)}")
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler has no num_inference_steps; call scheduler.set_timesteps(num_inference_steps) "
                         "before stepping")
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"scheduler.config.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got "
                         f"{config.prediction_type!r}")
    if getattr(config, "thresholding", False):
        raise ValueError("scheduler.config.thresholding=True is not supported (dynamic thresholding clips each "
                         "sample by a quantile of its own pixels); set thresholding=False, or clip_sample=True for "
                         "a fixed range")
    clip_range = float(getattr(config, "clip_sample_range", 1.0)) if config.clip_sample else None
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"scheduler.config.clip_sample_range must be > 0 with clip_sample=True, got {clip_range}")
    return SchedulerTerms(
        alphas_cumprod=scheduler.alphas_cumprod, final_alpha_cumprod=scheduler.final_alpha_cumprod,
        num_train_timesteps=int(config.num_train_timesteps),
        step=int(config.num_train_timesteps) // int(scheduler.num_inference_steps),
        prediction_type=config.prediction_type, clip_range=clip_range,
    )


def check_step_request(model_output: torch.Tensor, sample: torch.Tensor, *, eta: float,
                       prev_sample: torch.Tensor | None, generator: torch.Generator | None) -> None:
    checks.check_float("model_output", model_output, min_dim=2)
    checks.check_float("sample", sample, min_dim=2)
    if model_output.shape != sample.shape or model_output.device != sample.device:
        raise ValueError(f"model_output {tuple(model_output.shape)} on {model_output.device} must match sample "
                         f"{tuple(sample.shape)} on {sample.device}")
    if prev_sample is not None:
        checks.check_float("prev_sample", prev_sample, min_dim=2)
        if prev_sample.shape != sample.shape or prev_sample.device != sample.device:
            raise ValueError(f"prev_sample {tuple(prev_sample.shape)} on {prev_sample.device} must match sample "
                             f"{tuple(sample.shape)} on {sample.device}")
    # A chained comparison rejects NaN and inf too.
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if prev_sample is not None and eta <= 0:
        raise ValueError(f"eta must be > 0 to score a given prev_sample (std = eta * sqrt(variance) = 0 has no "
                         f"log-prob), got {eta!r}")
    if prev_sample is not None and generator is not None:
        raise ValueError("generator and prev_sample were both given: a generator draws prev_sample; pass one of them")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (one for the batch), got {type(generator).__name__}")


def checked_timesteps(timestep: int | torch.Tensor, num_rows: int, device: torch.device,
                      num_train_timesteps: int) -> torch.Tensor:
    """int64 ``[B]`` on ``device`` from a Python int, a 0-d tensor or a ``[B]`` tensor, each in
    ``[0, num_train_timesteps)`` (the range check of a tensor is one host sync; skipped while torch.compile traces)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool:
            raise ValueError(f"timestep must hold integers (scheduler.timesteps are int64), got {timestep.dtype}")
        if timestep.dim() == 0:
            timestep = timestep.reshape(1).expand(num_rows)
        elif timestep.shape != (num_rows,):
            raise ValueError(f"timestep must be an int, a 0-d tensor or one per sample [{num_rows}], got shape "
                             f"{tuple(timestep.shape)}")
        timestep_B = timestep.to(device=device, dtype=torch.int64)
        if not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.stack([timestep_B.min(), timestep_B.max()]).tolist())
            if low < 0 or high >= num_train_timesteps:
                raise ValueError(f"timestep must lie in [0, {num_train_timesteps}), got values in [{low}, {high}]")
        return timestep_B
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Integral):
        # The API promises ValueError for every bad input, type errors included.
        raise ValueError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")  # noqa: TRY004
    if not 0 <= timestep < num_train_timesteps:
        raise ValueError(f"timestep must lie in [0, {num_train_timesteps}), got {timestep}")
    return torch.full((num_rows,), int(timestep), dtype=torch.int64, device=device)
