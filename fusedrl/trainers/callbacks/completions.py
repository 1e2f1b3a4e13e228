"""Callbacks that generate from the policy during training: judged win rate, and logged completion tables.

Both read the prompts once, at construction, from the ``prompt`` column of ``trainer.eval_dataset`` (the first
``num_prompts``), and generate greedily (see :mod:`.generation`) unless given a ``GenerationConfig``. Every process
generates for its share of the prompts; judging and reporting happen on the main process. With named adapters
(``model_adapter_name``) the policy generates with its trained adapter (``fusedrl.use_adapter``), and a fusedrl
trainer's reference is whatever its ``reference_context`` yields (reference model, reference adapter, ``ref`` copy
or the base).
"""

from __future__ import annotations

import contextlib
import importlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import GenerationConfig, TrainerCallback

from fusedrl.trainers.adapters.named import trained_adapter_names, use_adapter
from fusedrl.trainers.models import tokenizer_of
from fusedrl.trainers.online.judges import TIE, PairwiseJudge, check_verdicts

from .generation import (
    broadcast_from_main,
    completion_text,
    eval_prompts,
    generate_eval_completions,
    resolve_generation_config,
)


def _trainer_completions(trainer, model, tokenizer, prompts, generation_config, args) -> list[str]:
    """The callbacks' generation: ``model``'s completions of ``prompts`` in batches of ``args``' eval size."""
    return generate_eval_completions(model, tokenizer, prompts, generation_config,
                                     batch_size=args.per_device_eval_batch_size,
                                     accelerator=getattr(trainer, "accelerator", None))


@dataclass(frozen=True)
class WinRate:
    """Outcome of one judged comparison of the policy against the reference.

    ``outcomes[i]`` is 1.0 if the policy's completion of prompt i won, 0.0 if it lost and 0.5 on a tie or unknown
    verdict, so ``win_rate`` is the usual ties-count-half rate; ``tie_rate`` says how much of it came from ties.
    """

    outcomes: list[float]
    verdicts: list[int]
    policy_first: list[bool]

    @property
    def win_rate(self) -> float:
        return sum(self.outcomes) / len(self.outcomes)

    @property
    def tie_rate(self) -> float:
        return sum(v == TIE for v in self.verdicts) / len(self.verdicts)


def judge_against_reference(
    judge: PairwiseJudge,
    prompts: Sequence[str],
    policy_completions: Sequence[str],
    reference_completions: Sequence[str],
    policy_first: Sequence[bool],
) -> WinRate:
    """Ask ``judge`` about each (reference, policy) pair, the policy shown first where ``policy_first[i]``."""
    if not len(prompts) == len(policy_completions) == len(reference_completions) == len(policy_first):
        raise ValueError(
            f"lengths differ: {len(prompts)} prompts, {len(policy_completions)} policy and "
            f"{len(reference_completions)} reference completions, {len(policy_first)} orders"
        )
    pairs = [
        (pol, ref) if first else (ref, pol)
        for pol, ref, first in zip(policy_completions, reference_completions, policy_first, strict=True)
    ]
    verdicts = check_verdicts(judge(list(prompts), pairs), len(pairs))
    outcomes = [
        0.5 if verdict == TIE else float(verdict == (0 if first else 1))
        for verdict, first in zip(verdicts, policy_first, strict=True)
    ]
    return WinRate(outcomes=outcomes, verdicts=verdicts, policy_first=list(policy_first))


def _main_process(trainer) -> bool:
    return trainer.accelerator.is_main_process if getattr(trainer, "accelerator", None) else True


def _trained_adapters(trainer) -> list[str]:
    """The policy's trained adapters when they are named (``model_adapter_name``), else ``[]``."""
    return trained_adapter_names(getattr(trainer, "args", None), getattr(trainer, "model", None))


def _with_adapter(model: torch.nn.Module, adapter: str | None):
    return contextlib.nullcontext() if adapter is None else use_adapter(model, adapter)


def _reporters(args) -> list[str]:
    report_to = getattr(args, "report_to", None) or []
    return [report_to] if isinstance(report_to, str) else list(report_to)


