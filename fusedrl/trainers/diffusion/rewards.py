"""Image rewards for the diffusion trainers: a registry of names, the built-in rewards, and the checked call.

Calling convention (TRL's DDPO and AlignProp trainers, kvablack/ddpo-pytorch):
``reward_fn(images, prompts, prompt_metadata) -> (rewards, reward_metadata)`` with ``images`` fp32 ``[B, 3, H, W]``
in [0, 1], ``prompts`` B strings, ``prompt_metadata`` B dicts; ``rewards`` one number per image (tensor, array or
list), ``reward_metadata`` a dict. AlignProp backpropagates through ``rewards``, so its reward must be a tensor that
depends differentiably on ``images`` (``brightness``, ``target_color``, ``aesthetic``); DDPO's may be anything
(``jpeg_*`` go through PIL).

The registry holds factories, as ddpo-pytorch does, because some rewards need arguments (a weights path, a colour):
``get_diffusion_reward("target_color", color=(0, 0, 1))`` builds one. Built-ins:

- ``jpeg_incompressibility``: size in kB of the image saved as JPEG at quality 95 (PIL); ``jpeg_compressibility``
  is its negative. Not differentiable.
- ``brightness``: mean pixel value in [0, 1]; differentiable, a tiny pipeline raises it within a few steps.
- ``target_color``: minus the mean squared distance of every pixel to ``color`` (RGB in [0, 1], red by default).
- ``aesthetic``: :class:`AestheticScorer` loaded from a local directory (``path=``) or given (``scorer=``).

:func:`score_images` calls a reward and checks what it returns: a function that raises, returns the wrong shape or
count, or NaN / +-inf raises a ValueError naming the function and the image (row and prompt).

Legend: B images, C=3 channels, H x W pixels, E the CLIP projection width.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fusedrl.trainers.registry import NamedRegistry

RewardFn = Callable[[torch.Tensor, Sequence[str], Sequence[dict]], tuple[Any, dict]]

# CLIP's image normalisation (the constants of openai/clip-vit-* preprocessor configs): the scorer sees images the
# way its CLIP tower was trained on them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MLP_FILE = "aesthetic_mlp.safetensors"


# --- built-in rewards ------------------------------------------------------------------------------------------

def _uint8_images(images) -> list:
    """PIL images from a ``[B, 3, H, W]`` [0, 1] tensor (rounded as ddpo-pytorch does) or a list of PIL images."""
    from PIL import Image

    if not isinstance(images, torch.Tensor):
        return list(images)
    pixels_BHWC = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return [Image.fromarray(pixels.cpu().numpy()) for pixels in pixels_BHWC]


def jpeg_incompressibility() -> RewardFn:
    """Size in kB (1000 bytes) of each image as a quality-95 JPEG: detail and noise score high."""
    def jpeg_incompressibility(images, prompts, prompt_metadata):
        sizes = []
        for image in _uint8_images(images):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            sizes.append(buffer.tell() / 1000)
        return torch.tensor(sizes, dtype=torch.float32), {}
    return jpeg_incompressibility


def jpeg_compressibility() -> RewardFn:
    """Minus the quality-95 JPEG size in kB: flat, smooth images score high."""
    incompressibility = jpeg_incompressibility()

    def jpeg_compressibility(images, prompts, prompt_metadata):
        sizes, metadata = incompressibility(images, prompts, prompt_metadata)
        return -sizes, metadata
    return jpeg_compressibility


def brightness() -> RewardFn:
    """Mean pixel value of each image, in [0, 1]; differentiable."""
    def brightness(images, prompts, prompt_metadata):
        return images.float().mean(dim=(1, 2, 3)), {}
    return brightness


def target_color(color: Sequence[float] = (1.0, 0.0, 0.0)) -> RewardFn:
    """Minus the mean squared RGB distance of every pixel to ``color`` (3 values in [0, 1]); 0 is a flat image of
    exactly that colour. Differentiable."""
    color = tuple(float(c) for c in color)
    if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
        raise ValueError(f"target_color: color must be 3 values in [0, 1] (RGB), got {color}")

    def target_color(images, prompts, prompt_metadata):
        target_C11 = torch.tensor(color, dtype=torch.float32, device=images.device).view(3, 1, 1)
        return -(images.float() - target_C11).pow(2).mean(dim=(1, 2, 3)), {}
    return target_color


class AestheticMLP(nn.Module):
    """LAION's improved-aesthetic-predictor head (its layer sizes and dropouts; ``layers.{0,2,4,6,7}`` are the keys
    of its released state dict, so a converted file loads as is): E -> 1024 -> 128 -> 64 -> 16 -> 1."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeds_BE: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds_BE).squeeze(-1)


