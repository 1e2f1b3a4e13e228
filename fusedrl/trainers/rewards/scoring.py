"""Scoring completions with a list of reward functions and reward models, as TRL's GRPO/RLOO trainers do, with
validation of what each function returns.

A reward is one of:

- a registered name (``"accuracy"``; see ``registry.py``);
- a callable ``fn(prompts, completions, completion_ids, **columns) -> list[float | None]``, sync or async
  (``async def`` or an async ``__call__``): ``columns`` are the dataset columns other than ``prompt`` (one value per
  completion), plus what the trainer adds (GRPO/RLOO: ``trainer_state``, ``log_extra(column, values)`` and
  ``log_metric(name, value)``, ``reward_logs.py``); ``None`` marks a row the function does not apply to
  (multi-task). The sync functions run one after the other, then the async ones together (``async_loop.py``);
- a sequence-classification model (``AutoModelForSequenceClassification``, ``num_labels=1``) or a path/hub id of
  one: it scores ``prompt + completion`` (chat template for conversational data), logit 0, with its own tokenizer.

Validation: a function that raises, returns a non-list, the wrong number of rewards, a non-number, NaN or +-inf
raises a ValueError naming the function and the row. With ``on_error="skip"`` (``reward_failure="skip"`` in the
configs) the failing function's rewards for that batch are treated as ``None`` instead (a warning names it and the
``rewards/<name>/failures`` metric counts it); a completion that every function leaves ``None`` gets advantage 0,
and TRL's warning names the first such row's columns, prompt and completion (once per batch).

Legend: N completions, F reward functions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from fusedrl.trainers.models import pretrained_kwargs
from fusedrl.trainers.online.rollout import is_conversational_prompt
from fusedrl.trainers.rewards.async_loop import run_coroutine
from fusedrl.trainers.rewards.registry import get_reward, registered_rewards

logger = logging.getLogger("fusedrl")
ON_ERROR = ("raise", "skip")


class Reward(NamedTuple):
    """One resolved reward: its logged ``name``, the callable or model, and the model's tokenizer (else None)."""

    name: str
    func: Callable | torch.nn.Module
    processing_class: Any = None

    @property
    def is_model(self) -> bool:
        return isinstance(self.func, torch.nn.Module)


class RewardScores(NamedTuple):
    """``rewards_per_func``: fp32 ``[N, F]``, NaN where a function returned None (or was skipped);
    ``failures``: reward name -> error message for functions skipped in this batch."""

    rewards_per_func: torch.Tensor
    failures: dict[str, str]


