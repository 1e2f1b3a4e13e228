"""Prompt handling and batched greedy generation shared by the completion callbacks.

Prompts come from the ``prompt`` column of the trainer's eval dataset, in TRL's standard (a string) or
conversational (a list of ``{"role", "content"}`` messages) format. Conversational prompts are rendered with the
tokenizer's chat template plus the generation prompt, and tokenized without special tokens (the template already
holds them). Under several processes each process generates for its slice of the prompts and the completions are
gathered, in prompt order, on every process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from fusedrl.runtime.compile import eager_generation

# Used when the caller passes no GenerationConfig. Greedy so the policy and the reference are compared on their
# modes, and two evaluations of the same weights give the same completions.
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class EvalPrompts:
    """Prompts ready for generation: ``texts`` (what the model is conditioned on, also what judges see) and whether
    they came from a chat template (then tokenization must not add special tokens again)."""

    texts: list[str]
    chat: bool


def completion_text(completion: str | list[dict]) -> str:
    """A completion as text: standard completions as they are, conversational ones as the last message's content."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def tokenizer_of(processing_class) -> PreTrainedTokenizerBase:
    """The tokenizer of a trainer's ``processing_class`` (a tokenizer, or a processor holding one)."""
    if processing_class is None:
        raise ValueError("the trainer has no processing_class (tokenizer); completion callbacks need one to generate")
    return getattr(processing_class, "tokenizer", processing_class)


def eval_prompts(trainer, tokenizer: PreTrainedTokenizerBase, num_prompts: int | None, owner: str) -> EvalPrompts:
    """The first ``num_prompts`` (all if None) prompts of ``trainer.eval_dataset``, rendered for generation."""
    dataset = trainer.eval_dataset
    if dataset is None:
        raise ValueError(f"{owner} needs a trainer with an eval_dataset")
    if isinstance(dataset, dict):
        raise TypeError(f"{owner} needs a single eval dataset, not a dict of {len(dataset)}; pass one to the trainer")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{owner} needs a 'prompt' column in the eval dataset; it has {dataset.column_names}")
    prompts = dataset["prompt"]
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{owner}: the eval dataset has no prompts")
    chat = not isinstance(prompts[0], str)
    if chat:
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    else:
        texts = prompts
    return EvalPrompts(texts=texts, chat=chat)


def resolve_generation_config(
    generation_config: GenerationConfig | None, tokenizer: PreTrainedTokenizerBase
) -> GenerationConfig:
    """``generation_config``, or greedy decoding of ``DEFAULT_MAX_NEW_TOKENS`` tokens; pad/eos default to the
    tokenizer's so generation never warns about a missing pad token."""
    if generation_config is None:
        config = GenerationConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, do_sample=False)
    else:  # a copy: the caller's config is not modified
        config = GenerationConfig.from_dict(generation_config.to_dict())
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no dropout; transformers skips activation checkpointing outside training, so the
    KV cache stays on); the previous mode is restored even on error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_local(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: EvalPrompts,
    generation_config: GenerationConfig,
    batch_size: int,
) -> list[str]:
    """Completions of ``prompts.texts`` on this process, left-padded batches of ``batch_size``."""
    device = next(model.parameters()).device
    completions = []
    with eval_mode(model):
        for start in range(0, len(prompts.texts), batch_size):
            batch = tokenizer(
                prompts.texts[start : start + batch_size],
                padding=True,
                padding_side="left",
                add_special_tokens=not prompts.chat,
                return_tensors="pt",
            ).to(device)
            with eager_generation():  # compiled blocks would recompile every decoding step
                output_ids = model.generate(**batch, generation_config=generation_config)
            completions += tokenizer.batch_decode(
                output_ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
    return completions


def generate_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: EvalPrompts,
    generation_config: GenerationConfig,
    batch_size: int,
    accelerator=None,
) -> list[str]:
    """Completions of all ``prompts``, split across the processes of ``accelerator`` and gathered in order.

    Every process must call this (it holds collectives). Under DeepSpeed ZeRO-3 transformers' ``generate`` sets
    ``synced_gpus`` itself, so ranks that finish early keep joining the per-layer parameter gathers.
    """
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        model = accelerator.unwrap_model(model)
        with accelerator.split_between_processes(prompts.texts) as local_texts:
            local = generate_local(
                model, tokenizer, EvalPrompts(list(local_texts), prompts.chat), generation_config, batch_size
            )
        return list(gather_object(local))
    return generate_local(model, tokenizer, prompts, generation_config, batch_size)


def broadcast_from_main(values: Sequence, accelerator=None) -> list:
    """``values`` as computed on the main process, on every process (identity with one process)."""
    values = list(values)
    if accelerator is None or accelerator.num_processes <= 1:
        return values
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(values, from_process=0)
