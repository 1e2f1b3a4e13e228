"""Preference rows with images -> padded batches with the image fields, encoded by a vision-language model's processor
when a batch is built, as TRL 1.16's ``DataCollatorForVisionPreference`` / ``DataCollatorForVisionUnpairedPreference``.

Legend: B pairs (DPO) or examples (KTO) per batch, N rows of one forward (DPO: 2B, ``[chosen; rejected]``; KTO: B),
T padded length, P one row's prompt tokens.

A dataset with an ``image`` column (one image per row, None allowed) or an ``images`` column (a list per row) keeps
its raw rows: decoding and processing every image up front would hold the whole dataset's pixels (TRL skips the
dataset preparation for the same reason). Its text fields must be conversational (the chat template places the
images). Per example, when a batch is built (:func:`encode_vision_example`):

- the images go into the prompt's first user message (``fusedrl.trainers.data.vision.attach_images``, TRL's
  ``prepare_multimodal_messages``); an implicit prompt (DPO rows without ``prompt``) is split off first;
- the processor encodes the prompt with the generation prompt (its ids and its ``VisionRow``: per-image fields such
  as ``pixel_values`` / ``image_grid_thw``, per-token ones such as Gemma 3's ``token_type_ids``), then prompt +
  each completion as one conversation; the completion starts where the prompt's ids stop being a prefix of them all,
  the rule of the text path (``preference.data.split_completions``). The processor runs its image processing once
  per call, so 3 times per DPO pair (prompt, prompt + chosen, prompt + rejected), 2 or 3 per KTO example.

A batch (:class:`VisionPreferenceCollator`, :class:`VisionUnpairedCollator`) is the text path's right-padded
``input_ids`` / ``attention_mask`` / ``completion_mask`` plus every image field under the processor's own name: the
per-image fields of the N rows concatenated in row order (each DPO pair's fields twice, for its chosen and its
rejected row), the per-token ones ``[N, T]`` aligned with the ids (zero on completion and padding). KTO's mismatched
KL rows (prompt i with the completion of example i - 1) use the same prompts in the same order, so they share the
per-image fields; their per-token fields are ``KL_<name>``.

``max_length`` keeps each row's start, as TRL's vision collators do; a row whose prompt (image tokens included) does
not fit below ``max_length`` is refused with the row and the length to set, since the cut would drop image tokens
whose features the forward still gets (TRL's "Image features and image tokens do not match") or, at best, every
completion token.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import torch
from datasets import IterableDataset

from fusedrl.trainers.data import extract_prompt, is_conversational
from fusedrl.trainers.data.vision import (
    IMAGE_COLUMNS,
    VisionRow,
    attach_images,
    check_vision_prompts,
    check_vision_trainer,
    collate_vision,
    encode_vision_prompt,
    row_images,
)
from fusedrl.trainers.preference.data import _map_kwargs, float_columns, pad_sequences, split_completions

# The raw columns a vision batch is built from (Trainer drops the others with remove_unused_columns).
PAIRED_COLUMNS = ("prompt", "chosen", "rejected", *IMAGE_COLUMNS, "tools", "chat_template_kwargs",
                  "ref_chosen_logps", "ref_rejected_logps")
UNPAIRED_COLUMNS = ("prompt", "completion", "KL_completion", "label", *IMAGE_COLUMNS, "tools", "chat_template_kwargs",
                    "ref_logps", "ref_KL_logps")


def has_images(dataset) -> bool:
    """Whether ``dataset`` (or the first of a dict of them) has an ``image`` / ``images`` column (TRL's
    ``_is_vision_dataset``)."""
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()))
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    return any(column in columns for column in IMAGE_COLUMNS)


@dataclasses.dataclass
class VisionExample:
    """One example encoded: ``prompt_ids`` (P), ``completions`` (field -> token ids), ``vision`` (its VisionRow, per-token
    fields of length P, or None without images)."""

    prompt_ids: list[int]
    completions: dict[str, list[int]]
    vision: VisionRow | None


def _template_kwargs(row: dict[str, Any]) -> tuple[list | None, dict]:
    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools, dict(row.get("chat_template_kwargs") or {})


def _image_token_ids(processor) -> set[int]:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None) is not None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return set() if token_id is None else {token_id}


def encode_vision_example(processor, row: dict[str, Any], images: Sequence | None,
                          completions: dict[str, list[dict]]) -> VisionExample:
    """``row``'s prompt with ``images`` and each of ``completions`` (name -> assistant messages) encoded by
    ``processor``'s chat template (the module docstring says how)."""
    check_vision_prompts([row["prompt"], *completions.values()], [images])  # conversational rows only
    tools, template_kwargs = _template_kwargs(row)
    prompt = attach_images(row["prompt"], images)
    prompt_ids, vision = encode_vision_prompt(processor, prompt, tools=tools, chat_template_kwargs=template_kwargs)
    full = {}
    for name, messages in completions.items():
        if any(isinstance(m.get("content"), list) and any(b.get("type") == "image" for b in m["content"])
               for m in messages):
            raise ValueError(f"a {name!r} completion holds an image block; images belong to the prompt (the 'image' "
                             "/ 'images' column), completions are text")
        encoded = processor.apply_chat_template([prompt + attach_images(messages)], tools=tools, tokenize=True,
                                                return_dict=True, return_tensors="pt", **template_kwargs)
        full[name] = encoded["input_ids"][0].tolist()
    split = split_completions(prompt_ids, full)
    num_prompt = len(split["prompt_ids"])
    image_ids = _image_token_ids(processor)
    for name in completions:
        if image_ids & set(split[f"{name}_ids"]):
            raise ValueError(f"the chat template renders the prompt alone differently from prompt + {name}, before "
                             "its image tokens; fusedrl cannot tell which image tokens belong to the prompt. Use a "
                             "chat template whose prompt rendering is a prefix of the whole conversation")
    if not images:
        vision = None
    else:
        vision = {"images": vision["images"], "tokens": {k: v[:num_prompt] for k, v in vision["tokens"].items()}}
    return VisionExample(split["prompt_ids"], {name: split[f"{name}_ids"] for name in completions}, vision)


