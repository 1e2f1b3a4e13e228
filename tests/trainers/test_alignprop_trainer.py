"""AlignPropTrainer / AlignPropConfig on the tiny Stable Diffusion pipeline: TRL's defaults and clear config errors,
truncated backpropagation (which steps keep a graph, and the same gradients as TRL's detach formulation),
checkpointing of the UNet inside the chain (same gradients, less memory kept for the backward), the reward rising
under training, a non-differentiable reward refused by name, and exact resume.

Every trainer here runs the ``ddim_logprob`` op on its reference backend: the compiled backend's first call compiles
for ~15 s on the 2-core CPU, and the backends are compared with each other in tests/ops/test_ddim.py."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from fusedrl import ddim_step_logprob, use_kernels
from fusedrl.cli.presets.diffusion import build_tiny_pipeline
from fusedrl.trainers.diffusion.alignprop import AlignPropTrainer, sample_with_grad
from fusedrl.trainers.diffusion.alignprop_config import AlignPropConfig
from fusedrl.trainers.diffusion.pipeline import DiffusionPipeline
from fusedrl.trainers.diffusion.prompts import get_prompt_function
from fusedrl.trainers.diffusion.rewards import get_diffusion_reward
from tests.utils import assert_close

KERNELS = "ddim_logprob=reference"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 OpenMP threads stall on the loaded 2-core machine


def _pipeline(perturb_lora: bool = False) -> DiffusionPipeline:
    """The tiny pipeline (seed 0) with LoRA, the same initial LoRA at every call; ``perturb_lora`` gives the LoRA
    ``B`` matrices (zero at init, which zeroes every ``A`` gradient) small seeded values, so every trained parameter
    has a gradient to compare."""
    torch.manual_seed(0)  # PEFT draws the LoRA A matrices from the global RNG
    pipeline = DiffusionPipeline(build_tiny_pipeline(0))
    if perturb_lora:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in pipeline.unet.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return pipeline


def _config(tmp_path, **overrides) -> AlignPropConfig:
    values = {"output_dir": str(tmp_path), "num_epochs": 1, "sample_num_steps": 2, "train_batch_size": 2,
              "truncated_rand_backprop_minmax": (0, 2), "log_image_freq": 0, "save_freq": 100, "kernels": KERNELS,
              "seed": 0}
    return AlignPropConfig(**{**values, **overrides})


def _chain(pipeline, *, backprop_start, gradient_checkpointing, num_steps=3, latents=None):
    """A 2-image guided chain (seeded noise) scored by brightness and backpropagated; returns the images and the
    gradient of every LoRA parameter (then cleared)."""
    prompt_embeds = pipeline.encode_prompts(["cat", "owl"])
    negative = pipeline.encode_prompts([""])
    with use_kernels(ddim_logprob="reference"):
        sample = sample_with_grad(pipeline, prompt_embeds, negative, num_steps=num_steps, guidance_scale=5.0,
                                  eta=1.0, backprop_start=backprop_start,
                                  gradient_checkpointing=gradient_checkpointing,
                                  generator=torch.Generator().manual_seed(0), latents=latents)
        sample.images.mean().backward()
    grads = {}
    for name, param in pipeline.unet.named_parameters():
        if param.requires_grad:
            grads[name] = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
            param.grad = None
    return sample.images.detach(), grads


# --- config ---------------------------------------------------------------------------------------------------

def test_config_defaults_are_trls():
    config = AlignPropConfig(output_dir="unused")
    assert (config.train_learning_rate, config.truncated_backprop_rand, config.truncated_backprop_timestep,
            config.truncated_rand_backprop_minmax) == (1e-3, True, 49, (0, 50))
    assert (config.sample_num_steps, config.sample_eta, config.sample_guidance_scale, config.train_batch_size,
            config.train_gradient_accumulation_steps, config.train_max_grad_norm) == (50, 1.0, 5.0, 1, 1, 1.0)
    assert config.gradient_checkpointing, "TRL's pipeline_step_with_grad always checkpointed"
    assert config.backprop_start_range == (0, 49), "a draw of 50 (past the last step) keeps the last step"
    fixed = AlignPropConfig(output_dir="unused", truncated_backprop_rand=False, truncated_backprop_timestep=7)
    assert fixed.backprop_start_range == (7, 7)
    assert AlignPropConfig(output_dir="unused", truncated_rand_backprop_minmax=[2, 5]).truncated_rand_backprop_minmax \
        == (2, 5), "a YAML list becomes TRL's tuple"


@pytest.mark.parametrize(("overrides", "match"), [
    ({"truncated_rand_backprop_minmax": (3, 1)}, "0 <= min <= max <= sample_num_steps \\(50\\)"),
    ({"truncated_rand_backprop_minmax": (-1, 4)}, "0 <= min <= max"),
    ({"sample_num_steps": 4}, "truncated_rand_backprop_minmax=\\(0, 50\\) must satisfy .* \\(0, 4\\)"),
    ({"truncated_rand_backprop_minmax": (50, 50)}, "min < sample_num_steps"),
    ({"truncated_rand_backprop_minmax": (0, 2, 4)}, "must be two ints"),
    ({"truncated_rand_backprop_minmax": (0.5, 2)}, "must be two ints"),
    ({"truncated_backprop_rand": False, "truncated_backprop_timestep": 50}, "truncated_backprop_timestep=50 must be <"),
    ({"truncated_backprop_timestep": -1}, "truncated_backprop_timestep must be an int >= 0"),
    ({"sample_eta": -0.5}, "sample_eta must be a number >= 0"),
    ({"train_learning_rate": 0.0}, "train_learning_rate must be a number > 0"),
], ids=["min-above-max", "negative", "range-past-steps", "min-at-end", "three", "float", "fixed-past-steps",
        "fixed-negative", "eta", "lr"])
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        AlignPropConfig(output_dir="unused", **overrides)


def test_backprop_start_draws_from_the_configured_range(tmp_path):
    """``random.randint`` over the range, the top capped at the last step: (1, 3) with 3 steps draws 1 or 2."""
    trainer = SimpleNamespace(config=_config(tmp_path, sample_num_steps=3, truncated_rand_backprop_minmax=(1, 3)))
    random.seed(0)
    draws = [AlignPropTrainer.backprop_start(trainer) for _ in range(200)]
    assert set(draws) == {1, 2}
    random.seed(0)
    assert [AlignPropTrainer.backprop_start(trainer) for _ in range(200)] == draws, "seeded by `random`"
    trainer.config = _config(tmp_path, sample_num_steps=3, truncated_backprop_rand=False,
                             truncated_backprop_timestep=1)
    assert {AlignPropTrainer.backprop_start(trainer) for _ in range(20)} == {1}


# --- truncation and checkpointing inside the chain ----------------------------------------------------------------

def test_truncation_cuts_the_graph_before_backprop_start(monkeypatch):
    """With 4 steps and backprop_start=2, the first two UNet calls run without grad and the last two with it; with
    checkpointing, the backward reruns exactly the last two. The starting latents get a gradient only when the
    graph reaches them (backprop_start=0)."""
    pipeline = _pipeline(perturb_lora=True)
    calls = []
    predict_noise = pipeline.predict_noise

    def spy(latents, timestep, *args):
        calls.append((int(timestep), torch.is_grad_enabled()))
        return predict_noise(latents, timestep, *args)

    monkeypatch.setattr(pipeline, "predict_noise", spy)
    timesteps = None
    for checkpointing in (False, True):
        calls.clear()
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        _, grads = _chain(pipeline, backprop_start=2, gradient_checkpointing=checkpointing, num_steps=4,
                          latents=latents)
        timesteps = pipeline.scheduler.timesteps.tolist()
        expected = [(t, i >= 2) for i, t in enumerate(timesteps)]
        if checkpointing:
            expected += [(timesteps[3], True), (timesteps[2], True)]  # recomputed in the backward, last step first
        assert calls == expected
        assert latents.grad is None, "no gradient flows past the untracked steps"
        assert all(g.abs().sum() > 0 for g in grads.values())
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    _chain(pipeline, backprop_start=0, gradient_checkpointing=False, num_steps=4, latents=latents)
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="backprop_start must be in \\[0, num_steps\\) = \\[0, 4\\), got 4"):
        _chain(pipeline, backprop_start=4, gradient_checkpointing=False, num_steps=4)


def test_truncation_gives_trls_gradients():
    """TRL's formulation runs every UNet call with a graph and detaches the prediction of the steps before the
    first trained one; running those steps under no_grad instead must give the same images and gradients."""
    pipeline = _pipeline(perturb_lora=True)
    images, grads = _chain(pipeline, backprop_start=1, gradient_checkpointing=False)
    prompt_embeds, negative = pipeline.encode_prompts(["cat", "owl"]), pipeline.encode_prompts([""])
    generator = torch.Generator().manual_seed(0)
    pipeline.scheduler.set_timesteps(3)
    latents = pipeline.initial_latents(2, generator=generator)
    with use_kernels(ddim_logprob="reference"):
        for index, timestep in enumerate(pipeline.scheduler.timesteps):
            noise_pred = pipeline.predict_noise(latents, timestep, prompt_embeds, negative, 5.0)
            if index < 1:
                noise_pred = noise_pred.detach()
            latents = ddim_step_logprob(pipeline.scheduler, noise_pred, timestep, latents, eta=1.0,
                                        generator=generator).prev_sample
        trl_images = pipeline.decode(latents).float()
        trl_images.mean().backward()
    assert_close(images, trl_images, name="images")
    for name, param in pipeline.unet.named_parameters():
        if param.requires_grad:
            assert_close(grads[name], param.grad, name=name)


def _saved_activation_bytes(pipeline, **chain_kwargs) -> tuple[int, torch.Tensor, dict]:
    """Bytes of the distinct tensors the autograd graph keeps for the backward (weights excluded): the activation
    memory held between the chain's forward and its backward."""
    weights = {t.untyped_storage().data_ptr() for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder)
               for t in (*module.parameters(), *module.buffers())}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        images, grads = _chain(pipeline, **chain_kwargs)
    return sum(kept.values()), images, grads


