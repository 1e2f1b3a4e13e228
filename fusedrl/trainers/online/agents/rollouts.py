"""GRPO's agentic rollouts (TRL 1.16): ``tools``, ``environment_factory`` and ``rollout_func``.

One round, for the rows of a generation batch:

1. environments (if any): each row draws an instance of its environment, ``reset`` with its example; an
   observation is appended to the prompt (``environments.py``);
2. the first turn: a user ``rollout_func(prompts, trainer)`` (its ``prompt_ids``, ``completion_ids`` and
   ``logprobs``, an optional ``env_mask`` and extra fields that reach the reward functions as columns), or
   fusedrl's own sampling with each row's tools rendered into its prompt;
3. with tools: completions are parsed (``parsing.py``); rows that called tools get the results appended (the chat
   template's tokens around tool messages, never a re-tokenization) and sample a continuation, until no row calls
   a tool, ``max_tool_calling_iterations`` turns have run, or the next tool results would pass
   ``max_completion_length`` (those results are dropped and the row keeps its completion as it is). With a
   sharded model (FSDP2, ZeRO-3) on several processes these decisions are taken over every process and a
   process with no row to continue samples a dropped dummy row, so the collective forwards run in step
   (``lockstep.py``);
4. the tool mask: 0 on tool-result tokens, 1 on sampled ones. The loss (and ``num_items_in_batch``, the
   completion-length metrics) count only the sampled tokens; attention still sees the whole conversation.

The completion a reward function gets is the conversation after the prompt: assistant turns (with ``tool_calls``)
and tool messages, as TRL gives it.

Vision-language models: the first turn's per-row image fields (``Rollout.vision``) go into every continuation's
``generate`` and the round's scoring forwards. A tool may return images (content blocks, as in TRL 1.16): the
processor renders those results (``parsing.tool_suffix_with_images``: the image tokens expanded to each image's
size) and their fields join the row's (``data.vision.extend_vision_row``), after the prompt's, so the next turns and
the scoring forward see them; like any tool result they are masked out of the loss. A ``rollout_func`` gets the
prompts with their images in the messages; its prompt ids must be the processor's encoding of them, whose image
fields the forwards then take.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from fusedrl.trainers.data.vision import attach_images, extend_vision_row, is_vision_processor, row_images
from fusedrl.trainers.online.agents.environments import Environments
from fusedrl.trainers.online.agents.lockstep import any_process_active, restore_rng, snapshot_rng
from fusedrl.trainers.online.agents.parsing import (
    check_tool_calling,
    derived_response_template,
    parse_completion,
    tool_suffix_ids,
    tool_suffix_with_images,
)
from fusedrl.trainers.online.agents.tools import has_image_results, run_tool_calls, tools_by_name
from fusedrl.trainers.online.rollout import (
    Rollout,
    is_conversational_prompt,
    rollout_from_ids,
    sample_continuations,
    tokenize_vision_prompts,
)

_ROLLOUT_FUNC_KEYS = ("completion_ids", "logprobs", "prompt_ids")


def _experimental(name: str) -> None:
    if os.environ.get("TRL_EXPERIMENTAL_SILENCE", "0") != "1":
        warnings.warn(f"You are using '{name}', which is an experimental feature. This API may change or be removed at "
                      "any time without prior notice. Silence this warning by setting environment variable "
                      "TRL_EXPERIMENTAL_SILENCE=1.", UserWarning, stacklevel=4)


class AgentRound(NamedTuple):
    """A round's rollout plus what the agentic path adds: ``tool_mask`` ``[B, C]`` (None without tools or an
    ``env_mask``), ``extra_columns`` for the reward functions, the rows' ``environments`` (None without them) and
    the tool-call counts of this process."""

    rollout: Rollout
    tool_mask: torch.Tensor | None
    extra_columns: dict
    environments: list | None
    num_tool_calls: int
    num_tool_failures: int


class AgentRollouts:
    """The agentic side of one GRPO trainer (module docstring). ``tokenizer`` gets a response template when the
    trainer has tools and it has none."""

    def __init__(self, tokenizer, *, tools: list[Callable] | None, environment_factory, rollout_func,
                 max_tool_calling_iterations: int | None, chat_template_kwargs: dict | None):
        if rollout_func is not None:
            _experimental("rollout_func")
            if not callable(rollout_func):
                raise TypeError(f"rollout_func is a {type(rollout_func).__name__}; expected a callable "
                                "(prompts, trainer) -> dict")
        if environment_factory is not None:
            _experimental("environment_factory")
        for tool in tools or []:
            if not callable(tool):
                raise TypeError(f"tools holds a {type(tool).__name__}; every tool must be a function (its name, "
                                "signature and docstring become the schema the model sees)")
        self.standalone_tools = list(tools or [])
        self.environments = (None if environment_factory is None
                              else Environments(environment_factory, self.standalone_tools))
        self.tools = list(dict.fromkeys(self.standalone_tools + ([] if self.environments is None
                                                                 else self.environments.all_tools())))
        self.rollout_func = rollout_func
        self.max_turns = sys.maxsize if max_tool_calling_iterations is None else max_tool_calling_iterations
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.tokenizer = tokenizer
        if self.tools:
            check_tool_calling(tokenizer, chat_template_kwargs=self.chat_template_kwargs)
            if getattr(tokenizer, "response_template", None) is None:
                tokenizer.response_template = derived_response_template(tokenizer, self.chat_template_kwargs)

    @property
    def reward_functions(self) -> list[Callable]:
        """Reward functions of the environments that define ``get_reward`` (one per environment class)."""
        return [] if self.environments is None else self.environments.reward_functions

    # --- one round ----------------------------------------------------------------------------------------------

    def run(self, trainer, examples: list[dict], prompts: list, sample_first_turn: Callable[..., Rollout],
            *, max_completion_length: int, max_model_length: int | None, pad_to_multiple_of: int | None,
            generation_config, eos_token_ids, async_loop) -> AgentRound:
        """``sample_first_turn(prompts, prompt_tools)`` is the trainer's own sampling (``generate_completions``)."""
        environments, row_tools = None, [self.standalone_tools] * len(prompts)
        if self.environments is not None:
            names = self.environments.names_of(examples)
            environments = self.environments.instances_for(names)
            prompts = self.environments.reset(environments, examples, prompts)
            row_tools = [[*self.standalone_tools, *Environments.methods_of(e)] for e in environments]
        tokenizer, extra_columns, tool_mask = self.tokenizer, {}, None
        vlm = is_vision_processor(trainer.processing_class)
        if self.rollout_func is not None:
            if vlm:  # TRL hands a vision-language rollout_func the prompts with their images in the messages
                images = row_images(examples) or [None] * len(prompts)
                prompts = [attach_images(p, i) if is_conversational_prompt(p) else p for p, i in zip(prompts, images,
                                                                                                     strict=True)]
            output = self.rollout_func(prompts, trainer)
            missing = sorted(set(_ROLLOUT_FUNC_KEYS) - set(output))
            if missing:
                raise ValueError(f"rollout_func must return keys {missing} in its output dict. fusedrl: it returned "
                                 f"{sorted(output)}")
            prompt_ids = [list(ids) for ids in output["prompt_ids"]]
            completion_ids = [list(ids) for ids in output["completion_ids"]]
            for key in ("prompt_ids", "completion_ids"):
                if len(output[key]) != len(prompts):
                    raise ValueError(f"rollout_func returned {len(output[key])} {key} rows for {len(prompts)} "
                                     "prompts; return one row per prompt")
            extra_columns = {k: v for k, v in output.items() if k not in _ROLLOUT_FUNC_KEYS}
            tool_mask = extra_columns.pop("env_mask", None)
            rollout = None
            vision = self._rollout_func_images(trainer, prompts, prompt_ids, row_tools) if vlm else None
        if self.rollout_func is None:
            rollout = sample_first_turn(prompts, [tools or None for tools in row_tools])
            vision = rollout.vision  # a vision-language model's prompt image fields, kept through every turn
            prompts = rollout.prompts if vision is not None else prompts  # the images sit in the messages
            prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.prompt_ids.cpu(),
                                                                         rollout.prompt_mask.cpu(), strict=True)]
            completion_ids = rollout.completion_ids_list
        conversational = is_conversational_prompt(prompts[0])
        if self.tools and not conversational:
            raise ValueError("tools / environment_factory need conversational prompts (lists of chat messages): a tool "
                             "call is read from an assistant turn and answered with a tool message. The prompts are "
                             "strings; give the dataset's 'prompt' column as [{'role': 'user', 'content': ...}]")
        parse = conversational and getattr(tokenizer, "response_template", None) is not None
        if parse:
            completions = [[parse_completion(tokenizer, ids, prompt_ids[i], row_tools[i] or None)]
                           for i, ids in enumerate(completion_ids)]
        elif rollout is not None:
            completions = rollout.completions
        else:
            texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        calls = failures = 0
        if self.tools and conversational:
            tool_mask, calls, failures, vision = self._tool_turns(
                trainer, prompts, prompt_ids, completion_ids, completions, row_tools,
                max_completion_length=max_completion_length, max_model_length=max_model_length,
                generation_config=generation_config, eos_token_ids=eos_token_ids, async_loop=async_loop,
                vision=vision, processor=trainer.processing_class if vlm else None)
            rollout = None  # the completions grew: rebuilt from the lists below
        device = trainer.accelerator.device
        if rollout is None:
            rollout = rollout_from_ids(tokenizer, prompts, prompt_ids, completion_ids, completions,
                                       eos_token_ids=eos_token_ids, pad_to_multiple_of=pad_to_multiple_of,
                                       device=device, chat_template_kwargs=self.chat_template_kwargs,
                                       vision=vision, processor=trainer.processing_class)
        elif parse:
            rollout = rollout._replace(completions=completions)
        mask = None
        if tool_mask is not None:
            if len(tool_mask) != len(completion_ids) or any(len(m) != len(c) for m, c in zip(tool_mask, completion_ids,
                                                                                             strict=True)):
                raise ValueError("env_mask must hold one 0/1 entry per completion token of every row (the "
                                 "completion_ids' shape); fix rollout_func's env_mask")
            mask = torch.ones_like(rollout.completion_ids)  # 1 (sampled) on the padding, as TRL pads it
            for row, row_mask in enumerate(tool_mask):
                mask[row, :len(row_mask)] = torch.as_tensor(list(row_mask), dtype=mask.dtype)
        return AgentRound(rollout, mask, extra_columns, environments, calls, failures)

    def _rollout_func_images(self, trainer, prompts, prompt_ids, row_tools) -> list | None:
        """A vision-language model's ``rollout_func`` round: each row's image fields, encoded by the processor from
        the row's prompt and images, as TRL builds its forward's from them; the rollout's prompt ids must be the
        processor's (its image tokens are what the image features fill)."""
        _, encoded, vision = tokenize_vision_prompts(  # the images already sit in the prompts
            trainer.processing_class, prompts, None, chat_template_kwargs=self.chat_template_kwargs,
            prompt_tools=[tools or None for tools in row_tools])
        for row, (given, ours) in enumerate(zip(prompt_ids, encoded, strict=True)):
            if list(given) != list(ours):
                raise ValueError(f"rollout_func's prompt_ids of row {row} differ from the processor's encoding of that "
                                 "prompt with its images (the image tokens the image features fill); return the ids "
                                 "of processing_class.apply_chat_template(prompt, add_generation_prompt=True, "
                                 "tokenize=True) for vision-language models")
        return vision if any(row is not None for row in vision) else None

    def _tool_turns(self, trainer, prompts, prompt_ids, completion_ids, completions, row_tools, *,
                    max_completion_length, max_model_length, generation_config, eos_token_ids, async_loop,
                    vision=None, processor=None):
        """Run tool calls and sample continuations in place (``completion_ids`` and ``completions`` grow); returns
        ``(tool_mask lists, calls, failures, vision)``: ``vision`` the rows' image fields, grown by the images tools
        returned to a vision-language model (``processor``)."""
        tokenizer = self.tokenizer
        tool_mask = [[1] * len(ids) for ids in completion_ids]
        vision = None if vision is None else list(vision)  # rows are replaced, never changed in place
        tables = [tools_by_name(tools) for tools in row_tools]
        calls = failures = 0
        active = [i for i, c in enumerate(completions) if c[-1].get("tool_calls")]
        turn = 0
        while turn < self.max_turns and any_process_active(trainer, bool(active)):  # lock-step: lockstep.py
            extended, kept = [], []
            for i in active:
                results = run_tool_calls(completions[i][-1]["tool_calls"], tables[i], async_loop)
                calls, failures = calls + results.num_calls, failures + results.num_failures
                suffix_vision = None
                if processor is not None and has_image_results(results.messages):
                    suffix, suffix_vision = tool_suffix_with_images(processor, results.messages,
                                                                    chat_template_kwargs=self.chat_template_kwargs)
                else:
                    suffix = tool_suffix_ids(tokenizer, results.messages,
                                             chat_template_kwargs=self.chat_template_kwargs)
                sequence = prompt_ids[i] + completion_ids[i] + suffix
                too_long = (len(sequence) - len(prompt_ids[i]) > max_completion_length
                            or (max_model_length is not None and len(sequence) >= max_model_length))
                if too_long:  # the results would not fit: the row ends with its completion as it is
                    continue
                completions[i].extend(results.messages)
                if suffix_vision is not None:  # the images' features fill the image tokens of the suffix
                    vision = [None] * len(completion_ids) if vision is None else vision
                    vision[i] = extend_vision_row(vision[i], suffix_vision, prompt_length=len(prompt_ids[i]),
                                                  completion_length=len(completion_ids[i]))
                tool_mask[i] += [0] * len(suffix)
                completion_ids[i] = completion_ids[i] + suffix
                extended.append(sequence)
                kept.append(i)
            if not any_process_active(trainer, bool(kept)):
                break
            rng = None
            if not kept:  # another process continues: join its forwards with row 0 so far, dropped (lockstep.py)
                extended, kept, rng = [prompt_ids[0] + completion_ids[0]], [0], snapshot_rng(trainer.accelerator.device)
            continuations = sample_continuations(trainer.model_wrapped, tokenizer, extended,
                                                 generation_config=generation_config, eos_token_ids=eos_token_ids,
                                                 accelerator=trainer.accelerator,
                                                 vision=None if vision is None else [vision[i] for i in kept])
            if rng is not None:  # the dummy's continuation and random draws are undone
                restore_rng(rng)
                kept = extended = continuations = []
            active = []
            for i, sequence, new_ids in zip(kept, extended, continuations, strict=True):
                new_ids = new_ids[:max(0, max_completion_length - len(completion_ids[i]))]
                completion_ids[i] = completion_ids[i] + new_ids
                tool_mask[i] += [1] * len(new_ids)
                if not new_ids:
                    continue
                message = parse_completion(tokenizer, new_ids, sequence, row_tools[i] or None)
                completions[i].append(message)
                if message.get("tool_calls"):
                    active.append(i)
            turn += 1
        return tool_mask, calls, failures, vision
