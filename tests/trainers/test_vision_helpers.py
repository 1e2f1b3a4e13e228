"""The tiny VLMs of tests/helpers/vision.py: each family's processor expands the image placeholder into as many image
tokens as its model consumes, the model runs forward and generates, and both survive a save / load round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

from fusedrl.cli import presets
from tests.helpers.vision import FAMILIES, image_prompts, save_tiny_vlm, tiny_vlm

# Image tokens per 32x32 image: 2x2 merged / pooled / resampled tokens, except LLaVA-NeXT's base image (4) + one
# 32x32 tile (4) + a newline token after each of the tile's 2 rows.
IMAGE_TOKENS_32 = {"qwen2_vl": 4, "qwen2_5_vl": 4, "gemma3": 4, "llava": 4, "llava_next": 10, "idefics2": 4}
QWEN = ("qwen2_vl", "qwen2_5_vl")


def image_messages(rows) -> list[list[dict]]:
    """Each row's user message with its image block in front, as TRL's trainers build them."""
    return [[{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": prompt[0]["content"]}]}]
            for prompt, image in zip(rows["prompt"], rows["image"])]


def chat_inputs(processor, conversations):
    return processor.apply_chat_template(conversation=conversations, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt", padding=True)


def num_image_tokens(processor, input_ids: torch.Tensor) -> list[int]:
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token)
    return (input_ids == image_id).sum(dim=1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_consumes_every_image_token_and_generates(family):
    model, processor = tiny_vlm(family)
    config = model.config
    assert config.get_text_config().vocab_size == len(processor.tokenizer)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token)
    assert (getattr(config, "image_token_id", None) or config.image_token_index) == image_id
    inputs = chat_inputs(processor, image_messages(image_prompts(2)[:2]))
    # The model raises when the image features and the image tokens differ in number, so a forward proves the match.
    assert num_image_tokens(processor, inputs["input_ids"]) == [IMAGE_TOKENS_32[family]] * 2
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_call_matches_chat_template(family):
    """``processor(text=rendered, images=...)`` tokenizes the template's text as the chat-template call does (the
    template writes ``<bos>`` itself, hence ``add_special_tokens=False``)."""
    _, processor = tiny_vlm(family)
    rows = image_prompts(1, size=64)[:1]
    conversations = image_messages(rows)
    text = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    assert text[0].startswith("<bos><|user|>") and text[0].endswith("<eos><|assistant|>")
    direct = processor(text=text, images=[rows["image"]], return_tensors="pt", add_special_tokens=False)
    templated = chat_inputs(processor, conversations)
    assert direct.keys() == templated.keys()
    for key in direct:
        torch.testing.assert_close(direct[key], templated[key], rtol=0, atol=0)


def test_text_only_messages_render_as_the_presets_template():
    _, processor = tiny_vlm("llava")
    messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    assert (processor.apply_chat_template(messages, tokenize=False)
            == presets.build_tokenizer().apply_chat_template(messages, tokenize=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(family, tmp_path):
    model, processor = tiny_vlm(family)
    save_tiny_vlm(family, tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    if family in QWEN and not is_torchvision_available():
        # Without torchvision the Qwen processors cannot be constructed from a directory (see the helper); the parts
        # they are made of still load.
        tokenizer = AutoTokenizer.from_pretrained(tmp_path)
        assert tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        assert tokenizer.image_token == processor.tokenizer.image_token
        assert tokenizer.chat_template == processor.chat_template
        assert type(AutoImageProcessor.from_pretrained(tmp_path)) is type(processor.image_processor)
        loaded_processor = processor
    else:
        loaded_processor = AutoProcessor.from_pretrained(tmp_path)
        assert type(loaded_processor) is type(processor)
    conversations = image_messages(image_prompts(1)[:1])
    inputs, loaded_inputs = chat_inputs(processor, conversations), chat_inputs(loaded_processor, conversations)
    assert inputs.keys() == loaded_inputs.keys()
    for key in inputs:
        torch.testing.assert_close(inputs[key], loaded_inputs[key], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_image_prompts_are_deterministic_conversational_rows():
    first, again, other = image_prompts(3, seed=1), image_prompts(3, seed=1), image_prompts(3, seed=2)
    assert first.column_names == ["prompt", "image"]
    assert first[0]["prompt"][0]["role"] == "user" and isinstance(first[0]["prompt"][0]["content"], str)
    assert [row["image"].tobytes() for row in first] == [row["image"].tobytes() for row in again]
    assert [row["image"].tobytes() for row in first] != [row["image"].tobytes() for row in other]
    listed = image_prompts(2, size=64, column="images")
    assert listed.column_names == ["prompt", "images"] and listed[0]["images"][0].size == (64, 64)
