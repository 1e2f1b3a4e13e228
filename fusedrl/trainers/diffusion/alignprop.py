"""AlignProp (Prabhudesai et al. 2023, "Aligning Text-to-Image Diffusion Models with Reward Backpropagation"):
sample images with gradients through the DDIM chain, score them with a differentiable reward, and ascend the
reward by backpropagating through the sampler into the trained parameters (LoRA on the UNet attention projections
by default). No policy gradient, no log-probs: the chain itself is the computation graph.

TRL 0.23's ``AlignPropTrainer`` semantics (names, defaults, one optimizer step per epoch over
``train_gradient_accumulation_steps`` batches of ``train_batch_size`` fresh samples, logged ``reward_mean`` /
``reward_std`` / ``loss``), with these differences:
- each sampling step is ``fusedrl.ddim_step_logprob`` (the ``ddim_logprob`` op, so ``kernels=`` picks its backend);
  its drawn ``prev_sample`` carries the gradient through the step's mean;
- truncation (``alignprop_config.py``): steps before the first trained one run the UNet under ``no_grad`` (TRL ran
  them with a graph and detached the prediction afterwards: the same gradients for more work); the first trained
  step is drawn once per chain, where TRL drew a new value at every step;
- ``gradient_checkpointing`` (TRL: always on) is a config flag; each trained step's guided UNet call is one
  non-reentrant checkpoint, so the graph holds each step's latents instead of the UNet's activations;
- the reward is checked (``rewards.score_images``): a reward without a gradient to the images, NaN or the wrong
  count raises naming the function and the image;
- the ``image_samples_hook`` gets TRL's AlignProp dict every ``log_image_freq`` epochs, and a grid PNG of the
  epoch's images is written to ``output_dir/images``;
- the loss is ``-mean(reward)``: TRL's ``10 - mean(reward)`` (a constant chosen for its aesthetic scorer) has the
  same gradient; the logged loss differs by that constant.

Randomness (prompt draws, the truncation draw and the sampling noise) comes from the global ``random`` / torch
RNGs, seeded from ``config.seed`` and saved in checkpoints, so a resumed run continues as the uninterrupted one.

Legend: B samples, S sampling steps, C x h x w latents, L prompt tokens, D text width, H x W images.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from fusedrl.ops.ddim import ddim_step_logprob
from fusedrl.runtime.memory import PeakMemory
from fusedrl.trainers.diffusion.alignprop_config import AlignPropConfig
from fusedrl.trainers.diffusion.common import DiffusionTrainerBase, save_image_grid
from fusedrl.trainers.diffusion.pipeline import DiffusionPipeline


class GradSample(NamedTuple):
    """A chain sampled with gradients. ``images``: fp32 ``[B, 3, H, W]`` in [0, 1], differentiable w.r.t. the
    trained parameters through steps ``backprop_start..S-1``; ``latents``: the final ``[B, C, h, w]``;
    ``backprop_start``: the index of the first step that kept a graph."""

    images: torch.Tensor
    latents: torch.Tensor
    backprop_start: int


def sample_with_grad(pipeline: DiffusionPipeline, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
                     *, num_steps: int, guidance_scale: float, eta: float, backprop_start: int,
                     gradient_checkpointing: bool, generator: torch.Generator | None = None,
                     latents: torch.Tensor | None = None) -> GradSample:
    """Run the DDIM chain for ``prompt_embeds`` ``[B, L, D]`` keeping a graph from step ``backprop_start`` on
    (``0 <= backprop_start < num_steps``), and decode the result with gradients (TRL's ``pipeline_step_with_grad``
    with truncation; see the module docstring).

    Steps ``i < backprop_start`` (UNet call and DDIM step) run under ``no_grad``, so nothing before them, not even
    the starting latents, gets a gradient. Steps ``i >= backprop_start``: the UNet call runs with a graph,
    recomputed in the backward when ``gradient_checkpointing``. Every step's next latents are
    ``ddim_step_logprob``'s draw (``eta``; noise from ``generator``, else the global torch RNG). ``latents``: the
    starting noise ``[B, C, h, w]`` (default: ``pipeline.initial_latents``).
    """
    if not 0 <= backprop_start < num_steps:
        raise ValueError(f"backprop_start must be in [0, num_steps) = [0, {num_steps}), got {backprop_start}")
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(num_steps, device=pipeline.device)
    if latents is None:
        latents = pipeline.initial_latents(prompt_embeds.shape[0], generator=generator)
    for index, timestep in enumerate(scheduler.timesteps):
        if index < backprop_start:
            with torch.no_grad():  # the whole step: the chain's graph starts at backprop_start
                noise_pred = pipeline.predict_noise(latents, timestep, prompt_embeds, negative_embeds, guidance_scale)
                latents = ddim_step_logprob(scheduler, noise_pred, timestep, latents, eta=eta,
                                            generator=generator).prev_sample
            continue
        if gradient_checkpointing:
            # The checkpoint keeps its inputs (latents, embeddings) and reruns the call in the backward under the
            # same autocast and RNG state; the trained parameters are reached through the pipeline's UNet.
            noise_pred = checkpoint(pipeline.predict_noise, latents, timestep, prompt_embeds, negative_embeds,
                                    guidance_scale, use_reentrant=False)
        else:
            noise_pred = pipeline.predict_noise(latents, timestep, prompt_embeds, negative_embeds, guidance_scale)
        latents = ddim_step_logprob(scheduler, noise_pred, timestep, latents, eta=eta, generator=generator).prev_sample
    return GradSample(pipeline.decode(latents).float(), latents, backprop_start)


class AlignPropTrainer(DiffusionTrainerBase):
    """``AlignPropTrainer(config, reward_function, prompt_function, pipeline, image_samples_hook=None)``, as TRL's.

    reward_function: ``(images [B, 3, H, W] in [0, 1], prompts, prompt_metadata) -> (rewards [B], metadata)``,
    differentiable w.r.t. ``images`` (``rewards.py``: ``brightness``, ``target_color``, ``aesthetic``);
    prompt_function: ``() -> (prompt, metadata)``; pipeline: a :class:`DiffusionPipeline` or a local diffusers
    directory (loaded with ``config.use_lora`` / ``lora_rank``). ``train()`` runs ``num_epochs`` epochs of one
    optimizer step each. Logged per epoch: ``reward_mean``, ``reward_std``, ``loss`` (TRL's names, means over the
    accumulated batches), ``backprop_steps`` (steps that kept a graph) and the epoch's peak memory
    (``runtime.memory.PeakMemory``: ``memory/peak_rss_mb`` on CPU, ``memory/peak_allocated_mb`` on CUDA).
    """

    config_class = AlignPropConfig

    def __init__(self, config: AlignPropConfig, reward_function, prompt_function, pipeline, image_samples_hook=None):
        super().__init__(config, reward_function, prompt_function, pipeline, image_samples_hook)
        self._peak_memory = PeakMemory(self.accelerator.device)

    def backprop_start(self) -> int:
        """The first step of the next chain that keeps a graph (``AlignPropConfig.backprop_start_range``), drawn
        from the global ``random`` as TRL's ``random.randint``."""
        low, high = self.config.backprop_start_range
        return low if low == high else random.randint(low, high)

    def _train_epoch(self, epoch: int, global_step: int) -> int:
        config = self.config
        info, prompt_image_data = defaultdict(list), []
        self.model.train()
        self._peak_memory.reset()
        for _ in range(config.train_gradient_accumulation_steps):
            prompts, prompt_metadata = self.sample_prompts(config.train_batch_size)
            with self.accelerator.accumulate(self.model), self.accelerator.autocast(), torch.enable_grad():
                sample = self._generate_samples(prompts)
                rewards_B, reward_metadata = self.compute_rewards(sample.images, prompts, prompt_metadata,
                                                                  differentiable=True)
                loss = self.calculate_loss(rewards_B)
                self.accelerator.backward(loss)
                self.optimizer_step()
            gathered = self.accelerator.gather(rewards_B.detach())
            info["reward_mean"].append(gathered.mean())
            info["reward_std"].append(gathered.std(unbiased=False))
            info["loss"].append(loss.detach())
            info["backprop_steps"].append(torch.tensor(float(config.sample_num_steps - sample.backprop_start)))
            prompt_image_data.append([sample.images.detach(), prompts, prompt_metadata, rewards_B.detach(),
                                      reward_metadata])
        if not self.accelerator.sync_gradients:  # one optimizer step per epoch, as TRL checked
            raise RuntimeError("an AlignProp epoch ended inside a gradient-accumulation window; the Accelerator's "
                               "gradient_accumulation_steps must be train_gradient_accumulation_steps")
        means = {key: torch.stack(values).mean() for key, values in info.items()}
        means = self.accelerator.reduce(means, reduction="mean")
        self.log({**means, **self._peak_memory.read(), "epoch": epoch}, global_step)
        global_step += 1
        self.log_images(prompt_image_data, epoch, global_step)
        return global_step

    def _generate_samples(self, prompts: list[str]) -> GradSample:
        """One batch for ``prompts``, sampled with gradients through the truncated chain."""
        config = self.config
        prompt_embeds_BLD = self.pipeline.encode_prompts(prompts)
        return sample_with_grad(
            self.pipeline, prompt_embeds_BLD, self.neg_prompt_embed, num_steps=config.sample_num_steps,
            guidance_scale=config.sample_guidance_scale, eta=config.sample_eta, backprop_start=self.backprop_start(),
            gradient_checkpointing=config.gradient_checkpointing,
        )

    def log_images(self, prompt_image_data: list[list], epoch: int, global_step: int) -> Path | None:
        """Every ``log_image_freq`` epochs: the grid PNG of the epoch's images (``DiffusionTrainerBase``), and the
        ``image_samples_hook`` called as TRL's AlignProp called it: ``hook(prompt_image_pairs, global_step,
        first tracker or None)`` with ``prompt_image_pairs`` the dict ``images`` / ``prompts`` /
        ``prompt_metadata`` / ``rewards`` of the epoch's last batch (DDPO's hook gets the list of every batch)."""
        freq = self.config.log_image_freq
        if self.image_samples_callback is not None and freq and epoch % freq == 0:
            images, prompts, prompt_metadata, rewards, _ = prompt_image_data[-1]
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_callback({"images": images, "prompts": prompts, "prompt_metadata": prompt_metadata,
                                         "rewards": rewards}, global_step, tracker)
        if not (freq and epoch % freq == 0 and self.accelerator.is_main_process):
            return None
        images = torch.cat([batch[0] for batch in prompt_image_data])
        return save_image_grid(images, self.output_dir / "images" / f"epoch_{epoch}.png")

    def calculate_loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """``-mean(rewards)`` of differentiable rewards ``[B]``: the loss whose descent ascends the reward (TRL's
        ``10 - mean``, without its constant)."""
        return -rewards.mean()