def _load_reward_model(path: str, *, model_init_kwargs: dict | None, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kwargs = pretrained_kwargs(model_init_kwargs, trust_remote_code, default_dtype=None)  # torch_dtype, str dtypes
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def resolve_rewards(reward_funcs, reward_processing_classes=None, *, model_init_kwargs: dict | None = None,
                    trust_remote_code: bool = False) -> list[Reward]:
    """TRL's ``reward_funcs`` argument (one or a list of names, callables, models, model paths) as :class:`Reward`s.

    A string is a registered reward name when registered, else a reward-model path or hub id (``a/b``); anything
    else raises a ValueError listing the registered names. ``reward_processing_classes`` (one per reward, None
    entries allowed) gives the tokenizers of reward models; missing ones load from the model's name.
    """
    if reward_funcs is None:
        raise ValueError("reward_funcs is required: one or more reward functions, registered names "
                         f"({sorted(registered_rewards())}) or reward models")
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError("reward_funcs is empty; give at least one reward")
    classes = reward_processing_classes
    if classes is None:
        classes = [None] * len(funcs)
    elif not isinstance(classes, (list, tuple)):
        classes = [classes]
    if len(classes) != len(funcs):
        raise ValueError(f"The number of reward processing classes ({len(classes)}) must match the number of reward "
                         f"functions ({len(funcs)}): reward_processing_classes has {len(classes)} entries for "
                         f"{len(funcs)} reward_funcs")
    rewards = []
    for func, processing_class in zip(funcs, classes, strict=True):
        if isinstance(func, str):
            if func in registered_rewards():
                rewards.append(Reward(func, get_reward(func)))
                continue
            if "/" not in func and not func.startswith("."):
                get_reward(func)  # raises with the list of names
            model, tokenizer = _load_reward_model(func, model_init_kwargs=model_init_kwargs,
                                                  trust_remote_code=trust_remote_code)
            rewards.append(Reward(func.rstrip("/").split("/")[-1], model, processing_class or tokenizer))
        elif isinstance(func, torch.nn.Module):
            if processing_class is None:
                from transformers import AutoTokenizer

                processing_class = AutoTokenizer.from_pretrained(func.config._name_or_path)
            name = getattr(getattr(func, "config", None), "_name_or_path", "") or type(func).__name__
            rewards.append(Reward(name.rstrip("/").split("/")[-1], func.eval().requires_grad_(False),
                                  processing_class))
        elif callable(func):
            rewards.append(Reward(getattr(func, "__name__", type(func).__name__), func))
        else:
            raise ValueError(f"reward_funcs entry {func!r} is neither a registered name, a callable nor a model")  # noqa: TRY004
    for reward in rewards:
        if reward.is_model:
            tokenizer = reward.processing_class
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            reward.func.config.pad_token_id = tokenizer.pad_token_id
    return rewards


def prepare_reward_models(rewards: Sequence[Reward], accelerator) -> list[Reward]:
    """``rewards`` with every reward model prepared through accelerate for no-grad scoring, as the frozen reference
    is (``runtime.sharded_head.prepare_reference``): partitioned under ZeRO-3, sharded under FSDP2, else placed on
    the device with accelerate's mixed-precision autocast (TRL's trainers prepare their reward models the same
    way). Reward functions pass through."""
    from fusedrl.runtime.sharded_head import prepare_reference

    return [reward._replace(func=prepare_reference(reward.func, accelerator)) if reward.is_model else reward
            for reward in rewards]


def reward_weights_tensor(weights: Sequence[float] | None, num_rewards: int) -> torch.Tensor:
    """``[F]`` fp32 weights (all 1.0 when None); ValueError when the count does not match the rewards."""
    if weights is None:
        return torch.ones(num_rewards)
    if len(weights) != num_rewards:
        raise ValueError(f"Number of reward weights ({len(weights)}) must match number of reward functions "
                         f"({num_rewards}): reward_weights has {len(weights)} entries for {num_rewards} reward "
                         "functions; give one weight per reward")
    return torch.tensor([float(w) for w in weights], dtype=torch.float32)


def _checked(name: str, output, num_rows: int) -> list[float]:
    """``output`` as floats (None -> NaN), or ValueError naming ``name`` and the offending row."""
    if not isinstance(output, (list, tuple)) and not (isinstance(output, torch.Tensor) and output.dim() == 1):
        raise ValueError(f"reward function '{name}' returned a {type(output).__name__}; it must return a list with "
                         f"one float (or None) per completion ({num_rows})")
    values = output.tolist() if isinstance(output, torch.Tensor) else list(output)
    if len(values) != num_rows:
        raise ValueError(f"reward function '{name}' returned {len(values)} rewards for {num_rows} completions; it "
                         "must return exactly one reward per completion")
    out = []
    for row, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy scalars, 0-d tensors
            except (TypeError, ValueError):
                raise ValueError(f"reward function '{name}' returned {value!r} for completion {row}; rewards must "
                                 "be numbers or None") from None
        if not math.isfinite(value):
            raise ValueError(f"reward function '{name}' returned {value} for completion {row}; rewards must be "
                             "finite (return None for a completion the function does not apply to)")
        out.append(float(value))
    return out


def _model_rewards(reward: Reward, prompts: list, completions: list, device) -> torch.Tensor:
    tokenizer = reward.processing_class
    if is_conversational_prompt(prompts[0]):
        texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions,
                                                                                      strict=True)]
    else:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    model_device = next(reward.func.parameters()).device
    with torch.inference_mode():
        logits = reward.func(**{k: v.to(model_device) for k, v in inputs.items()}).logits
    return logits[:, 0].float().to(device)


