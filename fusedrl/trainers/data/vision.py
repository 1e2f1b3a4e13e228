"""Vision-language prompts: images attached to chat messages, encoded by the model's processor, batched per row.

A trainer whose ``processing_class`` is a processor with an image processor (:func:`is_vision_processor`) takes
TRL's image datasets: an ``image`` column (one image per row) or an ``images`` column (a list per row) beside a
conversational ``prompt``. :func:`attach_images` turns each prompt into content blocks with the images in them, as
TRL 1.16's ``prepare_multimodal_messages`` does: string contents become ``[{"type": "text", ...}]``, the images go
in front of the first user message's text unless the messages already hold ``{"type": "image"}`` placeholders, and
the count of placeholders must match the count of images.

The processor encodes each row on its own (:func:`encode_vision_prompt`) into token ids and the fields the model's
forward takes beside them. Those fields come in two kinds, kept apart in a ``VisionRow``:

- per-image fields (``pixel_values``, ``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``...): the rows of
  a batch are concatenated along dim 0, each row's tensor zero-padded to the largest trailing shape (LLaVA-NeXT's
  patch count and Idefics' image count vary per row; both models drop all-zero padding).
- per-token fields (Gemma 3's ``token_type_ids``, Qwen 3.5's ``mm_token_type_ids``): one value per prompt token,
  left-padded with zeros like the prompt ids and extended with zeros over the completion (no image token is ever
  sampled: :func:`suppress_image_tokens`), except over images a tool returned into the completion
  (:func:`extend_vision_row`: GRPO's tool loop).

Rows stay separate until a forward needs them (:func:`collate_vision`), so a round's rows can be shuffled, split into
micro-batches and checkpointed like any other per-row value.

Legend: B rows, P prompt positions (left-padded), C completion positions, L one row's prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import ProcessorMixin

IMAGE_COLUMNS = ("images", "image")
_SEQUENCE_KEYS = ("input_ids", "attention_mask")


def is_vision_processor(processing_class) -> bool:
    """A processor that encodes images (LLaVA, Qwen-VL, Gemma 3, Idefics...), not a plain tokenizer."""
    return isinstance(processing_class, ProcessorMixin) and getattr(processing_class, "image_processor", None) is not None


def row_images(rows: Sequence[dict]) -> list[list | None] | None:
    """Each row's images from TRL's columns (``images``: a list per row; ``image``: one per row, None allowed), or
    None when the rows have no image column or no row has an image (TRL's rule: the processor needs one)."""
    if not rows:
        return None
    if "images" in rows[0]:
        images = [list(row.get("images") or []) or None for row in rows]
    elif "image" in rows[0]:
        images = [None if row.get("image") is None else [row["image"]] for row in rows]
    else:
        return None
    return images if any(images) else None


def _blocks(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def attach_images(messages: list[dict], images: Sequence | None = None) -> list[dict]:
    """``messages`` with every content as a list of blocks and ``images`` filled into its image placeholders (new
    dicts; the input is left as it is). Placeholders are the ``{"type": "image"}`` blocks without an image; when the
    messages are plain strings, one placeholder per image goes before the first user message's text."""
    images = list(images or [])
    placed = any(isinstance(m.get("content"), list) and any(b.get("type") == "image" for b in m["content"])
                 for m in messages)
    converted = []
    for message in messages:
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"a prompt message has role {role!r}; expected 'system', 'user', 'assistant' or 'tool'")
        content = message.get("content")
        if role == "user" and isinstance(content, str) and not placed:
            content = [*({"type": "image"} for _ in images), {"type": "text", "text": content}]
            placed = True
        elif content is not None:
            content = _blocks(content)
        converted.append({**message, "content": content} if content is not None else dict(message))
    empty = [(i, j) for i, m in enumerate(converted) if m.get("content") and m["role"] != "tool"
             for j, block in enumerate(m["content"]) if block.get("type") == "image" and "image" not in block]
    if len(empty) != len(images):
        raise ValueError(f"a prompt has {len(empty)} image placeholder(s) but its row has {len(images)} image(s); "
                         "give one image per {'type': 'image'} block of the prompt (the 'image' / 'images' column)")
    for (i, j), image in zip(empty, images, strict=True):
        content = list(converted[i]["content"])
        content[j] = {**content[j], "image": image}
        converted[i] = {**converted[i], "content": content}
    return converted


def prompt_images(messages: list[dict]) -> list:
    """The images held by a prompt's content blocks, in order."""
    return [block["image"] for m in messages if isinstance(m.get("content"), list) for block in m["content"]
            if block.get("type") == "image" and "image" in block]


# One row's processor fields, a plain dict so a checkpoint stores it: {"images": per-image tensors (dim 0 = the
# row's images or patches), "tokens": per-prompt-token 1-D tensors of the row's length L} and, once a tool returned
# an image into the completion (extend_vision_row), "completion_tokens": per-completion-token 1-D tensors.
VisionRow = dict
_TOKEN_PARTS = ("tokens", "completion_tokens")


def encode_vision_prompt(processor, messages: list[dict], *, tools: list | None = None,
                         chat_template_kwargs: dict | None = None,
                         add_generation_prompt: bool = True) -> tuple[list[int], VisionRow]:
    """One conversational prompt through the processor's chat template (with the generation prompt unless told
    otherwise): its token ids and its ``VisionRow`` (the images already sit in ``messages``: :func:`attach_images`)."""
    encoded = processor.apply_chat_template([messages], tools=tools, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=True, return_tensors="pt",
                                            **(chat_template_kwargs or {}))
    input_ids = encoded["input_ids"]
    images, tokens = {}, {}
    for key, value in encoded.items():
        if key in _SEQUENCE_KEYS or not isinstance(value, torch.Tensor):
            continue
        if value.shape == input_ids.shape:  # one value per prompt token
            tokens[key] = value[0]
        else:
            images[key] = value
    return input_ids[0].tolist(), {"images": images, "tokens": tokens}


def _pad_to(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``tensor`` zero-padded at the end of every dim but the first to ``shape[1:]``."""
    padding = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape[1:]), strict=True):
        padding += [0, want - have]
    return torch.nn.functional.pad(tensor, padding) if any(padding) else tensor


def collate_vision(rows: Sequence[VisionRow | None], prompt_width: int, completion_width: int = 0, *,
                   device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The forward keywords of a batch of rows: per-image fields concatenated (rows without images add nothing),
    per-token fields as ``[B, P + C]`` aligned with left-padded prompt ids of width ``prompt_width`` followed by
    ``completion_width`` completion positions (zeros on padding, and on the completion but where a row's
    ``completion_tokens`` say otherwise). Floating fields are cast to
    ``dtype`` (the model's, when it is not fp32) and everything moves to ``device``."""
    present = [row for row in rows if row is not None]
    out: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for row in present for k in row["images"]):
        parts = [row["images"][key] for row in present if key in row["images"]]
        shape = [max(dims) for dims in zip(*(part.shape for part in parts), strict=True)]
        value = torch.cat([_pad_to(part, shape) for part in parts])
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.to(device) if device is not None else value
    for key in dict.fromkeys(k for row in present for part in _TOKEN_PARTS for k in row.get(part, {})):
        sample = next(row[part][key] for row in present for part in _TOKEN_PARTS if key in row.get(part, {}))
        value = sample.new_zeros((len(rows), prompt_width + completion_width))
        for i, row in enumerate(rows):
            if row is not None and key in row["tokens"]:
                tokens = row["tokens"][key]  # a prompt cut to its last tokens keeps their types
                tokens = tokens[max(len(tokens) - prompt_width, 0):]
                value[i, prompt_width - len(tokens):prompt_width] = tokens
            if row is not None and key in row.get("completion_tokens", {}) and completion_width:
                tokens = row["completion_tokens"][key][:completion_width]
                value[i, prompt_width:prompt_width + len(tokens)] = tokens
        out[key] = value.to(device) if device is not None else value
    return out


def extend_vision_row(row: VisionRow | None, suffix: VisionRow, *, prompt_length: int,
                      completion_length: int) -> VisionRow:
    """``row`` (a prompt's fields; None for a prompt without images) plus the fields of images that arrive inside
    the completion: a tool's result rendered at completion positions ``completion_length`` onwards (``suffix``: its
    fields, per-token ones over the suffix's tokens). Per-image fields are appended after the row's, since image
    features fill the image tokens in sequence order; per-token fields go into ``completion_tokens`` (one value per
    completion token so far, zeros over sampled text), the prompt's made exactly ``prompt_length`` long. A new dict;
    ``row`` is left as it is."""
    row = row or {"images": {}, "tokens": {}}
    images = dict(row["images"])
    for key, value in suffix["images"].items():
        if key in images:
            shape = [max(dims) for dims in zip(images[key].shape, value.shape, strict=True)]
            value = torch.cat([_pad_to(images[key], shape), _pad_to(value, shape)])
        images[key] = value
    tokens, completion = dict(row["tokens"]), dict(row.get("completion_tokens", {}))
    for key, value in suffix["tokens"].items():
        prompt = tokens.get(key, value.new_zeros(0))[-prompt_length:] if prompt_length else value.new_zeros(0)
        tokens[key] = torch.nn.functional.pad(prompt, (prompt_length - len(prompt), 0))
        before = completion.get(key, value.new_zeros(0))[:completion_length]
        completion[key] = torch.cat([torch.nn.functional.pad(before, (0, completion_length - len(before))), value])
    return {"images": images, "tokens": tokens, "completion_tokens": completion}


def suppress_image_tokens(generation_config, model) -> None:
    """Add the model's image placeholder token to ``generation_config.suppress_tokens`` (kept: any the user set),
    TRL's rule: a sampled image token would have no image features behind it at the next forward."""
    config = model.config
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is not None:
        generation_config.suppress_tokens = [*(generation_config.suppress_tokens or []), token_id]


def text_tokenizer(processing_class, tokenizer):
    """The tokenizer that renders text: ``tokenizer``, given the processor's chat template when it has none of its own
    (LLaVA checkpoints keep theirs in the processor only; TRL renders with the processor)."""
    template = getattr(processing_class, "chat_template", None)
    if tokenizer is not processing_class and template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    return tokenizer


def check_vision_prompts(prompts: Sequence[Any], images: list | None) -> None:
    """Images need conversational prompts (the chat template places them); TRL's refusal, with the fix."""
    if images is not None and any(not isinstance(p, list) for p in prompts):
        raise ValueError("Multimodal training requires conversational prompts: the rows carry images but a prompt is "
                         "a string (a chat template applied before the trainer?). Give the raw chat messages "
                         "[{'role': 'user', 'content': ...}] and let the trainer apply the chat template")


def check_vision_trainer(args) -> None:
    """What fusedrl's sampling trainers do not take with a vision-language model, refused with the fix: adapters
    trained jointly (their union forward carries no image fields); shared-prefix forwards are switched off instead
    (``FusedTrainer.prefix_sharing``). Tools and environments (text or image results: ``agents/rollouts.py``) and
    a ``rollout_func`` (its prompt ids checked against the processor's) work.
    Sets TRL's ``ddp_find_unused_parameters=True`` default for a VLM: a batch without images leaves the vision tower
    without gradients, which DDP would otherwise wait for (reentrant checkpointing excepted: it fails with it)."""
    if args.ddp_find_unused_parameters is None and not (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        args.ddp_find_unused_parameters = True
    if isinstance(getattr(args, "model_adapter_name", None), (list, tuple)):
        raise ValueError(  # noqa: TRY004 - a config value, not a wrong argument type
            "model_adapter_name lists several adapters (joint training), which fusedrl does not support with a "
            "vision-language model; train one adapter at a time")
