"""Offline stand-ins of the ``trl-internal-testing/tiny-*ForConditionalGeneration`` vision-language models.

Each stand-in is the hub model's architecture class at toy size (text: hidden 16, 2 layers; vision tower: 1-2
layers, hidden 16-32, patch 14) with a processor saved beside it that ``AutoProcessor.from_pretrained(<id>)`` loads:

- the family's image processor (the PIL one, or torchvision's where the family has no other), sized so a 64x64 image
  gives 4 image tokens (Qwen: resized to 56x56 = 4x4 patches of 14, merged 2x2; Gemma 3 / LLaVA: 28-56 px inputs),
  or as few as the family allows (Gemma 4: 64, see _GEMMA4_IMAGES);
- trl_suite's stand-in tokenizer plus the family's image special tokens (appended after the stand-in vocabulary, so
  the config's ``image_token_id`` etc. are read off the tokenizer, never hard-coded);
- a chat template written here that renders ``{"type": "image"}`` blocks the way the family's own template does (the
  placeholder the processor then expands into the image's tokens), string or list content alike.

Qwen's processors also hold a video processor, which transformers only has with torchvision. The PyPI torchvision
wheel is a CUDA build whose ``_C`` extension cannot load beside a CPU torch; :func:`torchvision_shim` declares the
detection ops that torchvision's import registers kernels for (never called by an image processor), so its Python
transforms import. See trl_suite/README.md for installing the wheel beside the venv.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from trl_suite.tokenizer import build_tokenizer

# torchvision's C++ ops whose Meta / autograd kernels torchvision registers at import (torchvision 0.28).
_TORCHVISION_OPS = ("nms", "qnms", "roi_align", "_roi_align_backward", "ps_roi_align", "_ps_roi_align_backward",
                    "roi_pool", "_roi_pool_backward", "ps_roi_pool", "_ps_roi_pool_backward", "qroi_align",
                    "deform_conv2d", "_deform_conv2d_backward")
_shim_library = None


def torchvision_shim() -> None:
    """Let torchvision import when its compiled ops cannot load (a CUDA wheel beside a CPU torch): declare each op
    so torchvision's kernel registrations find it. Call before anything imports torchvision; a no-op otherwise."""
    global _shim_library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _shim_library is not None or spec.origin is None:
        return
    try:
        ctypes.CDLL(str(Path(spec.origin).parent / "_C.so"))
        return  # a working build: nothing to do
    except OSError:
        pass
    _shim_library = torch.library.Library("torchvision", "DEF")
    for op in _TORCHVISION_OPS:
        _shim_library.define(f"{op}(Tensor input) -> Tensor")


# Text model of every VLM stand-in: hidden 16 = 2 heads x head_dim 8 (Qwen's mrope needs head_dim/2 split in 3).
_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 2048}