def _call_reward(func, **kwargs):
    """``func(**kwargs)``: its return value (a coroutine for an async function), or the exception it raised."""
    try:
        return func(**kwargs)
    except Exception as error:  # noqa: BLE001 - any failure inside user code is reported with the function's name
        return error


def _called(reward: Reward, output, num_rows: int, device) -> torch.Tensor:
    """``[N]`` fp32 rewards of ``output`` (what the function returned, or the exception it raised), validated;
    ValueError naming the function otherwise."""
    if isinstance(output, Exception):  # any failure inside user code is reported with the function's name
        raise ValueError(f"reward function '{reward.name}' raised {type(output).__name__}: {output}") from output  # noqa: TRY004
    return torch.tensor(_checked(reward.name, output, num_rows), dtype=torch.float32, device=device)


async def _await_all(awaitables: list) -> list:
    """The results of ``awaitables``, awaited together; an exception is returned in its awaitable's place, so one
    failing function neither cancels nor hides the others."""
    return await asyncio.gather(*awaitables, return_exceptions=True)


def _warn_unscorable(rewards_NF: torch.Tensor, prompts: list, completions: list, columns: dict[str, list]) -> None:
    """TRL's warning for the first completion that every reward left None: its dataset columns, prompt and
    completion (not the trainer's own kwargs: ``trainer_state``, ``log_extra``, ``log_metric``)."""
    unscorable = rewards_NF.isnan().all(1)
    if not unscorable.any():
        return
    row = int(unscorable.nonzero()[0, 0])
    row_kwargs = {key: values[row] for key, values in columns.items()}
    row_kwargs["prompt"], row_kwargs["completion"] = prompts[row], completions[row]
    logger.warning("All reward functions returned None for the following kwargs:\n%s\n"
                   "Please ensure that at least one reward function returns a valid reward.", row_kwargs)


def score_completions(rewards: Sequence[Reward], *, prompts: list, completions: list,
                      completion_ids: list[list[int]], columns: dict[str, list] | None = None,
                      extra_kwargs: dict | None = None, on_error: str = "raise",
                      device: torch.device | str = "cpu", async_loop=None) -> RewardScores:
    """Run every reward on the N completions (see the module docstring); ``columns`` are the dataset columns, one
    list of N values each; ``extra_kwargs`` are passed as they are (``trainer_state``, ``log_extra``,
    ``log_metric``). Async functions run together on ``async_loop`` (an event loop running in another thread, the
    trainer's ``async_loop``), or without one on a fresh loop in a worker thread."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error (reward_failure) must be one of {ON_ERROR}, got {on_error!r}")
    num_rows = len(prompts)
    columns = columns or {}
    call = functools.partial(_call_reward, prompts=prompts, completions=completions, completion_ids=completion_ids,
                             **columns, **(extra_kwargs or {}))
    rewards_NF = torch.full((num_rows, len(rewards)), math.nan, dtype=torch.float32, device=device)
    outputs = {}  # reward index -> returned value (a coroutine for an async function) or raised exception
    for i, reward in enumerate(rewards):
        if reward.is_model:
            rewards_NF[:, i] = _model_rewards(reward, prompts, completions, device)
        else:
            outputs[i] = call(reward.func)
    # The async functions' coroutines (and any awaitable a sync wrapper returned) run together once the sync ones
    # have run, as in TRL; an awaitable left unawaited would be a silently missing reward.
    awaited = [i for i, output in outputs.items() if inspect.isawaitable(output)]
    if awaited:
        results = run_coroutine(_await_all([outputs[i] for i in awaited]), async_loop)
        for i, result in zip(awaited, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancellation, KeyboardInterrupt: not a reward function's failure
            outputs[i] = result
    failures = {}
    for i, output in outputs.items():
        try:
            rewards_NF[:, i] = _called(rewards[i], output, num_rows, device)
        except ValueError as error:
            if on_error == "raise":
                raise
            failures[rewards[i].name] = str(error)
            logger.warning("%s; its rewards for this batch count as None (reward_failure='skip')", error)
    _warn_unscorable(rewards_NF, prompts, completions, columns)
    return RewardScores(rewards_NF, failures)

