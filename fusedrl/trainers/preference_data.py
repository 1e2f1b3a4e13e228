"""Preference rows -> token ids -> padded ``[chosen; rejected]`` batches, the way TRL 1.16's DPOTrainer builds them.

Legend: B pairs per batch, N = 2B rows (the B chosen sequences, then the B rejected ones), T padded length.

Per row (:func:`tokenize_preference_row`), as TRL's ``_prepare_dataset``:

- a row without ``prompt`` gets the shared start of ``chosen`` and ``rejected`` as its prompt;
- standard rows: EOS is appended to chosen and rejected unless they end with it; ``prompt``, ``prompt + chosen``
  and ``prompt + rejected`` are tokenized as plain text, each with the tokenizer's special tokens (e.g. BOS);
- conversational rows: the chat template renders the prompt with the generation prompt, and prompt + chosen /
  prompt + rejected as whole conversations (``tools`` and ``chat_template_kwargs`` columns are passed on);
- the completion starts where the tokenized prompt stops being a prefix of both tokenized pairs (a template can
  render a prompt differently on its own), so ``prompt_ids + chosen_ids`` is exactly the tokenized prompt + chosen.

Every row is validated first (``fusedrl.trainers.data.validate_preference_dataset``): a bad row stops the trainer's
construction with its index and field. With ``max_length=None`` nothing is truncated, so a row longer than the
model's context is an error; with ``keep_start`` truncation a row whose prompt alone fills ``max_length`` is dropped
(no completion token would survive), as TRL does, and the count is logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from typing import Any

import torch
from datasets import Dataset, IterableDataset

from fusedrl.trainers.data import DatasetFormatError, extract_prompt, is_conversational, validate_preference_dataset

logger = logging.getLogger("fusedrl")

TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# A streamed dataset cannot be validated whole before training; its first rows are.
_STREAMED_ROWS_CHECKED = 1000


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other):
        if token != other_token:
            break
        length += 1
    return length


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def tokenize_preference_row(row: dict[str, Any], tokenizer) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` of one (validated) preference row."""
    if "prompt" not in row:
        row = {**row, **extract_prompt(row)}
    if is_conversational(row):
        tools = row.get("tools")
        template_kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools,
                           **(row.get("chat_template_kwargs") or {})}
        prompt = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True, **template_kwargs)
        prompt_chosen = _chat_ids(tokenizer, row["prompt"] + row["chosen"], **template_kwargs)
        prompt_rejected = _chat_ids(tokenizer, row["prompt"] + row["rejected"], **template_kwargs)
    else:
        eos = tokenizer.eos_token
        chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
        rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
        prompt = tokenizer(text=row["prompt"])["input_ids"]
        prompt_chosen = tokenizer(text=row["prompt"] + chosen)["input_ids"]
        prompt_rejected = tokenizer(text=row["prompt"] + rejected)["input_ids"]
    prompt_length = min(_common_prefix_length(prompt, prompt_chosen), _common_prefix_length(prompt, prompt_rejected))
    if prompt_length < len(prompt):
        warnings.warn(
            "the tokenized prompt is not a prefix of the tokenized prompt + completion (the chat template renders "
            "the prompt alone differently, or tokens merge across the boundary); the completion starts where they "
            "diverge, so the model trains on a context that differs from the one it sees at inference",
            stacklevel=2,
        )
    return {
        "prompt_ids": prompt[:prompt_length],
        "chosen_ids": prompt_chosen[prompt_length:],
        "rejected_ids": prompt_rejected[prompt_length:],
    }


def prepare_preference_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer,
    *,
    max_length: int | None,
    truncation_mode: str,
    max_positions: int | None,
    num_proc: int | None = None,
    name: str = "train",
) -> Dataset | IterableDataset:
    """Validate and tokenize ``dataset`` (a dataset that already has the token-id columns is returned as is).

    max_positions: the model's context length, checked against every row when ``max_length`` is None.
    """
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    if all(column in columns for column in TOKENIZED_COLUMNS):
        return dataset
    streamed = isinstance(dataset, IterableDataset)
    try:
        validate_preference_dataset(
            dataset,
            max_length=max_positions if max_length is None else None,
            truncation=max_length is not None,
            tokenizer=tokenizer,
            max_rows=_STREAMED_ROWS_CHECKED if streamed else None,
        )
    except DatasetFormatError as error:
        note = ""
        if max_length is None and "truncation is off" in str(error):
            note = (f" (max_length=None: nothing is truncated, so every row must fit the model's {max_positions} "
                    "positions)")
        raise DatasetFormatError(f"{name} dataset: {error}{note}") from None

    map_kwargs = {} if streamed else {"num_proc": num_proc, "desc": f"Tokenizing {name} dataset"}
    dataset = dataset.map(tokenize_preference_row, fn_kwargs={"tokenizer": tokenizer}, **map_kwargs)
    if max_length is not None and truncation_mode == "keep_start":
        before = None if streamed else len(dataset)
        if not streamed:
            map_kwargs["desc"] = f"Dropping fully truncated rows of {name} dataset"
        dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < max_length, **map_kwargs)
        if before is not None and len(dataset) < before:
            logger.warning("%s dataset: dropped %d of %d rows whose prompt alone fills max_length=%d",
                           name, before - len(dataset), before, max_length)
    return dataset


def _right_pad(rows: list[list[int]], value: int, multiple: int | None) -> torch.Tensor:
    length = max(len(row) for row in rows)
    if multiple is not None:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


@dataclasses.dataclass
class PreferenceCollator:
    """Rows with ``prompt_ids``/``chosen_ids``/``rejected_ids`` -> ``input_ids``, ``attention_mask`` and
    ``completion_mask``, all int64 ``[2B, T]`` right-padded, chosen sequences first; plus ``ref_chosen_logps`` /
    ``ref_rejected_logps`` fp32 ``[B]`` when the rows carry precomputed reference log-probs.

    Each sequence is truncated to ``max_length`` before padding: its start is kept (``keep_start``) or, deprecated in
    TRL 1.16, its end (``keep_end``).
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, completion_masks = [], []
        for completion in ("chosen_ids", "rejected_ids"):
            for example in examples:
                sequences.append(list(example["prompt_ids"]) + list(example[completion]))
                completion_masks.append([0] * len(example["prompt_ids"]) + [1] * len(example[completion]))
        if self.max_length is not None:
            if self.truncation_mode == "keep_start":
                kept = slice(None, self.max_length)
            elif self.truncation_mode == "keep_end":
                kept = slice(-self.max_length, None)
            else:
                raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
            sequences = [sequence[kept] for sequence in sequences]
            completion_masks = [mask[kept] for mask in completion_masks]
        batch = {
            "input_ids": _right_pad(sequences, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _right_pad([[1] * len(s) for s in sequences], 0, self.pad_to_multiple_of),
            "completion_mask": _right_pad(completion_masks, 0, self.pad_to_multiple_of),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.float32)
        return batch
