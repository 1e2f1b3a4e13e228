"""Tiny offline vision-language models for the VLM paths of the online trainers (GRPO, RLOO, Online DPO).

``tiny_vlm(family)`` builds a randomly initialised fp32 model of a real VLM class together with a processor made of
the family's own image processor (the PIL backend: torchvision is not installed here) and the preset
character-level tokenizer with the family's image tokens appended (ids 103, 104, ...), so ``vocab_size`` is
``len(tokenizer)`` and the config's image token ids are the tokenizer's. Widths: text hidden 32 (4 heads of 8, 2 KV
heads, 2 layers), vision tower 1 layer of hidden 32. A 32x32 image becomes 4 image tokens in every family but
LLaVA-NeXT (10: the base image's 4, its one 32x32 tile's 4 and a newline per tile row); a 64x64 image stays at 16 or
fewer (Qwen: 16, the others resize to 32x32 first; LLaVA-NeXT tiles it into 4 and gives 4 + 16 + 4 = 24).

The chat template is the preset one (``<bos><|role|>content<eos>...``) where a content may also be a list of blocks:
``{"type": "text", "text": ...}`` renders its text, ``{"type": "image"}`` the family's image placeholder, which the
processor then expands into the image tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from datasets import Dataset
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessorPil,
    Idefics2Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    SiglipVisionConfig,
)
from transformers.utils import is_torchvision_available

from fusedrl.cli import presets
from fusedrl.cli.presets.tokenizer import CHAT_TEMPLATE as PRESET_TEMPLATE
from fusedrl.cli.presets.tokenizer import ROLE_TOKENS

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "gemma3", "llava", "llava_next", "idefics2")

IMAGE_SIZE = 32  # every non-Qwen image processor resizes to this square, the vision towers' image_size
TEXT_WIDTHS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512,
               "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
VISION_WIDTHS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
# CLIP-style towers: 16-pixel patches give a 2x2 grid on a 32x32 image, i.e. 4 image tokens once LLaVA's "default"
# feature selection drops the CLS token.
CLIP_TOWER = {**VISION_WIDTHS, "image_size": IMAGE_SIZE, "patch_size": 16, "projection_dim": 32}
# Qwen: 8-pixel patches merged 2x2, so one image token per 16x16 pixels; min/max pixels keep every image between
# 32x32 (4 tokens) and 64x64 (16 tokens) after the processor's resize.
QWEN_PATCHES = {"patch_size": 8, "temporal_patch_size": 2, "merge_size": 2}
QWEN_PIXELS = {"min_pixels": 32 * 32, "max_pixels": 64 * 64}
# LLaVA-NeXT tiles an image into the best-fitting grid among these (in pixels), each tile one 32x32 tower input.
LLAVA_NEXT_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
NUM_LATENTS = 4  # Idefics2's perceiver resamples every image to this many tokens; Gemma 3 pools to this many too

# The preset template with each message's content rendered block by block (text blocks their text, image blocks BODY's
# placeholder): a string content is one text block.
CHAT_TEMPLATE = PRESET_TEMPLATE.replace(
    "{{ '<|' + message['role'] + '|>' }}",
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{% set blocks = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set blocks = message['content'] %}{% endif %}",
).replace("{{ message['content'] + eos_token }}", "BODY{{ eos_token }}")
BLOCKS = ("{% for block in blocks %}{% if block['type'] == 'image' %}PLACEHOLDER"
          "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}{% endfor %}")


def chat_template(placeholder: str) -> str:
    """The preset chat template where an ``{"type": "image"}`` block renders ``placeholder``."""
    return CHAT_TEMPLATE.replace("BODY", BLOCKS.replace("PLACEHOLDER", placeholder))


def vlm_tokenizer(named_tokens: dict[str, str], extra_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The preset tokenizer with ``named_tokens`` (e.g. ``{"image_token": "<image>"}``) and ``extra_tokens`` appended
    as special tokens after its 103, in that order. The names become attributes (``tokenizer.image_token``,
    ``tokenizer.image_token_id``) that the family processors read and that ``save_pretrained`` keeps."""
    base = presets.build_tokenizer()
    new_tokens = list(dict.fromkeys([*named_tokens.values(), *extra_tokens]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token=base.bos_token, eos_token=base.eos_token,
        pad_token=base.pad_token, unk_token=base.unk_token, extra_special_tokens=[*ROLE_TOKENS, *new_tokens],
        model_specific_special_tokens=named_tokens, padding_side=base.padding_side,
        model_max_length=base.model_max_length, clean_up_tokenization_spaces=False)
    missing = [token for token in new_tokens if tokenizer.convert_tokens_to_ids(token) == tokenizer.unk_token_id]
    assert not missing, f"tokens not added: {missing}"
    return tokenizer


def _text_config(tokenizer, **overrides) -> dict:
    return {**TEXT_WIDTHS, "vocab_size": len(tokenizer), **overrides}


def _qwen(version: str) -> tuple[type[PreTrainedModel], PreTrainedConfig, ProcessorMixin]:
    tokenizer = vlm_tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in
           (("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>"),
            ("vision_start_token", "<|vision_start|>"), ("vision_end_token", "<|vision_end|>"))}
    # Multimodal RoPE splits head_dim / 2 = 4 frequencies into (time, height, width) sections.
    text = _text_config(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 1, 1]})
    patches = {"patch_size": QWEN_PATCHES["patch_size"], "temporal_patch_size": QWEN_PATCHES["temporal_patch_size"],
               "spatial_merge_size": QWEN_PATCHES["merge_size"], "depth": 1, "num_heads": 2,
               "hidden_size": TEXT_WIDTHS["hidden_size"]}
    if version == "qwen2_vl":
        model_cls, config_cls, processor_cls = Qwen2VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLProcessor
        vision = {**patches, "embed_dim": 32, "mlp_ratio": 2}
    else:
        model_cls, config_cls, processor_cls = (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig,
                                                Qwen2_5_VLProcessor)
        # window_size 32 pixels = one 2x2 merged window; the single block attends globally anyway.
        vision = {**patches, "intermediate_size": 64, "out_hidden_size": TEXT_WIDTHS["hidden_size"],
                  "window_size": 32, "fullatt_block_indexes": [0]}
    config = config_cls(text_config=text, vision_config=vision, **ids)
    image_processor = Qwen2VLImageProcessorPil(**QWEN_PATCHES, **QWEN_PIXELS)
    template = chat_template("<|vision_start|><|image_pad|><|vision_end|>")
    if is_torchvision_available():
        processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    else:
        processor = _qwen_processor_without_video(processor_cls, image_processor, tokenizer, template)
    return model_cls, config, processor


