"""Prompt handling and batched greedy generation shared by the completion callbacks.

Prompts come from the ``prompt`` column of the trainer's eval dataset, in TRL's standard (a string) or
conversational (a list of ``{"role", "content"}`` messages) format. Generation is the online trainers' own
(:func:`fusedrl.trainers.online.rollout.generate_completions`: the same tokenization and chat template, eval mode,
eager decoding under compiled blocks), called in batches. Under several processes each process generates for its
slice of the prompts and the completions are gathered, in prompt order, on every process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import GenerationConfig, PreTrainedTokenizerBase

from fusedrl.trainers.online.rollout import generate_completions, render_prompts

# Used when the caller passes no GenerationConfig. Greedy so the policy and the reference are compared on their
# modes, and two evaluations of the same weights give the same completions.
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class EvalPrompts:
    """Prompts ready for generation: ``prompts`` as the dataset holds them (strings or message lists: what
    generation takes) and ``texts``, the rendered strings the model is conditioned on (what judges and tables see)."""

    prompts: list
    texts: list[str]


def completion_text(completion: str | list[dict]) -> str:
    """A completion as text: standard completions as they are, conversational ones as the last message's content."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


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
    return EvalPrompts(prompts=prompts, texts=render_prompts(tokenizer, prompts))


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


def _generate_local(model, tokenizer: PreTrainedTokenizerBase, prompts: list, generation_config: GenerationConfig,
                    batch_size: int, accelerator) -> list[str]:
    """Completion texts of ``prompts`` on this process, in left-padded batches of ``batch_size``; each completion
    ends at the first of ``generation_config``'s EOS ids."""
    eos = generation_config.eos_token_id
    eos_token_ids = None if eos is None else [eos] if isinstance(eos, int) else list(eos)
    completions = []
    for start in range(0, len(prompts), batch_size):
        rollout = generate_completions(model, tokenizer, prompts[start:start + batch_size],
                                       generation_config=generation_config, eos_token_ids=eos_token_ids,
                                       accelerator=accelerator)
        completions += rollout.completions_text
    return completions


def generate_eval_completions(
    model,
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

        with accelerator.split_between_processes(prompts.prompts) as local_prompts:
            local = _generate_local(model, tokenizer, list(local_prompts), generation_config, batch_size, accelerator)
        return list(gather_object(local))
    return _generate_local(model, tokenizer, prompts.prompts, generation_config, batch_size, accelerator)


def broadcast_from_main(values: Sequence, accelerator=None) -> list:
    """``values`` as computed on the main process, on every process (identity with one process)."""
    values = list(values)
    if accelerator is None or accelerator.num_processes <= 1:
        return values
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list(values, from_process=0)
