"""The tiny Stable Diffusion pipeline (``cli/presets/diffusion.py``) and the trainers' pipeline wrapper
(``trainers/diffusion/pipeline.py``): deterministic build, CLIP tokenizer from generated files, sampling whose stored
log-probs are what rescoring gives (DDPO's ratio starts at exactly 1), one batched UNet call for guidance, LoRA set-up,
save/load round trips (fusedrl and plain diffusers), and clear errors."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch
from diffusers import StableDiffusionPipeline

from fusedrl.cli.presets.diffusion import (
    BOS,
    EOS,
    IMAGE_SIZE,
    LATENT_SIZE,
    MAX_PROMPT_TOKENS,
    build_tiny_pipeline,
    write_clip_tokenizer_files,
)
from fusedrl.ops.ddim import ddim_step_logprob
from fusedrl.ops.dispatch import use_kernels
from fusedrl.trainers.diffusion.pipeline import LORA_WEIGHTS, DiffusionPipeline
from tests.utils import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb_lora(pipeline: DiffusionPipeline, seed: int = 1) -> None:
    """LoRA starts with B = 0 (no effect); give every trained matrix a small random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in pipeline.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def test_tiny_pipeline_is_deterministic_per_seed():
    first, again, other = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    for module in ("unet", "vae", "text_encoder"):
        a, b, c = (getattr(p, module).state_dict() for p in (first, again, other))
        assert all(torch.equal(a[key], b[key]) for key in a), module
        assert not all(torch.equal(a[key], c[key]) for key in a), module
    assert first.unet.config.sample_size == LATENT_SIZE
    assert first.vae_scale_factor * LATENT_SIZE == IMAGE_SIZE
    wrapped = DiffusionPipeline(first)  # an in-memory pipeline wraps as a loaded one does
    assert len(wrapped.trainable_parameters()) == 4 * 16  # 4 projections x 8 attention blocks x (A, B)


def test_clip_tokenizer_files_and_prompts(tmp_path):
    write_clip_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2"
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1  # CLIP's layout: specials last
    tokenizer = build_tiny_pipeline().tokenizer
    ids = tokenizer(["a photo of a cat", "horse"], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == MAX_PROMPT_TOKENS and all(len(row) == MAX_PROMPT_TOKENS for row in ids)
    assert ids[1][:3] == [vocab[BOS], vocab["horse</w>"], vocab[EOS]]  # merged to one token
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == ["a photo of a cat", "horse"]


def test_sample_shapes_and_stored_log_probs_rescore_exactly(tiny_sd_dir):
    """Each stored log-prob is the step's log-prob of the stored next latents under the same prediction: what DDPO's
    training step recomputes, so its first ratio is 1."""
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    _perturb_lora(pipeline)
    embeds = pipeline.encode_prompts(["cat", "dog", "horse"])
    negative = pipeline.encode_prompts([""])
    assert embeds.shape == (3, MAX_PROMPT_TOKENS, 32) and negative.shape == (1, MAX_PROMPT_TOKENS, 32)
    with use_kernels(ddim_logprob="reference"):
        out = pipeline.sample(embeds, negative, num_steps=3, guidance_scale=4.0, eta=1.0,
                              generator=torch.Generator().manual_seed(0))
        assert out.latents.shape == (3, 4, 4, LATENT_SIZE, LATENT_SIZE)
        assert out.log_probs.shape == (3, 3) and out.log_probs.dtype == torch.float32
        assert out.timesteps.tolist() == [667, 334, 1]  # 1000 // 3 apart, steps_offset 1
        assert out.images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0
        with torch.no_grad():
            for j, timestep in enumerate(out.timesteps):
                noise = pipeline.predict_noise(out.latents[:, j], timestep.repeat(3), embeds, negative, 4.0)
                rescored = ddim_step_logprob(pipeline.scheduler, noise, timestep.repeat(3), out.latents[:, j],
                                             eta=1.0, prev_sample=out.latents[:, j + 1]).log_prob
                assert_close(rescored, out.log_probs[:, j], name=f"step {j}", rtol=1e-4, atol=1e-4)
    again = pipeline.sample(embeds, negative, num_steps=3, guidance_scale=4.0, eta=1.0,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.latents[:, 0], out.latents[:, 0])  # the same generator seed, the same start


def test_guidance_is_one_batched_unet_call(tiny_sd_dir):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    _perturb_lora(pipeline)
    latents, timestep = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([501, 251])
    embeds, negative = pipeline.encode_prompts(["cat", "dog"]), pipeline.encode_prompts([""])
    with torch.no_grad(), mock.patch.object(pipeline.unet, "forward", wraps=pipeline.unet.forward) as spy:
        guided = pipeline.predict_noise(latents, timestep, embeds, negative, 5.0)
        assert spy.call_count == 1 and spy.call_args.args[0].shape[0] == 4  # [uncond; cond]
        uncond = pipeline.predict_noise(latents, timestep, negative.expand(2, -1, -1), None, 1.0)
        cond = pipeline.predict_noise(latents, timestep, embeds, None, 1.0)
    assert_close(guided, uncond + 5.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="negative_embeds"):
        pipeline.predict_noise(latents, timestep, embeds, None, 5.0)


def test_lora_and_full_fine_tuning_set_up(tiny_sd_dir):
    lora = DiffusionPipeline.from_pretrained(tiny_sd_dir, lora_rank=2)
    names = [name for name, param in lora.unet.named_parameters() if param.requires_grad]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert all(param.shape[0] == 2 for name, param in lora.unet.named_parameters() if ".lora_A." in name)
    assert not any(p.requires_grad for p in (*lora.vae.parameters(), *lora.text_encoder.parameters()))
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    latents, embeds = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE), torch.randn(2, MAX_PROMPT_TOKENS, 32)
    with torch.no_grad():  # LoRA's B starts at 0: the wrapped UNet is the base model exactly
        assert torch.equal(lora.unet(latents, 501, embeds).sample, base.unet(latents, 501, embeds).sample)
    full = DiffusionPipeline.from_pretrained(tiny_sd_dir, use_lora=False)
    assert len(full.trainable_parameters()) == len(list(full.unet.parameters()))


