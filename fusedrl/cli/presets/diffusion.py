"""A tiny Stable Diffusion pipeline built from configs, for the diffusion trainers' tests, demo and benchmarks.

Nothing is downloaded: the UNet, VAE and text encoder are randomly initialised from the shapes of diffusers' own
fast tests (``get_dummy_components`` of the Stable Diffusion tests), and the ``CLIPTokenizer`` is loaded from a
``vocab.json`` / ``merges.txt`` pair written here: CLIP's byte-level alphabet (each byte alone and as a word end
``</w>``), a few merges and ``<|startoftext|>`` / ``<|endoftext|>``, the layout of the real CLIP vocabulary.

Sizes: 32 x 32 RGB images, 4 x 16 x 16 latents (two VAE blocks: a scale factor of 2), prompts of at most
``MAX_PROMPT_TOKENS`` tokens, a 32-wide text encoder. The UNet has ~1M parameters; on the 2-core CPU one forward
over 16 latents takes 20-50 ms (loaded machine), so a DDPO epoch of 8 samples x 4 steps costs well under a second.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

IMAGE_SIZE = 32
LATENT_SIZE = 16  # IMAGE_SIZE / the VAE's scale factor 2 (two blocks)
MAX_PROMPT_TOKENS = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Merges of common bigrams and word ends, so frequent prompt words take a few tokens instead of one per letter.
# Each merge joins two existing symbols; the result is added to the vocabulary after the byte alphabet.
MERGES = (
    ("a", "t</w>"), ("t", "h"), ("e", "r</w>"), ("i", "n"), ("o", "n</w>"), ("a", "n"), ("o", "r"), ("e", "n"),
    ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>"), ("th", "e</w>"), ("o", "f</w>"), ("a", "l"), ("s", "t"),
    ("e", "s</w>"), ("a", "r"), ("o", "u"), ("h", "or"), ("s", "e</w>"), ("hor", "se</w>"), ("e", "a"), ("l", "e</w>"),
)


def _byte_alphabet() -> list[str]:
    """CLIP's (GPT-2's) byte -> printable-character table, as a list indexed by byte value: printable Latin-1
    bytes map to themselves, the others to code points from 256 up, so every byte is one visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the tiny CLIP tokenizer into ``directory``; returns it.

    Vocabulary order as CLIP's: the 256 byte characters, the same with ``</w>``, the merges' results, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the last two ids).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(f"{char}</w>" for char in alphabet), *(left + right for left, right in MERGES), BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise AssertionError("duplicate token in the tiny CLIP vocabulary")  # a MERGES edit that repeats a symbol
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in MERGES)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def build_clip_tokenizer() -> CLIPTokenizer:
    """The tiny ``CLIPTokenizer`` (``model_max_length = MAX_PROMPT_TOKENS``), loaded from files written to a
    temporary directory, as ``from_pretrained`` on a real checkpoint would load them."""
    with tempfile.TemporaryDirectory() as directory:
        write_clip_tokenizer_files(directory)
        return CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_PROMPT_TOKENS)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised fp32 ``StableDiffusionPipeline`` (DDIM scheduler, no safety checker); the same seed
    gives the same weights. The global torch RNG is left as it was (initialisation draws from a forked state)."""
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # diffusers' fast-test UNet shapes (block_out_channels=(32, 64), cross_attention_dim=32) with one layer per
        # block instead of two: 0.99M instead of 1.43M parameters and ~30% less time per call, still two
        # cross-attention blocks (down and up) whose to_q/to_k/to_v/to_out.0 projections LoRA trains.
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            norm_num_groups=1,
            sample_size=IMAGE_SIZE,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    # Stable Diffusion v1's schedule (scaled_linear 0.00085 -> 0.012), no sample clipping, as diffusers' tests.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`build_tiny_pipeline` (``seed``) to ``path`` with ``save_pretrained``, so
    ``StableDiffusionPipeline.from_pretrained(path)`` (and ``DiffusionPipeline.from_pretrained``) load it."""
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path)
    return path


# The demo's diffusion stage (fusedrl/cli/demo_diffusion.py): both trainers from the same untrained tiny pipeline,
# pushed towards red (target_color: minus the mean squared distance of every pixel to (1, 0, 0)).
# - Full fine-tuning: DDPO's score-function gradient with LoRA on this UNet needs ~256 samples per step to point the
#   right way (tests/trainers/test_ddpo_trainer.py), more than a demo affords; the whole UNet moves with 8.
# - A colour rather than brightness: this VAE saturates brightness near 0.62 (AlignProp, 20 epochs), while the
#   images' colour moves far and visibly.
# - DDPO: TRL's default clip range 1e-4 keeps every inner step at the first one's size; 0.2 (PPO's) lets the second
#   inner epoch take a step of its own.
# Measured in development (loaded 2-core machine, seed 0): AlignProp's sampled reward -0.261 -> -0.038 in 20 epochs
# (~10 s), DDPO's -0.260 -> -0.211 in 10 epochs (~18 s); the stage checks the evaluation batch's rise.
DIFFUSION_DEMO_RECIPE: dict = {
    "pipeline_seed": 0,
    "reward": "target_color",
    "reward_kwargs": {"color": (1.0, 0.0, 0.0)},
    "prompts": "animals",
    "alignprop": {"num_epochs": 20, "sample_num_steps": 4, "train_batch_size": 4, "train_learning_rate": 3e-3,
                  "truncated_rand_backprop_minmax": (0, 4), "use_lora": False, "seed": 0},
    "ddpo": {"num_epochs": 10, "sample_num_steps": 4, "sample_batch_size": 8, "sample_num_batches_per_epoch": 1,
             "train_batch_size": 4, "train_num_inner_epochs": 2, "train_learning_rate": 1e-3, "train_clip_range": 0.2,
             "use_lora": False, "seed": 0},
    "eval_images": 8,
    "eval_seed": 1234,
    "eval_sampling": {"num_steps": 4, "guidance_scale": 5.0, "eta": 1.0},
    # The evaluation batch's reward must rise by at least this much.
    "target_eval_rise": {"alignprop": 0.1, "ddpo": 0.02},
}
