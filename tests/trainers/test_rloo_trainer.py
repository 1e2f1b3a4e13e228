"""fusedrl.RLOOTrainer against trl.RLOOTrainer 1.16 (the peer) on the tiny preset model, plus its own guarantees.

- parity: both trainers start from the same saved checkpoint, data, seed and config and run 2 optimizer steps with
  identical completions; every metric TRL logs (loss, grad_norm, the reward-side kl, entropy, clip ratios over
  sequences, rewards, completions/*) must match to 1e-5 relative: with and without the KL reward penalty, with
  whitened advantages, reward clipping, several iterations per round (sequence-level ratio != 1) and gradient
  accumulation;
- TRL's RLOO defaults (num_generations=2, beta=0.05 with a reference model) and the leave-one-out advantages on
  a hand-derived batch.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import trl
from transformers import AutoModelForCausalLM

from fusedrl.cli import presets
from fusedrl.trainers import RLOOConfig, RLOOTrainer
from tests.helpers.online import char_reward
from tests.utils import assert_close, spy_policy_backends

TOKENIZER = presets.build_tokenizer()
BASE = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 5, "max_steps": 2,
        "logging_steps": 1, "learning_rate": 1e-2, "bf16": False, "activation_checkpointing": False,
        "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False, "seed": 5}
IGNORED = {"step_time", "memory/peak_rss_mb", "epoch", "step"}


def _run(trainer_cls, config_cls, model_path, tmp_path, *, kernels="all=reference", **fields):
    config = config_cls(str(tmp_path / trainer_cls.__module__.split(".")[0]), **{**BASE, **fields})
    if trainer_cls is RLOOTrainer:
        config.kernels = kernels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(AutoModelForCausalLM.from_pretrained(model_path),
                              reward_funcs=[presets.answer_reward, char_reward], args=config,
                              train_dataset=presets.load_preset_dataset("arithmetic", kind="prompt", n=48, seed=2),
                              processing_class=TOKENIZER)
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        trainer.train()
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    return [entry for entry in trainer.state.log_history if "loss" in entry], moved, set(before), trainer


CASES = {
    "defaults_kl_penalty": {},
    "no_reference_normalized": {"beta": 0.0, "normalize_advantages": True},
    "two_iterations_clipped_rewards": {"num_iterations": 2, "reward_clip_range": [0.0, 0.5], "epsilon_high": 0.3,
                                       "beta": 0.1},
    "accumulation": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4},
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_trl(preset_model_dir, tmp_path, case):
    ours, moved, trainable, _ = _run(RLOOTrainer, RLOOConfig, preset_model_dir, tmp_path, **CASES[case])
    theirs, _, _, _ = _run(trl.RLOOTrainer, trl.RLOOConfig, preset_model_dir, tmp_path, **CASES[case])
    assert len(ours) == len(theirs) == 2
    for step, (mine, peer) in enumerate(zip(ours, theirs, strict=True), start=1):
        names = set(peer) - IGNORED
        assert names <= set(mine), f"step {step}: metrics TRL logs but fusedrl does not: {names - set(mine)}"
        for name in sorted(names):
            if peer[name] is None:
                continue
            assert math.isfinite(mine[name]), f"step {step} {name} = {mine[name]}"
            assert_close(torch.tensor(mine[name]), torch.tensor(peer[name]), name=f"step {step} {name}",
                         rtol=1e-5, atol=1e-6)
    assert moved == trainable, f"parameters that never moved: {sorted(trainable - moved)}"


def test_trl_defaults_and_reference(preset_model_dir, tmp_path):
    config = RLOOConfig(str(tmp_path), bf16=False, report_to="none")
    assert (config.num_generations, config.beta, config.learning_rate, config.normalize_advantages) == (
        2, 0.05, 1e-6, False)
    _, _, _, trainer = _run(RLOOTrainer, RLOOConfig, preset_model_dir, tmp_path, max_steps=1)
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    _, _, _, trainer = _run(RLOOTrainer, RLOOConfig, preset_model_dir, tmp_path, max_steps=1, beta=0.0)
    assert trainer.ref_model is None


def test_leave_one_out_advantages_in_the_trainer(preset_model_dir, tmp_path):
    """G = 2, rewards [1, 0, 0.5, 0.5] (beta 0): each baseline is the sibling's reward -> [1, -1, 0, 0];
    one group has zero spread -> frac_reward_zero_std 0.5."""
    _, _, _, trainer = _run(RLOOTrainer, RLOOConfig, preset_model_dir, tmp_path, max_steps=1, beta=0.0,
                            num_generations=2)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.0], [0.5, 0.0]])
    trainer._metrics["train"].clear()
    advantages = trainer._advantages(rewards, {}, 2, "train")
    assert advantages.tolist() == [1.0, -1.0, 0.0, 0.0]
    assert trainer._metrics["train"]["frac_reward_zero_std"] == [0.5]


@pytest.mark.parametrize("backend", ["reference", "compiled", "triton"])
def test_policy_loss_flag_selects_what_runs(preset_model_dir, tmp_path, monkeypatch, backend):
    """One step, one micro-batch: the selected implementation of the policy-loss op (spied on in its module) runs
    once, on the [B, 1] summed log-probs, and the other two never."""
    spies = spy_policy_backends(monkeypatch)
    logs, _, _, _ = _run(RLOOTrainer, RLOOConfig, preset_model_dir, tmp_path, max_steps=1,
                         kernels=f"all=reference,policy_loss={backend}")
    assert math.isfinite(logs[0]["loss"])
    assert {key: spy.call_count for key, spy in spies.items()} == {key: int(key == backend) for key in spies}
    assert spies[backend].call_args.args[0].shape == (8, 1)


def test_single_generation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="RLOO needs num_generations >= 2"):
        RLOOConfig(str(tmp_path), **{**BASE, "num_generations": 1})
    with pytest.raises(ValueError, match="reward_clip_range must be"):
        RLOOConfig(str(tmp_path), **{**BASE, "reward_clip_range": [1.0, 0.0]})
