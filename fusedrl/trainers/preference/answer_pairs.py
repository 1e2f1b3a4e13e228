"""ORPO / CPO data: preference rows -> TRL 1.16's tokenized columns -> ``[chosen; rejected]`` batches.

Legend: B pairs per batch, N = 2B rows (the B chosen rows, then the B rejected ones), T padded sequence length
(decoder-only), S padded prompt length and L padded answer length (encoder-decoder).

``trl.experimental``'s ORPO and CPO trainers tokenize with their own ``tokenize_row`` (not DPO's), and their datasets
carry its column names, which TRL's tests read back from ``trainer.train_dataset`` / ``trainer.eval_dataset``:

- decoder-only (:data:`ANSWER_PAIR_COLUMNS`): ``{side}_input_ids`` = that side's prompt + answer,
  ``{side}_attention_mask`` (all ones), ``{side}_labels`` = the same ids with -100 over the prompt, for side in
  chosen / rejected; ``prompt_input_ids`` / ``prompt_attention_mask``, the prompt alone;
- encoder-decoder (:data:`ENCODER_DECODER_COLUMNS`): ``prompt_input_ids`` / ``prompt_attention_mask`` for the encoder
  and ``chosen_labels`` / ``rejected_labels``, the answers as decoder targets.

A dataset that already has those columns (tokenized by TRL, or by an earlier fusedrl run) is used as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from datasets import Dataset, IterableDataset

from fusedrl.trainers.data import DatasetFormatError, maybe_apply_chat_template, maybe_extract_prompt
from fusedrl.trainers.head import IGNORE_INDEX
from fusedrl.trainers.preference.data import _columns, _drop_rows, _map_kwargs, _validated

_SIDES = ("chosen", "rejected")
ANSWER_PAIR_COLUMNS = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
                       "rejected_input_ids", "rejected_attention_mask", "rejected_labels",
                       "prompt_input_ids", "prompt_attention_mask")
ENCODER_DECODER_COLUMNS = ("chosen_labels", "rejected_labels", "prompt_input_ids", "prompt_attention_mask")
# TRL's encoder-decoder answers are cut to max_completion_length, 128 when it is None.
DEFAULT_MAX_COMPLETION_LENGTH = 128


def _text_row(row: dict[str, Any], tokenizer) -> dict[str, Any]:
    """The row with its prompt made explicit and a conversation rendered to text by the chat template, as TRL's
    ``maybe_extract_prompt`` + ``maybe_apply_chat_template`` maps do before ``tokenize_row``."""
    row = {**row, **maybe_extract_prompt(row)}
    return {**row, **maybe_apply_chat_template(row, tokenizer)}


def tokenize_answer_pair_row(row: dict[str, Any], index: int, tokenizer, *, max_length: int) -> dict[str, list[int]]:
    """TRL's decoder-only columns (:data:`ANSWER_PAIR_COLUMNS`) of one (validated) preference row, as TRL 1.16's
    ``trl.experimental`` ORPO and CPO ``tokenize_row`` builds them.

    Unlike DPO's: all text is tokenized without special tokens; each side's prompt is the tokenized prompt, one token
    shorter when its last token merges with the answer (so the sides may differ by that token; more is an error);
    ``prompt_input_ids`` is the prompt cut to the shorter side's; BOS is prepended to each prompt and EOS appended to
    each answer unless already there; the *answer* is cut so prompt + answer fits ``max_length``, the prompt never is.
    """
    row = _text_row(row, tokenizer)
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    sides = {}
    for side in _SIDES:
        full = tokenizer(row["prompt"] + row[side], add_special_tokens=False)["input_ids"]
        start = len(prompt_ids) - int(full[: len(prompt_ids)] != prompt_ids)
        sides[side] = (full[:start], full[start:])
    chosen_prompt, rejected_prompt = sides["chosen"][0], sides["rejected"][0]
    if (sum(a != b for a, b in zip(chosen_prompt, rejected_prompt)) > 1
            or abs(len(chosen_prompt) - len(rejected_prompt)) > 1):
        raise DatasetFormatError(f"row {index}, field 'prompt': the tokenized prompts of chosen and rejected differ "
                                 "by more than a last merged token")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def with_bos(ids: list[int]) -> list[int]:
        return [bos, *ids] if bos is not None and ids[:1] != [bos] else list(ids)

    prompt = with_bos(prompt_ids[: min(len(chosen_prompt), len(rejected_prompt))])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side, (side_prompt, answer) in sides.items():
        side_prompt = with_bos(side_prompt)
        if answer[-1:] != [eos]:
            answer = [*answer, eos]
        answer = answer[: max(0, max_length - len(side_prompt))]
        out[f"{side}_input_ids"] = side_prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(side_prompt) + len(answer))
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(side_prompt) + answer
    return out


def tokenize_encoder_decoder_row(row: dict[str, Any], tokenizer, *, max_completion_length: int) -> dict[str, list[int]]:
    """TRL's encoder-decoder columns (:data:`ENCODER_DECODER_COLUMNS`) of one (validated) preference row: prompt and
    answers each tokenized on their own *with* the tokenizer's special tokens (T5 appends ``</s>``), the answers cut
    to ``max_completion_length``; the prompt is never cut (``max_length`` plays no part, as in TRL)."""
    row = _text_row(row, tokenizer)
    prompt = tokenizer(row["prompt"], add_special_tokens=True)
    out = {"prompt_input_ids": prompt["input_ids"], "prompt_attention_mask": prompt["attention_mask"]}
    for side in _SIDES:
        out[f"{side}_labels"] = tokenizer(row[side], truncation=True, max_length=max_completion_length,
                                          add_special_tokens=True)["input_ids"]
    return out


def _has_answers(row: dict[str, Any]) -> bool:
    return all(any(label != IGNORE_INDEX for label in row[f"{side}_labels"]) for side in _SIDES)


def prepare_answer_pair_dataset(dataset: Dataset | IterableDataset, tokenizer, *, max_length: int,
                                is_encoder_decoder: bool = False, max_completion_length: int | None = None,
                                num_proc: int | None = None, name: str = "train") -> Dataset | IterableDataset:
    """Validate and tokenize a paired dataset for ORPO/CPO (:func:`tokenize_answer_pair_row`, or
    :func:`tokenize_encoder_decoder_row` for an encoder-decoder model).

    A row left with an empty answer (decoder-only: its prompt alone fills ``max_length``) is dropped and the count
    logged: TRL keeps it, and its mean log-prob is 0/0, so its loss would be NaN. ``max_completion_length`` (None:
    128, as in TRL) cuts the answers of an encoder-decoder model.
    """
    columns = _columns(dataset)
    if is_encoder_decoder and "chosen_input_ids" in columns:
        raise ValueError(f"{name} dataset: it is tokenized for a decoder-only model (it has 'chosen_input_ids'); an "
                         "encoder-decoder model needs the prompt and the answers apart: pass the text columns")
    required = ENCODER_DECODER_COLUMNS if is_encoder_decoder else ANSWER_PAIR_COLUMNS
    if all(column in columns for column in required):
        return dataset
    _validated(dataset, tokenizer, paired=True, max_length=max_length, max_positions=None, name=name)
    if is_encoder_decoder:
        max_completion_length = max_completion_length or DEFAULT_MAX_COMPLETION_LENGTH
        dataset = dataset.map(tokenize_encoder_decoder_row,
                              fn_kwargs={"tokenizer": tokenizer, "max_completion_length": max_completion_length},
                              **_map_kwargs(dataset, num_proc, f"Tokenizing {name} dataset"))
        reason = "whose answer tokenizes to nothing"
    else:
        dataset = dataset.map(tokenize_answer_pair_row, with_indices=True,
                              fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                              **_map_kwargs(dataset, num_proc, f"Tokenizing {name} dataset"))
        reason = f"whose prompt alone fills max_length={max_length}"
    return _drop_rows(dataset, _has_answers, num_proc=num_proc, name=name, reason=reason)


def _right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(row, dtype=torch.long) for row in rows], batch_first=True,
                                           padding_value=value)


def _check_row(example: dict[str, Any], side: str) -> None:
    """A pre-tokenized decoder-only row must be self-consistent: the collator reads the tokens from
    ``{side}_input_ids`` and only the scored positions from ``{side}_labels``."""
    ids, mask, labels = (example[f"{side}_{key}"] for key in ("input_ids", "attention_mask", "labels"))
    if not len(ids) == len(mask) == len(labels):
        raise ValueError(f"field '{side}_labels': {side}_input_ids, {side}_attention_mask and {side}_labels must "
                         f"have one entry per token, got lengths {len(ids)}, {len(mask)}, {len(labels)}")
    if any(label not in (IGNORE_INDEX, token) for token, label in zip(ids, labels)):
        raise ValueError(f"field '{side}_labels': each label must be -100 or the token of {side}_input_ids at its "
                         "position (as TRL's tokenize_row makes them)")


@dataclasses.dataclass
class AnswerPairCollator:
    """Rows with TRL's ORPO/CPO columns -> a batch of N = 2B rows, chosen first, right-padded, all int64.

    decoder-only: ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` and ``completion_mask``
    (``{side}_labels != -100``), each ``[N, T]``. Encoder-decoder: ``input_ids`` / ``attention_mask`` ``[N, S]``, the
    prompt once per side (TRL repeats it), and ``labels`` ``[N, L]`` padded with -100 and ``completion_mask`` ``[N, L]``.
    """

    pad_token_id: int
    is_encoder_decoder: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.is_encoder_decoder:
            labels = _right_pad([example[f"{side}_labels"] for side in _SIDES for example in examples], IGNORE_INDEX)
            return {
                "input_ids": _right_pad([example["prompt_input_ids"] for example in examples] * 2, self.pad_token_id),
                "attention_mask": _right_pad([example["prompt_attention_mask"] for example in examples] * 2, 0),
                "labels": labels,
                "completion_mask": (labels != IGNORE_INDEX).long(),
            }
        for side in _SIDES:
            for example in examples:
                _check_row(example, side)
        rows = [example for side in _SIDES for example in examples]
        sides = [side for side in _SIDES for _ in examples]
        labels = _right_pad([row[f"{side}_labels"] for row, side in zip(rows, sides)], IGNORE_INDEX)
        return {
            "input_ids": _right_pad([row[f"{side}_input_ids"] for row, side in zip(rows, sides)], self.pad_token_id),
            "attention_mask": _right_pad([row[f"{side}_attention_mask"] for row, side in zip(rows, sides)], 0),
            "completion_mask": (labels != IGNORE_INDEX).long(),
        }
