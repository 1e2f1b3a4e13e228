"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning"): PPO over the denoising chain.
Each DDIM step is a Gaussian policy ``p(x_{t-1} | x_t, prompt)``; sampled chains are scored by a reward on their
final image, and every step's log-prob ratio against the sampling policy is trained with PPO's clipped objective
and the chain's (normalised) reward as advantage.

TRL 0.23's ``DDPOTrainer`` semantics (names, defaults, batching, the per-prompt stat tracker, the per-sample shuffle
of time, accumulation over timesteps, logged ``reward_mean`` / ``reward_std`` / ``loss`` / ``approx_kl`` /
``clipfrac``), run on fusedrl's ops:
- each sampling step and each training step's log-prob are ``fusedrl.ddim_step_logprob`` (the ``ddim_logprob`` op);
- the objective is ``fusedrl.policy_loss`` with one "token" per sample: ``logps`` = the step's log-prob ``[B, 1]``,
  ``epsilon_low = epsilon_high = train_clip_range``, advantages clipped to ``+-train_adv_clip_max``; GRPO's per-row
  mean over one token is TRL's ``mean(max(-A r, -A clip(r)))`` exactly;
- per training micro-step: one UNet call for the whole train batch (``[uncond; cond]`` when ``train_cfg``), no
  Python loop over samples anywhere (TRL drew one ``randperm`` per sample to shuffle time; here one ``argsort`` of
  uniform noise does it for all);
- the stored chain keeps ``S + 1`` latents per sample (``latents[:, j]`` and ``latents[:, j + 1]`` are a step's
  input and result) instead of TRL's two ``S``-long copies.

Legend: N samples of an epoch (per process), S sampling steps, K trained steps per sample, B train batch,
C x h x w latents, L prompt tokens, D text width.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from concurrent import futures

import numpy as np
import torch
from accelerate.utils import gather_object

from fusedrl.ops.ddim import ddim_step_logprob
from fusedrl.ops.policy import policy_loss
from fusedrl.trainers.diffusion.common import DiffusionTrainerBase
from fusedrl.trainers.diffusion.ddpo_config import DDPOConfig