def _check_fits(prompts: Sequence[list[int]], max_length: int | None) -> None:
    if max_length is None:
        return
    longest = max(len(prompt) for prompt in prompts)
    if longest >= max_length:
        raise ValueError(
            f"max_length={max_length} is too short for a row whose prompt, image tokens included, is {longest} "
            "tokens: truncation keeps the start of each row, so it would cut the prompt's image tokens (whose "
            f"features the model still gets) or leave no completion token. Set max_length above {longest}, or "
            "max_length=None")


def vision_fields(visions: Sequence[VisionRow | None], prompt_lengths: Sequence[int], width: int, *,
                  dtype: torch.dtype | None, token_prefix: str = "") -> dict[str, torch.Tensor]:
    """The forward keywords of N right-padded rows of ``width`` positions: per-image fields concatenated in row order
    (``collate_vision``), per-token fields ``[N, width]`` with row i's at its first ``prompt_lengths[i]`` positions,
    zero elsewhere, named ``token_prefix + <name>``."""
    out = collate_vision([None if v is None else {"images": v["images"], "tokens": {}} for v in visions], 0,
                         dtype=dtype)
    present = [v for v in visions if v is not None]
    for key in dict.fromkeys(k for v in present for k in v["tokens"]):
        sample = next(v["tokens"][key] for v in present if key in v["tokens"])
        value = sample.new_zeros((len(visions), width))
        for i, (vision, length) in enumerate(zip(visions, prompt_lengths, strict=True)):
            if vision is not None and key in vision["tokens"]:
                tokens = vision["tokens"][key][:min(length, width)]
                value[i, : len(tokens)] = tokens
        out[f"{token_prefix}{key}"] = value
    return out


