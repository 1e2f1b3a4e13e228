"""fusedrl.GRPOTrainer and trl.GRPOTrainer side by side on the ``tiny`` preset, as tests/trainers/test_grpo_trainer.py
runs them: the same saved checkpoint, arithmetic prompts, rewards, seed and config, 2 optimizer steps; sampling
draws from the same RNG stream, so the completions agree and every metric TRL logs must match (1e-5 relative)."""

from __future__ import annotations

import math
import warnings

import torch
from transformers import AutoModelForCausalLM

from fusedrl.cli import presets
from tests.helpers.online import char_reward
from tests.utils import assert_close

TOKENIZER = presets.build_tokenizer()
GRPO_BASE = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 5, "max_steps": 2,
             "logging_steps": 1, "learning_rate": 1e-2, "bf16": False, "activation_checkpointing": False,
             "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False,
             "seed": 3}
# Wall-clock and memory entries differ between any two runs.
UNTIMED = {"step_time", "memory/peak_rss_mb", "epoch", "step"}


def run_grpo(trainer_cls, config_cls, model_path, tmp_path, *, kernels: str = "all=reference", n: int = 48,
             **fields):
    """Train ``trainer_cls`` (fusedrl's or TRL's) on ``model_path``; returns ``(trainer, logged entries with a loss,
    names of the trainable tensors that moved, names of all trainable tensors)``. ``kernels`` applies to fusedrl."""
    config = config_cls(str(tmp_path / trainer_cls.__module__.split(".")[0]), **{**GRPO_BASE, **fields})
    if hasattr(config, "kernels"):
        config.kernels = kernels
    dataset = presets.load_preset_dataset("arithmetic", kind="prompt", n=n, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(AutoModelForCausalLM.from_pretrained(model_path),
                              reward_funcs=[presets.answer_reward, char_reward], args=config,
                              train_dataset=dataset, processing_class=TOKENIZER)
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
    moved = {name for name, p in trainer.model.named_parameters()
             if name in before and not torch.equal(p, before[name])}
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry], moved, set(before)


def assert_grpo_logs_match(ours: list[dict], theirs: list[dict], *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every metric TRL logged at every step, fusedrl logged with the same value (finite where TRL's is not None)."""
    assert len(ours) == len(theirs) and ours, (len(ours), len(theirs))
    for step, (mine, peer) in enumerate(zip(ours, theirs, strict=True), start=1):
        names = set(peer) - UNTIMED
        assert names <= set(mine), f"step {step}: metrics TRL logs but fusedrl does not: {names - set(mine)}"
        for name in sorted(names):
            if peer[name] is None:
                assert mine[name] is None, f"step {step} {name}: TRL logs None, fusedrl {mine[name]}"
                continue
            assert math.isfinite(mine[name]), f"step {step} {name} = {mine[name]}"
            assert_close(torch.tensor(mine[name]), torch.tensor(peer[name]), name=f"step {step} {name}", rtol=rtol,
                         atol=atol)