def test_checkpointing_inside_the_chain_gives_the_same_gradients_with_less_memory():
    """Checkpointing each UNet call is a memory-only change: the same images (bitwise) and LoRA gradients.

    Measured on the tiny pipeline (2-core CPU, torch 2.13), a guided 2-image chain of 3 steps all keeping a graph
    (4 UNet rows per call): the graph keeps 46.9 MB of activations without checkpointing and 9.2 MB with it (what
    is left is the VAE decode and the DDIM steps; the UNet keeps only its inputs), asserted below as "less than
    half". Peak RSS over the forward and backward above the resting RSS (``runtime.memory.PeakMemory``, after a
    warm-up and ``release_memory``; a separate script, not asserted: allocator caching makes it noisy): 66 MB
    without, 34 MB with. For 4 images and 10 steps: 276 MB vs 18.7 MB kept, peak RSS 414 MB vs 137 MB."""
    pipeline = _pipeline(perturb_lora=True)
    plain_bytes, plain_images, plain_grads = _saved_activation_bytes(pipeline, backprop_start=0,
                                                                     gradient_checkpointing=False)
    ckpt_bytes, ckpt_images, ckpt_grads = _saved_activation_bytes(pipeline, backprop_start=0,
                                                                  gradient_checkpointing=True)
    assert torch.equal(plain_images, ckpt_images)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        assert_close(ckpt_grads[name], grad, name=name)
    assert ckpt_bytes < plain_bytes / 2, f"checkpointing kept {ckpt_bytes} bytes, without it {plain_bytes}"
    print(f"kept for the backward: {plain_bytes / 2**20:.1f} MB without checkpointing, {ckpt_bytes / 2**20:.1f} MB "
          "with it")


