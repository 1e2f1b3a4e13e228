"""The Stable Diffusion pipeline the diffusion trainers train: a diffusers ``StableDiffusionPipeline`` with a DDIM
scheduler, LoRA (PEFT) on the UNet's attention projections, and sampling whose every step goes through
``fusedrl.ddim_step_logprob`` (the ``ddim_logprob`` op, so ``kernels=`` picks its backend).

What TRL's ``DefaultDDPOStableDiffusionPipeline`` did, with three differences:
- sampling runs the denoising loop here (no monkey-patched ``__call__``) and returns the latents of every step and
  their log-probs as stacked tensors; classifier-free guidance is one UNet call on ``[uncond; cond]``;
- :meth:`DiffusionPipeline.save_pretrained` writes a directory that loads with plain diffusers
  (``StableDiffusionPipeline.from_pretrained(path)`` then ``load_lora_weights(path)``): the UNet is saved without
  PEFT's ``base_layer`` names (diffusers' own ``save_pretrained`` keeps them and the result no longer loads), the
  LoRA as ``pytorch_lora_weights.safetensors``; written to a temporary directory and published with one rename;
- the VAE and text encoder are frozen; with ``use_lora`` only the LoRA matrices train, without it the whole UNet
  (a LoRA found in a loaded directory is then fused into the UNet weights first).

Legend: B samples, S sampling steps, C latent channels, h x w latent size, L prompt tokens, D text width,
H x W image size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from fusedrl.ops.ddim import ddim_step_logprob

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # TRL's choice: every attention projection of the UNet
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name, read by load_lora_weights
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
ADAPTER = "default"


class SampleOutput(NamedTuple):
    """One sampled batch. ``latents``: ``[B, S + 1, C, h, w]`` (the initial noise, then the latents after each
    step); ``log_probs``: fp32 ``[B, S]``, the log-prob of each step's result; ``timesteps``: int64 ``[S]``, the
    timestep of each step; ``images``: fp32 ``[B, 3, H, W]`` in [0, 1], decoded from the last latents."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    images: torch.Tensor