@dataclasses.dataclass
class VisionPreferenceCollator:
    """Raw DPO rows (``prompt`` optional, ``chosen``, ``rejected``, ``image`` or ``images``) -> the text path's
    int64 ``[2B, T]`` ``input_ids`` / ``attention_mask`` / ``completion_mask`` (chosen rows first), the image fields
    (module docstring), and ``ref_chosen_logps`` / ``ref_rejected_logps`` fp32 ``[B]`` when the rows carry them.
    ``dtype``: floating image fields are cast to it (the model's dtype)."""

    processor: Any
    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    dtype: torch.dtype | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = row_images(examples) or [None] * len(examples)
        encoded = []
        for example, example_images in zip(examples, images, strict=True):
            if "prompt" not in example:
                example = {**example, **extract_prompt(example)}
            encoded.append(encode_vision_example(
                self.processor, example, example_images,
                {side: example[side] for side in ("chosen", "rejected")}))
        prompts = [e.prompt_ids for e in encoded] * 2
        completions = [e.completions["chosen"] for e in encoded] + [e.completions["rejected"] for e in encoded]
        _check_fits(prompts, self.max_length)
        batch = pad_sequences(prompts, completions, pad_token_id=self.pad_token_id,
                              kept=slice(None, self.max_length), multiple=self.pad_to_multiple_of)
        batch.update(vision_fields([e.vision for e in encoded] * 2, [len(p) for p in prompts],
                                   batch["input_ids"].shape[1], dtype=self.dtype))
        return {**batch, **float_columns(examples, ("ref_chosen_logps", "ref_rejected_logps"))}


@dataclasses.dataclass
class VisionUnpairedCollator:
    """Raw KTO rows (``prompt``, ``completion``, ``label``, ``image`` or ``images``) -> the text path's int64
    ``[B, T]`` ``input_ids`` / ``attention_mask`` / ``completion_mask``, the same with a ``KL_`` prefix for the
    mismatched pairs when ``calculate_kl``, ``label`` bool ``[B]``, the image fields (module docstring), and
    ``ref_logps`` / ``ref_KL_logps`` fp32 ``[B]`` when present. The KL completion of a row is its ``KL_completion``
    column (:func:`pair_kl_completions`), else the previous row's completion in the batch (TRL's collator)."""

    processor: Any
    pad_token_id: int
    max_length: int | None = None
    calculate_kl: bool = True
    pad_to_multiple_of: int | None = None
    dtype: torch.dtype | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = row_images(examples) or [None] * len(examples)
        kl_completions = None
        if self.calculate_kl:
            kl_completions = ([example["KL_completion"] for example in examples] if "KL_completion" in examples[0]
                              else [examples[-1]["completion"]] + [e["completion"] for e in examples[:-1]])
        encoded = []
        for i, (example, example_images) in enumerate(zip(examples, images, strict=True)):
            completions = {"completion": example["completion"]}
            if kl_completions is not None:
                completions["KL_completion"] = kl_completions[i]
            encoded.append(encode_vision_example(self.processor, example, example_images, completions))
        prompts = [e.prompt_ids for e in encoded]
        _check_fits(prompts, self.max_length)
        visions = [e.vision for e in encoded]
        batch = {}
        for prefix in ("", "KL_") if kl_completions is not None else ("",):
            sequences = pad_sequences(prompts, [e.completions[f"{prefix}completion"] for e in encoded],
                                      pad_token_id=self.pad_token_id, kept=slice(None, self.max_length),
                                      multiple=self.pad_to_multiple_of, prefix=prefix)
            batch.update(sequences)
            fields = vision_fields(visions, [len(p) for p in prompts], sequences[f"{prefix}input_ids"].shape[1],
                                   dtype=self.dtype, token_prefix=prefix)
            batch.update(fields if not prefix else {k: v for k, v in fields.items() if k.startswith(prefix)})
        batch["label"] = torch.tensor([bool(example["label"]) for example in examples])
        return {**batch, **float_columns(examples, ("ref_logps", "ref_KL_logps"))}