# ---- chat templates ---------------------------------------------------------------------------------------------
# Shared macro: a message's content as text, each image block replaced by `image` (the family's placeholder).
_CONTENT = (
    "{%- macro render(content, image) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}{{ image }}"
    "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def chatml_template(image: str, default_system: str | None, think_by_default: bool = True) -> str:
    """Qwen-VL's ChatML: ``<|im_start|>role\\n...<|im_end|>\\n``, images as ``image`` where their block is; Qwen2-VL
    and Qwen2.5-VL open with a default system turn, Qwen3-VL / 3.5 do not. The generation prompt gets Qwen 3's empty
    think block when thinking is off: ``enable_thinking=False``, or by default for a no-think variant."""
    system = ("{%- if messages[0].role != 'system' -%}{{ '<|im_start|>system\\n" + default_system +
              "<|im_end|>\\n' }}{%- endif -%}") if default_system else ""
    return (_CONTENT + system +
            "{%- for message in messages -%}"
            "{{ '<|im_start|>' + message.role + '\\n' }}"
            "{%- if message.role == 'assistant' -%}{%- generation -%}{{ render(message.content, '" + image + "') }}"
            "{{ '<|im_end|>' }}{%- endgeneration -%}{{ '\\n' }}"
            "{%- else -%}{{ render(message.content, '" + image + "') + '<|im_end|>\\n' }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
            "{%- if (enable_thinking is defined and not enable_thinking) or (enable_thinking is not defined and "
            + ("false" if think_by_default else "true") + ") -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
            "{%- endif -%}{%- endif -%}")


# Gemma 3: no system role (its text opens the first user turn), the assistant is "model", <start_of_image> per image.
GEMMA_TEMPLATE = (
    _CONTENT +
    "{%- set system = messages[0].content if messages[0].role == 'system' else none -%}"
    "{%- for message in messages if message.role != 'system' -%}"
    "{%- set role = 'model' if message.role == 'assistant' else message.role -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if loop.first and system is not none -%}{{ render(system, '') + '\\n\\n' }}{%- endif -%}"
    "{%- if role == 'model' -%}{%- generation -%}{{ render(message.content, '<start_of_image>') }}"
    "{{ '<end_of_turn>' }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}{{ render(message.content, '<start_of_image>') + '<end_of_turn>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Gemma 4: a system turn of its own, "<|turn>role\n...<turn|>\n", the assistant is "model"; each image is
# <|image|>, which the processor expands into <|image>, the image's soft tokens, <image|>.
GEMMA4_TEMPLATE = (
    _CONTENT +
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message.role == 'assistant' else message.role -%}"
    "{{ '<|turn>' + role + '\\n' }}"
    "{%- if role == 'model' -%}{%- generation -%}{{ render(message.content, '<|image|>') }}"
    "{{ '<turn|>' }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}{{ render(message.content, '<|image|>') + '<turn|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)

# LLaVA 1.5 (llava-hf): "USER: <image>\n... ASSISTANT: ...</s>", images first in a turn, then its text.
LLAVA_TEMPLATE = (
    "{%- macro images(content) -%}{%- if content is not string -%}"
    "{%- for part in content if part.type == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- macro text(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}{{ 'ASSISTANT: ' }}{%- generation -%}{{ text(message.content) + '</s>' }}"
    "{%- endgeneration -%}"
    "{%- else -%}{{ message.role.upper() + ': ' + images(message.content) + text(message.content) + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Idefics 2: "User:<image>...<end_of_utterance>\nAssistant: ...<end_of_utterance>\n".
IDEFICS_TEMPLATE = (
    _CONTENT +
    "{%- for message in messages -%}"
    "{{ message.role | capitalize }}"
    "{%- if message.role == 'assistant' -%}{{ ': ' }}{%- generation -%}{{ render(message.content, '<image>') }}"
    "{{ '<end_of_utterance>' }}{%- endgeneration -%}{{ '\\n' }}"
    "{%- else -%}{{ ':' + render(message.content, '<image>') + '<end_of_utterance>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


# ---- per-family builders ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionStandin:
    """How to build one stand-in: the special tokens to add (``{attribute or name: token}``; attributes such as
    ``image_token`` become the tokenizer's own), the end-of-turn token used as EOS, and a builder returning
    ``(config, processor)`` for the tokenizer with those tokens."""

    tokens: dict[str, str]
    eos: str
    build: Callable[[transformers.PreTrainedTokenizerBase], tuple]
    model_class: str = "AutoModelForImageTextToText"


def _qwen_image_processor():
    # 64x64 -> 56x56 (max_pixels) = 4x4 patches of 14 px, merged 2x2 -> 4 image tokens.
    return transformers.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14,
                                                 merge_size=2, temporal_patch_size=2)


def _qwen_video_processor():
    return transformers.Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                              temporal_patch_size=2)


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _text_fields(tokenizer, **extra) -> dict:
    return {**_TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id, **extra}


_QWEN_TOKENS = {"vision_start": "<|vision_start|>", "image_token": "<|image_pad|>", "vision_end": "<|vision_end|>",
                "video_token": "<|video_pad|>"}


def _qwen_ids(tokenizer) -> dict:
    image, video, start, end = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return {"image_token_id": image, "video_token_id": video, "vision_start_token_id": start,
            "vision_end_token_id": end}


def _mrope(**extra) -> dict:
    # head_dim 8 -> 4 rotary frequencies split over (time, height, width)
    return {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], **extra}}


def _qwen2_5_vl(tokenizer):
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 28,
              "fullatt_block_indexes": [1]}
    config = transformers.Qwen2_5_VLConfig(text_config=_text_fields(tokenizer, **_mrope()), vision_config=vision,
                                           **_qwen_ids(tokenizer))
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=_qwen_image_processor(), tokenizer=tokenizer, video_processor=_qwen_video_processor(),
        chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>", "You are a helpful assistant."))
    return config, processor