class PerPromptStatTracker:
    """Per-prompt reward normalisation (TRL / ddpo-pytorch): each prompt keeps its last ``buffer_size`` rewards;
    a reward's advantage is ``(r - mean) / (std + 1e-6)`` over its prompt's buffer once that holds ``min_count``
    rewards, over the whole batch before. The buffers are state: checkpoints save them (:meth:`state_dict`)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards) -> np.ndarray:
        """Add ``rewards`` ``[N]`` (one per prompt) to the buffers and return their advantages ``[N]`` (fp32)."""
        prompts = np.asarray(prompts)
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            rows = prompts == prompt
            buffer = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(rewards[rows].tolist())
            reference = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[rows] = (rewards[rows] - reference.mean()) / (reference.std() + 1e-6)
        return advantages.astype(np.float32)

    def get_stats(self) -> dict[str, dict[str, float]]:
        return {prompt: {"mean": float(np.mean(buffer)), "std": float(np.std(buffer)), "count": len(buffer)}
                for prompt, buffer in self.stats.items()}

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buffer) for prompt, buffer in self.stats.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.stats = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state.items()}


class DDPOTrainer(DiffusionTrainerBase):
    """``DDPOTrainer(config, reward_function, prompt_function, pipeline, image_samples_hook=None)``, as TRL's.

    reward_function: ``(images [B, 3, H, W] in [0, 1], prompts, prompt_metadata) -> (rewards [B], metadata)``;
    prompt_function: ``() -> (prompt, metadata)``; pipeline: a :class:`DiffusionPipeline` or a local diffusers
    directory (loaded with ``config.use_lora`` / ``lora_rank``). ``train()`` runs ``num_epochs`` epochs.
    """

    config_class = DDPOConfig

    def __init__(self, config: DDPOConfig, reward_function, prompt_function, pipeline, image_samples_hook=None):
        # Built before the base's set-up, which restores a checkpoint's buffers into it (the base checks the type).
        tracked = isinstance(config, DDPOConfig) and config.per_prompt_stat_tracking
        self.stat_tracker = (PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size,
                                                  config.per_prompt_stat_tracking_min_count) if tracked else None)
        super().__init__(config, reward_function, prompt_function, pipeline, image_samples_hook)
        self.executor = (futures.ThreadPoolExecutor(max_workers=config.max_workers)
                         if config.async_reward_computation else None)

    # --- base hooks ---------------------------------------------------------------------------------------------

    def _accumulation_steps(self) -> int:
        # One backward per trained step: an optimizer step covers train_gradient_accumulation_steps batches of
        # num_train_timesteps steps each (TRL's accounting).
        return self.config.train_gradient_accumulation_steps * self.config.num_train_timesteps

    def _check_config(self) -> None:
        config, processes = self.config, self.accelerator.num_processes
        if config.sample_batch_size % config.train_batch_size:
            raise ValueError(f"sample_batch_size ({config.sample_batch_size}) must be a multiple of train_batch_size "
                             f"({config.train_batch_size})")
        samples_per_epoch = config.sample_batch_size * config.sample_num_batches_per_epoch * processes
        per_update = config.train_batch_size * config.train_gradient_accumulation_steps * processes
        if samples_per_epoch % per_update:
            raise ValueError(f"the samples of an epoch (sample_batch_size x sample_num_batches_per_epoch x processes "
                             f"= {samples_per_epoch}) must be a multiple of the samples of an optimizer step "
                             f"(train_batch_size x train_gradient_accumulation_steps x processes = {per_update}), "
                             "so every inner epoch ends on an optimizer step")

    def _extra_state(self) -> dict:
        return {"stat_tracker": self.stat_tracker.state_dict()} if self.stat_tracker is not None else {}

    def _load_extra_state(self, state: dict) -> None:
        if self.stat_tracker is not None:
            self.stat_tracker.load_state_dict(state.get("stat_tracker", {}))

    # --- one epoch ----------------------------------------------------------------------------------------------

    def _train_epoch(self, epoch: int, global_step: int) -> int:
        config = self.config
        samples, prompt_image_data, pending = self._generate_samples(config.sample_num_batches_per_epoch,
                                                                     config.sample_batch_size)
        scored = [future.result() for future in pending] if self.executor is not None else [
            self.compute_rewards(images, prompts, metadata) for images, prompts, metadata in prompt_image_data]
        for batch, (rewards_B, reward_metadata) in zip(prompt_image_data, scored):
            batch.extend([rewards_B, reward_metadata])
        self.log_images(prompt_image_data, epoch, global_step)

        rewards_N = torch.cat([rewards_B for rewards_B, _ in scored])
        all_rewards = self.accelerator.gather(rewards_N).cpu().numpy()
        self.log({"reward_mean": all_rewards.mean(), "reward_std": all_rewards.std(), "epoch": epoch}, global_step)
        if self.stat_tracker is not None:
            prompts = [prompt for _, batch_prompts, *_ in prompt_image_data for prompt in batch_prompts]
            all_prompts = gather_object(prompts) if self.accelerator.num_processes > 1 else prompts
            advantages = self.stat_tracker.update(all_prompts, all_rewards)
        else:
            advantages = (all_rewards - all_rewards.mean()) / (all_rewards.std() + 1e-8)
        # Keep this process's rows of the gathered advantages.
        local = torch.as_tensor(advantages).reshape(self.accelerator.num_processes, -1)[self.accelerator.process_index]
        samples["advantages"] = local.to(self.accelerator.device, torch.float32)

        for inner_epoch in range(config.train_num_inner_epochs):
            global_step = self._train_inner_epoch(samples, epoch, inner_epoch, global_step)
            if not self.accelerator.sync_gradients:  # _check_config makes every inner epoch end on a step
                raise RuntimeError("an inner epoch ended inside a gradient-accumulation window")
        return global_step

    @torch.no_grad()
    def _generate_samples(self, iterations: int, batch_size: int):
        """``iterations`` sampled batches of ``batch_size`` prompts: the chains as one dict of tensors over the
        N = iterations x batch_size samples (``prompt_embeds`` [N, L, D], ``latents`` [N, S + 1, C, h, w],
        ``log_probs`` [N, S], ``timesteps`` [S]), ``[images, prompts, prompt_metadata]`` per batch, and the
        reward futures of ``async_reward_computation`` (one per batch, else empty)."""
        config, pipeline = self.config, self.pipeline
        self.model.eval()
        chains, prompt_image_data, pending = defaultdict(list), [], []
        for _ in range(iterations):
            prompts, prompt_metadata = self.sample_prompts(batch_size)
            prompt_embeds_BLD = pipeline.encode_prompts(prompts)
            with self.accelerator.autocast():
                out = pipeline.sample(prompt_embeds_BLD, self.neg_prompt_embed, num_steps=config.sample_num_steps,
                                      guidance_scale=config.sample_guidance_scale, eta=config.sample_eta)
            chains["prompt_embeds"].append(prompt_embeds_BLD)
            chains["latents"].append(out.latents)
            chains["log_probs"].append(out.log_probs)
            prompt_image_data.append([out.images, prompts, prompt_metadata])
            if self.executor is not None:
                pending.append(self.executor.submit(self.compute_rewards, out.images, prompts, prompt_metadata))
        samples = {key: torch.cat(values) for key, values in chains.items()}
        samples["timesteps"] = out.timesteps
        return samples, prompt_image_data, pending

    def _train_inner_epoch(self, samples: dict[str, torch.Tensor], epoch: int, inner_epoch: int,
                           global_step: int) -> int:
        config, device = self.config, self.accelerator.device
        num_samples, num_steps = samples["log_probs"].shape
        # A random order of samples, and for each sample its own random order of steps (the first K are trained).
        order_N = torch.randperm(num_samples, device=device)
        step_order_NS = torch.argsort(torch.rand(num_samples, num_steps, device=device), dim=1)
        self.model.train()
        info = defaultdict(list)
        for start in range(0, num_samples, config.train_batch_size):
            rows_B = order_N[start:start + config.train_batch_size]
            for k in range(config.num_train_timesteps):
                steps_B = step_order_NS[rows_B, k]
                with self.accelerator.accumulate(self.model):
                    loss, approx_kl, clipfrac = self.calculate_loss(
                        samples["latents"][rows_B, steps_B], samples["timesteps"][steps_B],
                        samples["latents"][rows_B, steps_B + 1], samples["log_probs"][rows_B, steps_B],
                        samples["advantages"][rows_B], samples["prompt_embeds"][rows_B],
                    )
                    self.accelerator.backward(loss)
                    self.optimizer_step()
                info["loss"].append(loss.detach())
                info["approx_kl"].append(approx_kl)
                info["clipfrac"].append(clipfrac)
                if self.accelerator.sync_gradients:
                    means = {key: torch.stack(values).mean() for key, values in info.items()}
                    means = self.accelerator.reduce(means, reduction="mean")
                    self.log({**means, "epoch": epoch, "inner_epoch": inner_epoch}, global_step)
                    global_step += 1
                    info = defaultdict(list)
        return global_step

    def calculate_loss(self, latents: torch.Tensor, timesteps: torch.Tensor, next_latents: torch.Tensor,
                       log_probs: torch.Tensor, advantages: torch.Tensor, prompt_embeds: torch.Tensor):
        """The clipped PPO loss of one trained step for a batch (TRL's ``calculate_loss``).

        latents, next_latents: ``[B, C, h, w]``, a step's input and sampled result; timesteps: ``[B]`` int64 (each
        sample's own step); log_probs: ``[B]`` fp32, the sampling policy's log-prob of ``next_latents``;
        advantages: ``[B]``; prompt_embeds: ``[B, L, D]``. Returns ``(loss, approx_kl, clipfrac)``: the loss
        (scalar, differentiable w.r.t. the trained parameters), ``0.5 * mean((log_prob - log_probs)^2)`` and the
        fraction of samples with ``|ratio - 1| > train_clip_range`` (both detached).
        """
        config = self.config
        guidance = config.sample_guidance_scale if config.train_cfg else 1.0
        with self.accelerator.autocast():
            noise_pred = self.pipeline.predict_noise(latents, timesteps, prompt_embeds, self.neg_prompt_embed,
                                                     guidance)
        log_prob_B = ddim_step_logprob(self.pipeline.scheduler, noise_pred, timesteps, latents, eta=config.sample_eta,
                                       prev_sample=next_latents).log_prob
        clipped_B = advantages.clamp(-config.train_adv_clip_max, config.train_adv_clip_max)
        out = policy_loss(log_prob_B[:, None], log_probs[:, None].float(), clipped_B,
                          torch.ones_like(log_prob_B[:, None]), epsilon_low=config.train_clip_range,
                          epsilon_high=config.train_clip_range, loss_type="grpo")
        log_ratio_B = log_prob_B.detach() - log_probs.float()
        approx_kl = 0.5 * (log_ratio_B ** 2).mean()
        clipfrac = ((log_ratio_B.exp() - 1.0).abs() > config.train_clip_range).float().mean()
        return out.loss, approx_kl, clipfrac