def test_save_pretrained_round_trips_with_fusedrl_and_plain_diffusers(tiny_sd_dir, tmp_path):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    _perturb_lora(pipeline)
    target = tmp_path / "model"
    pipeline.save_pretrained(target)
    pipeline.save_pretrained(target)  # saving over an existing directory replaces it
    assert (target / LORA_WEIGHTS).is_file() and (target / "model_index.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no staging or replaced directory left behind
    latents, embeds = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE), pipeline.encode_prompts(["cat", "dog"])
    with torch.no_grad():
        expected = pipeline.unet(latents, 501, embeds).sample
        reloaded = DiffusionPipeline.from_pretrained(target)
        assert torch.equal(reloaded.unet(latents, 501, embeds).sample, expected)
        state = pipeline.trainable_state_dict()
        assert all(torch.equal(state[key], value) for key, value in reloaded.trainable_state_dict().items())
        plain = StableDiffusionPipeline.from_pretrained(target)  # base weights load without PEFT names
        plain.load_lora_weights(target)
        assert_close(plain.unet(latents, 501, embeds).sample, expected)
        fused = DiffusionPipeline.from_pretrained(target, use_lora=False)  # the LoRA merged into the UNet
        assert_close(fused.unet(latents, 501, embeds).sample, expected, rtol=1e-4, atol=1e-5)
    full_target = tmp_path / "full"
    fused.save_pretrained(full_target)
    assert not (full_target / LORA_WEIGHTS).exists()
    with torch.no_grad():
        assert_close(StableDiffusionPipeline.from_pretrained(full_target).unet(latents, 501, embeds).sample,
                     expected, rtol=1e-4, atol=1e-5)


def test_decode_is_differentiable_and_in_range(tiny_sd_dir):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    latents = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, requires_grad=True)
    images = pipeline.decode(latents)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert float(images.detach().min()) >= 0.0 and float(images.detach().max()) <= 1.0
    images.mean().backward()
    assert latents.grad is not None and float(latents.grad.abs().sum()) > 0


def test_clear_errors(tiny_sd_dir, tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        DiffusionPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lora_rank"):
        DiffusionPipeline(build_tiny_pipeline(), lora_rank=0)
    with pytest.raises(ValueError, match="no unet"):
        DiffusionPipeline(mock.Mock(unet=None))
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_dir, lora_rank=2)
    other = DiffusionPipeline.from_pretrained(tiny_sd_dir, lora_rank=4)
    with pytest.raises(ValueError, match="unexpected \\['missing'\\]"):
        other.load_trainable_state_dict({"missing": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"is \(2, 64\), this pipeline.s \(4, 64\)"):
        other.load_trainable_state_dict(pipeline.trainable_state_dict())


def test_top_level_exports():
    """The issue's public names resolve from the package root, as TRL's did from ``trl``."""
    import fusedrl
    from fusedrl.trainers.diffusion import alignprop, alignprop_config, ddpo, ddpo_config

    assert fusedrl.DDPOTrainer is ddpo.DDPOTrainer and fusedrl.DDPOConfig is ddpo_config.DDPOConfig
    assert fusedrl.AlignPropTrainer is alignprop.AlignPropTrainer
    assert fusedrl.AlignPropConfig is alignprop_config.AlignPropConfig
    assert callable(fusedrl.ddim_step_logprob)
    with pytest.raises(AttributeError, match="NoSuchTrainer"):
        fusedrl.NoSuchTrainer  # noqa: B018
