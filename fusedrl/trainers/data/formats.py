"""TRL's dataset formats and the conversions between them, with TRL's names and semantics.

A row is *standard* when its text fields are strings and *conversational* when they are lists of
``{"role": ..., "content": ...}`` messages. The layouts (https://huggingface.co/docs/trl/dataset_formats):

- language modeling: ``messages`` (``text`` once rendered);
- prompt-only: ``prompt`` (GRPO, RLOO);
- prompt-completion: ``prompt``, ``completion``;
- paired preference: ``prompt``, ``chosen``, ``rejected`` (DPO); the prompt may be implicit, i.e. the shared start
  of ``chosen`` and ``rejected`` with no ``prompt`` column;
- unpaired preference: ``prompt``, ``completion``, boolean ``label`` (KTO).

Behaviour follows ``trl.data_utils`` 1.16 (tests/trainers/test_data.py compares every function with it on the same rows);
where TRL's result depends on set iteration order or crashes on an edge case, this module picks the deterministic
or explicit behaviour, noted in each docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from datasets import DatasetDict, IterableDatasetDict

# Fixed order: TRL pops an arbitrary member of a set of these keys, so a row mixing formats could be classified
# either way depending on PYTHONHASHSEED. Checking in this order makes the answer stable.
_TEXT_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")

# The key sets apply_chat_template accepts ("label" rides along unrendered).
_CHAT_LAYOUTS = (
    {"messages"},
    {"prompt"},
    {"prompt", "completion"},
    {"prompt", "chosen", "rejected"},
    {"chosen", "rejected"},
    {"prompt", "completion", "label"},
)


def is_conversational(example: dict[str, Any]) -> bool:
    """Whether ``example`` is conversational: its first text field (in the order prompt, chosen, rejected,
    completion, messages) is a non-empty list whose first item is a dict with a ``"role"`` key.

    Same answer as TRL for every row whose text fields share one format. Differences: TRL looks at an arbitrary
    text field (set order) and raises IndexError on an empty list; here the order is fixed and ``[]`` is not
    conversational.
    """
    for key in _TEXT_KEYS:
        if key in example:
            value = example[key]
            return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]
    return False


def _shared_start(text: str, other: str) -> str:
    """The longest common prefix of two strings."""
    end = 0
    for a, b in zip(text, other):
        if a != b:
            break
        end += 1
    return text[:end]


def apply_chat_template(
    example: dict[str, list[dict[str, str]]],
    processing_class: Any,
    tools: list[dict | Callable] | None = None,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """Render a conversational ``example`` to text with ``processing_class``'s chat template (TRL semantics).

    - ``messages`` becomes ``text`` (the whole conversation, no generation prompt);
    - ``prompt`` is rendered with the generation prompt when its last message is from ``user`` or ``tool``, and
      continued (``continue_final_message``) when it is from ``assistant``; any other last role is a ValueError;
    - ``chosen`` / ``rejected`` / ``completion`` are the rendering of prompt + that field minus the prompt. The
      prompt kept is the common prefix of the prompt alone and every prompt + field rendering, because some
      templates (DeepSeek-R1) render the generation prompt differently from the start of the assistant turn;
    - with an implicit prompt, ``chosen`` and ``rejected`` are rendered whole; ``label`` is copied.

    A ``chat_template_kwargs`` dict in the example and ``**template_kwargs`` both go to the template; ``tools``
    gives the tool schemas (``[]`` counts as none, as in TRL). Raises KeyError for an unsupported key layout.
    Returns only the rendered keys (and ``label``), like TRL; ``Dataset.map`` keeps the other columns.
    """
    present = {key for key in example if key in (*_TEXT_KEYS, "label")}
    if present not in _CHAT_LAYOUTS:
        raise KeyError(f"Invalid keys in the example: {present}")
    row_kwargs = example.get("chat_template_kwargs", {})

    def render(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return processing_class.apply_chat_template(
            messages, tools=tools or None, tokenize=False, **kwargs, **row_kwargs, **template_kwargs
        )

    output: dict[str, Any] = {}
    if "messages" in example:
        output["text"] = render(example["messages"])
    if "prompt" in example:
        prompt_messages = example["prompt"]
        last_role = prompt_messages[-1]["role"]
        if last_role in ("user", "tool"):
            prompt = render(prompt_messages, add_generation_prompt=True, continue_final_message=False)
        elif last_role == "assistant":
            prompt = render(prompt_messages, add_generation_prompt=False, continue_final_message=True)
        else:
            raise ValueError(f"Invalid role in the last message: {last_role}")
        # Trim the prompt against every prompt+field rendering first, then cut every field at the final prompt.
        full = {
            key: render(prompt_messages + example[key])
            for key in ("chosen", "rejected", "completion")
            if key in example
        }
        for text in full.values():
            prompt = _shared_start(prompt, text)
        output["prompt"] = prompt
        output.update({key: text[len(prompt) :] for key, text in full.items()})
    else:  # implicit prompt: each side is a whole conversation
        output.update({key: render(example[key]) for key in ("chosen", "rejected") if key in example})
    if "label" in example:
        output["label"] = example["label"]
    return output


def maybe_apply_chat_template(
    example: dict[str, Any],
    processing_class: Any,
    tools: list[dict | Callable] | None = None,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """``apply_chat_template`` when ``example`` is conversational, else ``example`` unchanged (TRL semantics)."""
    if is_conversational(example):
        return apply_chat_template(example, processing_class, tools, **template_kwargs)
    return example


def extract_prompt(example: dict[str, Sequence]) -> dict[str, Sequence]:
    """Split an implicit-prompt preference row: the shared start of ``chosen`` and ``rejected`` becomes ``prompt``.

    Works on strings (characters) and on message lists (whole messages). Returns ``prompt``, ``chosen`` and
    ``rejected`` only; ``Dataset.map`` keeps the other columns. TRL semantics, quirks included:

    - a space right before the point where they diverge goes to the completions (``"The sky is"`` /
      ``" blue."``), so a prompt never ends in the space that a tokenizer would merge into the next word;
    - when one side is a prefix of the other the split is one item before the shorter one's end, so neither side
      is left empty (``"ab"`` vs ``"abc"`` gives prompt ``"a"``, chosen ``"b"``, rejected ``"bc"``).

    Differences from TRL: an empty side raises ValueError (TRL: UnboundLocalError), and a divergence at the very
    first item gives an empty prompt (TRL looks at item -1, so a chosen ending in a space loses that space to
    the prompt).
    """
    chosen, rejected = example["chosen"], example["rejected"]
    shortest = min(len(chosen), len(rejected))
    if shortest == 0:
        raise ValueError("extract_prompt needs non-empty 'chosen' and 'rejected'")
    split = shortest - 1  # no divergence within the shorter side
    for i in range(shortest):
        if chosen[i] != rejected[i]:
            split = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return {"prompt": chosen[:split], "chosen": chosen[split:], "rejected": rejected[split:]}


def maybe_extract_prompt(example: dict[str, Any]) -> dict[str, Any]:
    """``extract_prompt`` for a preference row whose prompt is implicit, else ``example`` unchanged (TRL semantics).

    A row keeps its ``prompt`` when prompt and chosen have the same format; a standard ``prompt`` next to
    conversational ``chosen`` (or the reverse) is taken as a leftover column and the prompt is extracted again.
    """
    if "chosen" not in example or "rejected" not in example:
        return example
    if "prompt" in example:
        chosen_is_chat = is_conversational({"chosen": example["chosen"]})
        if chosen_is_chat == is_conversational({"prompt": example["prompt"]}):
            return example
    return extract_prompt({"chosen": example["chosen"], "rejected": example["rejected"]})


def _unpair_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A batch of n pairs -> 2n rows: the n chosen (label True), then the n rejected (label False)."""
    num_pairs = len(batch["chosen"])
    rows = {"completion": batch["chosen"] + batch["rejected"], "label": [True] * num_pairs + [False] * num_pairs}
    # Every other column (prompt first) is repeated for the rejected half.
    for key in ("prompt", *(k for k in batch if k not in ("prompt", "chosen", "rejected"))):
        if key in batch:
            rows[key] = batch[key] * 2
    return rows


