"""fusedrl.trainers.diffusion.rewards and .prompts: the built-in image rewards (hand-derived values and gradients),
the aesthetic scorer (tiny CLIP vision tower from a config, frozen, differentiable, save/load from local files), the
registries, and the checked calls whose errors name the function and the image."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig

from fusedrl.trainers.diffusion.prompts import (
    ANIMALS,
    draw_prompts,
    get_prompt_function,
    register_prompt_function,
    registered_prompt_functions,
    unregister_prompt_function,
)
from fusedrl.trainers.diffusion.rewards import (
    AestheticScorer,
    get_diffusion_reward,
    register_diffusion_reward,
    registered_diffusion_rewards,
    score_images,
    unregister_diffusion_reward,
)
from tests.utils import assert_close

PROMPTS = ["cat", "dog", "owl"]
METADATA = [{}, {}, {}]


def _images(seed: int = 0, shape=(3, 3, 20, 28)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _tiny_scorer(seed: int = 0) -> AestheticScorer:
    """A tiny CLIP vision tower (2 layers, width 32, 16x16 input in 4x4 patches), randomly initialised."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=4, projection_dim=24)
    return AestheticScorer(config)


# --- built-in rewards --------------------------------------------------------------------------------------------

def test_jpeg_sizes_match_pil_by_hand_and_compressibility_is_the_negative():
    """Size in kB of each image as a quality-95 JPEG, written out with PIL here; noise compresses worse than a flat
    image, so incompressibility ranks it first and compressibility last."""
    flat = torch.full((1, 3, 32, 32), 0.5)
    images = torch.cat([flat, _images(1, (1, 3, 32, 32))])
    expected = []
    for image in images:
        buffer = io.BytesIO()
        pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    incompressible, meta = get_diffusion_reward("jpeg_incompressibility")(images, PROMPTS[:2], METADATA[:2])
    compressible, _ = get_diffusion_reward("jpeg_compressibility")(images, PROMPTS[:2], METADATA[:2])
    assert meta == {}
    assert incompressible.tolist() == pytest.approx(expected)
    assert compressible.tolist() == pytest.approx([-e for e in expected])
    assert incompressible[1] > incompressible[0]
    pil_images = [Image.fromarray((np.asarray(i.permute(1, 2, 0)) * 255).round().astype(np.uint8)) for i in images]
    assert get_diffusion_reward("jpeg_incompressibility")(pil_images, PROMPTS[:2], METADATA[:2])[0].tolist() == \
        pytest.approx(expected)


def test_brightness_is_the_mean_pixel_with_a_uniform_gradient():
    """d mean / d pixel = 1 / (3 * 20 * 28) = 1/1680 for every pixel."""
    images = _images().requires_grad_(True)
    rewards, _ = get_diffusion_reward("brightness")(images, PROMPTS, METADATA)
    assert_close(rewards, images.detach().mean(dim=(1, 2, 3)), name="brightness")
    rewards.sum().backward()
    assert_close(images.grad, torch.full_like(images, 1 / 1680), name="grad")


def test_target_color_is_minus_the_mean_squared_distance():
    """A flat red image scores 0 against red; black scores -(1 + 0 + 0) / 3; the gradient of pixel p is
    -2 (p - c) / (3 H W)."""
    reward = get_diffusion_reward("target_color")
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    black = torch.zeros(1, 3, 4, 4, requires_grad=True)
    rewards, _ = reward(torch.cat([red, black]), PROMPTS[:2], METADATA[:2])
    assert_close(rewards, torch.tensor([0.0, -1 / 3]), name="target_color")
    rewards[1].backward()
    expected = torch.zeros(1, 3, 4, 4)
    expected[:, 0] = 2 / 48
    assert_close(black.grad, expected, name="grad")
    blue, _ = get_diffusion_reward("target_color", color=(0, 0, 1))(torch.cat([red]), PROMPTS[:1], METADATA[:1])
    assert_close(blue, torch.tensor([-2 / 3]), name="blue")
    with pytest.raises(ValueError, match="3 values in \\[0, 1\\]"):
        get_diffusion_reward("target_color", color=(1.0, 2.0, 0.0))