def _qwen_processor_without_video(processor_cls: type[ProcessorMixin], image_processor, tokenizer,
                                  template: str) -> ProcessorMixin:
    """The Qwen processor's state set by hand, for an environment without torchvision.

    transformers 5.25's Qwen2-VL / Qwen2.5-VL processors take a video processor, and ``ProcessorMixin.__init__``
    type-checks it against ``VideoProcessorMixin``, which does not exist without torchvision, so the constructor
    (and ``AutoProcessor.from_pretrained``) raises even for ``video_processor=None``. Images and text need none of
    it: this sets the attributes ``Qwen2VLProcessor.__init__`` would. Its ``save_pretrained`` fails on the missing
    video processor (``save_tiny_vlm`` saves the tokenizer and image processor instead), and loading the directory
    with ``AutoProcessor`` needs torchvision.
    """
    tokenizer.chat_template = template  # saved with the tokenizer, where AutoProcessor finds it
    processor = object.__new__(processor_cls)
    processor.chat_template = template
    processor.image_processor, processor.tokenizer, processor.video_processor = image_processor, tokenizer, None
    processor.image_token, processor.video_token = tokenizer.image_token, tokenizer.video_token
    processor.image_token_id, processor.video_token_id = tokenizer.image_token_id, tokenizer.video_token_id
    return processor


def _gemma3() -> tuple[type[PreTrainedModel], PreTrainedConfig, ProcessorMixin]:
    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = vlm_tokenizer(named)
    ids = {f"{key}_index": tokenizer.convert_tokens_to_ids(named[f"{key}_token"]) for key in ("boi", "eoi")}
    # 8-pixel patches give a 4x4 grid that Gemma 3's projector average-pools down to mm_tokens_per_image = 2x2.
    config = Gemma3Config(
        text_config=_text_config(tokenizer, query_pre_attn_scalar=8, sliding_window=64),
        vision_config=SiglipVisionConfig(**VISION_WIDTHS, image_size=IMAGE_SIZE, patch_size=8),
        mm_tokens_per_image=NUM_LATENTS, image_token_index=tokenizer.image_token_id, **ids)
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=NUM_LATENTS,
                                chat_template=chat_template(named["boi_token"]))
    return Gemma3ForConditionalGeneration, config, processor