def _has_adapter(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


class DiffusionPipeline:
    """A ``StableDiffusionPipeline`` prepared for RL fine-tuning (see the module docstring).

    ``use_lora``: train LoRA matrices of rank ``lora_rank`` (alpha = rank, Gaussian init with B = 0, so training
    starts from the base model exactly) on ``to_q``/``to_k``/``to_v``/``to_out.0``; an adapter already in the UNet
    (loaded from a directory) is trained as it is. ``use_lora=False``: the whole UNet trains.
    """

    def __init__(self, sd_pipeline: StableDiffusionPipeline, *, use_lora: bool = True, lora_rank: int = 4):
        missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if getattr(sd_pipeline, name, None) is None]
        if missing:
            raise ValueError(f"sd_pipeline must be a diffusers StableDiffusionPipeline; it has no {', '.join(missing)}")
        if not (isinstance(lora_rank, int) and lora_rank >= 1):
            raise ValueError(f"lora_rank must be an int >= 1, got {lora_rank!r}")
        self.sd_pipeline = sd_pipeline
        self.use_lora = use_lora
        # The module that runs noise predictions: the UNet, or the UNet as a trainer wrapped it (accelerate's DDP /
        # autocast wrapper, torch.compile). Parameters, saving and configs always go through `unet`.
        self.denoiser: torch.nn.Module | None = None
        if not isinstance(sd_pipeline.scheduler, DDIMScheduler):
            # The log-probs are DDIM's: any other scheduler of a checkpoint is replaced by DDIM on the same schedule.
            sd_pipeline.scheduler = DDIMScheduler.from_config(sd_pipeline.scheduler.config)
        if hasattr(sd_pipeline, "safety_checker"):
            sd_pipeline.safety_checker = None
        sd_pipeline.vae.requires_grad_(False)
        sd_pipeline.text_encoder.requires_grad_(False)
        unet = sd_pipeline.unet
        if use_lora:
            if not _has_adapter(unet):
                unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                            target_modules=list(LORA_TARGETS)), adapter_name=ADAPTER)
            unet.requires_grad_(False)
            for name, param in unet.named_parameters():
                if ".lora_" in name:
                    param.data = param.data.float()  # LoRA trains in fp32 even over a half-precision UNet
                    param.requires_grad_(True)
        else:
            if _has_adapter(unet):
                unet.fuse_lora()  # the adapter's update is merged into the base weights, then the layers unwrapped
                unet.unload_lora()
            unet.requires_grad_(True)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, use_lora: bool = True, lora_rank: int = 4,
                        dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
        """Load a local diffusers directory (``StableDiffusionPipeline.from_pretrained``; nothing is downloaded)
        in ``dtype``, with the LoRA weights of a directory that has ``pytorch_lora_weights.safetensors`` (as
        :meth:`save_pretrained` writes)."""
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a diffusers pipeline directory (no model_index.json); build one with "
                             "fusedrl.cli.presets.diffusion.save_tiny_pipeline or StableDiffusionPipeline.save_pretrained")
        sd_pipeline = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                                              requires_safety_checker=False, local_files_only=True)
        if (path / LORA_WEIGHTS).is_file():
            sd_pipeline.load_lora_weights(path, weight_name=LORA_WEIGHTS, adapter_name=ADAPTER)
        return cls(sd_pipeline, use_lora=use_lora, lora_rank=lora_rank)

    # --- components ------------------------------------------------------------------------------------------

    @property
    def unet(self):
        return self.sd_pipeline.unet

    @property
    def vae(self):
        return self.sd_pipeline.vae

    @property
    def text_encoder(self):
        return self.sd_pipeline.text_encoder

    @property
    def tokenizer(self):
        return self.sd_pipeline.tokenizer

    @property
    def scheduler(self) -> DDIMScheduler:
        return self.sd_pipeline.scheduler

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusionPipeline:
        """Move the frozen weights to ``device`` (cast to ``dtype`` when given: the inference dtype of mixed
        precision); trainable parameters keep fp32."""
        for module in (self.vae, self.text_encoder, self.unet):
            module.to(device)
            if dtype is not None:
                for param in module.parameters():
                    if not param.requires_grad:
                        param.data = param.data.to(dtype)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA matrices (``use_lora``) or every UNet parameter, in module order."""
        return [param for param in self.unet.parameters() if param.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name (detached, on their device): what a training checkpoint saves."""
        return {name: param.detach() for name, param in self.unet.named_parameters() if param.requires_grad}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a :meth:`trainable_state_dict` back in place (names must match exactly)."""
        params = {name: param for name, param in self.unet.named_parameters() if param.requires_grad}
        if params.keys() != state.keys():
            extra, missing = sorted(state.keys() - params.keys()), sorted(params.keys() - state.keys())
            raise ValueError(f"the checkpoint's trainable parameters do not match this pipeline's (use_lora and "
                             f"lora_rank must be the ones it was saved with): unexpected {extra[:3]}, missing "
                             f"{missing[:3]}")
        for name, param in params.items():
            if state[name].shape != param.shape:
                raise ValueError(f"the checkpoint's {name} is {tuple(state[name].shape)}, this pipeline's "
                                 f"{tuple(param.shape)} (lora_rank must be the one it was saved with)")
            param.copy_(state[name])

    # --- prompts, noise prediction, sampling -------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``[B, L, D]`` text-encoder states of ``prompts``, padded / truncated to the tokenizer's
        ``model_max_length`` (Stable Diffusion's conditioning)."""
        ids_BL = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids_BL.to(self.text_encoder.device))[0]

    def predict_noise(self, latents: torch.Tensor, timestep: int | torch.Tensor, prompt_embeds: torch.Tensor,
                      negative_embeds: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
        """The UNet's prediction ``[B, C, h, w]`` in ``latents``' dtype, guided when ``guidance_scale > 1``:
        ``uncond + guidance_scale * (cond - uncond)`` from one UNet call on ``[uncond; cond]`` (2B rows).

        latents: ``[B, C, h, w]``; timestep: an int, a 0-d tensor or ``[B]`` (one per sample); prompt_embeds:
        ``[B, L, D]``; negative_embeds: ``[B, L, D]`` or ``[1, L, D]`` (broadcast), needed when guiding.
        Differentiable w.r.t. the trainable parameters when grad is enabled.
        """
        denoiser = self.unet if self.denoiser is None else self.denoiser
        if guidance_scale <= 1.0:
            return denoiser(latents, timestep, prompt_embeds, return_dict=False)[0].to(latents.dtype)
        if negative_embeds is None:
            raise ValueError("negative_embeds is needed for classifier-free guidance (guidance_scale > 1)")
        num_rows = latents.shape[0]
        embeds_2BLD = torch.cat([negative_embeds.expand(num_rows, -1, -1), prompt_embeds])
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 1:
            timestep = timestep.repeat(2)
        noise_2B = denoiser(latents.repeat(2, 1, 1, 1), timestep, embeds_2BLD, return_dict=False)[0]
        uncond, cond = noise_2B.to(latents.dtype).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def initial_latents(self, num_samples: int, *, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Gaussian starting latents ``[B, C, h, w]`` at the UNet's native size (``sample_size``), scaled by the
        scheduler's ``init_noise_sigma`` (1 for DDIM), drawn on the generator's device as diffusers does."""
        config = self.unet.config
        shape = (num_samples, config.in_channels, config.sample_size, config.sample_size)
        device = generator.device if generator is not None else self.device
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype).to(self.device)
        return noise * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def sample(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, *, num_steps: int,
               guidance_scale: float, eta: float, generator: torch.Generator | None = None,
               latents: torch.Tensor | None = None) -> SampleOutput:
        """Run the DDIM chain for ``prompt_embeds`` ``[B, L, D]`` without gradients: ``num_steps`` steps, each one
        (guided) UNet call for the whole batch and one ``ddim_step_logprob`` that draws the next latents and
        scores them. ``latents``: the starting noise ``[B, C, h, w]`` (default: :meth:`initial_latents`).
        Latents stay fp32 whatever the UNet's dtype (run this under autocast for a half-precision UNet).
        Returns :class:`SampleOutput`."""
        self.scheduler.set_timesteps(num_steps, device=self.device)
        timesteps_S = self.scheduler.timesteps
        if latents is None:
            latents = self.initial_latents(prompt_embeds.shape[0], generator=generator)
        all_latents, all_log_probs = [latents], []
        for timestep in timesteps_S:
            noise_pred = self.predict_noise(latents, timestep, prompt_embeds, negative_embeds, guidance_scale)
            step = ddim_step_logprob(self.scheduler, noise_pred, timestep, latents, eta=eta, generator=generator)
            latents = step.prev_sample
            all_latents.append(latents)
            all_log_probs.append(step.log_prob)
        return SampleOutput(torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1), timesteps_S,
                            self.decode(latents).float())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] from latents ``[B, C, h, w]``: the VAE decoder on
        ``latents / scaling_factor (+ shift_factor)``, then ``(x / 2 + 0.5).clamp(0, 1)`` (diffusers'
        postprocessing). Differentiable w.r.t. ``latents``."""
        config = self.vae.config
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1)

    # --- saving ------------------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the pipeline to ``path`` (a diffusers directory: base weights + ``pytorch_lora_weights.safetensors``
        with ``use_lora``, the trained UNet otherwise), atomically: into ``.<name>.tmp`` beside it, then renamed
        over ``path``. :meth:`from_pretrained` (and plain diffusers) load it back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)  # left over from a save that was killed
        staging.mkdir()
        self.sd_pipeline.save_config(staging)  # model_index.json
        for name, component in self.sd_pipeline.components.items():
            if name == "unet":
                self._save_base_unet(staging / name)
            elif component is not None and hasattr(component, "save_pretrained"):
                component.save_pretrained(staging / name)
        if _has_adapter(self.unet):
            lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet, adapter_name=ADAPTER))
            StableDiffusionPipeline.save_lora_weights(
                staging, unet_lora_layers=lora_state, weight_name=LORA_WEIGHTS,
                unet_lora_adapter_metadata=self.unet.peft_config[ADAPTER].to_dict(),
            )
        if path.exists():
            replaced = path.parent / f".{path.name}.replaced"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(path, replaced)
            os.replace(staging, path)
            shutil.rmtree(replaced)
        else:
            os.replace(staging, path)
        return path

    def _save_base_unet(self, directory: Path) -> None:
        """The UNet without its LoRA: PEFT renames each wrapped layer's weights ``<layer>.base_layer.*`` and adds
        ``<layer>.lora_*``; the base names are restored and the LoRA left to its own file."""
        directory.mkdir(parents=True)
        self.unet.save_config(directory)
        state = {name.replace(".base_layer.", "."): tensor.detach().cpu().contiguous()
                 for name, tensor in self.unet.state_dict().items() if ".lora_" not in name}
        safetensors.torch.save_file(state, directory / UNET_WEIGHTS, metadata={"format": "pt"})
