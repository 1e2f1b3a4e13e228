"""Preference rows -> token ids -> padded batches, the way TRL 1.16's DPO, ORPO/CPO and KTO trainers build them.

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

ORPO and CPO (``trl.experimental``) tokenize their own way, into TRL's column names (``answer_pairs.py``, which
reuses the validation and row dropping here). KTO's unpaired rows (:func:`prepare_unpaired_dataset`) are tokenized
like the pairs above and batched ``[N, T]`` by :class:`UnpairedCollator`, with the mismatched prompt/completion pairs
of its KL estimate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from typing import Any

import torch
from datasets import Dataset, IterableDataset

from fusedrl.trainers.data import (
    DatasetFormatError,
    extract_prompt,
    is_conversational,
    unpair_preference_dataset,
    validate_preference_dataset,
)

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


def _tokenize_completions(row: dict[str, Any], tokenizer, fields: tuple[str, ...]) -> dict[str, list[int]]:
    """``prompt_ids`` and ``<field>_ids`` for each completion field of a (validated) row with a prompt."""
    if is_conversational(row):
        tools = row.get("tools")
        template_kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools,
                           **(row.get("chat_template_kwargs") or {})}
        prompt = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True, **template_kwargs)
        full = {field: _chat_ids(tokenizer, row["prompt"] + row[field], **template_kwargs) for field in fields}
    else:
        eos = tokenizer.eos_token
        prompt = tokenizer(text=row["prompt"])["input_ids"]
        full = {}
        for field in fields:
            completion = row[field] if row[field].endswith(eos) else row[field] + eos
            full[field] = tokenizer(text=row["prompt"] + completion)["input_ids"]
    return split_completions(prompt, full)


def split_completions(prompt: list[int], full: dict[str, list[int]]) -> dict[str, list[int]]:
    """``prompt_ids`` and ``<field>_ids``: each tokenized prompt + completion in ``full`` cut where the tokenized
    ``prompt`` stops being a prefix of all of them (warned when that is before its end)."""
    prompt_length = min(_common_prefix_length(prompt, ids) for ids in full.values())
    if prompt_length < len(prompt):
        warnings.warn(
            "the tokenized prompt is not a prefix of the tokenized prompt + completion (the chat template renders "
            "the prompt alone differently, or tokens merge across the boundary); the completion starts where they "
            "diverge, so the model trains on a context that differs from the one it sees at inference",
            stacklevel=3,
        )
    completions = {f"{field}_ids": ids[prompt_length:] for field, ids in full.items()}
    return {"prompt_ids": prompt[:prompt_length], **completions}


def tokenize_preference_row(row: dict[str, Any], tokenizer) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` of one (validated) preference row."""
    if "prompt" not in row:
        row = {**row, **extract_prompt(row)}
    return _tokenize_completions(row, tokenizer, ("chosen", "rejected"))


def _validated(dataset, tokenizer, *, paired: bool, max_length: int | None, max_positions: int | None,
               name: str) -> None:
    """``validate_preference_dataset``, its error prefixed with the dataset's name."""
    try:
        validate_preference_dataset(
            dataset,
            paired=paired,
            max_length=max_positions if max_length is None else None,
            truncation=max_length is not None,
            tokenizer=tokenizer,
            max_rows=_STREAMED_ROWS_CHECKED if isinstance(dataset, IterableDataset) else None,
        )
    except DatasetFormatError as error:
        note = ""
        if max_length is None and "truncation is off" in str(error):
            note = (f" (max_length=None: nothing is truncated, so every row must fit the model's {max_positions} "
                    "positions)")
        raise DatasetFormatError(f"{name} dataset: {error}{note}") from None


def _map_kwargs(dataset, num_proc: int | None, desc: str) -> dict[str, Any]:
    return {} if isinstance(dataset, IterableDataset) else {"num_proc": num_proc, "desc": desc}


def _drop_rows(dataset, keep, *, num_proc: int | None, name: str, reason: str):
    """``dataset.filter(keep)``, logging how many rows went (``reason`` says why)."""
    before = None if isinstance(dataset, IterableDataset) else len(dataset)
    dataset = dataset.filter(keep, **_map_kwargs(dataset, num_proc, f"Dropping truncated rows of {name} dataset"))
    if before is not None and len(dataset) < before:
        logger.warning("%s dataset: dropped %d of %d rows %s", name, before - len(dataset), before, reason)
    return dataset


def _columns(dataset) -> list[str]:
    return dataset.column_names or list(next(iter(dataset)).keys())


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
    if all(column in _columns(dataset) for column in TOKENIZED_COLUMNS):
        return dataset
    _validated(dataset, tokenizer, paired=True, max_length=max_length, max_positions=max_positions, name=name)
    dataset = dataset.map(tokenize_preference_row, fn_kwargs={"tokenizer": tokenizer},
                          **_map_kwargs(dataset, num_proc, f"Tokenizing {name} dataset"))
    if max_length is not None and truncation_mode == "keep_start":
        dataset = _drop_rows(dataset, lambda row: len(row["prompt_ids"]) < max_length, num_proc=num_proc, name=name,
                             reason=f"whose prompt alone fills max_length={max_length}")
    return dataset


# --- KTO: unpaired rows ----------------------------------------------------------------------------------------------


def _rotate_completions(batch: dict[str, list]) -> dict[str, list]:
    """KTO's mismatched pairs: within a batch, example i gets the completion of example i - 1 (the first, the last's)."""
    return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}


