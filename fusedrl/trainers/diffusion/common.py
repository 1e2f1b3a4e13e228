"""What the diffusion trainers (DDPO, AlignProp) share: accelerate, the optimizer, rewards and prompts, logging with
image grids, checkpoints and resume, kernels and compile, and the epoch loop.

A trainer subclasses :class:`DiffusionTrainerBase` (constructor ``(config, reward_function, prompt_function,
pipeline, image_samples_hook=None)``, TRL's) with a config subclassing :class:`DiffusionConfig`, and overrides:

- ``_train_epoch(self, epoch: int, global_step: int) -> int`` (required): sample, score, update for one epoch;
  returns the new global step (one per optimizer step). Runs inside the trainer's kernel selection.
- ``_check_config(self)``: raise ValueError for settings it cannot run; called once the Accelerator exists
  (``self.accelerator.num_processes`` is known) and before anything is built.
- ``_accumulation_steps(self) -> int``: backward passes per optimizer step, given to the Accelerator (default
  ``train_gradient_accumulation_steps``; DDPO multiplies it by the timesteps it trains on).
- ``_extra_state(self) -> dict`` / ``_load_extra_state(self, state)``: JSON-able algorithm state that a checkpoint
  must carry (DDPO's per-prompt reward buffers).

The base gives a subclass: ``self.pipeline`` (a :class:`DiffusionPipeline`, also ``self.sd_pipeline`` as TRL named
it), ``self.accelerator``, ``self.optimizer``, ``self.trainable_layers`` (the trained parameters),
``self.model`` (the prepared UNet, for ``accelerator.accumulate``), ``self.neg_prompt_embed`` ``[1, L, D]``,
:meth:`sample_prompts`, :meth:`compute_rewards`, :meth:`optimizer_step`,
:meth:`log`, :meth:`log_images`, and ``self.log_history`` (every logged dict, as ``Trainer.state.log_history``).

Checkpoints (after every ``save_freq``-th epoch, in ``output_dir/checkpoints/checkpoint_<epoch>``): the trained
parameters (safetensors), the optimizer (and GradScaler), the Python / NumPy / torch RNG states, epoch, global step,
log history and the extra state; written to a staging directory and renamed into place
(``runtime.checkpoint.write_atomically``), the oldest beyond ``num_checkpoint_limit`` deleted. ``resume_from`` (a
checkpoint, or a directory of them: the newest complete one) restores all of it, so a resumed run continues exactly
as the uninterrupted one would (a prompt function with its own seeded RNG restarts its sequence: the trainers' own
prompt functions without a seed draw from ``random``, which is restored). TRL named them the same way but resumed
at the checkpoint's save count + 1 and with the global step reset to 0.

Legend: B samples, L prompt tokens, D text width, H x W image size.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from fusedrl.ops.compiler import compile_options
from fusedrl.ops.dispatch import config_kernels, kernel_backends, parse_kernel_spec
from fusedrl.runtime.checkpoint import load_json, save_json, write_atomically
from fusedrl.trainers.diffusion.config import DiffusionConfig
from fusedrl.trainers.diffusion.pipeline import DiffusionPipeline
from fusedrl.trainers.diffusion.prompts import draw_prompts
from fusedrl.trainers.diffusion.rewards import ImageRewards, score_images

logger = logging.getLogger("fusedrl")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng_state.json"
TORCH_RNG_FILE = "rng_state.safetensors"

__all__ = ["DiffusionConfig", "DiffusionTrainerBase", "latest_checkpoint", "save_image_grid"]


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a complete checkpoint (``checkpoint_<N>`` with its state file), else the complete
    ``checkpoint_<N>`` under it with the largest N; ValueError when there is none."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if CHECKPOINT_PATTERN.match(path.name):
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"resume_from={str(path)!r} is not a complete checkpoint (no {STATE_FILE})")
        return path
    found = []
    if path.is_dir():
        for entry in path.iterdir():
            match = CHECKPOINT_PATTERN.match(entry.name)
            if match and (entry / STATE_FILE).is_file():
                found.append((int(match.group(1)), entry))
    if not found:
        raise ValueError(f"resume_from={str(path)!r}: no complete checkpoint_<N> directory found there")
    return max(found)[1]


def save_image_grid(images_BCHW: torch.Tensor, path: str | os.PathLike, *, num_columns: int | None = None,
                    padding: int = 2) -> Path:
    """Write images ``[B, 3, H, W]`` in [0, 1] as one PNG grid (``num_columns`` default: ceil(sqrt(B))) with
    ``padding`` white pixels between tiles; returns the path."""
    from PIL import Image

    num_images, _, height, width = images_BCHW.shape
    columns = num_columns or math.ceil(math.sqrt(num_images))
    rows = math.ceil(num_images / columns)
    grid = torch.ones(3, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for index, image in enumerate(images_BCHW.detach().float().cpu().clamp(0, 1)):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)
    return path


def _number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class DiffusionTrainerBase(abc.ABC):
    """The shared machinery of the diffusion trainers; the module docstring lists what a subclass overrides."""

    config_class = DiffusionConfig

    def __init__(self, config: DiffusionConfig, reward_function: Callable, prompt_function: Callable,
                 pipeline: DiffusionPipeline | str | os.PathLike, image_samples_hook: Callable | None = None):
        name = type(self).__name__
        if not isinstance(config, self.config_class):
            raise TypeError(f"{name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        for argument, value in (("reward_function", reward_function), ("prompt_function", prompt_function)):
            if not callable(value):
                raise TypeError(f"{argument} must be callable, got {type(value).__name__}")
        if image_samples_hook is not None and not callable(image_samples_hook):
            raise TypeError(f"image_samples_hook must be callable or None, got {type(image_samples_hook).__name__}")
        # Seeded first: LoRA's random init (PEFT draws from the global RNG) of a pipeline loaded here is then the
        # same in every run. Offset by the process index as set_seed(device_specific=True) does, read from
        # PartialState: AcceleratorState() would fix mixed precision before the Accelerator below sets it.
        set_seed(config.seed + PartialState().process_index)
        if isinstance(pipeline, (str, os.PathLike)):
            pipeline = DiffusionPipeline.from_pretrained(pipeline, use_lora=config.use_lora, lora_rank=config.lora_rank)
        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(f"pipeline must be a fusedrl DiffusionPipeline or a local diffusers directory, got "
                             f"{type(pipeline).__name__} (wrap a StableDiffusionPipeline in DiffusionPipeline(...))")
        self.config, self.reward_fn, self.prompt_fn = config, reward_function, prompt_function
        self.image_samples_callback = image_samples_hook
        self.pipeline = self.sd_pipeline = pipeline
        self.output_dir = Path(config.output_dir)
        self.resume_path = latest_checkpoint(config.resume_from) if config.resume_from else None
        self._kernel_selection = parse_kernel_spec(config.kernels or "", source="kernels")

        mixed_precision = config.mixed_precision or ("fp16" if torch.cuda.is_available() else "no")
        # sync_with_dataloader=False: these trainers feed no accelerate dataloader, and accelerate's process-wide
        # GradientState may still point at one another trainer left active (the demo's GRPO stage): when that one
        # reported its end, accumulate() synced mid-window and DDPO's inner epoch ended inside an accumulation
        # window (seen in the full demo, not in the stage alone).
        self.accelerator = Accelerator(
            log_with=config.log_with, mixed_precision=mixed_precision,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), **config.project_kwargs),
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=self._accumulation_steps(),
                                                                    sync_with_dataloader=False),
            **config.accelerator_kwargs,
        )
        self._check_config()
        if self.accelerator.is_main_process and config.log_with is not None:
            self.accelerator.init_trackers(config.tracker_project_name, config=config.to_dict(),
                                           init_kwargs=config.tracker_kwargs)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        # Frozen weights only run inference: they take the mixed-precision dtype, trained parameters stay fp32.
        inference_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
        pipeline.to(self.accelerator.device, dtype=inference_dtype)

        self.trainable_layers = pipeline.trainable_parameters()
        if not self.trainable_layers:
            raise ValueError("the pipeline has no trainable parameters (use_lora=True adds LoRA; use_lora=False "
                             "trains the UNet)")
        self.optimizer = self._make_optimizer(self.trainable_layers)
        # `model`: the UNet as accelerate wrapped it (DDP, autocast); every prediction runs through it, and
        # `accelerator.accumulate(self.model)` skips DDP's gradient sync inside an accumulation window.
        self.model, self.optimizer = self.accelerator.prepare(pipeline.unet, self.optimizer)
        pipeline.denoiser = self.model
        if config.compile:
            # compile_options() asks for dynamic shapes; Inductor (torch 2.13) fails on the UNet's symbolic sizes
            # (ValueRangeError in its resize arithmetic), and a run has fixed batch shapes, so shapes are static.
            pipeline.denoiser = torch.compile(self.model, **{**compile_options(), "dynamic": False})

        with torch.no_grad():
            negative = [""] if config.negative_prompts is None else [config.negative_prompts]
            self.neg_prompt_embed = pipeline.encode_prompts(negative)
        self.log_history: list[dict[str, Any]] = []
        self.first_epoch, self.global_step = 0, 0
        if self.resume_path is not None:
            logger.info("resuming from %s", self.resume_path)
            self.load_checkpoint(self.resume_path)
        with config_kernels(self._kernel_selection):
            logger.info("fusedrl kernels for %s on %s: %s", name, self.accelerator.device,
                        kernel_backends(self.accelerator.device))

    # --- hooks of a subclass ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _train_epoch(self, epoch: int, global_step: int) -> int:
        """Sample, score and update for one epoch; return the new global step."""

    def _check_config(self) -> None:
        """Raise ValueError for settings this trainer cannot run (the base checks none beyond the config's)."""

    def _accumulation_steps(self) -> int:
        return self.config.train_gradient_accumulation_steps

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned (the base keeps none)."""

    # --- pieces for a subclass ----------------------------------------------------------------------------------

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        config = self.config
        if config.train_use_8bit_adam:
            import bitsandbytes  # checked importable by the config

            optimizer_class = bitsandbytes.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        return optimizer_class(params, lr=config.train_learning_rate,
                               betas=(config.train_adam_beta1, config.train_adam_beta2),
                               weight_decay=config.train_adam_weight_decay, eps=config.train_adam_epsilon)

    def sample_prompts(self, num_prompts: int) -> tuple[list[str], list[dict]]:
        """``num_prompts`` calls of the prompt function, checked (``prompts.draw_prompts``)."""
        return draw_prompts(self.prompt_fn, num_prompts)

    def compute_rewards(self, images: torch.Tensor, prompts: Sequence[str], prompt_metadata: Sequence[dict], *,
                        differentiable: bool = False) -> ImageRewards:
        """The reward function on one batch, checked (``rewards.score_images``): fp32 ``[B]`` rewards on the
        trainer's device and the reward metadata; ``differentiable=True`` requires a gradient to ``images``."""
        return score_images(self.reward_fn, images, prompts, prompt_metadata, differentiable=differentiable)

    def optimizer_step(self) -> None:
        """Inside ``accelerator.accumulate``: clip the gradient norm on a synchronising step, then step and zero
        (accelerate skips both on the other micro-batches of an accumulation window)."""
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.trainable_layers, self.config.train_max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Send ``metrics`` to the trackers at ``step`` and append them (plain numbers) to ``log_history``."""
        entry = {key: _number(value) for key, value in metrics.items()}
        self.accelerator.log(entry, step=step)
        self.log_history.append({**entry, "step": step})

    def log_images(self, prompt_image_data: list[list], epoch: int, global_step: int) -> Path | None:
        """Every ``log_image_freq`` epochs (main process): one PNG grid of the epoch's images in
        ``output_dir/images/epoch_<epoch>.png``; then the ``image_samples_hook`` as TRL called it,
        ``hook(prompt_image_data, global_step, first tracker or None)`` with ``prompt_image_data`` a list of
        ``[images, prompts, prompt_metadata, rewards, reward_metadata]`` per sampled batch."""
        if self.image_samples_callback is not None:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_callback(prompt_image_data, global_step, tracker)
        freq = self.config.log_image_freq
        if not (freq and epoch % freq == 0 and self.accelerator.is_main_process):
            return None
        images = torch.cat([batch[0].detach() for batch in prompt_image_data])
        return save_image_grid(images, self.output_dir / "images" / f"epoch_{epoch}.png")

    @contextlib.contextmanager
    def kernel_context(self):
        """The trainer's ``kernels=`` selection (the config level: a caller's ``use_kernels`` still wins)."""
        with config_kernels(self._kernel_selection):
            yield

    # --- the loop -----------------------------------------------------------------------------------------------

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch (TRL's ``step``): sample, score and update; returns the new global step."""
        with self.kernel_context():
            return self._train_epoch(epoch, global_step)

    def train(self, epochs: int | None = None) -> list[dict[str, Any]]:
        """Train from ``first_epoch`` (0, or the resumed checkpoint's epoch + 1) up to ``epochs`` (default
        ``num_epochs``), checkpointing after every ``save_freq``-th epoch; returns ``log_history``."""
        epochs = self.config.num_epochs if epochs is None else epochs
        progress = tqdm(range(self.first_epoch, epochs), desc=type(self).__name__, initial=self.first_epoch,
                        total=epochs, disable=not self.accelerator.is_local_main_process, dynamic_ncols=True)
        for epoch in progress:
            self.global_step = self.step(epoch, self.global_step)
            rewards = [entry["reward_mean"] for entry in self.log_history if "reward_mean" in entry]
            if rewards:
                progress.set_postfix(reward_mean=f"{rewards[-1]:.4f}")
            if (epoch + 1) % self.config.save_freq == 0:
                self.save_checkpoint(epoch)
            self.first_epoch = epoch + 1
        return self.log_history

    def save_pretrained(self, path: str | os.PathLike | None = None) -> Path:
        """The trained pipeline as a diffusers directory (``DiffusionPipeline.save_pretrained``; default
        ``output_dir/model``), written by the main process."""
        path = Path(path) if path is not None else self.output_dir / "model"
        if self.accelerator.is_main_process:
            self.pipeline.save_pretrained(path)
        self.accelerator.wait_for_everyone()
        return path

    save_model = save_pretrained

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save_checkpoint(self, epoch: int) -> Path:
        """Checkpoint the state after ``epoch`` (see the module docstring); returns its directory."""
        checkpoints = self.output_dir / "checkpoints"
        is_main = self.accelerator.is_main_process

        def write(staging: str) -> None:
            if not is_main:
                return
            directory = Path(staging) / f"checkpoint_{epoch}"
            directory.mkdir(parents=True)
            safetensors.torch.save_file({name: tensor.cpu().contiguous() for name, tensor
                                         in self.pipeline.trainable_state_dict().items()},
                                        directory / TRAINABLE_FILE)
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
            if self.accelerator.scaler is not None:
                torch.save(self.accelerator.scaler.state_dict(), directory / SCALER_FILE)
            numpy_state, python_state = np.random.get_state(), random.getstate()
            save_json(directory / RNG_FILE, {
                "python": [python_state[0], list(python_state[1]), python_state[2]],
                "numpy": [numpy_state[0], numpy_state[1].tolist(), *map(_number, numpy_state[2:])],
            })
            torch_states = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                torch_states.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
            safetensors.torch.save_file(torch_states, directory / TORCH_RNG_FILE)
            save_json(directory / STATE_FILE, {"epoch": epoch, "global_step": self.global_step,
                                               "log_history": self.log_history, "extra": self._extra_state()})

        published = Path(write_atomically(str(checkpoints), f"checkpoint_{epoch}", write, is_main=is_main,
                                          barrier=self.accelerator.wait_for_everyone))
        limit = self.config.num_checkpoint_limit
        if is_main and limit is not None:
            numbered = sorted((int(match.group(1)), entry) for entry in checkpoints.iterdir()
                              if (match := CHECKPOINT_PATTERN.match(entry.name)))
            for _, stale in numbered[:-limit]:
                shutil.rmtree(stale, ignore_errors=True)
        return published

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a :meth:`save_checkpoint` directory: parameters, optimizer, RNG states, counters, history."""
        path = latest_checkpoint(path)
        device = self.accelerator.device
        self.pipeline.load_trainable_state_dict(safetensors.torch.load_file(path / TRAINABLE_FILE,
                                                                            device=str(device)))
        self.optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location=device, weights_only=True))
        if self.accelerator.scaler is not None and (path / SCALER_FILE).is_file():
            self.accelerator.scaler.load_state_dict(torch.load(path / SCALER_FILE, weights_only=True))
        rng = load_json(path / RNG_FILE)
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        torch_states = safetensors.torch.load_file(path / TORCH_RNG_FILE)
        torch.set_rng_state(torch_states["cpu"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch_states[f"cuda{i}"] for i in range(torch.cuda.device_count())
                                          if f"cuda{i}" in torch_states])
        state = load_json(path / STATE_FILE)
        self.first_epoch, self.global_step = state["epoch"] + 1, state["global_step"]
        self.log_history = list(state["log_history"])
        self._load_extra_state(state["extra"])