def _qwen2_vl(tokenizer):
    vision = {"depth": 2, "embed_dim": 16, "hidden_size": 16, "mlp_ratio": 2, "num_heads": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = transformers.Qwen2VLConfig(text_config=_text_fields(tokenizer, **_mrope()), vision_config=vision,
                                        **_qwen_ids(tokenizer))
    processor = transformers.Qwen2VLProcessor(
        image_processor=_qwen_image_processor(), tokenizer=tokenizer, video_processor=_qwen_video_processor(),
        chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>", "You are a helpful assistant."))
    return config, processor


def _qwen3_image_processor():
    # patch 16: 64x64 stays 64x64 = 4x4 patches, merged 2x2 -> 4 image tokens.
    return transformers.Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16,
                                                 merge_size=2, temporal_patch_size=2)


def _qwen3_video_processor():
    return transformers.Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
                                              patch_size=16, merge_size=2, temporal_patch_size=2)


# Qwen3-VL's vision tower (also Qwen 3.5's): a 4x4 learned position grid, deepstack features from layer 0.
_QWEN3_VISION = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
                 "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 16,
                 "deepstack_visual_indexes": [0]}
_LINEAR_ATTENTION = {"layer_types": ["linear_attention", "full_attention"], "linear_conv_kernel_dim": 4,
                     "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                     "linear_num_value_heads": 2}


def _qwen3_processor(processor_cls, tokenizer, think_by_default: bool):
    return processor_cls(image_processor=_qwen3_image_processor(), tokenizer=tokenizer,
                         video_processor=_qwen3_video_processor(),
                         chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>", None,
                                                       think_by_default))


def _qwen3_vl(tokenizer):
    text = _text_fields(tokenizer, **_mrope(mrope_interleaved=True))
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=_QWEN3_VISION, **_qwen_ids(tokenizer))
    return config, _qwen3_processor(transformers.Qwen3VLProcessor, tokenizer, True)


def _qwen3_5(tokenizer, think_by_default: bool = False):
    text = _text_fields(tokenizer, **_LINEAR_ATTENTION,
                        **_mrope(mrope_interleaved=True, partial_rotary_factor=1.0))
    config = transformers.Qwen3_5Config(text_config=text, vision_config=_QWEN3_VISION, **_qwen_ids(tokenizer))
    return config, _qwen3_processor(transformers.Qwen3VLProcessor, tokenizer, think_by_default)


def _qwen3_5_moe(tokenizer):
    text = _text_fields(tokenizer, **_LINEAR_ATTENTION, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, shared_expert_intermediate_size=16,
                        **_mrope(mrope_interleaved=True, partial_rotary_factor=1.0))
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=_QWEN3_VISION, **_qwen_ids(tokenizer))
    return config, _qwen3_processor(transformers.Qwen3VLProcessor, tokenizer, True)


_SIGLIP = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "patch_size": 14}


def _gemma3(tokenizer):
    boi, eoi, image = _ids(tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    # 56x56 input = 4x4 patches, average-pooled 2x2 -> 4 tokens per image (mm_tokens_per_image).
    text = _text_fields(tokenizer, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    # vision_use_head=False as Gemma 3's own: its SigLIP pooling head is unused (TRL asserts every weight trains).
    config = transformers.Gemma3Config(text_config=text,
                                       vision_config={**_SIGLIP, "image_size": 56, "vision_use_head": False},
                                       mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi,
                                       image_token_index=image)
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=GEMMA_TEMPLATE, image_seq_length=4)
    return config, processor


# <|video|> is listed though unused: Gemma4Processor adds it to the tokenizer on init, which would otherwise grow the
# vocabulary past the model's embedding rows. The audio tokens: its validate_inputs raises without boa/eoa tokens,
# audio or not (transformers 5.25).
_GEMMA4_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                  "video_token": "<|video|>", "audio_token": "<|audio|>", "boa_token": "<|audio>",
                  "eoa_token": "<audio|>", "start_of_turn": "<|turn>", "end_of_turn": "<turn|>"}
