"""Online trainer runs on the ``tiny`` preset and the bundled arithmetic prompts: the toy rewards of the GRPO, RLOO,
PPO and online DPO tests, quiet training, the PPO trainer of tests/trainers/test_ppo_trainer.py (also compiled
in tests/runtime/test_compile_capture.py), and a small GRPO run (offloading and callback tests)."""

from __future__ import annotations

import contextlib
import io
import warnings

from fusedrl.cli import presets
from fusedrl.trainers.online.grpo import GRPOTrainer
from fusedrl.trainers.online.grpo_config import GRPOConfig
from fusedrl.trainers.online.ppo import PPOTrainer
from fusedrl.trainers.online.ppo_config import PPOConfig


def digit_count(completions, **kwargs):
    """A reward with spread on a random model: the number of digits sampled."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def char_reward(completions, **kwargs):
    """Mean of ``ord(c) % 7 / 7`` over the characters: arbitrary, but dense, so every group of a random model's
    completions has spread (a zero-spread group gives zero advantages and no gradient to compare)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ord(ch) % 7 for ch in t) / (7 * max(len(t), 1)) for t in texts]


def train_quietly(trainer, **kwargs) -> list[dict]:
    """``trainer.train(**kwargs)`` without its printed log lines and warnings; the logged entries with a loss."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**kwargs)
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def make_ppo_trainer(tmp_path, *, reward_funcs=(digit_count,), rows: int = 8, **overrides) -> PPOTrainer:
    """PPO on the ``tiny`` preset (seed 0): 2 steps of batch 4 on ``rows`` arithmetic prompts, 5-token responses,
    reference kernels; ``overrides`` go to PPOConfig."""
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_mini_batches": 1,
                "num_ppo_epochs": 1, "max_steps": 2, "response_length": 5, "learning_rate": 1e-3, "bf16": False,
                "gradient_checkpointing": False, "logging_steps": 1, "report_to": [], "save_strategy": "no",
                "use_cpu": True, "kernels": "all=reference", "dataloader_pin_memory": False, "disable_tqdm": True,
                "seed": 0}
    settings.update(overrides)
    tokenizer = presets.build_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PPOTrainer(presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer),
                          reward_funcs=list(reward_funcs), args=PPOConfig(**settings),
                          train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=rows),
                          processing_class=tokenizer)


def make_grpo_trainer(tmp_path, *, rows: int = 16, eval_rows: int = 0, callbacks=None, **overrides) -> GRPOTrainer:
    """GRPO on the ``tiny`` preset (seed 0) with the answer and character rewards: 2 steps of 8 completions (2 prompts
    x 4) of 5 tokens on ``rows`` arithmetic prompts (seed 1), reference kernels; ``eval_rows`` prompts of the test
    split as eval dataset; ``overrides`` go to GRPOConfig."""
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 8, "num_generations": 4,
                "max_completion_length": 5, "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-2, "bf16": False,
                "report_to": [], "save_strategy": "no", "use_cpu": True, "kernels": "all=reference",
                "dataloader_pin_memory": False, "disable_tqdm": True, "seed": 3}
    settings.update(overrides)
    tokenizer = presets.build_tokenizer()
    eval_dataset = presets.load_preset_dataset("arithmetic", "test", kind="prompt", n=eval_rows) if eval_rows else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(presets.load_preset_model("tiny", seed=0, tokenizer=tokenizer),
                           reward_funcs=[presets.answer_reward, char_reward], args=GRPOConfig(**settings),
                           train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=rows, seed=1),
                           eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks)
