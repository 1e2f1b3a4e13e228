"""Embedded defaults for the demo, the tests and the benchmarks: a tokenizer, models and a task built in code.

Nothing here reads a hub. ``--model tiny --dataset arithmetic`` on the CLI resolve through :func:`load_preset_model`
and :func:`load_preset_dataset`.
"""

from __future__ import annotations

from datasets import Dataset
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from .datasets import (
    ARITHMETIC,
    ARITHMETIC_HARD,
    LEARNABLE_MISTAKES,
    MISTAKES,
    SPLITS,
    ArithmeticTask,
    answer_reward,
    preference_dataset,
    prompt_dataset,
    unpaired_preference_dataset,
)
from .models import MODEL_PRESETS, ModelPreset, build_model, preset_config
from .recipes import DEMO_RECIPE
from .tokenizer import CHAT_TEMPLATE, build_tokenizer

DATASET_PRESETS: dict[str, ArithmeticTask] = {"arithmetic": ARITHMETIC, "arithmetic-hard": ARITHMETIC_HARD}
DATASET_KINDS = ("preference", "unpaired", "prompt")
DEFAULT_SIZES = {"train": DEMO_RECIPE["train_size"], "test": DEMO_RECIPE["eval_size"]}


def load_preset_model(
    name: str, *, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None
) -> LlamaForCausalLM:
    """Model preset ``name`` (one of ``MODEL_PRESETS``), randomly initialised from ``seed``."""
    return build_model(name, tokenizer if tokenizer is not None else build_tokenizer(), seed)


def load_preset_dataset(
    name: str,
    split: str = "train",
    *,
    kind: str = "preference",
    n: int | None = None,
    seed: int = 0,
    conversational: bool = False,
) -> Dataset:
    """Dataset preset ``name`` (one of ``DATASET_PRESETS``) as TRL rows.

    kind: ``"preference"`` (prompt/chosen/rejected, DPO), ``"unpaired"`` (prompt/completion/label, KTO) or
    ``"prompt"`` (prompt/answer, GRPO with :func:`answer_reward`). ``n`` defaults to the demo recipe's split size.
    """
    if name not in DATASET_PRESETS:
        raise ValueError(f"unknown dataset preset {name!r}; choose one of {sorted(DATASET_PRESETS)}")
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {DATASET_KINDS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    make = {"preference": preference_dataset, "unpaired": unpaired_preference_dataset, "prompt": prompt_dataset}[kind]
    return make(
        DEFAULT_SIZES[split] if n is None else n,
        seed,
        split=split,
        conversational=conversational,
        task=DATASET_PRESETS[name],
    )


__all__ = [
    "ARITHMETIC",
    "ARITHMETIC_HARD",
    "CHAT_TEMPLATE",
    "DATASET_KINDS",
    "DATASET_PRESETS",
    "DEMO_RECIPE",
    "LEARNABLE_MISTAKES",
    "MISTAKES",
    "MODEL_PRESETS",
    "ArithmeticTask",
    "ModelPreset",
    "answer_reward",
    "build_model",
    "build_tokenizer",
    "load_preset_dataset",
    "load_preset_model",
    "preference_dataset",
    "preset_config",
    "prompt_dataset",
    "unpaired_preference_dataset",
]
