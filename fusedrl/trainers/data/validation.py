"""Fail-fast checks of a training dataset, run before tokenization so a bad row stops the run in seconds.

Each check raises DatasetFormatError (a ValueError) at the first problem, naming the split (for a DatasetDict),
the row index and the field. Three layouts are known:

- paired preference (DPO): ``chosen``, ``rejected``, and ``prompt`` unless the prompt is implicit;
- unpaired preference (KTO): ``prompt``, ``completion``, boolean ``label``;
- prompt-only (GRPO, RLOO, PPO, online DPO): ``prompt``; :func:`check_prompt_dataset` is the online trainers' check.

Every text field is a string (standard format) or a list of ``{"role": str, "content": str}`` messages
(conversational format), one format per row. Completions (chosen, rejected, completion) must not be empty; a
conversational prompt must end with a user, tool or assistant message (what TRL's ``apply_chat_template``
accepts). With ``max_length`` set, ``truncation=False`` and a tokenizer, every sequence is tokenized the way TRL's
trainers build it (chat template for conversational rows; plain text plus EOS for standard completions) and must
fit. Extra columns are allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from fusedrl.trainers.data.formats import extract_prompt

_PROMPT_LAST_ROLES = ("user", "tool", "assistant")
# TRL 1.16's words (its tests pin them), then why: precomputed reference log-probs are stored as dataset columns.
PRECOMPUTE_ITERABLE_ERROR = ("`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a "
                             "map-style Dataset or set `precompute_ref_log_probs=False` (the log-probs are stored "
                             "as dataset columns)")


class DatasetFormatError(ValueError):
    """A dataset row or column that does not fit the trainer's layout; the message names split, row and field."""


@dataclasses.dataclass(frozen=True)
class _Layout:
    name: str
    required: tuple[str, ...]
    completions: tuple[str, ...]
    expected: str


_PAIRED = _Layout(
    "paired preference",
    ("chosen", "rejected"),
    ("chosen", "rejected"),
    "columns 'chosen' and 'rejected', plus 'prompt' unless the prompt is implicit (the shared start of chosen and "
    "rejected)",
)
_UNPAIRED = _Layout(
    "unpaired preference",
    ("prompt", "completion", "label"),
    ("completion",),
    "columns 'prompt', 'completion' and a boolean 'label' (True = desirable)",
)
_PROMPT_ONLY = _Layout("prompt-only", ("prompt",), (), "a column 'prompt'")


def validate_preference_dataset(
    dataset: Any,
    *,
    paired: bool = True,
    max_length: int | None = None,
    truncation: bool = True,
    tokenizer: Any = None,
    max_rows: int | None = None,
) -> None:
    """Check a preference dataset before training; raise DatasetFormatError naming the row and field
    of the first problem.

    Args:
        dataset: a ``Dataset``, ``DatasetDict`` (every split is checked), ``IterableDataset`` or any iterable of
            row dicts.
        paired: True for ``prompt``/``chosen``/``rejected`` (DPO), False for ``prompt``/``completion``/``label``
            (KTO; a paired dataset can be converted with ``unpair_preference_dataset``).
        max_length: longest allowed prompt + completion, in tokens; only checked when ``truncation`` is False
            (the trainer would otherwise truncate), and then ``tokenizer`` is required.
        tokenizer: used for the length check, and to require a chat template when rows are conversational.
        max_rows: check only the first ``max_rows`` rows of each split (for streamed datasets); None checks all.
    """
    _validate(dataset, _PAIRED if paired else _UNPAIRED, max_length, truncation, tokenizer, max_rows)


def validate_prompt_dataset(
    dataset: Any,
    *,
    max_length: int | None = None,
    truncation: bool = True,
    tokenizer: Any = None,
    max_rows: int | None = None,
) -> None:
    """Check a prompt-only dataset (the online trainers run it through :func:`check_prompt_dataset`); same arguments
    as ``validate_preference_dataset``, with ``max_length`` bounding the tokenized prompt (generation prompt
    included)."""
    _validate(dataset, _PROMPT_ONLY, max_length, truncation, tokenizer, max_rows)


# Rows of a streamed (iterable) prompt dataset checked at construction; the rest are read only by training.
_STREAMED_ROWS_CHECKED = 64