# --- dataset checks and KTO's KL pairing -----------------------------------------------------------------------------


def _first_row(dataset) -> dict[str, Any]:
    text_columns = [c for c in (dataset.column_names or []) if c not in IMAGE_COLUMNS]
    if text_columns and not isinstance(dataset, IterableDataset):
        dataset = dataset.select_columns(text_columns)  # no image decoded
    return next(iter(dataset))


def check_vision_dataset(dataset, *, paired: bool, name: str) -> None:
    """The columns a vision dataset needs (DPO: ``chosen``/``rejected``, ``prompt`` optional; KTO: ``prompt``/
    ``completion``/``label``: TRL refuses paired KTO rows with images) and conversational text fields, checked on its
    first row (the rows stay raw until batched; the collators check each prompt again)."""
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    if not paired and {"chosen", "rejected"} <= set(columns):
        raise ValueError(
            f"{name} dataset: Vision datasets must be in unpaired format with `completion` and `label` columns. "
            "Paired format (`chosen`/`rejected`) is not supported for vision datasets (unpairing would copy every "
            "image). Unpair your dataset first: `dataset = unpair_preference_dataset(dataset)`.")
    required = ("chosen", "rejected") if paired else ("prompt", "completion", "label")
    missing = [column for column in required if column not in columns]
    if missing:
        raise ValueError(f"{name} dataset is missing column(s) {missing}; its columns are {columns}")
    row = _first_row(dataset)
    if not is_conversational(row):
        raise ValueError(f"{name} dataset: Multimodal training requires conversational rows: the dataset has an "
                         "'image' / 'images' column but its text fields are strings. Give chat messages "
                         "[{'role': 'user', 'content': ...}] and let the trainer apply the processor's chat template")


def _rotate_completions(completion: list) -> dict[str, list]:
    return {"KL_completion": completion[-1:] + completion[:-1]}


def pair_kl_completions(dataset, *, kl_batch_size: int, num_proc: int | None, name: str):
    """``dataset`` with KTO's mismatched ``KL_completion`` column: within each run of ``kl_batch_size`` rows, row i
    gets row i - 1's completion (the first, the last's), as the text path's ``KL_completion_ids``. Only the
    ``completion`` column is read, so no image is decoded."""
    if "KL_completion" in (dataset.column_names or []):
        return dataset
    return dataset.map(_rotate_completions, batched=True, batch_size=kl_batch_size, input_columns=["completion"],
                       **_map_kwargs(dataset, num_proc, f"Pairing KL completions of {name} dataset"))


def check_vision_config(args, *, is_vlm: bool) -> None:
    """What a dataset with images needs of the trainer's set-up (TRL's refusals in its words where it has them),
    with the fix; and TRL's ``ddp_find_unused_parameters=True`` default: a batch without images leaves the vision
    tower without gradients."""
    if not is_vlm:
        raise ValueError(
            "The dataset appears to be vision-related (contains 'image' or 'images' keys), but the provided model "
            "does not seem to be a vision-language model (its processing_class is a tokenizer, not a processor "
            "with an image processor). Please check your model and dataset.")
    if args.max_length is not None and getattr(args, "truncation_mode", "keep_start") == "keep_end":
        raise ValueError(
            "truncation_mode='keep_end' is not supported for vision-language models. Image tokens reside inside the "
            "prompt portion of the sequence; depending on the example, keep_end may silently drop them, causing "
            "pixel_values to be forwarded to the model with no corresponding visual tokens in input_ids. Use "
            "truncation_mode='keep_start' (the default) or set max_length=None.")
    check_vision_trainer(args)


def image_dtype(model) -> torch.dtype | None:
    """The dtype the collators cast floating image fields to: the model's, unless fp32 (autocast then decides)."""
    dtype = getattr(model, "dtype", None)
    return None if dtype in (None, torch.float32) else dtype