# --- training --------------------------------------------------------------------------------------------------

def test_reward_rises_with_random_truncation(tmp_path):
    """Brightness on one prompt, 2-step chains with TRL's randomised truncation over the whole chain, lr 0.02
    (the tiny random UNet needs large steps to move its images in a few updates; 0.05 overshoots by the 4th): the
    logged reward rises over 4 epochs (0.5246, 0.5336, 0.5370, 0.5418 when written) and a fixed evaluation batch
    (same noise, before and after) gets brighter (0.5245 -> 0.5434)."""
    pipeline = _pipeline()
    config = _config(tmp_path, num_epochs=4, train_learning_rate=2e-2)
    trainer = AlignPropTrainer(config, get_diffusion_reward("brightness"),
                               get_prompt_function("animals", choices=["cat"]), pipeline)

    def evaluate() -> float:
        prompt_embeds = pipeline.encode_prompts(["cat"] * 4)
        with use_kernels(ddim_logprob="reference"):
            out = pipeline.sample(prompt_embeds, trainer.neg_prompt_embed, num_steps=2, guidance_scale=5.0,
                                  eta=1.0, generator=torch.Generator().manual_seed(1))
        return out.images.mean().item()

    before = evaluate()
    history = trainer.train()
    after = evaluate()
    rewards = [entry["reward_mean"] for entry in history]
    assert len(history) == 4 and [entry["step"] for entry in history] == [0, 1, 2, 3]
    assert {"reward_mean", "reward_std", "loss", "backprop_steps", "epoch"} <= history[0].keys()
    assert all(entry["loss"] == pytest.approx(-entry["reward_mean"]) for entry in history)
    assert all(entry["backprop_steps"] in (1.0, 2.0) for entry in history)
    assert rewards[-1] > rewards[0] + 0.01, rewards
    assert after > before + 0.01, (before, after)