def prepare_unpaired_dataset(dataset: Dataset | IterableDataset, tokenizer, *, max_length: int | None,
                             max_positions: int | None, kl_batch_size: int | None, num_proc: int | None = None,
                             name: str = "train") -> Dataset | IterableDataset:
    """Validate and tokenize a KTO dataset, as TRL 1.16's ``KTOTrainer._prepare_dataset``: ``prompt_ids`` and
    ``completion_ids`` per row (tokenized like DPO's pairs), and ``KL_completion_ids`` when ``kl_batch_size`` is set.

    A paired dataset (``chosen``/``rejected``, prompt possibly implicit) is unpaired first
    (``unpair_preference_dataset``). Rows whose prompt alone fills ``max_length`` are dropped. The mismatched KL
    completions rotate the completions by one within each run of ``kl_batch_size`` rows, so they pair up with the
    batches of a sequential sampler of that batch size.
    """
    columns = _columns(dataset)
    if "prompt_ids" in columns and "completion_ids" in columns:
        return dataset
    paired = "chosen" in columns and "rejected" in columns
    _validated(dataset, tokenizer, paired=paired, max_length=max_length, max_positions=max_positions, name=name)
    if paired:
        if "prompt" not in columns:
            dataset = dataset.map(extract_prompt, **_map_kwargs(dataset, num_proc, f"Extracting prompt of {name}"))
        dataset = unpair_preference_dataset(dataset, **_map_kwargs(dataset, num_proc, f"Unpairing {name} dataset"))
    dataset = dataset.map(_tokenize_completions, fn_kwargs={"tokenizer": tokenizer, "fields": ("completion",)},
                          **_map_kwargs(dataset, num_proc, f"Tokenizing {name} dataset"))
    if max_length is not None:
        dataset = _drop_rows(dataset, lambda row: len(row["prompt_ids"]) < max_length, num_proc=num_proc, name=name,
                             reason=f"whose prompt alone fills max_length={max_length}")
    if kl_batch_size is not None:
        dataset = dataset.map(_rotate_completions, batched=True, batch_size=kl_batch_size,
                              **_map_kwargs(dataset, num_proc, f"Pairing KL completions of {name} dataset"))
    return dataset


# --- collators -------------------------------------------------------------------------------------------------------


def right_pad(rows: list[list[int]], value: int, multiple: int | None) -> torch.Tensor:
    length = max(len(row) for row in rows)
    if multiple is not None:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], *, pad_token_id: int, kept: slice,
                   multiple: int | None, prefix: str = "") -> dict[str, torch.Tensor]:
    """prompt + completion per row, cut to ``kept`` -> right-padded int64 ``input_ids``, ``attention_mask``,
    ``completion_mask`` (keys prefixed with ``prefix``)."""
    sequences = [(list(prompt) + list(completion))[kept] for prompt, completion in zip(prompts, completions)]
    masks = [([0] * len(prompt) + [1] * len(completion))[kept] for prompt, completion in zip(prompts, completions)]
    return {
        f"{prefix}input_ids": right_pad(sequences, pad_token_id, multiple),
        f"{prefix}attention_mask": right_pad([[1] * len(s) for s in sequences], 0, multiple),
        f"{prefix}completion_mask": right_pad(masks, 0, multiple),
    }


def float_columns(examples: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([example[key] for example in examples], dtype=torch.float32)
            for key in keys if key in examples[0]}


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
        kept = slice(None)
        if self.max_length is not None:
            if self.truncation_mode == "keep_start":
                kept = slice(None, self.max_length)
            elif self.truncation_mode == "keep_end":
                kept = slice(-self.max_length, None)
            else:
                raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        prompts, completions = [], []
        for side in ("chosen", "rejected"):
            for example in examples:
                prompts.append(example["prompt_ids"])
                completions.append(example[f"{side}_ids"])
        batch = pad_sequences(prompts, completions, pad_token_id=self.pad_token_id, kept=kept,
                               multiple=self.pad_to_multiple_of)
        return {**batch, **float_columns(examples, ("ref_chosen_logps", "ref_rejected_logps"))}


@dataclasses.dataclass
class UnpairedCollator:
    """KTO rows with ``prompt_ids``/``completion_ids`` -> int64 ``[N, T]`` right-padded ``input_ids``,
    ``attention_mask``, ``completion_mask``; the same with a ``KL_`` prefix for the mismatched ``KL_completion_ids``
    when present; ``label`` bool ``[N]``; ``ref_logps`` / ``ref_KL_logps`` fp32 ``[N]`` when precomputed.
    Each sequence keeps its first ``max_length`` tokens (TRL's ``DataCollatorForUnpairedPreference``).
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept = slice(None, self.max_length)
        prompts = [example["prompt_ids"] for example in examples]
        batch = {}
        for prefix in ("", "KL_"):
            if f"{prefix}completion_ids" in examples[0]:
                batch.update(pad_sequences(prompts, [example[f"{prefix}completion_ids"] for example in examples],
                                            pad_token_id=self.pad_token_id, kept=kept,
                                            multiple=self.pad_to_multiple_of, prefix=prefix))
        batch["label"] = torch.tensor([bool(example["label"]) for example in examples])
        return {**batch, **float_columns(examples, ("ref_logps", "ref_KL_logps"))}