# Gemma 4's image processor accepts max_soft_tokens in {70, 140, 280, 560, 1120} only and resizes every image up or
# down to that budget: 70, the least, gives 64 soft tokens for a square image (an 8x8 grid; 56-66 for other aspect
# ratios). Patch 4 and 2x2 pooling make that a 64x64 input (16x16 patches, padded to 70 * 4 = 280); pooling 1 is
# not usable: transformers 5.25's pooler then keeps the padding patches and drops the real ones. Patch coordinates
# stay below 70 * 2 = 140 at any aspect ratio (the position table's size).
_GEMMA4_IMAGES = {"patch_size": 4, "pooling_kernel_size": 2, "max_soft_tokens": 70}


def _gemma4(tokenizer):
    image, boi, eoi, video, audio, boa, eoa = _ids(tokenizer, *(_GEMMA4_TOKENS[k] for k in (
        "image_token", "boi_token", "eoi_token", "video_token", "audio_token", "boa_token", "eoa_token")))
    # no per-layer embeddings (hidden_size_per_layer_input=0): the text model is Gemma 3's shape plus its own
    # global-attention head_dim (8, as the sliding layers')
    text = _text_fields(tokenizer, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                        global_head_dim=8, hidden_size_per_layer_input=0, vocab_size_per_layer_input=len(tokenizer))
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 8, "position_embedding_size": 140,
              "patch_size": _GEMMA4_IMAGES["patch_size"], "pooling_kernel_size": _GEMMA4_IMAGES["pooling_kernel_size"]}
    # No audio tower (audio_config=None); the processor still needs an audio feature extractor to be built.
    config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                                       image_token_id=image, boi_token_id=boi, eoi_token_id=eoi,
                                       video_token_id=video, audio_token_id=audio, boa_token_id=boa,
                                       eoa_token_index=eoa)
    processor = transformers.Gemma4Processor(
        feature_extractor=transformers.Gemma4AudioFeatureExtractor(),
        image_processor=transformers.Gemma4ImageProcessorPil(**_GEMMA4_IMAGES),
        video_processor=transformers.Gemma4VideoProcessor(**_GEMMA4_IMAGES), tokenizer=tokenizer,
        chat_template=GEMMA4_TEMPLATE, image_seq_length=64)
    return config, processor


_CLIP = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "patch_size": 14, "image_size": 28, "projection_dim": 16}


def _llava(tokenizer):
    (image,) = _ids(tokenizer, "<image>")
    # 28x28 input = 2x2 patches + CLS; the "default" strategy drops CLS -> 4 tokens per image.
    config = transformers.LlavaConfig(text_config={"model_type": "llama", **_text_fields(tokenizer)},
                                      vision_config={"model_type": "clip_vision_model", **_CLIP},
                                      image_token_index=image, image_seq_length=4, vision_feature_layer=-2)
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                         crop_size={"height": 28, "width": 28})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=LLAVA_TEMPLATE, patch_size=14,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return config, processor


def _llava_next(tokenizer):
    (image,) = _ids(tokenizer, "<image>")
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = transformers.LlavaNextConfig(text_config={"model_type": "llama", **_text_fields(tokenizer)},
                                          vision_config={"model_type": "clip_vision_model", **_CLIP},
                                          image_token_index=image, image_seq_length=4, vision_feature_layer=-2,
                                          image_grid_pinpoints=pinpoints)
    image_processor = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 28},
                                                              crop_size={"height": 28, "width": 28},
                                                              image_grid_pinpoints=pinpoints)
    processor = transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                chat_template=LLAVA_TEMPLATE, patch_size=14,
                                                vision_feature_select_strategy="default",
                                                num_additional_image_tokens=1)
    return config, processor


def _idefics2(tokenizer):
    (image,) = _ids(tokenizer, "<image>")
    vision = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "patch_size": 14, "image_size": 56}
    # the perceiver resamples each image to 4 latents = 4 image tokens
    perceiver = {"hidden_size": 16, "resampler_n_latents": 4, "resampler_depth": 1, "resampler_n_heads": 2,
                 "resampler_head_dim": 8, "num_key_value_heads": 1}
    config = transformers.Idefics2Config(text_config={"model_type": "mistral", **_text_fields(tokenizer)},
                                         vision_config=vision, perceiver_config=perceiver, image_token_id=image)
    image_processor = transformers.Idefics2ImageProcessorPil(do_image_splitting=False,
                                                             size={"shortest_edge": 28, "longest_edge": 56})
    processor = transformers.Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                               image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    return config, processor