def _column_names(dataset: Any) -> list[str]:
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        dataset = next(iter(dataset.values()))
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())  # an IterableDataset of unknown features: peek at the first row


def unpair_preference_dataset(dataset: Any, **map_kwargs: Any) -> Any:
    """Paired ``prompt``/``chosen``/``rejected`` -> unpaired ``completion``/``label``/``prompt`` rows, as KTO wants.

    Each pair gives a ``label=True`` row with the chosen completion and a ``label=False`` row with the rejected one.
    Within every ``map`` batch (``map_kwargs["batch_size"]``, 1000 by default) the chosen rows come first, then the
    rejected ones; other columns are copied to both. Works on ``Dataset``, ``DatasetDict`` and their iterable
    versions; output columns and row order equal TRL's.
    """
    return dataset.map(_unpair_batch, batched=True, remove_columns=_column_names(dataset), **map_kwargs)


def maybe_unpair_preference_dataset(dataset: Any, num_proc: int | None = None, desc: str | None = None) -> Any:
    """``unpair_preference_dataset`` when ``dataset`` has ``chosen`` and ``rejected`` columns, else ``dataset``."""
    columns = _column_names(dataset)
    if "chosen" in columns and "rejected" in columns:
        return unpair_preference_dataset(dataset, num_proc=num_proc, desc=desc)
    return dataset