def _llava(next_: bool) -> tuple[type[PreTrainedModel], PreTrainedConfig, ProcessorMixin]:
    tokenizer = vlm_tokenizer({"image_token": "<image>"})
    common = {"vision_config": CLIPVisionConfig(**CLIP_TOWER), "text_config": LlamaConfig(**_text_config(tokenizer)),
              "image_token_index": tokenizer.image_token_id, "vision_feature_layer": -1,
              "vision_feature_select_strategy": "default"}
    processor_args = {"tokenizer": tokenizer, "patch_size": CLIP_TOWER["patch_size"],
                      "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
                      "chat_template": chat_template("<image>")}
    square = {"size": {"shortest_edge": IMAGE_SIZE}, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}
    if not next_:
        config = LlavaConfig(**common, image_seq_length=4)
        return LlavaForConditionalGeneration, config, LlavaProcessor(CLIPImageProcessorPil(**square), **processor_args)
    config = LlavaNextConfig(**common, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    image_processor = LlavaNextImageProcessorPil(**square, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    return LlavaNextForConditionalGeneration, config, LlavaNextProcessor(image_processor, **processor_args)


def _idefics2() -> tuple[type[PreTrainedModel], PreTrainedConfig, ProcessorMixin]:
    tokenizer = vlm_tokenizer({"image_token": "<image>", "image_boundary_token": "<fake_token_around_image>"},
                              extra_tokens=("<end_of_utterance>",))
    config = Idefics2Config(
        text_config=_text_config(tokenizer, model_type="mistral"),
        vision_config={**VISION_WIDTHS, "image_size": IMAGE_SIZE, "patch_size": 8},
        perceiver_config={"hidden_size": TEXT_WIDTHS["hidden_size"], "resampler_n_latents": NUM_LATENTS,
                          "resampler_depth": 1, "resampler_n_heads": 2, "resampler_head_dim": 8,
                          "num_key_value_heads": 1},
        image_token_id=tokenizer.image_token_id)
    # No splitting: one 32x32 image is one tower input (splitting would add 4 crops).
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=False,
                                                size={"shortest_edge": IMAGE_SIZE, "longest_edge": IMAGE_SIZE})
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=NUM_LATENTS,
                                  chat_template=chat_template("<image>"))
    return Idefics2ForConditionalGeneration, config, processor


BUILDERS: dict[str, Callable[[], tuple[type[PreTrainedModel], PreTrainedConfig, ProcessorMixin]]] = {
    "qwen2_vl": lambda: _qwen("qwen2_vl"), "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"), "gemma3": _gemma3,
    "llava": lambda: _llava(next_=False), "llava_next": lambda: _llava(next_=True), "idefics2": _idefics2}


def tiny_vlm(family: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A randomly initialised fp32 ``family`` model (initialised right after ``torch.manual_seed(seed)``, the global
    CPU generator restored afterwards) and its processor; see the module docstring for the sizes."""
    if family not in BUILDERS:
        raise ValueError(f"unknown VLM family {family!r}; expected one of {FAMILIES}")
    model_cls, config, processor = BUILDERS[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).float().eval()
        for name, param in model.named_parameters():
            # Gemma 3 initialises its image projection to zeros, which would make every image look the same to the
            # text model; a small random one lets the tests see that the images reach the scores.
            if "multi_modal_projector" in name and param.ndim > 1 and not param.detach().any():
                torch.nn.init.normal_(param, std=0.5)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model, processor


def save_tiny_vlm(family: str, path: str, seed: int = 0) -> str:
    """``tiny_vlm(family, seed)`` written to ``path`` (model and processor), for ``from_pretrained`` callers."""
    model, processor = tiny_vlm(family, seed)
    model.save_pretrained(path)
    if getattr(processor, "video_processor", "") is None:  # a Qwen processor built without torchvision
        processor.tokenizer.save_pretrained(path)
        processor.image_processor.save_pretrained(path)
    else:
        processor.save_pretrained(path)
    return str(path)


def solid_image(rng: random.Random, size: int) -> Image.Image:
    """A ``size`` x ``size`` RGB image: a random background with a random-coloured square, so images differ."""
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    side = max(1, size // 2)
    corner = (rng.randrange(size - side + 1), rng.randrange(size - side + 1))
    image.paste(tuple(rng.randrange(256) for _ in range(3)), (*corner, corner[0] + side, corner[1] + side))
    return image


QUESTIONS = ("What color is the square?", "Describe the image.", "Where is the square?", "Is it bright?")


def image_prompts(n: int, *, seed: int = 0, size: int = 32, column: str = "image") -> Dataset:
    """``n`` conversational prompt-only rows in the shape of TRL's image datasets: ``prompt`` holds one user message
    with text content, ``column`` ("image") one PIL image, or, with ``column="images"``, a one-image list. The
    trainers turn the user message into ``[{"type": "image"}, {"type": "text", ...}]`` themselves."""
    if column not in ("image", "images"):
        raise ValueError(f"column must be 'image' or 'images', got {column!r}")
    rng = random.Random(seed)
    rows = {"prompt": [], column: []}
    for i in range(n):
        image = solid_image(rng, size)
        rows["prompt"].append([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        rows[column].append(image if column == "image" else [image])
    return Dataset.from_dict(rows)