# --- aesthetic scorer ---------------------------------------------------------------------------------------------

def test_aesthetic_scorer_is_the_mlp_of_the_normalised_clip_embedding_and_differentiable():
    scorer = _tiny_scorer()
    images = _images(2, (3, 3, 16, 16)).requires_grad_(True)
    scores = scorer(images)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    with torch.no_grad():
        embeds = scorer.clip(pixel_values=(images - mean) / std).image_embeds  # 16x16 in: no resize
        expected = scorer.mlp.layers(embeds / embeds.norm(dim=-1, keepdim=True))[:, 0]
    assert_close(scores, expected, name="scores")
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in scorer.parameters()), "the scorer must stay frozen"
    assert all(p.grad is None for p in scorer.parameters())
    scorer.train()  # a trainer switching modes must not turn dropout on
    assert not scorer.training
    assert torch.equal(scorer(images), scorer(images))


def test_aesthetic_preprocess_resizes_the_shorter_side_and_centre_crops():
    scorer = _tiny_scorer()
    pixels = scorer.preprocess(_images(3, (2, 3, 20, 40)))
    assert pixels.shape == (2, 3, 16, 16)
    assert scorer(_images(3, (2, 3, 40, 20))).shape == (2,)


def test_aesthetic_reward_round_trips_through_local_files(tmp_path):
    scorer = _tiny_scorer(seed=1)
    for param in scorer.mlp.parameters():  # non-default head weights, so a load that skipped them would show
        param.data.normal_()
    scorer.save_pretrained(tmp_path / "scorer")
    reward = get_diffusion_reward("aesthetic", path=tmp_path / "scorer")
    images = _images(4, (3, 3, 16, 16))
    rewards, meta = reward(images, PROMPTS, METADATA)
    assert meta == {}
    assert torch.equal(rewards, scorer(images))
    given = get_diffusion_reward("aesthetic", scorer=scorer)
    assert given.scorer is scorer
    with pytest.raises(ValueError, match="exactly one of path= .* or scorer="):
        get_diffusion_reward("aesthetic")
    with pytest.raises(ValueError, match="does not exist"):
        get_diffusion_reward("aesthetic", path=tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        AestheticScorer.from_pretrained(tmp_path / "scorer", mlp_file=tmp_path / "no_mlp.safetensors")


# --- registries ---------------------------------------------------------------------------------------------------

def test_reward_registry_names_builtins_and_protects_them():
    assert list(registered_diffusion_rewards())[:5] == ["jpeg_compressibility", "jpeg_incompressibility",
                                                        "brightness", "target_color", "aesthetic"]
    with pytest.raises(ValueError, match="unknown diffusion reward 'shiny'.*'brightness'"):
        get_diffusion_reward("shiny")
    with pytest.raises(ValueError, match="built-in"):
        register_diffusion_reward("brightness", lambda: None)
    with pytest.raises(ValueError, match="non-empty"):
        register_diffusion_reward(" ", lambda: None)
    with pytest.raises(ValueError, match="callable"):
        register_diffusion_reward("darkness", 3)

    def darkness():
        def darkness(images, prompts, prompt_metadata):
            return 1 - images.mean(dim=(1, 2, 3)), {}
        return darkness

    register_diffusion_reward("darkness", darkness)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_diffusion_reward("darkness", darkness)
        register_diffusion_reward("darkness", darkness, replace=True)
        images = _images()
        assert_close(get_diffusion_reward("darkness")(images, PROMPTS, METADATA)[0],
                     1 - images.mean(dim=(1, 2, 3)), name="darkness")
    finally:
        unregister_diffusion_reward("darkness")
    assert "darkness" not in registered_diffusion_rewards()


def test_prompt_functions_are_seedable_and_registered():
    first, _ = draw_prompts(get_prompt_function("animals", seed=3), 8)
    second, metadata = draw_prompts(get_prompt_function("animals", seed=3), 8)
    assert first == second and set(first) <= set(ANIMALS) and metadata == [{}] * 8
    random.seed(5)
    unseeded = draw_prompts(get_prompt_function("animals"), 8)[0]
    random.seed(5)
    assert draw_prompts(get_prompt_function("animals"), 8)[0] == unseeded, "unseeded draws follow `random`"
    prompt, meta = get_prompt_function("animal_activities", seed=0, choices=["owl"], activities=["reading"])()
    assert (prompt, meta) == ("an owl reading", {"animal": "owl", "activity": "reading"})
    assert draw_prompts(get_prompt_function("animals", choices=["yak"]), 2) == (["yak", "yak"], [{}, {}])
    with pytest.raises(ValueError, match="unknown prompt function 'plants'.*'animals'"):
        get_prompt_function("plants")
    with pytest.raises(ValueError, match="built-in"):
        register_prompt_function("animals", lambda: None)
    register_prompt_function("fixed", lambda text="a red square": lambda: (text, {}))
    try:
        assert "fixed" in registered_prompt_functions()
        assert draw_prompts(get_prompt_function("fixed", text="sky"), 1) == (["sky"], [{}])
    finally:
        unregister_prompt_function("fixed")


def test_draw_prompts_names_the_function_and_the_call():
    def broken():
        raise KeyError("vocabulary")

    with pytest.raises(ValueError, match="prompt function 'broken' raised KeyError on call 0"):
        draw_prompts(broken, 2)

    def bare():
        return "cat"

    with pytest.raises(ValueError, match="prompt function 'bare' returned 'cat' on call 0.*\\(prompt: str"):
        draw_prompts(bare, 1)


# --- score_images -------------------------------------------------------------------------------------------------

def _returning(value):
    def constant(images, prompts, prompt_metadata):
        return value, {}
    return constant


def test_score_images_accepts_arrays_lists_and_column_vectors():
    images = _images()
    for value in ([1, 2, 3], np.array([1.0, 2.0, 3.0]), torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)):
        scored = score_images(_returning(value), images, PROMPTS, METADATA)
        assert scored.rewards.dtype == torch.float32 and scored.rewards.tolist() == [1.0, 2.0, 3.0]
    scored = score_images(get_diffusion_reward("brightness"), images.requires_grad_(True), PROMPTS, METADATA,
                          differentiable=True)
    assert scored.rewards.grad_fn is not None and scored.metadata == {}