VISION_STANDINS: dict[str, VisionStandin] = {
    "tiny-Qwen2_5_VLForConditionalGeneration": VisionStandin(_QWEN_TOKENS, "<|im_end|>", _qwen2_5_vl),
    "tiny-Qwen2VLForConditionalGeneration": VisionStandin(_QWEN_TOKENS, "<|im_end|>", _qwen2_vl),
    "tiny-Qwen3VLForConditionalGeneration": VisionStandin(_QWEN_TOKENS, "<|im_end|>", _qwen3_vl),
    "tiny-Qwen3_5ForConditionalGeneration-NoThink": VisionStandin(_QWEN_TOKENS, "<|im_end|>", _qwen3_5),
    "tiny-Qwen3_5MoeForConditionalGeneration-3.6": VisionStandin(_QWEN_TOKENS, "<|im_end|>", _qwen3_5_moe),
    "tiny-Gemma3ForConditionalGeneration": VisionStandin(
        {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>",
         "start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>"}, "<end_of_turn>", _gemma3),
    "tiny-Gemma4ForConditionalGeneration": VisionStandin(_GEMMA4_TOKENS, "<turn|>", _gemma4),
    "tiny-LlavaForConditionalGeneration": VisionStandin({"image_token": "<image>", "eos": "</s>"}, "</s>", _llava),
    "tiny-LlavaNextForConditionalGeneration": VisionStandin({"image_token": "<image>", "eos": "</s>"}, "</s>",
                                                            _llava_next),
    "tiny-Idefics2ForConditionalGeneration": VisionStandin(
        {"image_boundary_token": "<fake_token_around_image>", "image_token": "<image>",
         "end_of_utterance_token": "<end_of_utterance>"}, "<end_of_utterance>", _idefics2),
}

# Attribute names the tokenizer carries as its own special tokens (tokenizer.image_token, .image_token_id, ...).
_TOKENIZER_ATTRIBUTES = {"image_token", "boi_token", "eoi_token", "video_token", "vision_start", "vision_end",
                         "image_boundary_token", "end_of_utterance_token", "audio_token", "boa_token", "eoa_token"}


def vision_tokenizer(standin: VisionStandin, vocab_size: int, vocab: str | None):
    """The stand-in tokenizer with the family's special tokens appended and its end-of-turn token as EOS."""
    tokenizer = build_tokenizer(vocab_size, vocab)
    named = {k: v for k, v in standin.tokens.items() if k in _TOKENIZER_ATTRIBUTES}
    others = [v for k, v in standin.tokens.items() if k not in _TOKENIZER_ATTRIBUTES]
    tokenizer.add_special_tokens({"additional_special_tokens": list(named.values()) + others})
    tokenizer._set_model_specific_special_tokens(named)  # tokenizer.image_token etc., saved with the tokenizer
    tokenizer.eos_token = standin.eos
    return tokenizer


def probe_image(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def prove(model, processor) -> None:
    """A forward and a 2-token generate on the processor's encoding of a one-image prompt (64x64): the config, the
    processor's token expansion and the chat template agree, or this raises."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[probe_image()]], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        if logits.shape[1] != inputs["input_ids"].shape[1]:
            raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(inputs['input_ids'].shape)}")
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    if out.shape[1] != inputs["input_ids"].shape[1] + 2:
        raise ValueError(f"generate returned {out.shape[1]} ids for a {inputs['input_ids'].shape[1]}-id prompt + 2")


def build_vision(name: str, path: Path, seed: int, vocab_size: int, vocab: str | None,
                 save: Callable | None = None) -> None:
    """Build stand-in ``name`` into ``path``: the model (bf16, as on the hub), its processor, generation config."""
    torchvision_shim()
    standin = VISION_STANDINS[name]
    tokenizer = vision_tokenizer(standin, vocab_size, vocab)
    config, processor = standin.build(tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, standin.model_class).from_config(config)
    prove(model, processor)
    model.to(torch.bfloat16).save_pretrained(path)
    processor.save_pretrained(path)
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    transformers.GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=None).save_pretrained(path)