def test_a_reward_without_gradient_is_refused_by_name(tmp_path, tiny_sd_dir):
    """The pipeline given as a local path, as a user would (loaded with config.use_lora)."""
    trainer = AlignPropTrainer(_config(tmp_path, sample_num_steps=1, truncated_rand_backprop_minmax=(0, 1)),
                               get_diffusion_reward("jpeg_compressibility"), get_prompt_function("animals", seed=0),
                               tiny_sd_dir)
    assert trainer.pipeline.use_lora and trainer.trainable_layers
    with pytest.raises(ValueError, match="'jpeg_compressibility' returned rewards without a gradient"):
        trainer.train()


def test_resume_continues_exactly(tmp_path):
    """2 epochs in one run, or 1 epoch, a checkpoint, and 1 more epoch in a new trainer resumed from it: the same
    LoRA weights (bitwise) and the same log (the prompt, truncation and noise draws are restored with the RNGs).
    The first run also logs images: a grid PNG and TRL's hook call."""
    reward, prompts = get_diffusion_reward("brightness"), get_prompt_function("animals")
    straight = AlignPropTrainer(_config(tmp_path / "straight", num_epochs=2, train_learning_rate=1e-2), reward,
                                prompts, _pipeline())
    straight.train()
    hook_calls = []
    first = AlignPropTrainer(_config(tmp_path / "split", num_epochs=1, save_freq=1, train_learning_rate=1e-2,
                                     log_image_freq=1),
                             reward, prompts, _pipeline(), image_samples_hook=lambda *args: hook_calls.append(args))
    first.train()
    (pairs, global_step, tracker), = hook_calls  # TRL's AlignProp hook: the last batch as a dict
    assert (sorted(pairs), global_step, tracker) == (["images", "prompt_metadata", "prompts", "rewards"], 1, None)
    assert pairs["images"].shape == (2, 3, 32, 32) and pairs["rewards"].shape == (2,)
    assert (tmp_path / "split" / "images" / "epoch_0.png").is_file()
    resumed = AlignPropTrainer(_config(tmp_path / "resumed", num_epochs=2, train_learning_rate=1e-2,
                                       resume_from=str(tmp_path / "split" / "checkpoints")),
                               reward, prompts, _pipeline())
    assert resumed.first_epoch == 1
    resumed.train()
    def trace(history):  # memory/peak_rss_mb differs from run to run: the rest must not
        return [{k: v for k, v in entry.items() if not k.startswith("memory/")} for entry in history]

    assert trace(resumed.log_history) == trace(straight.log_history)
    expected = straight.pipeline.trainable_state_dict()
    for name, tensor in resumed.pipeline.trainable_state_dict().items():
        assert torch.equal(tensor, expected[name]), name
