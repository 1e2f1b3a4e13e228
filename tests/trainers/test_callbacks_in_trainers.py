"""fusedrl's callbacks inside fusedrl trainers (tests/trainers/test_callbacks.py drives them through a plain
``transformers.Trainer``), and ``report_to=["tensorboard"]`` read back from the event files.

DPO (3 steps, evaluations at steps 2 and 3) and GRPO (2 steps, an evaluation at step 2) on the ``tiny`` preset and
the arithmetic data, each with every callback:

- :class:`SyncRefModelCallback`, installed by the trainer from ``sync_ref_model=True`` (alpha 1, a hard copy). DPO
  syncs every 2 steps: its losses are ``[ln 2, not ln 2, ln 2]`` (the policy moved at step 1; equal to the reference
  again from the sync at step 2 on) and its step-2 evaluation is ln 2. GRPO (``beta`` 0.1) syncs every step: the KL
  of both steps is 0 and the reference ends equal to the policy;
- :class:`WinRateCallback` (arithmetic judge, 4 eval prompts, greedy 3 tokens): reference completions from the
  trainer's ``reference_context`` at train begin, ``eval_win_rate`` / ``eval_tie_rate`` logged at each evaluation;
- :class:`LogCompletionsCallback` every step (``freq=1``): rows for the eval prompts at every step, generated in
  eval mode with the model handed back in train mode, so the step's metrics are still logged as training metrics;
- :func:`use_rich_progress`: one plain line per log, with the trainer's metric names;
- tensorboard: every number of every log, under transformers' tag names (``train/<name>``, ``eval/<name>``), at its
  step, as float32, read back with tensorboard's ``EventAccumulator``.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import GenerationConfig

from fusedrl.cli import presets
from fusedrl.trainers import DPOConfig, DPOTrainer
from fusedrl.trainers.callbacks import LogCompletionsCallback, SyncRefModelCallback, WinRateCallback, use_rich_progress
from fusedrl.trainers.online.judges import arithmetic_judge
from tests.helpers.online import make_grpo_trainer

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

GREEDY_3 = GenerationConfig(max_new_tokens=3, do_sample=False)
NUM_EVAL_PROMPTS = 4
SYNCED = {"sync_ref_model": True, "ref_model_mixup_alpha": 1.0, "report_to": ["tensorboard"],
          "eval_strategy": "steps", "eval_steps": 2}


def _train_with_callbacks(trainer):
    """Attach the callbacks of the module docstring, train, and return them with the printed progress."""
    progress = io.StringIO()
    use_rich_progress(trainer, console=Console(file=progress))
    win_rate = WinRateCallback(arithmetic_judge(), trainer, GREEDY_3, num_prompts=NUM_EVAL_PROMPTS)
    completions = LogCompletionsCallback(trainer, GREEDY_3, num_prompts=2, freq=1, console=Console(file=io.StringIO()))
    trainer.add_callback(win_rate)
    trainer.add_callback(completions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert sum(isinstance(cb, SyncRefModelCallback) for cb in trainer.callback_handler.callbacks) == 1
    return win_rate, completions, progress.getvalue()


def _check_common(trainer, win_rate, completions, progress, *, eval_steps: list[int], metric: str) -> list[dict]:
    """What every run shows; returns the training log entries."""
    history = trainer.state.log_history
    train_logs = [e for e in history if "loss" in e]
    assert [e["step"] for e in train_logs] == list(range(1, trainer.state.max_steps + 1))
    assert all(metric in e and not any(k.startswith("eval_") for k in e) for e in train_logs)
    rates = [e for e in history if "eval_win_rate" in e]
    assert [e["step"] for e in rates] == eval_steps == [step for step, _ in win_rate.history]
    assert all(0.0 <= e["eval_win_rate"] <= 1.0 and 0.0 <= e["eval_tie_rate"] <= 1.0 for e in rates)
    assert len(win_rate.reference_completions) == NUM_EVAL_PROMPTS
    prompts = trainer.eval_dataset["prompt"][:2]
    assert [(step, prompt) for step, prompt, _ in completions.table] == [
        (step, prompt) for step in range(1, trainer.state.max_steps + 1) for prompt in prompts]
    lines = progress.splitlines()
    assert lines[0] == f"Training for {trainer.state.max_steps} steps"
    assert any(line.startswith("step 1/") and f"| {metric} " in line for line in lines)
    assert any("eval_win_rate" in line for line in lines)
    _check_tensorboard(trainer)
    return train_logs


def _tag(key: str) -> str:
    """transformers' TensorBoardCallback names: ``eval_x`` -> ``eval/x``, ``test_x`` -> ``test/x``, else ``train/x``."""
    for split in ("eval", "test"):
        if key.startswith(split + "_"):
            return f"{split}/{key[len(split) + 1:]}"
    return f"train/{key}"


def _check_tensorboard(trainer) -> None:
    runs = sorted(Path(trainer.args.output_dir).glob("runs/*"))
    assert len(runs) == 1, runs
    events = event_accumulator.EventAccumulator(str(runs[0]))
    events.Reload()
    written = defaultdict(list)
    for tag in events.Tags()["scalars"]:
        for scalar in events.Scalars(tag):
            written[tag, scalar.step].append(scalar.value)
    expected = defaultdict(list)
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key != "step":
                expected[_tag(key), entry["step"]].append(torch.tensor(value, dtype=torch.float32).item())
    assert written == expected


def test_dpo_with_every_callback_and_tensorboard(tmp_path):
    tokenizer = presets.build_tokenizer()
    args = DPOConfig(str(tmp_path), max_steps=3, ref_model_sync_steps=2, per_device_train_batch_size=2,
                     per_device_eval_batch_size=2, logging_steps=1, learning_rate=1e-2, max_length=48, bf16=False,
                     use_cpu=True, kernels="all=reference", save_strategy="no", disable_tqdm=True, seed=0, **SYNCED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer), args=args,
                             train_dataset=presets.load_preset_dataset("arithmetic", "train", n=8),
                             eval_dataset=presets.load_preset_dataset("arithmetic", "test", n=NUM_EVAL_PROMPTS),
                             processing_class=tokenizer)
    win_rate, completions, progress = _train_with_callbacks(trainer)

    logs = _check_common(trainer, win_rate, completions, progress, eval_steps=[2, 3], metric="rewards/margins")
    losses = [e["loss"] for e in logs]
    assert losses[0] == losses[2] == pytest.approx(math.log(2), abs=1e-6) and losses[1] != pytest.approx(math.log(2))
    eval_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert eval_losses[0] == pytest.approx(math.log(2), abs=1e-6) != eval_losses[1]
    assert "eval_win_rate" in trainer.evaluate()


def test_grpo_with_every_callback_and_tensorboard(tmp_path):
    trainer = make_grpo_trainer(tmp_path, eval_rows=NUM_EVAL_PROMPTS, beta=0.1, ref_model_sync_steps=1,
                                per_device_eval_batch_size=4, **SYNCED)
    win_rate, completions, progress = _train_with_callbacks(trainer)

    logs = _check_common(trainer, win_rate, completions, progress, eval_steps=[2], metric="reward")
    assert [e["kl"] for e in logs] == [0.0, 0.0]
    for (name, param), ref in zip(trainer.model.named_parameters(), trainer.ref_model.parameters(), strict=True):
        assert torch.equal(param, ref), name
    assert "train/rewards/answer_reward/mean" in {_tag(k) for k in logs[0]}