class WinRateCallback(TrainerCallback):
    """At each evaluation, judges the policy's completions against reference completions and logs
    ``eval_win_rate`` (ties count half) and ``eval_tie_rate``.

    The reference completions are, in order of preference: ``reference_completions`` (e.g. the eval set's ``chosen``
    column; conversational messages are reduced to their last content), else generated once at the start of training
    by the model a fusedrl trainer's ``reference_context()`` yields (its ``ref_model``, or the PEFT policy with the
    reference adapter ``ref_adapter_name`` / the frozen ``ref`` copy active or its adapters disabled); for another
    ``transformers.Trainer``, by ``trainer.ref_model``, else by the PEFT policy with its adapters disabled, else by
    the policy before its first update. The rate thus measures the policy against where training started; a
    reference moved later by :class:`SyncRefModelCallback` is not regenerated. The policy generates with its trained
    adapter (``adapter``) when adapters are named.

    ``eval_win_rate`` is also written into the evaluation's metrics, so ``trainer.evaluate()`` returns it and
    ``metric_for_best_model="eval_win_rate"`` works.

    Args:
        judge: a :class:`~fusedrl.trainers.online.judges.PairwiseJudge`.
        trainer: the trainer, with an eval dataset holding a ``prompt`` column and a tokenizer.
        generation_config: for policy and reference generation; greedy, 64 new tokens if None.
        num_prompts: judge the first ``num_prompts`` eval prompts (all if None).
        shuffle_order: show the policy first or second at random (seeded by ``args.seed`` and the step) to cancel a
            judge's position bias; if False the reference is always first.
        reference_completions: stored reference completions, one per prompt (extra ones are ignored).
        adapter: the trained adapter whose completions are judged; None: the one trained adapter (required when
            several are trained together).
    """

    def __init__(
        self,
        judge: PairwiseJudge,
        trainer,
        generation_config: GenerationConfig | None = None,
        num_prompts: int | None = None,
        shuffle_order: bool = True,
        *,
        reference_completions: Sequence | None = None,
        adapter: str | None = None,
    ):
        trained = _trained_adapters(trainer)
        if adapter is None and len(trained) > 1:
            raise ValueError(f"WinRateCallback: {len(trained)} adapters are trained together ({trained}); pass "
                             "adapter= to choose the one to judge")
        if adapter is not None and adapter not in trained:
            raise ValueError(f"WinRateCallback: adapter={adapter!r} is not a trained adapter of the trainer "
                             f"(model_adapter_name: {trained})")
        self.adapter = adapter if adapter is not None else (trained[0] if trained else None)
        self.judge = judge
        self.trainer = trainer
        self.shuffle_order = shuffle_order
        self.tokenizer = tokenizer_of(trainer.processing_class)
        self.prompts = eval_prompts(trainer, self.tokenizer, num_prompts, "WinRateCallback")
        self.generation_config = resolve_generation_config(generation_config, self.tokenizer)
        self.reference_completions: list[str] | None = None
        if reference_completions is not None:
            if len(reference_completions) < len(self.prompts.texts):
                raise ValueError(
                    f"{len(reference_completions)} reference completions for {len(self.prompts.texts)} prompts"
                )
            self.reference_completions = [completion_text(c) for c in reference_completions[: len(self.prompts.texts)]]
        self.history: list[tuple[int, float]] = []  # (global_step, win_rate) of every evaluation
        self.last: WinRate | None = None  # the last evaluation's per-prompt results, on the main process
        self.last_policy_completions: list[str] | None = None

    def _generate(self, model: torch.nn.Module) -> list[str]:
        return _trainer_completions(self.trainer, model, self.tokenizer, self.prompts, self.generation_config,
                                    self.trainer.args)

    def _ensure_reference(self) -> None:
        if self.reference_completions is not None:
            return
        reference_context = getattr(self.trainer, "reference_context", None)
        if reference_context is not None:  # a fusedrl trainer: the model (or adapter) its losses use
            with reference_context() as reference:
                self.reference_completions = self._generate(reference)
            return
        ref_model = getattr(self.trainer, "ref_model", None)
        policy = self.trainer.model
        if ref_model is not None:
            self.reference_completions = self._generate(ref_model)
        elif isinstance(getattr(policy, "peft_config", None), dict) and hasattr(policy, "disable_adapter"):
            with policy.disable_adapter():  # the base model, which is the reference of PEFT training
                self.reference_completions = self._generate(policy)
        else:
            self.reference_completions = self._generate(policy)

    def on_train_begin(self, args, state, control, **kwargs):
        self._ensure_reference()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._ensure_reference()
        with _with_adapter(self.trainer.model, self.adapter):
            policy_completions = self._generate(self.trainer.model)
        rates = [float("nan"), float("nan")]
        if _main_process(self.trainer):
            rng = random.Random(args.seed * 1_000_003 + state.global_step)
            n = len(policy_completions)
            policy_first = [rng.random() < 0.5 for _ in range(n)] if self.shuffle_order else [False] * n
            self.last = judge_against_reference(
                self.judge, self.prompts.texts, policy_completions, self.reference_completions, policy_first
            )
            self.last_policy_completions = policy_completions
            rates = [self.last.win_rate, self.last.tie_rate]
        win_rate, tie_rate = broadcast_from_main(rates, getattr(self.trainer, "accelerator", None))
        self.history.append((state.global_step, win_rate))
        if metrics is not None:
            metrics["eval_win_rate"] = win_rate
        self.trainer.log({"eval_win_rate": win_rate, "eval_tie_rate": tie_rate})