@pytest.mark.parametrize(("value", "match"), [
    ([1.0, math.nan, 0.0], "returned nan for image 1 \\(prompt 'dog'\\); rewards must be finite"),
    (torch.tensor([0.0, 0.0, -math.inf]), "returned -inf for image 2 \\(prompt 'owl'\\)"),
    ([1.0, 2.0], "returned rewards of shape \\(2,\\) for 3 images"),
    ([1.0, None, 2.0], "returned rewards of type list; they must be numbers"),
    (["a", "b", "c"], "returned rewards of type list; they must be numbers"),
], ids=["nan", "inf", "count", "none", "strings"])
def test_score_images_names_the_function_and_the_row(value, match):
    with pytest.raises(ValueError, match=f"reward function 'constant' {match}"):
        score_images(_returning(value), _images(), PROMPTS, METADATA)


def test_score_images_rejects_bad_calls_with_the_function_name():
    def exploding(images, prompts, prompt_metadata):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(ValueError, match="'exploding' raised RuntimeError: CUDA out of memory"):
        score_images(exploding, _images(), PROMPTS, METADATA)

    def bare(images, prompts, prompt_metadata):
        return images.mean(dim=(1, 2, 3))

    with pytest.raises(ValueError, match="'bare' returned a Tensor; it must return a pair"):
        score_images(bare, _images(), PROMPTS, METADATA)

    def listed_metadata(images, prompts, prompt_metadata):
        return images.mean(dim=(1, 2, 3)), ["x"]

    with pytest.raises(ValueError, match="metadata of type list"):
        score_images(listed_metadata, _images(), PROMPTS, METADATA)
    images = _images().requires_grad_(True)
    with pytest.raises(ValueError, match="'jpeg_compressibility' returned rewards without a gradient"):
        score_images(get_diffusion_reward("jpeg_compressibility"), images, PROMPTS, METADATA, differentiable=True)
    assert score_images(get_diffusion_reward("jpeg_compressibility"), images, PROMPTS, METADATA).rewards.shape == (3,)