def check_prompt_dataset(dataset: Any, name: str, *, streamed_ok: bool = False, prompt_optional: bool = False,
                         images_ok: bool = False) -> None:
    """The online trainers' (GRPO, RLOO, PPO, online DPO) check of a prompt dataset at construction, or of each of a
    dict of them (None passes): a map-style ``Dataset`` (rollout batches are sampled by index), a ``prompt`` column,
    no images, and rows that pass :func:`validate_prompt_dataset`; with ``streamed_ok`` (GRPO, RLOO: train and eval
    sets) an ``IterableDataset`` too, its first rows checked. Every error names ``name``; the column is checked
    first so a wrong layout is reported in the trainer's terms ("needs a 'prompt' column"). ``prompt_optional``
    (GRPO with an ``environment_factory``, whose ``reset`` may supply the prompt): rows without one pass.
    ``images_ok`` (the trainers that take a vision-language model's processor): ``image`` / ``images`` columns pass."""
    if dataset is None:
        return
    if isinstance(dataset, dict):  # a DatasetDict or IterableDatasetDict, or a dict of eval datasets
        for key, value in dataset.items():
            check_prompt_dataset(value, f"{name}[{key!r}]", streamed_ok=streamed_ok, prompt_optional=prompt_optional,
                                 images_ok=images_ok)
        return
    columns = dataset.column_names if isinstance(dataset, (Dataset, IterableDataset)) else None
    if prompt_optional and columns is not None and "prompt" not in columns:
        return
    if streamed_ok and isinstance(dataset, IterableDataset):
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        if "prompt" not in columns:
            raise ValueError(f"{name} needs a 'prompt' column (TRL's prompt-only format); it has {columns}")
        try:
            validate_prompt_dataset(dataset, max_rows=_STREAMED_ROWS_CHECKED)
        except DatasetFormatError as error:
            raise DatasetFormatError(f"{name}: {error}") from None
        return
    if not isinstance(dataset, Dataset):
        msg = (f"{name} must be a datasets.Dataset (rollout batches are sampled by index, so fusedrl's online "
               f"trainers do not take an IterableDataset), got {type(dataset).__name__}")
        raise ValueError(msg)  # noqa: TRY004
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{name} needs a 'prompt' column (TRL's prompt-only format); it has {dataset.column_names}")
    if not images_ok and {"image", "images"} & set(dataset.column_names):
        raise ValueError(f"{name} has images: vision prompts are not supported by this fusedrl trainer (GRPO, RLOO "
                         "and online DPO take them with a vision-language model's processor)")
    try:
        validate_prompt_dataset(dataset)
    except DatasetFormatError as error:
        raise DatasetFormatError(f"{name}: {error}") from None


def _validate(dataset, layout: _Layout, max_length, truncation, tokenizer, max_rows) -> None:
    check_length = max_length is not None and not truncation
    if check_length and tokenizer is None:
        raise ValueError(
            f"max_length={max_length} with truncation=False needs a tokenizer to measure the sequences; pass "
            "tokenizer=..."
        )
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        for split, split_dataset in dataset.items():
            _validate_split(
                split_dataset, layout, max_length if check_length else None, tokenizer, max_rows, f"split {split!r}, "
            )
    else:
        _validate_split(dataset, layout, max_length if check_length else None, tokenizer, max_rows, "")


def _rows(dataset: Any, max_rows: int | None) -> Iterator[Mapping[str, Any]]:
    if isinstance(dataset, Dataset):
        dataset = dataset.with_format(None)  # plain Python values, whatever format the caller set
    for index, row in enumerate(dataset):
        if max_rows is not None and index >= max_rows:
            return
        yield row


def _validate_split(dataset, layout: _Layout, max_length, tokenizer, max_rows, where: str) -> None:
    rows = _rows(dataset, max_rows)
    first = next(rows, None)
    columns = list(getattr(dataset, "column_names", None) or (first.keys() if first is not None else []))
    missing = [column for column in layout.required if column not in columns]
    if missing:
        hint = ""
        if layout is _UNPAIRED and {"chosen", "rejected"} <= set(columns):
            hint = " It looks paired: convert it with unpair_preference_dataset(dataset)."
        elif layout is _PAIRED and {"completion", "label"} <= set(columns):
            hint = " It looks unpaired (KTO format): a paired trainer needs chosen/rejected pairs."
        raise DatasetFormatError(
            f"{where}{layout.name} dataset is missing column(s) {missing}; its columns are {columns}. "
            f"Expected {layout.expected}.{hint}"
        )
    if first is None:
        raise DatasetFormatError(f"{where}{layout.name} dataset has no rows")
    for index, row in enumerate(_chain(first, rows)):
        _check_row(row, layout, f"{where}row {index}", max_length, tokenizer)


def _chain(first: Mapping[str, Any], rest: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    yield first
    yield from rest


def _describe(value: Any) -> str:
    return "None" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _text_format(value: Any, field: str, at: str) -> str:
    """'standard' or 'conversational', after checking every message."""
    if isinstance(value, str):
        return "standard"
    if not isinstance(value, list):
        raise DatasetFormatError(
            f"{at}, field {field!r}: expected a string (standard format) or a list of {{'role', 'content'}} "
            f"messages (conversational format), got {_describe(value)}"
        )
    if not value:
        raise DatasetFormatError(f"{at}, field {field!r}: has no messages")
    for number, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DatasetFormatError(
                f"{at}, field {field!r}, message {number}: expected a dict, got {_describe(message)}"
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise DatasetFormatError(
                f"{at}, field {field!r}, message {number}: 'role' must be a non-empty string, got {_describe(role)}"
            )
        if _is_tool_call(message) and content is None:
            continue  # an assistant turn that only calls tools (TRL's tool-calling format): the template renders it
        if isinstance(content, list):  # TRL's multimodal blocks: [{"type": "image"}, {"type": "text", ...}]
            _check_blocks(content, f"{at}, field {field!r}, message {number}")
        elif not isinstance(content, str):
            raise DatasetFormatError(
                f"{at}, field {field!r}, message {number}: 'content' must be a string, got {_describe(content)}"
            )
    return "conversational"


def _check_blocks(blocks: list, at: str) -> None:
    """Content blocks as TRL's vision datasets write them: each a dict of type 'image' (filled from the row's
    ``image`` / ``images`` column) or 'text' with a string ``text``."""
    for number, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text" and isinstance(block.get("text"), str) or kind == "image":
            continue
        raise DatasetFormatError(f"{at}, block {number}: expected {{'type': 'text', 'text': str}} or "
                                 f"{{'type': 'image'}}, got {_describe(block)}")


def _is_tool_call(message: Mapping) -> bool:
    """An assistant message carrying tool calls (``{"role": "assistant", "tool_calls": [...]}``, content optional)."""
    calls = message.get("tool_calls")
    return message.get("role") == "assistant" and isinstance(calls, list) and bool(calls)


def _is_empty(value: str | list[dict[str, str]]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(_is_tool_call(message) or _has_content(message.get("content")) for message in value)


def _has_content(content) -> bool:
    if isinstance(content, list):  # multimodal blocks: an image, or a text block with more than blanks
        return any(block.get("type") == "image" or (block.get("text") or "").strip() for block in content)
    return bool((content or "").strip())


def _check_row(row: Mapping[str, Any], layout: _Layout, at: str, max_length: int | None, tokenizer: Any) -> None:
    fields = [field for field in ("prompt", *layout.completions) if field in row]
    formats = {field: _text_format(row[field], field, at) for field in fields}
    if len(set(formats.values())) > 1:
        described = ", ".join(f"{field!r} is {fmt}" for field, fmt in formats.items())
        raise DatasetFormatError(f"{at}: fields mix formats ({described}); use one format for every field of a row")
    conversational = "conversational" in formats.values()
    for field in layout.completions:
        if _is_empty(row[field]):
            raise DatasetFormatError(f"{at}, field {field!r}: is empty")
    if "prompt" in row:
        prompt = row["prompt"]
        if conversational and prompt[-1]["role"] not in _PROMPT_LAST_ROLES:
            raise DatasetFormatError(
                f"{at}, field 'prompt': the last message has role {prompt[-1]['role']!r}; a prompt must end with a "
                f"'user', 'tool' or 'assistant' message"
            )
        if layout is _PROMPT_ONLY and _is_empty(prompt):
            raise DatasetFormatError(f"{at}, field 'prompt': is empty")
    elif layout is _PAIRED and not extract_prompt(row)["prompt"]:
        raise DatasetFormatError(
            f"{at}: there is no 'prompt' column and 'chosen' and 'rejected' share no common start, so the implicit "
            "prompt would be empty; add a 'prompt' column"
        )
    if layout is _UNPAIRED and not isinstance(row["label"], bool):
        raise DatasetFormatError(
            f"{at}, field 'label': expected a bool (True = desirable), got {_describe(row['label'])}"
        )
    if tokenizer is not None and conversational and not getattr(tokenizer, "chat_template", None):
        raise DatasetFormatError(f"{at}: the row is conversational but the tokenizer has no chat template")
    if max_length is not None:
        for field in layout.completions or ("prompt",):
            num_tokens = _num_tokens(tokenizer, row, field, conversational)
            if num_tokens > max_length:
                what = "the prompt" if field == "prompt" else f"prompt + {field}"
                raise DatasetFormatError(
                    f"{at}, field {field!r}: {what} is {num_tokens} tokens, longer than max_length={max_length}, "
                    "and truncation is off; raise max_length, turn truncation on, or drop the row"
                )


def _num_tokens(tokenizer: Any, row: Mapping[str, Any], field: str, conversational: bool) -> int:
    """Tokens of the sequence a TRL trainer builds for ``field``: prompt + completion (whole conversation) or the
    prompt alone with its generation prompt; standard completions get EOS appended unless they end with it."""
    prompt = row.get("prompt", [] if conversational else "")
    if conversational:
        kwargs = dict(row.get("chat_template_kwargs") or {})
        if field == "prompt":
            last_role = prompt[-1]["role"]
            kwargs.update(
                add_generation_prompt=last_role != "assistant", continue_final_message=last_role == "assistant"
            )
            messages = prompt
        else:
            messages = prompt + row[field]
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
        return len(encoded["input_ids"])
    if field == "prompt":
        return len(tokenizer(prompt)["input_ids"])
    completion = row[field]
    eos = tokenizer.eos_token
    if eos is not None and not completion.endswith(eos):
        completion += eos
    return len(tokenizer(prompt + completion)["input_ids"])