class LogCompletionsCallback(TrainerCallback):
    """Generates completions for the eval prompts and logs a (step, prompt, completion) table.

    When: with ``freq``, at every step that is a multiple of ``freq``; without, at every evaluation. Where: a
    ``wandb.Table`` of all rows so far (key ``completions``) when ``"wandb"`` is in ``args.report_to`` and a wandb
    run is active; otherwise the new rows are printed as a rich table (plain text when stdout is not a terminal).
    wandb is imported only when reported to. All rows stay in ``self.table`` either way. With named adapters the
    policy generates with its trained adapter; with several trained together, each of them generates and the rows
    gain an ``adapter`` column (``self.columns``).

    Args:
        trainer: the trainer, with an eval dataset holding a ``prompt`` column and a tokenizer.
        generation_config: greedy, 64 new tokens if None.
        num_prompts: the first ``num_prompts`` eval prompts (all if None).
        freq: log every ``freq`` optimizer steps instead of at evaluations.
        console: where the rich table goes; a ``Console()`` on stdout if None.
    """

    COLUMNS = ("step", "prompt", "completion")

    def __init__(
        self,
        trainer,
        generation_config: GenerationConfig | None = None,
        num_prompts: int | None = None,
        freq: int | None = None,
        *,
        console: Console | None = None,
    ):
        if freq is not None and freq < 1:
            raise ValueError(f"freq must be a positive number of steps, got {freq}")
        self.trainer = trainer
        self.freq = freq
        self.console = console or Console()
        self.tokenizer = tokenizer_of(trainer.processing_class)
        self.prompts = eval_prompts(trainer, self.tokenizer, num_prompts, "LogCompletionsCallback")
        self.generation_config = resolve_generation_config(generation_config, self.tokenizer)
        self.adapters = _trained_adapters(trainer)
        self.columns = self.COLUMNS if len(self.adapters) <= 1 else ("step", "adapter", "prompt", "completion")
        self.table: list[tuple] = []
        self._last_logged_step = -1

    def on_step_end(self, args, state, control, **kwargs):
        if self.freq is not None and state.global_step % self.freq == 0:
            self.log_completions(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.freq is None:
            self.log_completions(args, state)

    def log_completions(self, args, state) -> None:
        """Generate, record and report one round of completions (once per global step). Every process calls it."""
        if state.global_step == self._last_logged_step:
            return
        self._last_logged_step = state.global_step
        model = self.trainer.model
        rows = []
        for adapter in self.adapters or [None]:
            with _with_adapter(model, adapter):
                completions = _trainer_completions(self.trainer, model, self.tokenizer, self.prompts,
                                                   self.generation_config, args)
            tag = (adapter,) if len(self.columns) > len(self.COLUMNS) else ()
            rows += [(state.global_step, *tag, prompt, completion)
                     for prompt, completion in zip(self.prompts.texts, completions)]
        if not _main_process(self.trainer):
            return
        self.table.extend(rows)
        wandb = self._active_wandb(args)
        if wandb is not None:
            wandb.log({"completions": wandb.Table(columns=list(self.columns), data=[list(r) for r in self.table])})
        else:
            self.console.print(self._rich_table(rows))

    @staticmethod
    def _active_wandb(args):
        if "wandb" not in _reporters(args):
            return None
        try:
            wandb = importlib.import_module("wandb")
        except ImportError:
            return None
        return wandb if getattr(wandb, "run", None) is not None else None

    def _rich_table(self, rows) -> Table:
        table = Table(title=f"completions at step {rows[0][0]}", show_lines=True)
        for column in self.columns:
            table.add_column(column, overflow="fold")
        for step, *tag, prompt, completion in rows:  # Text, not markup: a completion may contain "[...]"
            table.add_row(str(step), *tag, Text(prompt.rstrip("\n")), Text(completion))
        return table