class AestheticScorer(nn.Module):
    """A frozen, differentiable aesthetic score: CLIP vision tower + projection, L2-normalised image embedding, then
    :class:`AestheticMLP` (ddpo-pytorch's and AlignProp's scorer, with gradients to the pixels).

    ``AestheticScorer(vision_config)`` builds an untrained one from a ``CLIPVisionConfig`` (tests use a tiny config);
    :meth:`from_pretrained` loads trained weights from local files only. Real weights: a local copy of a CLIP
    checkpoint (``openai/clip-vit-large-patch14``, E=768) and LAION's ``sac+logos+ava1-l14-linearMSE.pth`` saved as
    safetensors (``safetensors.torch.save_file(torch.load(pth), "aesthetic_mlp.safetensors")``).
    """

    def __init__(self, vision_config=None, *, clip: nn.Module | None = None):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        if (vision_config is None) == (clip is None):
            raise ValueError("AestheticScorer needs exactly one of vision_config (a CLIPVisionConfig) or clip (a "
                             "CLIPVisionModelWithProjection)")
        self.clip = clip if clip is not None else CLIPVisionModelWithProjection(vision_config)
        self.mlp = AestheticMLP(self.clip.config.projection_dim)
        self.register_buffer("mean_C11", torch.tensor(CLIP_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std_C11", torch.tensor(CLIP_STD).view(3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> AestheticScorer:
        """Always eval: the score must not change with dropout when a trainer toggles train mode."""
        return super().train(False)

    @classmethod
    def from_pretrained(cls, path, *, mlp_file=None, dtype: torch.dtype = torch.float32) -> AestheticScorer:
        """CLIP from the local directory ``path`` (a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` checkpoint),
        the head from ``mlp_file`` (default ``path/aesthetic_mlp.safetensors``). Never downloads."""
        from safetensors.torch import load_file
        from transformers import CLIPVisionModelWithProjection

        path = Path(path)
        mlp_file = Path(mlp_file) if mlp_file is not None else path / MLP_FILE
        for required in (path, mlp_file):
            if not required.exists():
                raise ValueError(f"aesthetic scorer: {required} does not exist (weights load from local files only)")
        clip = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, dtype=dtype)
        scorer = cls(clip=clip)
        scorer.mlp.load_state_dict(load_file(mlp_file))
        return scorer.to(dtype)

    def save_pretrained(self, path) -> Path:
        """Write what :meth:`from_pretrained` reads: the CLIP checkpoint and ``aesthetic_mlp.safetensors``."""
        from safetensors.torch import save_file

        path = Path(path)
        self.clip.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.mlp.state_dict().items()}, path / MLP_FILE)
        return path

    def preprocess(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """CLIP's preprocessing, differentiable: shorter side resized to the tower's ``image_size`` (bilinear,
        antialiased), centre crop, then the mean/std normalisation."""
        size = self.clip.config.image_size
        height, width = images_BCHW.shape[-2:]
        scale = size / min(height, width)
        new_hw = (max(size, round(height * scale)), max(size, round(width * scale)))
        resized = F.interpolate(images_BCHW, size=new_hw, mode="bilinear", antialias=True, align_corners=False)
        top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
        cropped = resized[..., top:top + size, left:left + size]
        return (cropped - self.mean_C11) / self.std_C11

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B]`` fp32 scores."""
        param = next(self.clip.parameters())
        pixels = self.preprocess(images_BCHW.to(param.device, torch.float32)).to(param.dtype)
        embeds_BE = self.clip(pixel_values=pixels).image_embeds
        embeds_BE = embeds_BE / torch.linalg.vector_norm(embeds_BE, dim=-1, keepdim=True)
        return self.mlp(embeds_BE).float()


def aesthetic(path=None, *, scorer: AestheticScorer | None = None, mlp_file=None) -> RewardFn:
    """The aesthetic score of each image (differentiable): ``scorer`` as given, or loaded from the local ``path``
    (see :meth:`AestheticScorer.from_pretrained`)."""
    if (path is None) == (scorer is None):
        raise ValueError("the aesthetic reward needs exactly one of path= (a local directory with a CLIP checkpoint "
                         f"and {MLP_FILE}; nothing is downloaded) or scorer= (an AestheticScorer)")
    scorer = scorer if scorer is not None else AestheticScorer.from_pretrained(path, mlp_file=mlp_file)

    def aesthetic(images, prompts, prompt_metadata):
        return scorer(images).to(images.device), {}
    aesthetic.scorer = scorer
    return aesthetic


# --- registry ---------------------------------------------------------------------------------------------------

BUILTIN_DIFFUSION_REWARDS: dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "brightness": brightness,
    "target_color": target_color,
    "aesthetic": aesthetic,
}
_REGISTRY = NamedRegistry("diffusion reward", BUILTIN_DIFFUSION_REWARDS,
                          "add one with fusedrl.trainers.diffusion.rewards.register_diffusion_reward")


def register_diffusion_reward(name: str, factory: Callable[..., RewardFn], *, replace: bool = False):
    """Register ``factory`` (``(**kwargs) -> reward_fn``) as ``name``; returns ``factory``. ValueError for a
    built-in name, a name already registered (unless ``replace``), an empty name or a non-callable factory."""
    return _REGISTRY.register(name, factory, replace=replace)


def unregister_diffusion_reward(name: str) -> None:
    """Remove a custom reward (KeyError if it is not registered; built-ins cannot be removed)."""
    _REGISTRY.unregister(name)


def registered_diffusion_rewards() -> dict[str, Callable[..., RewardFn]]:
    """Every registered name: built-ins first, then custom registrations."""
    return _REGISTRY.registered()


def get_diffusion_reward(name: str, **kwargs) -> RewardFn:
    """The reward function ``name`` builds with ``kwargs`` (ValueError listing the known names otherwise)."""
    return _REGISTRY.get(name)(**kwargs)


# --- the checked call -------------------------------------------------------------------------------------------

class ImageRewards(NamedTuple):
    """``rewards``: fp32 ``[B]`` on the images' device (carrying the graph when the reward is differentiable);
    ``metadata``: the dict the reward function returned."""

    rewards: torch.Tensor
    metadata: dict


def _name(reward_fn) -> str:
    return getattr(reward_fn, "__name__", type(reward_fn).__name__)


def _row(row: int, prompts: Sequence[str]) -> str:
    return f"image {row} (prompt {prompts[row]!r})" if row < len(prompts) else f"image {row}"


def score_images(reward_fn: RewardFn, images: torch.Tensor, prompts: Sequence[str],
                 prompt_metadata: Sequence[dict], *, differentiable: bool = False) -> ImageRewards:
    """Call ``reward_fn(images, prompts, prompt_metadata)`` and check it (see the module docstring).

    ``differentiable=True`` (AlignProp) also requires the rewards to carry a gradient back to ``images`` when
    ``images`` requires grad. Every failure is a ValueError naming the function, and the image where one is at fault.
    """
    name, num_rows = _name(reward_fn), images.shape[0]
    try:
        output = reward_fn(images, prompts, prompt_metadata)
    except Exception as error:  # any failure inside user code is reported with the function's name
        raise ValueError(f"reward function '{name}' raised {type(error).__name__}: {error}") from error
    if not isinstance(output, tuple) or len(output) != 2:
        raise ValueError(f"reward function '{name}' returned a {type(output).__name__}; it must return a pair "
                         "(rewards, reward_metadata) with one reward per image, as TRL's DDPO/AlignProp rewards do")
    rewards, metadata = output
    if not isinstance(rewards, torch.Tensor):
        try:
            rewards = torch.as_tensor(rewards, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"reward function '{name}' returned rewards of type {type(rewards).__name__}; they "
                             "must be numbers (a tensor, array or list with one per image)") from None
    if rewards.dim() == 2 and rewards.shape[1] == 1:
        rewards = rewards[:, 0]  # a [B, 1] model head, as the aesthetic MLP of ddpo-pytorch gives before squeeze
    if rewards.shape != (num_rows,):
        raise ValueError(f"reward function '{name}' returned rewards of shape {tuple(rewards.shape)} for {num_rows} "
                         "images; it must return exactly one reward per image")
    if rewards.is_complex():
        raise ValueError(f"reward function '{name}' returned complex rewards; rewards must be real numbers")
    finite = torch.isfinite(rewards.detach())
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise ValueError(f"reward function '{name}' returned {float(rewards[row])} for {_row(row, prompts)}; "
                         "rewards must be finite")
    if differentiable and images.requires_grad and rewards.grad_fn is None:
        raise ValueError(f"reward function '{name}' returned rewards without a gradient to the images; AlignProp "
                         "backpropagates through the reward, so it must be computed with torch ops on the images "
                         "(built-in differentiable rewards: brightness, target_color, aesthetic)")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        message = (f"reward function '{name}' returned metadata of type {type(metadata).__name__}; the second "
                   "element of its pair must be a dict")
        raise ValueError(message)  # noqa: TRY004
    return ImageRewards(rewards.to(images.device, torch.float32), metadata)
